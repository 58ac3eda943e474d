"""User-space forwarding benchmark (issue 8 item 5).

    python -m bench.userspace [--smoke] [--profile] [--streams 1,50] [--rounds N]

Packets per second the relay forwards in user space, against a minimal
Twisted UDP forwarder (bench/userspace_forwarder.py) in the same run:

  relay      media-relay with ``kernel_forwarding = no`` in the relay
             namespace, with its dispatcher; calls set up over the
             dispatcher's proxy socket and both parties latched (bench/relay.py,
             bench/kernel.py's latch); the caller blasts RTP-sized packets
             (172 bytes, G.711 at 20 ms) to relay:A, the relay sends them on
             from relay:B to the callee;
  forwarder  the reference: one DatagramProtocol per port, A's datagrams sent
             to the callee from B (and B's back to the caller), same Python
             (this interpreter), same reactor (the default, epoll), same
             namespace.

Both run at once; the sender (udpsend, AF_PACKET frames) blasts far beyond
what either can forward (most packets die on the full receive buffers of
their sockets) and interleaves them (one group of streams each, 50 ms
slices in turn), the receiver (udprecv) counts per group what reaches the
callee. Figure: packets delivered per second of sending, per scenario; the
ratio relay/forwarder of each blast, median over the blasts (the machine's
speed drifts and other work shares it, so only the same seconds are
compared). The receiver stops when the sender does: what the sockets still
hold then (up to a few hundred packets a socket, the same for both) would
otherwise be counted for both and pull the ratio towards 1.

CPUs (2): both Python processes are pinned to CPU 1; the sender and the
receiver run on CPU 0, the receiver in its epoll mode (-E, through a
wrapper script: bench.tools.blast has no option for it) so that it sleeps
between packets and leaves the sender enough CPU to flood both. Each
process's CPU time per packet it read (/proc/PID/stat, once both are idle
again; the relay's own packet counter, the forwarder's from the namespace's
UDP InDatagrams) is reported as well: a second ratio, forwarder/relay, that
does not depend on how CPU 1 was shared.

--profile (on by default in full mode when py-spy is installed in the
virtualenv): the relay alone is blasted while py-spy samples it; the share
of samples per part of the packet path (recvfrom, sendto, the relay's
Python, the reactor), per function and per source line go to "details",
the parts to the notes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tools  # noqa: E402
from bench.relay import Daemons, cpu_seconds, shut_down  # noqa: E402
from bench.tools import Stream, blast, build_tools  # noqa: E402
from bench.topology import CALLEE_IP, CALLER_IP, RELAY_IP, RoutedTopology  # noqa: E402

RELAY, FORWARDER = 0, 1
NAMES = {RELAY: "relay", FORWARDER: "forwarder"}

# Ports: relay calls' parties 23000+2i (caller) and 33000+2i (callee), the relay's
# port_range 56000:58000; the forwarder: caller 27000+i -> relay 38000+i, from
# relay 39000+i -> callee 37000+i. None is used by the kernel benchmark.
RELAY_CALLER, RELAY_CALLEE = 23000, 33000
RELAY_PORT_RANGE = (56000, 58000)
FWD_CALLER, FWD_A, FWD_B, FWD_CALLEE = 27000, 38000, 39000, 37000

PYTHON_CPU = 1          # both Python processes
TOOLS_CPU = 0           # sender and receiver
RATIO_TARGET = 0.8

KEYS = ("userspace_pps_ratio", "userspace_pps_ratio_1", "userspace_pps_ratio_50",
        "userspace_relay_pps_1", "userspace_forwarder_pps_1",
        "userspace_relay_pps_50", "userspace_forwarder_pps_50",
        "userspace_relay_us_per_packet_50", "userspace_forwarder_us_per_packet_50",
        "userspace_relay_cpu_percent_50")


@dataclass
class Options:
    streams: tuple[int, ...] = (1, 50)
    rounds: int = 9                 # interleaved blasts per stream count
    group_seconds: float = 1.2      # sending time per scenario in one blast
    slice_ms: float = 50.0
    size: int = 172
    profile: bool = True
    profile_seconds: float = 6.0
    smoke: bool = False

    @classmethod
    def smoke_options(cls) -> "Options":
        return cls(rounds=1, group_seconds=0.4, profile=False, smoke=True)


def log(message: str) -> None:
    print(f"[bench.userspace {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- streams --

def relay_streams(calls, n: int) -> list[Stream]:
    return [Stream(RELAY, RELAY_IP, c.caller_port, c.caller_facing, c.callee_port) for c in calls[:n]]


def forwarder_streams(n: int) -> list[Stream]:
    return [Stream(FORWARDER, RELAY_IP, FWD_CALLER + i, FWD_A + i, FWD_CALLEE + i) for i in range(n)]


# -- processes --

def start_forwarder(topo, manager, pairs: int, workdir: Path, timeout: float = 20.0):
    ready = workdir / "forwarder.ready"
    ready.unlink(missing_ok=True)
    process = manager.start("minimal-forwarder", [
        sys.executable, "-m", "bench.userspace_forwarder", "--ip", RELAY_IP, "--pairs", pairs,
        "--a-port", FWD_A, "--b-port", FWD_B, "--caller", CALLER_IP, "--caller-port", FWD_CALLER,
        "--callee", CALLEE_IP, "--callee-port", FWD_CALLEE, "--ready", ready], netns=topo.ns("relay"), cwd=REPO)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        process.assert_running()
        if time.monotonic() > deadline:
            raise TimeoutError("the minimal forwarder did not start")
        time.sleep(0.05)
    return process


def pin(pid: int, cpu: int) -> None:
    """All threads of pid onto one CPU (nothing when the machine has a single CPU)."""
    if tools.cpu_count() >= 2 and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True,
                       timeout=10)


@contextmanager
def tools_on_one_cpu():
    """bench.tools pins the receiver to CPU 1; here it goes with the sender to CPU 0 (tools.blast
    reads the module constant at each call), so that CPU 1 is the Python processes' own."""
    saved = tools.RECEIVER_CPU, tools.SENDER_CPU
    tools.RECEIVER_CPU = tools.SENDER_CPU = TOOLS_CPU
    try:
        yield
    finally:
        tools.RECEIVER_CPU, tools.SENDER_CPU = saved


def epoll_receiver(binaries: dict, workdir: Path) -> dict:
    """The same tools, the receiver in its epoll mode (-E: it sleeps until packets come, so
    that it takes little of the sender's CPU): a wrapper that execs udprecv -E."""
    wrapper = workdir / "udprecv-epoll"
    wrapper.write_text(f'#!/bin/sh\nexec "{binaries["udprecv"]}" -E "$@"\n')
    wrapper.chmod(0o755)
    return {**binaries, "udprecv": wrapper}


def udp_counters(topo) -> dict:
    """The relay namespace's UDP counters (/proc/net/snmp): datagrams read, dropped on full buffers."""
    lines = [line.split() for line in topo.run("relay", ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


# -- measurements --

def wait_idle(pids: dict, timeout: float = 3.0) -> None:
    """Until neither process uses CPU any more (their sockets' backlog drained)."""
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = tuple(cpu_seconds(pid) for pid in pids.values())
        if now == last:
            return
        last = now
        time.sleep(0.06)


def one_blast(topo, binaries, calls, n: int, opts: Options, pids: dict, daemons) -> dict:
    """One interleaved blast. "pps": packets delivered at the callee while the sender was
    sending (the receiver stops when the sender does: what the sockets still hold then is
    not counted, else that backlog, as large for both, would pull the ratio towards 1).
    "us_per_packet": each process's CPU time over the packets it read (the relay's own
    counter; the forwarder's: the namespace's UDP InDatagrams, counted as sockets are read,
    less the relay's), both read once the two are idle again."""
    streams = relay_streams(calls, n) + forwarder_streams(n)
    wait_idle(pids)
    before_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before_relay = daemons.relay_summary().get("userspace_packets")
    before_udp = udp_counters(topo)
    result = blast(topo, binaries, streams, opts.group_seconds * 2, mode="packet", size=opts.size,
                   slice_ms=opts.slice_ms, drain=0.0)
    wait_idle(pids)
    after_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    after_relay = daemons.relay_summary().get("userspace_packets")
    after_udp = udp_counters(topo)
    udp = {k: after_udp.get(k, 0) - before_udp.get(k, 0)
           for k in ("InDatagrams", "RcvbufErrors", "SndbufErrors", "InErrors", "NoPorts")}
    read = {}
    if before_relay is not None and after_relay is not None:
        read["relay"] = after_relay - before_relay
        read["forwarder"] = udp["InDatagrams"] - read["relay"]
    out = {"streams": n, "seconds": round(result.seconds, 3), "cpus": result.cpu_shares, "udp": udp}
    for group, r in result.groups.items():
        name = NAMES[group]
        cpu = after_cpu[name] - before_cpu[name]
        packets = read.get(name)
        out[name] = {"sent": r.sent, "received": r.received, "lost": r.sent - r.received, "errors": r.errors,
                     "seconds": round(r.seconds, 4), "pps": round(r.pps, 1), "cpu_s": round(cpu, 3),
                     "read": packets, "us_per_packet": round(1e6 * cpu / packets, 3) if packets else None}
    if out["forwarder"]["pps"] > 0:
        out["ratio"] = round(out["relay"]["pps"] / out["forwarder"]["pps"], 4)
    if out["relay"].get("us_per_packet") and out["forwarder"].get("us_per_packet"):
        out["cpu_ratio"] = round(out["forwarder"]["us_per_packet"] / out["relay"]["us_per_packet"], 4)
    return out


def probe_paths(topo, calls) -> None:
    from bench.kernel import probe

    call = calls[0]
    source = probe(topo, call.caller_port, (RELAY_IP, call.caller_facing), call.callee_port)
    if source != (RELAY_IP, call.callee_facing):
        raise RuntimeError(f"the relay does not deliver: the callee got {source}, "
                           f"expected a packet from {RELAY_IP}:{call.callee_facing}")
    source = probe(topo, FWD_CALLER, (RELAY_IP, FWD_A), FWD_CALLEE)
    if source != (RELAY_IP, FWD_B):
        raise RuntimeError(f"the minimal forwarder does not deliver: the callee got {source}")


def profile_relay(topo, binaries, calls, n: int, pid: int, seconds: float, workdir: Path) -> dict | None:
    """py-spy samples the relay while it alone is blasted: the share of samples per function
    (its own time) and of a few frames with what they call (inclusive)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        spy = shutil.which("py-spy")
        if spy is None:
            return None
    raw = workdir / "relay.pyspy.txt"
    spy_proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", f"{seconds + 1:.0f}",
                                 "--rate", "250", "--format", "raw", "--nonblocking", "--output", str(raw)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        blast(topo, binaries, relay_streams(calls, n), seconds, mode="packet", size=172, drain=0.2)
        _, err = spy_proc.communicate(timeout=seconds + 30)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.strip()[-300:]}")
    return summarize_profile(raw.read_text())


def _frame(frame: str) -> tuple[str, str, int]:
    """py-spy's raw frame "function (path/file.py:line)" -> (function, path, line)."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return name, path, int(line) if line.isdigit() else 0


def _source_line(path: str, line: int) -> str:
    import linecache

    import twisted

    for root in (REPO, Path(twisted.__file__).resolve().parents[1]):
        text = linecache.getline(str(root / path), line)
        if text:
            return text.strip()
    return ""


# Where the time goes: the leaf frame (function, and the source line for the two that make
# the system calls) -> a part of the per-packet path.
def _part(name: str, path: str, line: int) -> str:
    short = path.rsplit("/", 1)[-1]
    if short == "udp.py" and name.endswith("doRead"):
        return "recvfrom and Twisted's read loop (udp.Port.doRead)"
    if "sendto(" in _source_line(path, line):
        return "sendto (the system call)"
    if short == "udp.py" and name.endswith("write") or short == "abstract.py":
        return "Twisted's Port.write: address checks (isIPAddress, isIPv6Address)"
    if short in ("userspace.py", "streams.py", "rtp.py", "core.py", "forwarding.py", "userspace_forwarder.py"):
        return "the relay's packet path in Python (datagramReceived, receiver, on_packet)"
    if short in ("epollreactor.py", "log.py", "context.py", "posixbase.py", "base.py"):
        return "the reactor: epoll_wait and dispatching to doRead"
    return "other"


def summarize_profile(text: str) -> dict:
    own, inclusive, parts, lines = Counter(), Counter(), Counter(), Counter()
    total = 0
    for row in text.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        names = [f"{path.rsplit('/', 1)[-1]}:{name}" for name, path, _ in frames]
        total += count
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
        name, path, line = frames[-1]
        parts[_part(name, path, line)] += count
        lines[f"{path.rsplit('/', 1)[-1]}:{line} {_source_line(path, line)[:60]}"] += count
    share = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {"samples": total,
            "parts_percent": {name: share(c) for name, c in parts.most_common()},
            "own_percent": {name: share(c) for name, c in own.most_common(20)},
            "own_lines_percent": {name: share(c) for name, c in lines.most_common(15)},
            "inclusive_percent": {name: share(c) for name, c in inclusive.most_common(30)}}


def derive(opts: Options, blasts: list[dict], figures: dict, notes: list) -> None:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    ratios = []
    for n in opts.streams:
        runs = [b for b in blasts if b["streams"] == n]
        ratio = med(b.get("ratio") for b in runs)
        figures[f"userspace_pps_ratio_{n}"] = round(ratio, 4) if ratio is not None else None
        if ratio is not None:
            ratios.append(ratio)
        for name in ("relay", "forwarder"):
            pps = med(b[name]["pps"] for b in runs)
            figures[f"userspace_{name}_pps_{n}"] = round(pps) if pps is not None else None
            us = med(b[name].get("us_per_packet") for b in runs)
            figures[f"userspace_{name}_us_per_packet_{n}"] = round(us, 3) if us is not None else None
        cpu = med(100.0 * b["relay"]["cpu_s"] / b["seconds"] for b in runs if b["seconds"])
        figures[f"userspace_relay_cpu_percent_{n}"] = round(cpu, 1) if cpu is not None else None
        cpu_ratio = med(b.get("cpu_ratio") for b in runs)
        figures[f"userspace_cpu_ratio_{n}"] = round(cpu_ratio, 4) if cpu_ratio is not None else None
        for name in ("relay", "forwarder"):
            figures[f"userspace_{name}_lost_{n}"] = sum(b[name]["lost"] for b in runs)
        send_errors = sum(b["udp"]["SndbufErrors"] for b in runs)
        if send_errors:
            notes.append(f"{n} streams: {send_errors} datagrams could not be sent by the relay or the forwarder "
                         "(SndbufErrors in the relay namespace)")
        if runs:
            notes.append(
                f"{n} stream{'s' if n != 1 else ''}: relay {figures[f'userspace_relay_pps_{n}']} packets/s, minimal "
                f"forwarder {figures[f'userspace_forwarder_pps_{n}']} (ratio {figures[f'userspace_pps_ratio_{n}']}, "
                f"median of {len(runs)} blasts); CPU a packet read: relay "
                f"{figures[f'userspace_relay_us_per_packet_{n}']} us, forwarder "
                f"{figures[f'userspace_forwarder_us_per_packet_{n}']} us.")
    figures["userspace_pps_ratio"] = round(min(ratios), 4) if ratios else None
    notes.append("userspace_pps_ratio is the lower of the ratios at the stream counts measured.")
    notes.append("Both processes share CPU 1 with whatever else runs on the machine: at 1 stream each runs only "
                 "during its own slices (its one socket's backlog is gone within a millisecond), at 50 streams "
                 "both work through every slice, so they get more of CPU 1 against other work; packets/s differ "
                 "between the stream counts for that reason, the CPU time a packet hardly does.")
    notes.append("The sender blasts beyond capacity: most packets are dropped by the kernel on the full "
                 "receive buffers of the two processes' sockets (udp RcvbufErrors in details), which is "
                 "why 'lost' is large for both; the figures count what reached the callee while the "
                 "sender sent. The relay's CPU percent is over the whole blast, of which it had half "
                 "the slices.")


def rows(figures: dict, opts: Options) -> list[dict]:
    out = []
    for n in opts.streams:
        ratio = figures.get(f"userspace_pps_ratio_{n}")
        status = "n/a" if ratio is None else ("smoke" if opts.smoke else
                                               ("ok" if ratio >= RATIO_TARGET else "below target"))
        out.append({"figure": f"user-space forwarding, {n} stream{'s' if n != 1 else ''}: packets/s delivered",
                    "value": figures.get(f"userspace_relay_pps_{n}"),
                    "reference": figures.get(f"userspace_forwarder_pps_{n}"),
                    "ratio": ratio, "target": f">= {RATIO_TARGET}", "status": status})
        cpu_ratio = figures.get(f"userspace_cpu_ratio_{n}")
        out.append({"figure": f"user-space forwarding, {n} stream{'s' if n != 1 else ''}: CPU us a packet",
                    "value": figures.get(f"userspace_relay_us_per_packet_{n}"),
                    "reference": figures.get(f"userspace_forwarder_us_per_packet_{n}"),
                    "ratio": cpu_ratio, "target": "", "status": "info"})
    return out


def run(smoke: bool, workdir: Path, opts: Options | None = None) -> dict:
    from bench.kernel import latch
    from tests.support.processes import ProcessManager

    opts = opts or (Options.smoke_options() if smoke else Options())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures = dict.fromkeys(KEYS)
    details: dict = {"options": {"streams": list(opts.streams), "rounds": opts.rounds,
                                 "group_seconds": opts.group_seconds, "slice_ms": opts.slice_ms, "size": opts.size},
                     "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "blasts": []}
    notes: list[str] = []
    binaries = epoll_receiver(build_tools(), workdir)
    n_max = max(opts.streams)
    manager = ProcessManager(workdir / "logs")
    daemons = None
    with RoutedTopology() as topo:
        try:
            topo.ping()
            daemons = Daemons(topo, workdir, manager, RELAY_PORT_RANGE, python=sys.executable)
            daemons.start({"kernel_forwarding": "no", "stream_timeout": 600})
            start = time.monotonic()
            calls = daemons.setup_calls(n_max, CALLER_IP, CALLEE_IP, RELAY_CALLER, RELAY_CALLEE)
            setup_s = time.monotonic() - start
            rounds = latch(topo, calls)
            forwarder = start_forwarder(topo, manager, n_max, workdir)
            probe_paths(topo, calls)
            pids = {"relay": daemons.relay.command_pid, "forwarder": forwarder.command_pid}
            for pid in pids.values():
                pin(pid, PYTHON_CPU)
            details["setup"] = {"calls": len(calls), "setup_s": round(setup_s, 3), "latch_rounds": rounds,
                                "summary": daemons.relay_summary(), "pids": pids}
            log(f"{len(calls)} calls set up and latched; relay pid {pids['relay']}, forwarder {pids['forwarder']}")
            with tools_on_one_cpu():
                for r in range(opts.rounds):
                    for n in (opts.streams if r % 2 == 0 else tuple(reversed(opts.streams))):
                        b = one_blast(topo, binaries, calls, n, opts, pids, daemons)
                        b["round"] = r
                        details["blasts"].append(b)
                        log(f"round {r}, {n} streams: relay {b['relay']['pps']:.0f}, forwarder "
                            f"{b['forwarder']['pps']:.0f} packets/s (ratio {b.get('ratio')}); CPU us a packet "
                            f"relay {b['relay']['us_per_packet']}, forwarder {b['forwarder']['us_per_packet']}")
                if opts.profile:
                    try:
                        prof = profile_relay(topo, binaries, calls, n_max, pids["relay"], opts.profile_seconds,
                                             workdir)
                    except Exception as exc:
                        prof = None
                        notes.append(f"profile: not taken ({type(exc).__name__}: {exc})")
                    if prof is not None:
                        details["profile"] = prof
                        notes.append(profile_note(prof))
                    else:
                        notes.append("profile: not taken (py-spy is not installed: .venv/bin/pip install py-spy)")
            details["final_summary"] = daemons.relay_summary()
        finally:
            shut_down(daemons, manager)
    derive(opts, details["blasts"], figures, notes)
    details["figures_more"] = {k: v for k, v in figures.items() if k not in KEYS}
    return {"figures": {k: figures.get(k) for k in KEYS}, "rows": rows(figures, opts),
            "details": details, "notes": notes}


def profile_note(prof: dict) -> str:
    parts = "; ".join(f"{name} {pct}%" for name, pct in prof["parts_percent"].items())
    return (f"Where the relay's time goes under the blast (py-spy, {prof['samples']} samples of the relay "
            f"alone, own time of the innermost frame; a system call counts for the Python line making it): "
            f"{parts}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.userspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, one blast a stream count")
    parser.add_argument("--streams", help="comma list of stream counts (default 1,50)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--group-seconds", type=float)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy the relay under a blast (default: on in full mode)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profile)")
    args = parser.parse_args(argv)
    opts = Options.smoke_options() if args.smoke else Options()
    if args.streams:
        opts.streams = tuple(int(x) for x in args.streams.split(","))
    if args.rounds is not None:
        opts.rounds = args.rounds
    if args.group_seconds is not None:
        opts.group_seconds = args.group_seconds
    if args.profile is not None:
        opts.profile = args.profile
    def stop(signum, frame):
        for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(f"bench.userspace: stopped by signal {signal.Signals(signum).name}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)       # unwind: namespaces and daemons are removed on the way out
    workdir = Path(tempfile.mkdtemp(prefix="mpb-userspace-"))
    try:
        result = run(args.smoke, workdir, opts)
    finally:
        if args.keep:
            print(f"bench.userspace: work directory {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
