"""The kernel fast path seen from outside: real daemons, real TLS, namespaces.

A ``Rig`` is one test's network and daemons: the namespaces proxy
(198.18.0.2: the media-dispatcher), relay1 (198.18.0.5: the media-relay),
caller (.10) and callee (.20) on one bridge (``tests.support.netns``); the
dispatcher runs through ``recording_dispatcher.py``, which appends every
session it accounts (the statistics of a `remove` reply or an `expired`
report) to a JSON-lines file.

``MediaParty`` is a phone's media: an RTP and an RTCP socket that live in the
caller's or the callee's namespace (created from this process), counting what
they send (packets, UDP payload bytes) and keeping what they receive with its
source. ``pump`` makes two parties talk at a steady rate.

Inspection happens inside the relay's namespace: ``conntrack -L -m MARK``
for the relay's entries, ``iptables-legacy -t raw -S`` for its inhibitor
rules (python-iptables uses the legacy backend, not the nft one).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.helpers import Daemon, Management, dispatcher_socket, start_dispatcher, start_relay
from tests.integration.daemons import ProxyClient, parse_address_reply, rtp_packet
from tests.support.certs import make_certs_dir
from tests.support.netns import Topology
from tests.support.processes import wait_for

HERE = Path(__file__).resolve().parent
RECORDING_DISPATCHER = HERE / "recording_dispatcher.py"

HOSTS = ("proxy", "relay1", "caller", "callee")
RELAY_HOST = "relay1"
MARK = 0x4D50
RULE_COMMENT = "mediaproxy"
PORT_RANGE = (50000, 50100)
CALLER_PORT = 6000
CALLEE_PORT = 7000
RTP, RTCP = 0, 1
# 198.18.0.0/15 is not public: without this the relay would drop a party's
# packets until the other party is latched; with it every packet is delivered.
RELAY_OPTIONS = {"kernel_forwarding": "yes", "routable_private_ranges": "198.18.0.0/15"}
SHORT_UDP_TIMEOUTS = {
    "net.netfilter.nf_conntrack_udp_timeout_stream": "3",
    "net.netfilter.nf_conntrack_udp_timeout": "3",
}


# -- the relay's conntrack entries and iptables rules --


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    sport: int
    dport: int


@dataclass
class ConntrackEntry:
    orig: Flow
    reply: Flow
    mark: int
    orig_packets: int | None
    reply_packets: int | None
    line: str

    @classmethod
    def parse(cls, line: str) -> "ConntrackEntry":
        values: dict[str, list[str]] = {}
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            values.setdefault(key, []).append(value)

        def flow(n: int) -> Flow:
            return Flow(values["src"][n], values["dst"][n], int(values["sport"][n]), int(values["dport"][n]))

        packets = values.get("packets", [])
        return cls(
            flow(0),
            flow(1),
            int(values.get("mark", ["0"])[0]),
            int(packets[0]) if len(packets) > 0 else None,
            int(packets[1]) if len(packets) > 1 else None,
            line,
        )


def conntrack_entries(
    topo: Topology, host: str = RELAY_HOST, mark: int = MARK, family: str = "ipv4"
) -> list[ConntrackEntry]:
    """The UDP entries of ``family`` (ipv4 or ipv6) with ``mark`` in ``host``'s namespace
    (``conntrack -L -f FAMILY -m MARK``)."""
    output = topo.run(host, ["conntrack", "-L", "-f", family, "-p", "udp", "-m", hex(mark)]).stdout
    return [ConntrackEntry.parse(line) for line in output.splitlines() if "src=" in line]


def udp_listening_ports(topo: Topology, host: str = RELAY_HOST) -> set[int]:
    """The local ports of the UDP sockets in ``host``'s namespace (``ss -Hnua``)."""
    output = topo.run(host, ["ss", "-Hnua"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in output.splitlines() if line.strip()}


def raw_rules(topo: Topology, host: str = RELAY_HOST, command: str = "iptables-legacy") -> list[str]:
    """The raw table's rules in ``host`` (``iptables-legacy -t raw -S``; ``ip6tables-legacy`` for
    IPv6), policies left out."""
    output = topo.run(host, [command, "-t", "raw", "-S"]).stdout
    return [line for line in output.splitlines() if line.startswith("-A ")]


def ipset_members(topo: Topology, name: str, host: str = RELAY_HOST) -> list[str]:
    """The members of the ipset ``name`` in ``host`` (read with pyroute2: no ipset tool here)."""
    script = (
        "import sys\nfrom pyroute2 import IPSet\nsets = IPSet()\n"
        "for message in sets.list(sys.argv[1]):\n"
        "    adt = message.get_attr('IPSET_ATTR_ADT')\n"
        "    for data in (adt.get_attrs('IPSET_ATTR_DATA') if adt else []):\n"
        "        print(data)\n"
    )
    return topo.run(host, [sys.executable, "-c", script, name]).stdout.splitlines()


def relay_rules(topo: Topology, host: str = RELAY_HOST) -> list[str]:
    """The raw-table NOTRACK rules of single flows that carry the relay's comment: none should
    stay. (The standing rule of the relay's inhibitor ipset, whose members come and go
    within one netlink batch, is not one of them: see `inhibitor_set_rules`.)"""
    return [rule for rule in raw_rules(topo, host) if RULE_COMMENT in rule and "--match-set" not in rule]


def inhibitor_set_rules(topo: Topology, host: str = RELAY_HOST) -> list[str]:
    """The relay's standing NOTRACK rule for the flows of its inhibitor ipset."""
    return [rule for rule in raw_rules(topo, host) if RULE_COMMENT in rule and "--match-set" in rule]


# -- the parties --


def stun_binding_request() -> bytes:
    """A STUN Binding Request (RFC 5389): type, length 0, magic cookie, transaction id."""
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + random.randbytes(12)


def rtcp_packet(ssrc: int) -> bytes:
    """A receiver report without report blocks (8 bytes)."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


class MediaParty:
    """RTP on ``port`` and RTCP on ``port + 1`` of ``host``'s address, inside its namespace."""

    def __init__(self, topo: Topology, host: str, port: int, payload_type: int, ip: str | None = None) -> None:
        self.topo = topo
        self.host = host
        self.ip = ip or topo.address(host)         # an IPv6 address: a phone that speaks IPv6
        self.family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        self.payload_type = payload_type
        self.ssrc = random.getrandbits(32)
        self.seq = 0
        self.sent_packets = 0           # RTP + RTCP, as the relay's statistics count them
        self.sent_bytes = 0             # UDP payload
        self.received: dict[int, list[tuple[bytes, tuple[str, int]]]] = {RTP: [], RTCP: []}
        self.sockets: dict[int, socket.socket] = {}
        self.bind(port)

    def bind(self, port: int) -> None:
        """(Re)open the sockets on ``port``/``port + 1`` (a phone that moved)."""
        self.close()
        self.port = port
        for component in (RTP, RTCP):
            sock = self.topo.socket(self.host, family=self.family, type=socket.SOCK_DGRAM)
            sock.bind((self.ip, port + component))
            sock.setblocking(False)
            self.sockets[component] = sock

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}

    def media(self, direction: str = "sendrecv", media_type: str = "audio") -> str:
        return f"{media_type}:{self.ip}:{self.port}:{direction}"

    def _send(self, component: int, data: bytes, destination: tuple[str, int]) -> None:
        self.sockets[component].sendto(data, (destination[0], destination[1] + component))
        self.sent_packets += 1
        self.sent_bytes += len(data)

    def send_rtp(self, destination: tuple[str, int]) -> None:
        self.seq += 1
        self._send(RTP, rtp_packet(self.payload_type, self.seq, self.ssrc), destination)

    def send_stun(self, destination: tuple[str, int]) -> None:
        self._send(RTP, stun_binding_request(), destination)

    def send_rtcp(self, destination: tuple[str, int]) -> None:
        self._send(RTCP, rtcp_packet(self.ssrc), destination)

    def drain(self) -> int:
        """Read what is waiting; the number of packets read."""
        count = 0
        for component, sock in self.sockets.items():
            while True:
                try:
                    data, source = sock.recvfrom(65536)
                    self.received[component].append((data, source[:2]))
                except BlockingIOError:
                    break
                count += 1
        return count

    def received_count(self, component: int | None = None) -> int:
        if component is not None:
            return len(self.received[component])
        return sum(len(packets) for packets in self.received.values())

    def sources(self, component: int) -> set[tuple[str, int]]:
        return {source for _, source in self.received[component]}


def pump(
    caller: MediaParty,
    callee: MediaParty,
    call: "Call",
    packets: int,
    rate: float = 150.0,
    rtcp_every: int | None = 10,
) -> None:
    """Both parties send ``packets`` RTP packets at ``rate`` per second (and
    one RTCP packet every ``rtcp_every``, from the first on), reading what
    arrives; then wait until nothing more arrives."""
    pump_streams([(caller, callee, call.caller_facing, call.callee_facing)], packets, rate, rtcp_every)


def pump_streams(streams, packets: int, rate: float = 150.0, rtcp_every: int | None = 10) -> None:
    """``pump`` for several streams at once: (caller, callee, caller_facing, callee_facing) each."""
    interval = 1.0 / rate
    parties = [party for caller, callee, _, _ in streams for party in (caller, callee)]
    start = time.monotonic()
    for n in range(packets):
        for caller, callee, caller_facing, callee_facing in streams:
            caller.send_rtp(caller_facing)
            callee.send_rtp(callee_facing)
            if rtcp_every and n % rtcp_every == 0:
                caller.send_rtcp(caller_facing)
                callee.send_rtcp(callee_facing)
        for party in parties:
            party.drain()
        delay = start + (n + 1) * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    settle(*parties)


def settle(*parties: MediaParty, quiet: float = 0.3, timeout: float = 5.0) -> None:
    """Read until no party has received anything for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline:
        if sum(party.drain() for party in parties):
            last = time.monotonic()
        elif time.monotonic() - last >= quiet:
            return
        time.sleep(0.02)


@dataclass
class Call:
    """A call set up through the proxy socket: offer (caller's SDP), answer (callee's SDP)."""

    proxy: ProxyClient
    call_id: str
    caller: MediaParty
    callee: MediaParty
    relay_ip: str = ""
    caller_facing_port: int = 0          # where the caller sends (told in the answer)
    callee_facing_port: int = 0          # where the callee sends (told in the offer)
    cseq: int = 0
    direction: str = "sendrecv"          # of both parties' SDP in the next exchange ("inactive": hold)

    def __post_init__(self) -> None:
        self.negotiate()

    def negotiate(self) -> None:
        """An offer/answer exchange with the next CSeq (the first one, or a re-INVITE)."""
        self.cseq += 1
        to_tag = "callee-tag" if self.cseq > 1 else ""
        offer = self.proxy.update(
            self.call_id, "request", self.caller.media(self.direction), to_tag=to_tag, cseq=self.cseq)
        relay_ip, (callee_facing,) = parse_address_reply(offer)
        answer = self.proxy.update(
            self.call_id, "reply", self.callee.media(self.direction), to_tag="callee-tag", cseq=self.cseq)
        ip, (caller_facing,) = parse_address_reply(answer)
        assert ip == relay_ip, f"the answer names relay {ip}, the offer {relay_ip}"
        if self.relay_ip:
            assert (relay_ip, caller_facing, callee_facing) == (
                self.relay_ip, self.caller_facing_port, self.callee_facing_port,
            ), "a re-offer of the same stream got other ports"  # fmt: skip
        self.relay_ip, self.caller_facing_port, self.callee_facing_port = relay_ip, caller_facing, callee_facing

    @property
    def caller_facing(self) -> tuple[str, int]:
        return (self.relay_ip, self.caller_facing_port)

    @property
    def callee_facing(self) -> tuple[str, int]:
        return (self.relay_ip, self.callee_facing_port)

    def remove(self) -> str:
        return self.proxy.remove(self.call_id)

    def expected_entries(self) -> dict[int, tuple[Flow, Flow]]:
        """Per component, the (original, reply) tuples of the relay's NAT entry."""
        return {
            component: (
                Flow(self.caller.ip, self.relay_ip, self.caller.port + component, self.caller_facing_port + component),
                Flow(self.callee.ip, self.relay_ip, self.callee.port + component, self.callee_facing_port + component),
            )
            for component in (RTP, RTCP)
        }


# -- the rig --


@dataclass
class Rig:
    topo: Topology
    workdir: Path
    certs_path: Path
    dispatcher: Daemon
    accounting_file: Path
    management: Management
    relays: list[Daemon] = field(default_factory=list)
    proxies: list[ProxyClient] = field(default_factory=list)
    parties: list[MediaParty] = field(default_factory=list)
    link_ip: str = ""           # the address the dispatcher knows the relay by, when not relay_ip (an IPv6 link)

    @property
    def relay_ip(self) -> str:
        return self.topo.address(RELAY_HOST)

    @property
    def relay(self) -> Daemon:
        return self.relays[-1]

    def start_relay(self, options: dict[str, object] | None = None, wait: bool = True, wrapper=()) -> Daemon:
        relay = start_relay(
            self.topo,
            self.workdir,
            self.certs_path,
            host=RELAY_HOST,
            port_range=PORT_RANGE,
            extra={"Relay": {**RELAY_OPTIONS, **(options or {})}},
            wait=wait,
            wrapper=wrapper,
        )
        self.relays.append(relay)
        return relay

    def proxy(self) -> ProxyClient:
        client = ProxyClient(dispatcher_socket(self.dispatcher))
        self.proxies.append(client)
        return client

    def party(self, host: str, port: int, payload_type: int, ip: str | None = None) -> MediaParty:
        party = MediaParty(self.topo, host, port, payload_type, ip)
        self.parties.append(party)
        return party

    def close(self) -> None:
        for client in self.proxies:
            client.close()
        for party in self.parties:
            party.close()

    # -- what the dispatcher says --

    def summary(self) -> dict:
        """The relay's `summary` entry (through the dispatcher's management port)."""
        ip = self.link_ip or self.relay_ip
        entries = [entry for entry in self.management.summary() if entry.get("ip") == ip]
        assert len(entries) == 1, f"summary lists relay {ip} {len(entries)} times: {entries}"
        return entries[0]

    def wait_relay_listed(self, timeout: float = 15.0) -> dict:
        """Wait until the dispatcher lists the relay (by link_ip or relay_ip) as active; its summary."""
        ip = self.link_ip or self.relay_ip

        def listed_active():
            self.relay.process.assert_running()
            return next((entry for entry in self.management.summary()
                         if entry.get("ip") == ip and entry.get("status") == "active"), None)

        return wait_for(listed_active, timeout=timeout, interval=0.1, message=f"the dispatcher to list relay {ip}")

    def sessions(self) -> list[dict]:
        return self.management.sessions()

    def session(self, call_id: str) -> dict:
        sessions = [session for session in self.sessions() if session["call_id"] == call_id]
        assert len(sessions) == 1, f"`sessions` lists {call_id} {len(sessions)} times: {self.sessions()}"
        return sessions[0]

    def accounted(self, call_id: str) -> list[dict]:
        """The statistics the dispatcher accounted for ``call_id`` (remove replies, expired reports)."""
        try:
            lines = self.accounting_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [record for record in map(json.loads, lines) if record["call_id"] == call_id]

    def wait_accounted(self, call_id: str, timeout: float = 5.0) -> dict:
        records = wait_for(
            lambda: self.accounted(call_id), timeout=timeout, interval=0.1, message=f"{call_id} to be accounted"
        )
        assert len(records) == 1, f"{call_id} accounted {len(records)} times: {records}"
        return records[0]

    # -- what the relay's namespace holds --

    def entries(self) -> list[ConntrackEntry]:
        return conntrack_entries(self.topo)

    def listening_ports(self) -> set[int]:
        return udp_listening_ports(self.topo)

    def inhibitor_rules(self) -> list[str]:
        return relay_rules(self.topo)


def build_rig(
    topo: Topology, results_dir: Path, dispatcher_extra: dict | None = None, san_ips: tuple[str, ...] = ()
) -> tuple[Rig, Path]:
    """Certificates, the recording dispatcher in ``proxy``; the relay is the test's to start.

    The accounting file goes to ``results_dir``; daemon directories under a
    short temporary directory (a UNIX socket path has at most 107 bytes),
    which the caller removes (returned second).
    """
    workdir = Path(tempfile.mkdtemp(prefix="mpk-"))
    try:
        certs = make_certs_dir(
            workdir / "tls",
            dispatcher_san_ips=(topo.address("proxy"), *san_ips),
            relay_san_ips=(topo.address(RELAY_HOST), *san_ips),
        )
        accounting_file = results_dir / "accounting.jsonl"
        dispatcher = start_dispatcher(
            topo,
            workdir,
            certs.path,
            script=RECORDING_DISPATCHER,
            arguments=("--accounting-file", str(accounting_file)),
            extra=dispatcher_extra,
        )
        rig = Rig(topo, workdir, certs.path, dispatcher, accounting_file, Management(topo))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return rig, workdir


def stream_counters(stream: dict) -> dict[str, int]:
    return {key: stream[key] for key in ("caller_packets", "callee_packets", "caller_bytes", "callee_bytes")}


def sent_counters(caller: MediaParty, callee: MediaParty) -> dict[str, int]:
    return {
        "caller_packets": caller.sent_packets,
        "callee_packets": callee.sent_packets,
        "caller_bytes": caller.sent_bytes,
        "callee_bytes": callee.sent_bytes,
    }


def wait_kernel_entries(rig, count):
    """Wait until the relay's summary says ``count`` sub-streams are in the kernel."""
    return wait_for(
        lambda: (summary := rig.summary())["kernel_entries"] == count and summary,
        timeout=5,
        interval=0.1,
        message=f"the relay to report {count} kernel entries",
    )


def kernel_call(rig, call_id: str, payload_type: int = 0, packets: int = 100, port_offset: int = 0):
    """A call whose parties sent ``packets`` each, so that its RTP and RTCP are in the kernel:
    (caller, callee, call)."""
    caller = rig.party("caller", CALLER_PORT + port_offset, payload_type=payload_type)
    callee = rig.party("callee", CALLEE_PORT + port_offset, payload_type=payload_type)
    call = Call(rig.proxy(), call_id, caller, callee)
    pump(caller, callee, call, packets=packets)
    wait_kernel_entries(rig, 2)
    return caller, callee, call
