"""The pieces of the call-flow tests: a ``Rig`` of real daemons, Kamailio and
sipp user agents in network namespaces, driven step by step.

Hosts (``tests.support.netns``): proxy 198.18.0.2 (media-dispatcher, then
Kamailio with its own config, ``kamailio.cfg`` here), relay1 198.18.0.5 and
relay2 198.18.0.6 (media-relay), caller .10 and callee .20 (sipp).

The dispatcher runs through ``tests/kernel/recording_dispatcher.py``: the
real one plus an accounting backend that appends the statistics of every
session that ends to a JSON-lines file, which is how a test reads what the
relay reported at the end of a call. Its ``[OpenSIPS] socket_path`` is
Kamailio's jsonrpcs datagram socket, so a call whose media died is ended in
Kamailio (``dlg.end_dlg``), which sends BYE to both sides.

sipp plays media with ``rtp_stream`` (a raw A-law file written by the test,
looped or played once; ``rtp_stream="pause"``/``"resume"`` around hold) from
``[media_port]``. Scenarios that must wait for the test at some point (hold
until the test saw it, hang up after a dispatcher restart, ...) wait for a
``STEP`` request, which ``Agent.step()`` sends to sipp's SIP port with the
call's Call-ID: the flows go as fast as the daemons allow and never depend
on a pause being long enough on a loaded machine. A scenario keeps the
dialog's To header in ``$to`` (a STEP is not part of the dialog, so
``[last_To:]`` after one would be wrong).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    MEDIA_PORT,
    SIP_PORT,
    Daemon,
    Management,
    dispatcher_socket,
    fill_template,
    sipp_messages,
    start_dispatcher,
    start_relay,
)
from tests.kernel.helpers import RECORDING_DISPATCHER
from tests.support.certs import make_certs_dir
from tests.support.netns import Topology, wait_for_udp_bound, wait_for_unix_connections
from tests.support.pcap import Sdp, parse_sdp
from tests.support.processes import Process, wait_for

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
KAMAILIO_TEMPLATE = HERE / "kamailio.cfg"
KAMAILIO_CHILDREN = 2  # children= in kamailio.cfg: the workers that connect to the dispatcher

PORT_RANGES = {"relay1": (50000, 50100), "relay2": (52000, 52100)}
# 198.18.0.0/15 is not public: without it a relay holds a party's first packets
# until the other party is latched. reconnect_delay: back soon after a dispatcher restart.
RELAY_OPTIONS = {"routable_private_ranges": "198.18.0.0/15", "reconnect_delay": 1}
SHORT_UDP_TIMEOUTS = {
    "net.netfilter.nf_conntrack_udp_timeout_stream": "3",
    "net.netfilter.nf_conntrack_udp_timeout": "3",
}
# [Relay] kernel_forwarding for the flows run both ways: user space, and the kernel path.
FORWARDING = (pytest.param("no", id="userspace"), pytest.param("yes", id="kernel"))
TONE_SECONDS = 2  # the A-law file sipp streams: 2 s, 100 packets of 20 ms
# The ports of the streams the test sends itself (sipp binds 6000 and 6002), as in the scenarios' SDP.
VIDEO_PORT = 6010  # uac_video.xml, uas_video.xml
IMAGE_PORT = 6020  # uac_t38.xml, uas_t38.xml


def address(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


def write_tone(path: Path, seconds: float = TONE_SECONDS) -> Path:
    """A raw 8 kHz A-law file for sipp's rtp_stream (sent as is, 160 bytes a packet): a 440 Hz
    tone, crudely coded (nothing decodes it; it only has to be a payload that is not constant)."""
    frames = int(8000 * seconds)
    path.write_bytes(bytes((int(100 * math.sin(2 * math.pi * 440 * n / 8000)) & 0xFF) ^ 0x55 for n in range(frames)))
    return path


# -- Kamailio --


def render_kamailio_cfg(path: Path, listen_ip: str, rundir: Path, socket_path: Path, port: int = SIP_PORT) -> Path:
    return fill_template(KAMAILIO_TEMPLATE, path, {
        "LISTEN_IP": listen_ip,
        "LISTEN_PORT": str(port),
        "RUNDIR": str(rundir),
        "DISPATCHER_SOCKET": str(socket_path),
    })


# -- sipp --


@dataclass
class Agent:
    """A sipp user agent (one call) and the files it writes."""

    process: Process
    topo: Topology
    host: str
    port: int
    messages: Path
    errors: Path

    @property
    def address(self) -> str:
        return self.topo.address(self.host)

    def trace(self) -> list[tuple[str, str]]:
        return sipp_messages(self.messages)

    def received(self) -> list[str]:
        return [text for direction, text in self.trace() if direction == "received"]

    def received_sdps(self) -> list[Sdp]:
        """The SDP bodies this agent received, in order (the offers or answers it was given)."""
        return [parse_sdp(text) for text in self.received() if re.search(r"^\s*m=", text, re.MULTILINE)]

    def received_requests(self, method: str) -> list[str]:
        return [text for text in self.received() if text.startswith(f"{method} ")]

    def wait_message(self, direction: str, start: str, cseq: str | None = None, timeout: float = 15.0) -> str:
        """Wait until this agent has ``direction`` (``sent``|``received``) a message whose first
        line starts with ``start`` (e.g. ``ACK``, ``SIP/2.0 200``) and, if given, whose CSeq is
        ``cseq`` (e.g. ``2 ACK``): sipp writes its trace as it goes."""

        header = re.compile(rf"^CSeq:\s*{re.escape(cseq or '')}\s*$", re.MULTILINE | re.IGNORECASE)

        def seen():
            for way, text in self.trace():
                if way == direction and text.startswith(start) and (cseq is None or header.search(text)):
                    return text
            if self.process.poll() not in (None, 0):
                raise AssertionError(f"sipp on {self.host}:{self.port} failed:\n{self.error_log()}")
            return None

        what = f"{direction} {start}" + (f" (CSeq {cseq})" if cseq else "")
        return wait_for(seen, timeout=timeout, interval=0.1, message=f"sipp on {self.host}:{self.port} to have {what}")

    def step(self, call_id: str) -> None:
        """Let the scenario go on past its next ``<recv request="STEP"/>``."""
        with self.topo.socket(self.host, type=socket.SOCK_DGRAM) as sock:
            sock.bind((self.address, 0))
            port = sock.getsockname()[1]
            message = (
                f"STEP sip:{self.address}:{self.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {self.address}:{port};branch=z9hG4bK-step-{time.monotonic_ns()}\r\n"
                f"From: <sip:test@{self.address}>;tag=step\r\n"
                f"To: <sip:agent@{self.address}>\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 STEP\r\n"
                "Max-Forwards: 1\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            sock.sendto(message.encode(), (self.address, self.port))

    def error_log(self) -> str:
        try:
            return self.errors.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_success(self, timeout: float) -> None:
        """Wait for sipp to finish its call; fail with its errors unless it succeeded."""
        try:
            status = self.process.wait(timeout)
        except AssertionError:
            raise AssertionError(f"sipp on {self.host}:{self.port} still runs; errors:\n{self.error_log()}") from None
        if status != 0:
            raise AssertionError(
                f"sipp on {self.host}:{self.port} exited with {status}\n"
                f"errors:\n{self.error_log()}\nlog:\n{self.process.tail()}"
            )


# -- media the test sends itself (a second stream; sipp plays only one) --


def rtp(payload_type: int, seq: int, ssrc: int = 0x5EED) -> bytes:
    """An RTP packet with 160 bytes of payload."""
    return struct.pack("!BBHII", 0x80, payload_type & 0x7F, seq & 0xFFFF, seq * 160, ssrc) + bytes(160)


def udptl(seq: int) -> bytes:
    """A T.38 UDPTL packet (seq_number, then a primary IFP with a t30-indicator and no secondary):
    its first byte is not that of RTP version 2."""
    return struct.pack("!H", seq & 0xFFFF) + bytes((1, 0x00, 0x00))


class Endpoint:
    """A phone's socket for one stream: ``host``'s address, ``port``, in its namespace."""

    def __init__(self, topo: Topology, host: str, port: int) -> None:
        self.sock = topo.socket(host, type=socket.SOCK_DGRAM)
        self.sock.bind((topo.address(host), port))
        self.sock.setblocking(False)
        self.sent = 0
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data: bytes, destination: tuple[str, int]) -> None:
        self.sock.sendto(data, destination)
        self.sent += 1

    def drain(self) -> int:
        count = 0
        while True:
            try:
                self.received.append(self.sock.recvfrom(65536))
            except BlockingIOError:
                return count
            count += 1

    @property
    def sources(self) -> set[tuple[str, int]]:
        return {source for _, source in self.received}

    def close(self) -> None:
        self.sock.close()


def exchange(topo: Topology, port: int, caller_facing, callee_facing, make_packet, count: int, rate: float = 50.0):
    """The caller (to ``caller_facing``) and the callee (to ``callee_facing``) each send
    ``count`` packets ``make_packet(n)`` from ``port``, at ``rate`` per second, reading
    what arrives, until nothing more does; returns the two Endpoints (closed)."""
    caller, callee = Endpoint(topo, "caller", port), Endpoint(topo, "callee", port)
    try:
        start = time.monotonic()
        for n in range(count):
            caller.send(make_packet(n), caller_facing)
            callee.send(make_packet(n), callee_facing)
            caller.drain()
            callee.drain()
            delay = start + (n + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        quiet_since, deadline = time.monotonic(), time.monotonic() + 5
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.3:
            if caller.drain() + callee.drain():
                quiet_since = time.monotonic()
            time.sleep(0.02)
    finally:
        caller.close()
        callee.close()
    return caller, callee


# -- the rig --


@dataclass
class Rig:
    """One test's namespaces and daemons. Daemon directories (and their UNIX
    sockets) live in ``workdir``, a short temporary directory; sipp's traces
    in ``tmp_path/sipp``."""

    topo: Topology
    tmp_path: Path
    workdir: Path
    certs_path: Path
    accounting: Path
    dispatcher: Daemon | None = None
    kamailio: Process | None = None
    relays: dict[str, Daemon] = field(default_factory=dict)
    agents: list[Agent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.management = Management(self.topo)
        self.traces = self.tmp_path / "sipp"  # sipp's cwd: its traces, and tone.alaw (rtp_stream takes no keywords)
        self.traces.mkdir(parents=True, exist_ok=True)
        write_tone(self.traces / "tone.alaw")
        self._control_ports = iter(range(8888, 8988))

    @classmethod
    def build(cls, topo: Topology, tmp_path: Path) -> "Rig":
        workdir = Path(tempfile.mkdtemp(prefix="mpf-"))
        relays = [host for host in ("relay1", "relay2") if host in topo.hosts]
        certs = make_certs_dir(
            workdir / "tls",
            dispatcher_san_ips=(topo.address("proxy"),),
            relay_san_ips=tuple(topo.address(host) for host in relays),
        )
        return cls(topo, tmp_path, workdir, certs.path, tmp_path / "accounting.jsonl")

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- daemons --

    @property
    def kamailio_rundir(self) -> Path:
        return self.workdir / "kamailio"

    def start_dispatcher(self) -> Daemon:
        """The recording dispatcher; dialogs of dead calls are ended through Kamailio's jsonrpcs socket."""
        extra = {
            "OpenSIPS": {"socket_path": self.kamailio_rundir / "kamailio_rpc.sock", "proxy": "kamailio"},
        }
        self.dispatcher = start_dispatcher(
            self.topo,
            self.workdir,
            self.certs_path,
            extra=extra,
            script=RECORDING_DISPATCHER,
            arguments=("--accounting-file", str(self.accounting)),
        )
        return self.dispatcher

    def start_relay(self, host: str = "relay1", **options: object) -> Daemon:
        relay = start_relay(
            self.topo,
            self.workdir,
            self.certs_path,
            host=host,
            port_range=PORT_RANGES[host],
            extra={"Relay": {**RELAY_OPTIONS, **options}},
        )
        self.relays[host] = relay
        return relay

    def start_kamailio(self, timeout: float = 15.0) -> Process:
        """Kamailio in proxy; returns once it serves SIP and all its workers are connected to the dispatcher."""
        assert self.dispatcher is not None, "start the dispatcher first: Kamailio's workers connect at start"
        rundir = self.kamailio_rundir
        rundir.mkdir(parents=True, exist_ok=True)
        ip = self.topo.address("proxy")
        socket_path = dispatcher_socket(self.dispatcher)
        config = render_kamailio_cfg(rundir / "kamailio.cfg", ip, rundir, socket_path)
        process = self.topo.spawn(
            "proxy",
            ["kamailio", "-DD", "-E", "-m", "64", "-M", "8", "-f", config, "-Y", rundir],
            name="kamailio",
        )
        ns = self.topo.ns("proxy")
        try:
            wait_for_udp_bound(ns, SIP_PORT, ip, timeout=timeout)
            wait_for_unix_connections(ns, socket_path, KAMAILIO_CHILDREN, peer_command="kamailio", timeout=timeout)
        except AssertionError:
            process.assert_running()
            raise
        process.assert_running()
        self.kamailio = process
        return process

    def start(self, relays: tuple[str, ...] = ("relay1",), **relay_options: object) -> "Rig":
        """Dispatcher, relays, Kamailio: a platform ready for calls."""
        self.start_dispatcher()
        for host in relays:
            self.start_relay(host, **relay_options)
        self.start_kamailio()
        return self

    def stop_dispatcher(self) -> None:
        """SIGTERM: it saves its session table and exits."""
        assert self.dispatcher is not None
        process = self.dispatcher.process
        status = process.stop(timeout=10)
        assert status == 0, f"the dispatcher exited with {status} on SIGTERM:\n{process.tail()}"
        assert re.search(r"saved \d+ sessions to ", process.log_text()), process.tail()

    def restart_dispatcher(self) -> Daemon:
        """SIGTERM, then a new dispatcher in the same directories (it restores the table)."""
        self.stop_dispatcher()
        return self.start_dispatcher()

    def dispatcher_log(self) -> str:
        """The logs of every dispatcher process of the test, in order."""
        processes = self.topo.processes.processes
        return "".join(process.log_text() for process in processes if process.name.startswith("media-dispatcher"))

    # -- sipp --

    def sipp(
        self,
        host: str,
        scenario: str,
        name: str,
        remote: str | None = None,
        port: int = SIP_PORT,
        media_port: int = MEDIA_PORT,
        keys: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> Agent:
        """sipp in ``host`` running ``scenarios/<scenario>`` for one call; a UAC when ``remote``
        (``ip:port``) is given. ``keys`` become ``-key NAME VALUE``."""
        ip = self.topo.address(host)
        traces = self.traces
        messages, errors = traces / f"{name}-messages.log", traces / f"{name}-errors.log"
        argv = [
            "sipp", "-sf", SCENARIOS / scenario,
            "-i", ip, "-p", str(port), "-mi", ip, "-mp", str(media_port),
            "-cp", str(next(self._control_ports)),
            "-m", "1",
            # sipp's Call-ID is "%u-%p@%s" and every contained sipp is pid 2: name the call after the agent
            "-cid_str", f"%u-%p-{name}@%s",
            "-timeout", f"{int(timeout)}s", "-timeout_error",
            "-nostdin",
            "-trace_msg", "-message_file", messages,
            "-trace_err", "-error_file", errors,
        ]  # fmt: skip
        for key, value in (keys or {}).items():
            argv += ["-key", key, value]
        if remote is not None:
            argv.append(remote)
        process = self.topo.spawn(host, argv, name=name, cwd=traces)
        agent = Agent(process, self.topo, host, port, messages, errors)
        self.agents.append(agent)
        if remote is None:  # a UAS: ready once it listens
            try:
                wait_for_udp_bound(self.topo.ns(host), port, ip, timeout=10)
            except AssertionError:
                process.assert_running()
                raise
        return agent

    def call(
        self,
        uac_scenario: str,
        uas_scenario: str,
        name: str = "",
        port: int = SIP_PORT,
        media_port: int = MEDIA_PORT,
        caller_keys: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[Agent, Agent]:
        """A callee (UAS) in callee and a caller (UAC) in caller that calls it through Kamailio."""
        suffix = f"-{name}" if name else ""
        callee = self.sipp("callee", uas_scenario, f"uas{suffix}", port=port, media_port=media_port, timeout=timeout)
        keys = {"request_uri": f"sip:service@{self.topo.address('callee')}:{port}", **(caller_keys or {})}
        caller = self.sipp(
            "caller",
            uac_scenario,
            f"uac{suffix}",
            remote=f"{self.topo.address('proxy')}:{SIP_PORT}",
            port=port,
            media_port=media_port,
            keys=keys,
            timeout=timeout,
        )
        return caller, callee

    # -- what the dispatcher says --

    def sessions(self) -> list[dict]:
        return self.management.sessions()

    def summary(self) -> list[dict]:
        return self.management.summary()

    def relay_summary(self, host: str) -> dict:
        ip = self.topo.address(host)
        entries = [entry for entry in self.summary() if entry.get("ip") == ip]
        assert len(entries) == 1, f"summary lists relay {ip} {len(entries)} times: {entries}"
        return entries[0]

    def wait_relay(self, host: str, status: str = "active", timeout: float = 15.0) -> dict:
        """Wait until the dispatcher lists ``host``'s relay with ``status``; its summary."""
        ip = self.topo.address(host)

        def listed():
            return next((s for s in self.summary() if s.get("ip") == ip and s.get("status") == status), None)

        return wait_for(listed, timeout=timeout, interval=0.2, message=f"the dispatcher to list {host} as {status}")

    def wait_kernel_entries(self, host: str = "relay1", at_least: int = 1, timeout: float = 5.0) -> dict:
        """Wait until ``host``'s relay reports ``at_least`` kernel forwarding entries; its summary."""

        def enough():
            summary = self.relay_summary(host)
            return summary if summary.get("kernel_entries", 0) >= at_least else None

        return wait_for(enough, timeout=timeout, interval=0.2, message=f"{at_least} kernel entries on {host}")

    def wait_session(self, predicate, message: str, timeout: float = 15.0) -> dict:
        """The first session of `sessions` for which ``predicate(session)`` holds (a sipp
        of the test that failed meanwhile ends the wait)."""

        def found():
            for agent in self.agents:
                if agent.process.poll() not in (None, 0):
                    raise AssertionError(f"sipp on {agent.host}:{agent.port} failed:\n{agent.error_log()}")
            for session in self.sessions():
                if predicate(session):
                    return session
            return None

        return wait_for(found, timeout=timeout, interval=0.2, message=message)

    def session(self, call_id: str) -> dict:
        sessions = [session for session in self.sessions() if session["call_id"] == call_id]
        assert len(sessions) == 1, f"`sessions` lists {call_id} {len(sessions)} times: {self.sessions()}"
        return sessions[0]

    def wait_no_sessions(self, timeout: float = 10.0) -> None:
        wait_for(lambda: self.sessions() == [], timeout=timeout, interval=0.2, message="`sessions` to be empty")

    def accounted(self, call_id: str) -> list[dict]:
        """The statistics the dispatcher recorded for ``call_id`` when it ended."""
        try:
            lines = self.accounting.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [record for record in map(json.loads, lines) if record["call_id"] == call_id]

    def wait_accounted(self, call_id: str, timeout: float = 10.0) -> dict:
        records = wait_for(
            lambda: self.accounted(call_id), timeout=timeout, interval=0.2, message=f"{call_id} to be accounted"
        )
        assert len(records) == 1, f"{call_id} accounted {len(records)} times: {records}"
        return records[0]


# -- what a session shows --


def audio_running(session: dict, packets: int = 10) -> bool:
    """One active G.711 A-law audio stream with traffic both ways."""
    streams = [stream for stream in session["streams"] if stream["status"] not in ("closed", "rejected")]
    return (
        len(streams) == 1
        and streams[0]["media_type"] == "audio"
        and streams[0]["status"] == "active"
        and streams[0]["caller_codec"] == streams[0]["callee_codec"] == "G711a"
        and min(streams[0]["caller_packets"], streams[0]["callee_packets"]) >= packets
    )


def stream_of(session: dict, media_type: str) -> dict:
    """The session's one stream of ``media_type``."""
    streams = [stream for stream in session["streams"] if stream["media_type"] == media_type]
    assert len(streams) == 1, f"{len(streams)} {media_type} streams in {session}"
    return streams[0]


def packets(stream: dict) -> tuple[int, int]:
    return stream["caller_packets"], stream["callee_packets"]


def assert_names_relay(sdp: Sdp, relay_ip: str, port_range: tuple[int, int], media: str = "audio") -> int:
    """The SDP's ``media`` stream points at the relay, on a port of its range; that port."""
    streams = [m for m in sdp.media if m.media == media]
    assert len(streams) == 1, f"{len(streams)} {media} streams in {sdp}"
    assert streams[0].connection == relay_ip, f"{media} goes to {streams[0].connection}, not the relay {relay_ip}"
    assert port_range[0] <= streams[0].port < port_range[1], f"{media} port {streams[0].port} not in {port_range}"
    return streams[0].port


def assert_no_traceback(text: str, who: str) -> None:
    if "Traceback" in text:
        start = max(text.index("Traceback") - 2000, 0)
        raise AssertionError(f"{who} logged a traceback:\n{text[start:start + 6000]}")

