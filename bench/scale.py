"""What one relay holds now that parked ports cost no descriptor (issue 8 items 2, 3, 4, 7).

    python -m bench.scale [--smoke]         # prints the result dict as JSON

One media-relay (kernel path on) and one media-dispatcher in the benchmark's
relay namespace (bench.topology, bench.relay); calls set up through the
dispatcher's proxy socket (update request, update reply), one audio stream
each, in waves: a wave's calls are set up, then both parties of every call
send RTP and RTCP (bench/tools/scalesend.c: one AF_PACKET socket in the
caller's and one in the callee's namespace, no socket per port) until the
relay has handed all four sub-stream directions to the kernel and parked
their ports. The relay's open sockets therefore stay about four per call of
one wave. Afterwards scalesend keeps every entry alive with one packet per
sub-stream and direction every few seconds.

Figures (KEYS):
  concurrent_calls          calls whose RTP and RTCP both have the relay's
                            conntrack entry at the end of the waves;
  memory_per_call_kb        (RSS relay + dispatcher at that point - RSS with
                            no call) / calls;
  cpu_percent_at_max_calls  both daemons' CPU (utime+stime, /proc/PID/stat)
                            over >= 30 s while the kernel carries the calls,
                            % of one core;
  sampling_ms_5000/_20000   one traffic sampling pass (RelayCore.sample_traffic
                            through KernelForwarding, what runs every
                            traffic_sampling_period) at 5,000 and 20,000 kernel
                            entries: bench/scale_sampling.py in a namespace of
                            its own, process CPU time (the machine is shared:
                            wall times are in the details);
  expiry_burst_lost         of E calls whose traffic stops at once (short UDP
                            timeouts in the relay namespace), how many the
                            dispatcher did not log as `expired`;
  restart_restore_s_10000   SIGTERM to the dispatcher with all the calls, start
                            it again: seconds from the start to the sessions
                            restored and the relay reconnected and reconciled
                            (the first `summary` through the management port
                            that lists the relay comes after the reconcile's
                            `sessions` answer on the same link).
Plus bench/scale_memory.py: bytes per session by source line and object type
in the sans-IO cores.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEYS = ("concurrent_calls", "memory_per_call_kb", "cpu_percent_at_max_calls", "sampling_ms_5000",
        "sampling_ms_20000", "expiry_burst_lost", "restart_restore_s_10000")
# key -> (target text, predicate, reference text)
TARGETS = {
    "concurrent_calls": ("10000", lambda v: v >= 10000, "about 5,000 (4 sockets a stream, 20,000 descriptors)"),
    "memory_per_call_kb": ("< 5", lambda v: v < 5, "10.7 (original MediaProxy)"),
    "cpu_percent_at_max_calls": ("< 5", lambda v: v < 5, None),
    "sampling_ms_5000": ("< 5", lambda v: v < 5, "13-28 at 4,000 (original MediaProxy)"),
    "sampling_ms_20000": (None, None, None),
    "expiry_burst_lost": ("0", lambda v: v == 0, None),
    "restart_restore_s_10000": ("< 2", lambda v: v < 2, None),
}
REFERENCE_VALUES = {"concurrent_calls": 5000, "memory_per_call_kb": 10.7, "sampling_ms_5000": 13.0}

TOOL = "scalesend"
CALLER_PORT0 = CALLEE_PORT0 = 10000       # party i: 10000 + 2i (RTP), +1 (RTCP), in its own namespace
RELAY_PORT_RANGE = (10000, 60000)         # 12,500 streams; the relay's own TCP ports are 60000+
RELAY_MARK = 0x4D50
EXPIRED_RE = re.compile(r"session (\S+) expired on relay")
LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


@dataclass
class Options:
    calls: int = 10000
    wave: int = 1000
    keepalive_period: float = 5.0          # each sub-stream direction once per period
    cpu_seconds: float = 35.0
    expiry_calls: int = 5000
    expiry_timeout: int = 8                # nf_conntrack_udp_timeout(_stream) for the burst
    sampling_entries: tuple = (5000, 20000)
    sampling_passes: int = 20
    memory_sessions: int = 2000
    profile: bool = True
    smoke: bool = False

    @classmethod
    def smoke_options(cls) -> "Options":
        return cls(calls=200, wave=100, keepalive_period=1.0, cpu_seconds=3.0, expiry_calls=100, expiry_timeout=3,
                   sampling_entries=(500, 2000), sampling_passes=5, memory_sessions=200, profile=False, smoke=True)


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the packet tool --

def build_tool(build_dir: Path = HERE / "build") -> Path:
    from bench.tools import build_tools

    return build_tools(build_dir, (TOOL,))[TOOL]


class Sender:
    """scalesend runs in the caller's and the callee's namespace."""

    def __init__(self, topo, binary: Path, tmp: Path):
        from bench.topology import CALLEE_IP, CALLER_IP, RELAY_IN, RELAY_OUT

        self.topo, self.binary, self.tmp = topo, binary, tmp
        self.sides = {"caller": (CALLER_IP, topo.mac("relay", RELAY_IN)),
                      "callee": (CALLEE_IP, topo.mac("relay", RELAY_OUT))}
        self.keepalive: dict[str, subprocess.Popen] = {}
        self.counter = 0

    def _files(self, calls) -> dict[str, Path]:
        from bench.topology import RELAY_IP

        self.counter += 1
        files = {}
        for side in self.sides:
            path = self.tmp / f"{side}-{self.counter}.streams"
            with open(path, "w") as f:
                for call in calls:
                    own, relay = ((call.caller_port, call.caller_facing) if side == "caller"
                                  else (call.callee_port, call.callee_facing))
                    f.write(f"{own} {RELAY_IP} {relay}\n{own + 1} {RELAY_IP} {relay + 1}\n")
            files[side] = path
        return files

    def _argv(self, side: str, path: Path, extra) -> list:
        from bench.tools import PDEATHSIG

        ip, mac = self.sides[side]
        return [*PDEATHSIG, *self.topo.command(side, [self.binary, "-i", "eth0", "-M", mac, "-a", ip, "-P", path,
                                                      *extra])]

    def burst(self, calls, rounds: int = 3, gap_ms: float = 200, rate: float = 50000) -> dict:
        """Every sub-stream of these calls, both directions at once, `rounds` times."""
        files = self._files(calls)
        procs = {side: subprocess.Popen(self._argv(side, files[side], ["-n", rounds, "-g", gap_ms, "-r", rate]),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL) for side in self.sides}
        out = {}
        for side, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"scalesend ({side}) failed: {stderr.strip()}")
            out[side] = json.loads(stdout)
        return out

    def keep_alive(self, calls, period: float) -> None:
        """Replace the keepalive senders by ones for these calls."""
        self.stop_keepalive()
        if not calls:
            return
        files = self._files(calls)
        for side in self.sides:
            self.keepalive[side] = subprocess.Popen(
                self._argv(side, files[side], ["-t", 3600, "-p", period]), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def stop_keepalive(self) -> dict:
        out = {}
        for side, proc in self.keepalive.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)       # setpriv and ip netns exec exec: this is scalesend
            try:
                stdout, _ = proc.communicate(timeout=10)
                out[side] = json.loads(stdout) if stdout.strip() else None
            except (subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.communicate()
        self.keepalive = {}
        return out


# -- calls --

def setup_wave(daemons, indices, clients: int = 4, timeout: float = 120.0):
    """Calls `indices` through the proxy socket, `clients` connections at once."""
    from bench.topology import CALLEE_IP, CALLER_IP

    return daemons.setup_calls(indices, CALLER_IP, CALLEE_IP, CALLER_PORT0, CALLEE_PORT0, clients, timeout,
                               prefix="scale")


# -- process figures --

def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def process_figures(daemons) -> dict:
    from bench.relay import cpu_seconds, rss_kb

    return {name: {"rss_kb": rss_kb(pid), "fds": fd_count(pid), "cpu_s": round(cpu_seconds(pid), 3)}
            for name, pid in daemons.pids().items()}


def log_times(text: str, pattern: str) -> list[float]:
    """Epoch seconds of the log lines matching `pattern` (the daemons log asctime, ms)."""
    out = []
    for line in text.splitlines():
        if re.search(pattern, line):
            match = LOG_TIME_RE.match(line)
            if match:
                stamp, ms = match.group(1).split(",")
                out.append(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000)
    return out


def kernel_calls(topo, calls) -> dict:
    """Calls whose RTP and RTCP have the relay's entry (conntrack -L -m MARK in the relay namespace)."""
    from bench import conntrack as ct
    from bench.topology import CALLER_IP, RELAY_IP

    entries = [e for e in ct.list_entries(topo, "-m", str(RELAY_MARK)) if e.src == CALLER_IP and e.dst == RELAY_IP]
    have = {(e.sport, e.dport) for e in entries}
    both = sum(1 for c in calls if (c.caller_port, c.caller_facing) in have
               and (c.caller_port + 1, c.caller_facing + 1) in have)
    return {"entries": len(entries), "calls_with_rtp_and_rtcp_entries": both}


# -- profiles --

def py_spy() -> str | None:
    path = Path(sys.executable).parent / "py-spy"
    return str(path) if path.exists() else shutil.which("py-spy")


def start_profile(pid: int, seconds: float, out: Path):
    tool = py_spy()
    if tool is None:
        return None
    return subprocess.Popen([tool, "record", "--nonblocking", "-r", "100", "-d", str(int(seconds)), "-f", "raw",
                             "-o", str(out), "--pid", str(pid)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 12, everything: bool = False) -> dict:
    """py-spy's raw (collapsed) stacks: samples per function anywhere on the stack (inclusive),
    restricted to mediaproxy/ and twisted's reactor, and per leaf function (self)."""
    inclusive, leaf, total = Counter(), Counter(), 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        seen = set()
        for frame in frames:
            name = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")" \
                if " (" in frame else frame
            if name not in seen:
                seen.add(name)
                inclusive[name] += n
        leaf[frames[-1].split(" (")[0]] += n
    interesting = {k: v for k, v in inclusive.items() if everything and "doPoll" not in k and "<module>" not in k
                   or any(s in k for s in ("core.py", "forwarding.py", "conntrack.py", "netlink.py", "ctnetlink.py",
                                           "iptables.py", "statistics.py", "service.py", "dispatchers.py",
                                           "relaylink.py", "parking.py", "streams.py", "session.py"))}
    if everything:      # the reactor's loop, Twisted's plumbing and the like say nothing
        plumbing = ("(log.py)", "(context.py)", "(posixbase.py)", "(tcp.py)", "(tls.py)", "(policies.py)",
                    "(endpoints.py)", "(base.py)", "(daemon.py)", "(defer.py)", "(epollreactor.py)", "(runpy>)")
        interesting = {k: v for k, v in interesting.items() if v < 0.9 * total and not k.endswith(plumbing)}
    return {"samples": total, "rate_hz": 100,
            "inclusive": dict(Counter(interesting).most_common(top)),
            "self": dict(leaf.most_common(top))}


# -- the scenario --

@dataclass
class State:
    figures: dict = field(default_factory=lambda: dict.fromkeys(KEYS))
    details: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def measure_sampling(topo, opts: Options, state: State) -> None:
    """bench/scale_sampling.py in a namespace of its own (one veth pair, the relay's address)."""
    from bench.topology import RELAY_IP, host_run

    ns = topo.prefix + "sampling"
    host_run(["ip", "netns", "add", ns])
    topo.created.append(ns)              # destroy() removes it with the others
    for argv in (["link", "set", "lo", "up"], ["link", "add", "s0", "type", "veth", "peer", "name", "s1"],
                 ["addr", "add", f"{RELAY_IP}/24", "dev", "s0"], ["link", "set", "s0", "up"],
                 ["link", "set", "s1", "up"]):
        host_run(["ip", "-n", ns, *argv])
    host_run(["ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
    argv = [sys.executable, "-m", "bench.scale_sampling", "--relay-ip", RELAY_IP,
            "--entries", ",".join(str(n) for n in opts.sampling_entries), "--passes", str(opts.sampling_passes)]
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=240,
                            cwd=REPO, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"bench.scale_sampling failed: {result.stderr.strip()[-1500:]}")
    data = json.loads(result.stdout)
    state.details["sampling"] = data
    runs = {run["entries"]: run for run in data["runs"]}
    for n, key in zip(sorted(opts.sampling_entries), ("sampling_ms_5000", "sampling_ms_20000")):
        state.figures[key] = runs[n]["sampling_pass"]["cpu_median_ms"]
    for n, run in sorted(runs.items()):
        log(f"sampling at {n} entries: pass {run['sampling_pass']['cpu_median_ms']} ms CPU "
            f"({run['sampling_pass']['median_ms']} ms wall); refresh_counters "
            f"{run['refresh_counters']['cpu_median_ms']} ms CPU ({run['refresh_counters']['median_ms']} ms wall)")
    host_run(["ip", "netns", "delete", ns], check=False)


def run_scenario(opts: Options, workdir: Path, state: State) -> None:
    from bench.relay import Daemons, shut_down
    from bench.topology import RoutedTopology
    from tests.support.processes import ProcessManager

    details, notes = state.details, state.notes
    binary = build_tool()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    details["nofile_limit"] = hard
    tmp = Path(tempfile.mkdtemp(prefix="mpb-scale-"))
    manager = ProcessManager(workdir / "logs")
    memory = subprocess.Popen([sys.executable, "-m", "bench.scale_memory", "--sessions", str(opts.memory_sessions)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              stdin=subprocess.DEVNULL)
    daemons = sender = None
    try:
        with RoutedTopology() as topo:
            try:
                topo.ping()
                # the parties have no sockets: what reaches them is dropped quietly (no ICMP back)
                for host in ("caller", "callee"):
                    topo.run(host, ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport",
                                    f"{CALLER_PORT0}:{CALLER_PORT0 + 2 * opts.calls + 1}", "-j", "DROP"])
                started = time.monotonic()
                try:
                    measure_sampling(topo, opts, state)
                except Exception as exc:
                    notes.append(f"sampling not measured: {type(exc).__name__}: {str(exc)[:300]}")
                    log(notes[-1])
                details["sampling_s"] = round(time.monotonic() - started, 1)

                if opts.smoke:
                    for key in ("nf_conntrack_udp_timeout_stream", "nf_conntrack_udp_timeout"):
                        topo.sysctl("relay", f"net.netfilter.{key}", str(opts.expiry_timeout))
                daemons = Daemons(topo, workdir, manager, RELAY_PORT_RANGE)
                daemons.start(relay_options={"reconnect_delay": 0.2})
                time.sleep(1.0)
                baseline = process_figures(daemons)
                details["baseline"] = baseline
                log(f"daemons running: {baseline}")
                sender = Sender(topo, binary, tmp)
                calls = waves(topo, daemons, sender, opts, state)
                at_max(topo, daemons, calls, baseline, opts, state, memory)
                restart(daemons, manager, opts, state)
                if opts.profile:
                    restart(daemons, manager, opts, state, profile=True)
                expiry(topo, daemons, sender, calls, opts, state)
            finally:
                if sender is not None:
                    sender.stop_keepalive()
                shut_down(daemons, manager)
    finally:
        if memory.poll() is None:
            memory.kill()
        memory.communicate()
        shutil.rmtree(tmp, ignore_errors=True)


def waves(topo, daemons, sender: Sender, opts: Options, state: State):
    from tests.support.processes import wait_for

    pids = daemons.pids()
    calls, per_wave = [], []
    peak_relay_fds = 0
    start_all = time.monotonic()
    for first in range(0, opts.calls, opts.wave):
        indices = range(first, min(first + opts.wave, opts.calls))
        diagnose = first == 0 and not opts.smoke
        if diagnose:
            # debug logging (SIGUSR1 toggles it) for the first wave only: the relay logs every port
            # its raw socket wakes up ("a packet from a new address to parked port")
            log_mark = len(daemons.relay.log_text())
            daemons.relay.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        t0 = time.monotonic()
        wave = setup_wave(daemons, indices)
        t1 = time.monotonic()
        fds_open = fd_count(pids["relay"])
        peak_relay_fds = max(peak_relay_fds, fds_open)
        calls.extend(wave)
        want = 2 * len(calls)
        summary = {}
        # Wait for the kernel entries only: the relay does not park every port of a wave
        # (see the notes: its raw socket wakes ports on packets from before the hand-over).
        for attempt in range(4):
            sender.burst(wave, rounds=3 if attempt == 0 else 2)
            try:
                summary = wait_for(lambda: (s := daemons.relay_summary()).get("kernel_entries", 0) >= want and s,
                                   timeout=5 if not opts.smoke else 3, interval=0.1, ignore=(OSError, ValueError))
                break
            except AssertionError:
                summary = daemons.relay_summary()
        t2 = time.monotonic()
        time.sleep(0.3)             # the last sockets are closed (parked) after the entries exist
        summary = daemons.relay_summary() or summary
        if diagnose:
            daemons.relay.send_signal(signal.SIGUSR1)
            text = daemons.relay.log_text()[log_mark:]
            woken = re.findall(r"to parked port (\d+): listening on it again", text)
            state.details["first_wave_debug"] = {
                "handed_over": len(re.findall(r"relayed by the kernel", text)),
                "parked_ports_woken": len(woken), "distinct_ports_woken": len(set(woken)),
                "woken_even_odd": [sum(1 for p in set(woken) if int(p) % 2 == 0),
                                   sum(1 for p in set(woken) if int(p) % 2 == 1)]}
            log(f"first wave, debug log: {state.details['first_wave_debug']}")
        sender.keep_alive(calls, opts.keepalive_period)
        item = {"calls": len(calls), "setup_s": round(t1 - t0, 3), "latch_s": round(t2 - t1, 3),
                "relay_fds_after_setup": fds_open, "relay_fds_after_parking": fd_count(pids["relay"]),
                "kernel_entries": summary.get("kernel_entries"), "parked_ports": summary.get("parked_ports"),
                "latch_attempts": attempt + 1}
        per_wave.append(item)
        log(f"wave to {len(calls)} calls: set up in {item['setup_s']} s, in the kernel in {item['latch_s']} s; "
            f"kernel entries {item['kernel_entries']}, parked ports {item['parked_ports']}, relay fds "
            f"{fds_open} -> {item['relay_fds_after_parking']}")
    state.details["waves"] = per_wave
    state.details["setup_total_s"] = round(time.monotonic() - start_all, 1)
    state.details["peak_relay_fds"] = peak_relay_fds
    return calls


def at_max(topo, daemons, calls, baseline, opts: Options, state: State, memory) -> None:
    details, figures = state.details, state.figures
    time.sleep(1.0)
    held = kernel_calls(topo, calls)
    summary = daemons.relay_summary()
    procs = process_figures(daemons)
    details["at_max"] = {"summary": summary, "processes": procs, **held}
    figures["concurrent_calls"] = held["calls_with_rtp_and_rtcp_entries"]
    rss_delta = sum(procs[n]["rss_kb"] for n in procs) - sum(baseline[n]["rss_kb"] for n in baseline)
    figures["memory_per_call_kb"] = round(rss_delta / len(calls), 2)
    details["memory_split_kb_per_call"] = {n: round((procs[n]["rss_kb"] - baseline[n]["rss_kb"]) / len(calls), 2)
                                           for n in procs}
    log(f"{held['calls_with_rtp_and_rtcp_entries']} of {len(calls)} calls with RTP and RTCP in the kernel "
        f"({held['entries']} entries); relay fds {procs['relay']['fds']}, dispatcher fds "
        f"{procs['dispatcher']['fds']}; memory {figures['memory_per_call_kb']} KB a call")

    # the sans-IO breakdown ran meanwhile; it must be done before the CPU is read
    try:
        out, err = memory.communicate(timeout=300)
        details["memory_breakdown"] = json.loads(out) if memory.returncode == 0 else {"error": err[-1000:]}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        memory.kill()
        details["memory_breakdown"] = {"error": str(exc)}

    pids = daemons.pids()
    profiles = {name: Path(tempfile.gettempdir()) / f"mpb-scale-{os.getpid()}-{name}.txt"
                for name in pids} if opts.profile else {}
    spies = {name: start_profile(pids[name], opts.cpu_seconds, path) for name, path in profiles.items()}
    before = {name: process_figures(daemons)[name]["cpu_s"] for name in pids}
    stat_before = _cpu_stat()
    wall = time.monotonic()
    time.sleep(opts.cpu_seconds)
    wall = time.monotonic() - wall
    after = {name: process_figures(daemons)[name]["cpu_s"] for name in pids}
    stat_after = _cpu_stat()
    cpu = {name: 100.0 * (after[name] - before[name]) / wall for name in pids}
    figures["cpu_percent_at_max_calls"] = round(sum(cpu.values()), 2)
    details["cpu"] = {"wall_s": round(wall, 2), "percent": {k: round(v, 2) for k, v in cpu.items()},
                      "machine_busy_share": _busy(stat_before, stat_after),
                      "kernel_entries_after": daemons.relay_summary().get("kernel_entries")}
    log(f"CPU over {wall:.0f} s with {len(calls)} calls in the kernel: relay {cpu['relay']:.2f}%, dispatcher "
        f"{cpu['dispatcher']:.2f}%")
    for name, spy in spies.items():
        if spy is None:
            continue
        try:
            spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
        details.setdefault("profiles", {})[name] = summarize_profile(profiles[name])
        try:
            profiles[name].unlink()
        except OSError:
            pass
    # the relay's `sessions` answer (what reconcile asks for), through the management port
    start = time.monotonic()
    lines = daemons.management("sessions", timeout=60)
    details["management_sessions"] = {"sessions": len(lines), "seconds": round(time.monotonic() - start, 3)}


def _cpu_stat() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def _busy(before, after) -> float:
    delta = [a - b for a, b in zip(after, before)]
    total = sum(delta[:8]) or 1
    return round(1 - (delta[3] + delta[4]) / total, 3)


def restart(daemons, manager, opts: Options, state: State, profile: bool = False) -> None:
    """SIGTERM to the dispatcher, start it again, time it. With `profile`, py-spy watches the relay
    and the new dispatcher (which slows both down on this 2-CPU machine: details only, no figure)."""
    from bench.topology import RELAY_IP

    details = state.details
    old = daemons.dispatcher
    spies, paths = {}, {}
    key = "restart_profiled" if profile else "restart"
    if profile:
        paths = {name: Path(tempfile.gettempdir()) / f"mpb-scale-{os.getpid()}-restart-{name}.txt"
                 for name in ("relay", "dispatcher")}
        spies["relay"] = start_profile(daemons.relay.command_pid, 12, paths["relay"])
    stop_start = time.monotonic()
    old.stop(timeout=30)
    stop_s = time.monotonic() - stop_start
    saved = re.findall(r"saved (\d+) sessions", old.log_text())
    t0 = time.monotonic()
    t0_epoch = time.time()
    new = manager.start("media-dispatcher", old.argv, netns=old.netns)
    daemons.dispatcher = new
    if profile:
        try:
            spies["dispatcher"] = start_profile(new.command_pid, 8, paths["dispatcher"])
        except AssertionError:
            pass
    marks = {}
    deadline = t0 + (60 if not opts.smoke else 20)
    while time.monotonic() < deadline:
        new.assert_running()
        text = new.log_text()
        now = time.monotonic()
        if "restored" not in marks and re.search(r"restored \d+ sessions", text):
            marks["restored"] = now - t0
        if "listening" not in marks and "listening for the proxy on" in text:
            marks["listening"] = now - t0
        if "relay_connected" not in marks and re.search(r"relay \S+ (re)?connected", text):
            marks["relay_connected"] = now - t0
        if "listening" in marks:
            try:
                if any(e.get("ip") == RELAY_IP and e.get("status") == "active" for e in daemons.summary()):
                    marks["reconciled"] = time.monotonic() - t0
                    break
            except (OSError, ValueError):
                pass
        time.sleep(0.02)
    text = new.log_text()
    restored = re.findall(r"restored (\d+) sessions", text)
    stamps = {name: log_times(text, pattern) for name, pattern in (
        ("first_line", r"."), ("restored", r"restored \d+ sessions"), ("listening", r"listening for the proxy"),
        ("relay_connected", r"relay \S+ (re)?connected"))}
    from_log = {name: round(times[0] - t0_epoch, 3) for name, times in stamps.items() if times}
    gone = len(re.findall(r"is gone from relay", text))
    adopted = len(re.findall(r"adopted", text))
    details[key] = {"stop_s": round(stop_s, 3), "saved": int(saved[-1]) if saved else None,
                          "restored": int(restored[0]) if restored else None,
                          "polled_s": {k: round(v, 3) for k, v in marks.items()},
                          "log_s_after_start": from_log, "sessions_gone": gone, "sessions_adopted": adopted}
    for name, spy in spies.items():
        if spy is None:
            continue
        try:
            spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
        details.setdefault("restart_profiles", {})[name] = summarize_profile(paths[name], top=16, everything=True)
        try:
            paths[name].unlink()
        except OSError:
            pass
    if "reconciled" in marks and restored and not profile:
        state.figures["restart_restore_s_10000"] = round(marks["reconciled"], 3)
    log(f"dispatcher restart{' (profiled)' if profile else ''}: {details[key]}")


def expiry(topo, daemons, sender: Sender, calls, opts: Options, state: State) -> None:
    details = state.details
    n = min(opts.expiry_calls, len(calls))
    expiring, surviving = calls[:n], calls[n:]
    if not opts.smoke:
        for key in ("nf_conntrack_udp_timeout_stream", "nf_conntrack_udp_timeout"):
            topo.sysctl("relay", f"net.netfilter.{key}", str(opts.expiry_timeout))
    # the survivors' entries are refreshed well within the short timeout
    sender.keep_alive(surviving, max(opts.expiry_timeout / 4, 0.5))
    time.sleep(min(opts.keepalive_period, 2.0))
    wanted = {c.call_id for c in expiring}
    dispatcher = daemons.dispatcher
    before = set(EXPIRED_RE.findall(dispatcher.log_text()))
    sender.burst(expiring, rounds=1, rate=200000)      # their last packets, all within a fraction of a second
    t_stop, t_stop_epoch = time.monotonic(), time.time()
    wait = opts.expiry_timeout + (45 if not opts.smoke else 10)
    got = set()
    while time.monotonic() < t_stop + wait:
        got = set(EXPIRED_RE.findall(dispatcher.log_text())) - before
        if len(got & wanted) >= n:
            break
        time.sleep(0.25)
    elapsed = time.monotonic() - t_stop
    text = dispatcher.log_text()
    times = [t for t, line in zip(log_times(text, r"expired on relay"),
                                  [ln for ln in text.splitlines() if EXPIRED_RE.search(ln)]) if t > t_stop_epoch]
    relay_text = daemons.relay.log_text()
    relay_times = [t for t in log_times(relay_text, r"session \S+ expired$") if t > t_stop_epoch]
    details["expiry"] = {
        "relay_first_expired_s": round(min(relay_times) - t_stop_epoch, 2) if relay_times else None,
        "relay_last_expired_s": round(max(relay_times) - t_stop_epoch, 2) if relay_times else None,
        "streams": n, "timeout_s": opts.expiry_timeout, "expired_at_dispatcher": len(got & wanted),
        "survivors_expired": len(got - wanted), "waited_s": round(elapsed, 2),
        "first_report_s": round(min(times) - t_stop_epoch, 2) if times else None,
        "last_report_s": round(max(times) - t_stop_epoch, 2) if times else None,
        "relay_events_lost_warnings": relay_text.count("conntrack events were lost"),
        "relay_undelivered_warnings": relay_text.count("while its dispatcher"),
        "summary_after": daemons.relay_summary()}
    state.figures["expiry_burst_lost"] = n - len(got & wanted)
    log(f"expiry burst: {len(got & wanted)} of {n} reported expired to the dispatcher in {elapsed:.1f} s "
        f"(first {details['expiry']['first_report_s']} s, last {details['expiry']['last_report_s']} s after "
        f"the last packets; timeout {opts.expiry_timeout} s)")


# -- the result --

def rows_and_notes(opts: Options, state: State) -> list[dict]:
    rows = []
    for key in KEYS:
        value = state.figures.get(key)
        target, check, reference = TARGETS[key]
        ref_value = REFERENCE_VALUES.get(key)
        if value is None:
            status = "not measured"
        elif opts.smoke or check is None:
            status = "smoke" if opts.smoke else "info"
        else:
            status = "met" if check(value) else "missed"
        ratio = round(value / ref_value, 3) if value is not None and ref_value else None
        rows.append({"figure": key, "value": value, "reference": reference, "ratio": ratio, "target": target,
                     "status": status})
    return rows


def derive_notes(opts: Options, state: State) -> None:
    d, notes = state.details, state.notes
    if "at_max" in d:
        p = d["at_max"]["processes"]
        notes.append(f"Descriptors at {len(d.get('waves', [])) and d['waves'][-1]['calls']} calls: relay "
                     f"{p['relay']['fds']}, dispatcher {p['dispatcher']['fds']} (/proc/PID/fd); the relay's peak "
                     f"was {d.get('peak_relay_fds')} while a wave of {opts.wave} calls was set up (4 sockets a "
                     f"call until its ports are parked). Parked ports: {d['at_max']['summary'].get('parked_ports')}.")
        notes.append(f"Memory: {d.get('memory_split_kb_per_call')} KB a call (RSS growth per process).")
    mb = d.get("memory_breakdown") or {}
    if "parts" in mb:
        parts = mb["parts"]
        notes.append("Sans-IO breakdown (tracemalloc, bytes a session): " + ", ".join(
            f"{name} {part['bytes_per_session']:.0f}" for name, part in parts.items())
            + "; largest lines: " + "; ".join(f"{line['where']} {line['bytes_per_session']:.0f}"
                                               for part in parts.values() for line in part["by_line"][:3]))
    if "cpu" in d:
        notes.append(f"CPU over {d['cpu']['wall_s']} s: {d['cpu']['percent']} (machine busy share "
                     f"{d['cpu']['machine_busy_share']}: other work shares this VM).")
    for name, profile in (d.get("profiles") or {}).items():
        if not profile.get("samples"):
            continue
        idle = profile["self"].get("EPollReactor.doPoll", 0)
        busy = max(profile["samples"] - idle, 1)
        share = d.get("cpu", {}).get("percent", {}).get(name)
        text = (f"py-spy ({name}, {profile['samples']} samples at 100 Hz over the CPU window, {busy} not idle): "
                + ", ".join(f"{k} {v}" for k, v in list(profile["inclusive"].items())[:6]))
        if share is not None and profile["inclusive"]:
            periodic = {"timeout checks (RelayCore.check_timeouts, every 1 s)": "RelayCore.check_timeouts (core.py)",
                        "table reads (_TableReader.doRead, every udp_timeout/4)": "_TableReader.doRead (forwarding.py)",
                        "traffic sampling (RelayCore.sample_traffic)": "RelayCore.sample_traffic (core.py)",
                        "destroy events": "_EventReader.doRead (forwarding.py)",
                        "dispatcher clean_up (every 60 s)": "Dispatcher.clean_up (core.py)"}
            parts = [f"{label} ~{share * profile['inclusive'].get(key, 0) / busy:.2f}%"
                     for label, key in periodic.items() if key in profile["inclusive"]]
            if parts:
                text += f"; of its {share}% CPU: " + ", ".join(parts)
        notes.append(text)
    if "first_wave_debug" in d:
        fw = d["first_wave_debug"]
        notes.append(f"Parking: of the first wave's {opts.wave} calls ({fw['handed_over']} hand-overs), the relay's raw "
                     f"socket woke {fw['distinct_ports_woken']} parked ports again (debug log) - packets that "
                     "reached those ports before their hand-over, read from the raw socket's backlog only after "
                     "the ports were parked; they stay open though the kernel relays them.")
    s = d.get("sampling")
    if s:
        for run in s["runs"]:
            notes.append(f"At {run['entries']} kernel entries: a sampling pass (iptables counter read) "
                         f"{run['sampling_pass']['cpu_median_ms']} ms CPU, {run['sampling_pass']['median_ms']} ms "
                         f"wall; refresh_counters (ctnetlink dump of our entries: `sessions`, _reap) "
                         f"{run['refresh_counters']['cpu_median_ms']} ms CPU, {run['refresh_counters']['median_ms']} "
                         f"ms wall.")
    if "restart" in d:
        notes.append(f"Dispatcher restart: {d['restart']}")
    for name, profile in (d.get("restart_profiles") or {}).items():
        if profile.get("samples"):
            notes.append(f"py-spy during the restart ({name}, samples at 100 Hz): "
                         + ", ".join(f"{k} {v}" for k, v in list(profile["inclusive"].items())[:10]))
    if "expiry" in d:
        notes.append(f"Expiry burst: {d['expiry']}")


def run(smoke: bool = False, workdir: Path | None = None) -> dict:
    opts = Options.smoke_options() if smoke else Options()
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mpb-scale-work-"))
    workdir.mkdir(parents=True, exist_ok=True)
    state = State()
    started = time.monotonic()
    try:
        run_scenario(opts, workdir, state)
    except (Exception, KeyboardInterrupt) as exc:
        state.notes.append(f"the scenario stopped early: {type(exc).__name__}: {str(exc).strip()[:500]}")
        log(state.notes[-1])
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    state.details["options"] = {k: v for k, v in opts.__dict__.items()}
    state.details["seconds"] = round(time.monotonic() - started, 1)
    derive_notes(opts, state)
    return {"figures": state.figures, "rows": rows_and_notes(opts, state), "details": state.details,
            "notes": state.notes}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small counts, about 20 s, no target checked")
    parser.add_argument("--workdir", type=Path, help="keep the daemons' configuration and logs here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.scale needs root (namespaces, conntrack, AF_PACKET)", file=sys.stderr)
        return 2

    def stop(signum, frame):
        for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by signal {signum}")
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, stop)
    signal.alarm(170 if args.smoke else 540)
    result = run(args.smoke, args.workdir)
    signal.alarm(0)
    json.dump(result, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
