"""Faults under load (issue 9 item 5): while 200 calls run through two relays
on the kernel path and 20 a second start and end, one relay is killed, a
relay's link to the dispatcher is cut for 15 s, and the dispatcher restarts.
After each, the relays hold exactly what the running calls need (sessions,
port pairs, kernel entries, no stray inhibitor rule); at the end nothing is
left and every call that ended has exactly one accounting record. (A full
disk under the dispatcher is tests/integration/test_disk_full.py.)"""

import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import Management, dispatcher_socket, start_dispatcher, start_relay
from tests.integration.daemons import ProxyClient, parse_address_reply
from tests.kernel.helpers import RECORDING_DISPATCHER, RELAY_OPTIONS, MediaParty, conntrack_entries, relay_rules
from tests.support.certs import make_certs_dir
from tests.support.processes import wait_for

pytestmark = pytest.mark.timeout(280)

HOSTS = ("proxy", "relay1", "relay2", "caller", "callee")
RELAYS = ("relay1", "relay2")
CALLS = 200
CHURN = 20                       # calls ended and started a second
PORT_RANGES = {"relay1": (50000, 52000), "relay2": (52000, 54000)}
# Streams whose remove was lost (the link was cut) end by themselves: short conntrack and stream timeouts.
SYSCTLS = {relay: {"net.netfilter.nf_conntrack_udp_timeout_stream": "6",
                   "net.netfilter.nf_conntrack_udp_timeout": "6"} for relay in RELAYS}
DISPATCHER_PORT = 25060


class Load:
    """Calls through the dispatcher's proxy socket, their parties sending RTP and RTCP."""

    def __init__(self, topo, socket_path):
        self.topo = topo
        self.proxy = ProxyClient(socket_path, timeout=15)
        self.socket_path = socket_path
        self.active = collections.OrderedDict()      # call_id -> (relay ip, caller, callee, facing ports)
        self.ended = {}                               # call_id -> how: "removed", "unanswered remove", "lost"
        self.serial = 0
        self.free_ports = collections.deque(range(10000, 30000, 2))

    def reconnect(self):
        self.proxy.close()
        self.proxy = ProxyClient(self.socket_path, timeout=15)

    def start(self, count):
        started = []
        for _ in range(count):
            self.serial += 1
            call_id = f"load-{self.serial}"
            port = self.free_ports.popleft()
            caller = MediaParty(self.topo, "caller", port, 0)
            callee = MediaParty(self.topo, "callee", port, 8)
            ip, (callee_facing,) = parse_address_reply(self.proxy.update(call_id, "request", caller.media()))
            _, (caller_facing,) = parse_address_reply(self.proxy.update(call_id, "reply", callee.media(),
                                                                        to_tag="callee-tag"))
            self.active[call_id] = (ip, caller, callee, (ip, caller_facing), (ip, callee_facing))
            started.append((call_id, ip))
        return started

    def end(self, count, on=None):
        """End the oldest `count` calls (of relay ip `on`, if given) with the proxy's remove."""
        for call_id in [c for c, v in self.active.items() if on is None or v[0] == on][:count]:
            answer = self.proxy.remove(call_id)
            self.ended[call_id] = "removed" if answer == "removed" else "unanswered remove"
            self._drop(call_id)

    def lost(self, relay_ip):
        """The calls of a relay that died: their phones hang up without a remove reaching it."""
        for call_id in [c for c, v in self.active.items() if v[0] == relay_ip]:
            self.ended[call_id] = "lost"
            self._drop(call_id)

    def _drop(self, call_id):
        _, caller, callee, _, _ = self.active.pop(call_id)
        caller.close()
        callee.close()
        self.free_ports.append(caller.port)

    def pump(self, tick=0):
        for _, caller, callee, caller_facing, callee_facing in self.active.values():
            caller.send_rtp(caller_facing)
            callee.send_rtp(callee_facing)
            if tick % 10 == 0:
                caller.send_rtcp(caller_facing)
                callee.send_rtcp(callee_facing)
            caller.drain()
            callee.drain()

    def run_for(self, seconds, churn=CHURN, on=None):
        """Media every 0.2 s, `churn` calls ended and started every second; the relays new calls got."""
        placed = []
        end = time.monotonic() + seconds
        tick = 0
        while time.monotonic() < end:
            second = time.monotonic()
            self.end(churn, on)
            placed.extend(ip for _, ip in self.start(churn))
            while time.monotonic() - second < 1.0:
                self.pump(tick)
                tick += 1
                time.sleep(0.2)
        return placed

    def close(self):
        for call_id in list(self.active):
            self._drop(call_id)
        self.proxy.close()


def assert_nothing_leaked(load, management, topo, ip):
    """With the churn paused and the new calls' media latched: the relays hold exactly what the
    running calls need (their sessions, two port pairs and two kernel entries a call, no flow's
    inhibitor rule left over)."""
    load.run_for(3, churn=0)

    def exact():
        if {s["call_id"] for s in management.sessions()} != set(load.active):
            return False
        summary = {entry["ip"]: entry for entry in management.summary()}
        for host, address in ip.items():
            calls = sum(1 for v in load.active.values() if v[0] == address)
            if summary.get(address, {}).get("port_pairs", {}).get("used") != 2 * calls \
                    or len(conntrack_entries(topo, host)) != 2 * calls or relay_rules(topo, host):
                return False
        return True
    wait_for(exact, timeout=20, interval=0.5, message="the relays to hold just what the running calls need")


def accounting(path):
    try:
        return collections.Counter(json.loads(line)["call_id"] for line in path.read_text().splitlines())
    except FileNotFoundError:
        return collections.Counter()


@pytest.fixture
def rig(kernel_tools, make_topology, tmp_path):
    topo = make_topology(HOSTS, SYSCTLS)
    workdir = Path(tempfile.mkdtemp(prefix="mpf-"))         # short: a UNIX socket path has at most 107 bytes
    certs = make_certs_dir(workdir / "tls", dispatcher_san_ips=(topo.address("proxy"),),
                           relay_san_ips=tuple(topo.address(r) for r in RELAYS))
    records = tmp_path / "accounting.jsonl"

    def dispatcher():
        return start_dispatcher(topo, workdir, certs.path, script=RECORDING_DISPATCHER,
                                arguments=("--accounting-file", str(records)),
                                extra={"Dispatcher": {"relay_timeout": 2, "log_level": "info"}})

    def relay(host):
        return start_relay(topo, workdir / host, certs.path, host=host, port_range=PORT_RANGES[host],
                           extra={"Relay": {**RELAY_OPTIONS, "stream_timeout": 8, "reconnect_delay": 1,
                                            "keepalive_interval": 2, "log_level": "info"}})

    try:
        yield topo, dispatcher, relay, records
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_faults_under_load_lose_nothing_and_leave_nothing(rig):
    topo, start_dispatcher_daemon, start_relay_daemon, records = rig
    dispatcher = start_dispatcher_daemon()
    relays = {host: start_relay_daemon(host) for host in RELAYS}
    ip = {host: topo.address(host) for host in RELAYS}
    management = Management(topo)
    load = Load(topo, dispatcher_socket(dispatcher))
    try:
        load.start(CALLS)
        load.run_for(3)
        assert {v[0] for v in load.active.values()} == set(ip.values())       # both relays carry calls

        # 1. relay2 is killed: new calls go to relay1; at its next start relay2 clears what the kernel
        #    kept of it; the dispatcher accounts the calls it lost, once each.
        relays["relay2"].process.stop(signum=9)
        load.lost(ip["relay2"])
        wait_for(lambda: ip["relay2"] not in {s.get("ip") for s in management.summary()}, timeout=10,
                 message="the dispatcher to see relay2 go")
        assert set(load.run_for(3)) == {ip["relay1"]}
        relays["relay2"] = start_relay_daemon("relay2")
        wait_for(lambda: conntrack_entries(topo, "relay2") == [] and relay_rules(topo, "relay2") == [],
                 timeout=10, message="relay2 to clear its old kernel entries and rules")
        lost = [c for c, how in load.ended.items() if how == "lost"]
        wait_for(lambda: all(accounting(records)[c] == 1 for c in lost), timeout=15,
                 message="the calls relay2 lost to be accounted")
        assert_nothing_leaked(load, management, topo, ip)

        # 2. relay1's link to the dispatcher is cut for 15 s (relay_timeout is 2 s): its calls' media
        #    goes on in the kernel, new calls go to relay2; when it is back, nothing is duplicated.
        #    (Only relay2's calls end meanwhile: relay1's would be removed there when it is back.)
        cut = ["-p", "tcp", "--dport", str(DISPATCHER_PORT), "-j", "DROP"]
        topo.run("relay1", ["iptables-legacy", "-I", "OUTPUT", *cut])
        try:
            placed = load.run_for(15, on=ip["relay2"])
            assert placed[-10 * CHURN:] == [ip["relay2"]] * (10 * CHURN)     # once the cut was noticed
        finally:
            topo.run("relay1", ["iptables-legacy", "-D", "OUTPUT", *cut])
        wait_for(lambda: any(s.get("ip") == ip["relay1"] and s.get("status") == "active"
                             for s in management.summary()), timeout=20, message="relay1 back")
        assert_nothing_leaked(load, management, topo, ip)
        load.run_for(3)

        # 3. the dispatcher restarts in the middle of it all
        dispatcher.process.stop()
        dispatcher = start_dispatcher_daemon()
        load.reconnect()
        wait_for(lambda: len(management.summary()) == 2, timeout=20, message="both relays back")
        load.run_for(3)
        assert_nothing_leaked(load, management, topo, ip)

        # Every call ends; nothing is left, and every call that ended is accounted once.
        load.end(len(load.active))
        for host in RELAYS:
            wait_for(lambda: not conntrack_entries(topo, host) and not relay_rules(topo, host), timeout=30,
                     message=f"{host}'s kernel entries and rules to go")
        wait_for(lambda: management.sessions() == [], timeout=30, message="no session left")
        for entry in management.summary():
            assert entry["port_pairs"]["used"] == 0 and entry["session_count"] == 0, entry
        wait_for(lambda: set(accounting(records)) >= set(load.ended), timeout=30,
                 message="every ended call accounted")
        counts = accounting(records)
        assert {c: counts[c] for c in load.ended if counts[c] != 1} == {}
        assert set(counts) <= set(load.ended) | set(load.active)
        for daemon in (dispatcher, *relays.values()):
            assert "Traceback" not in daemon.process.log_text()
    finally:
        load.close()
