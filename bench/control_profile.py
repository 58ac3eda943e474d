"""Where the control path's time goes: py-spy samples media-dispatcher and
media-relay while 8 clients of bench/control.py run sessions back to back
(or, with --rate, send them at that rate: the open loop).

    python -m bench.control_profile [--seconds 10] [--clients 8] [--rate N] [--gil] [--svg DIR]

Needs py-spy in the virtualenv (.venv/bin/pip install py-spy). Prints, per
daemon, its CPU share over the run, the share of its busy samples spent in
each part of the work (a sample counts in the part of its deepest matching frame)
and the functions with the most samples of their own.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PY_SPY = REPO / ".venv" / "bin" / "py-spy"
RATE = 200

# Parts of the work. A busy sample is counted in the part of its deepest frame that matches one
# (walking from the leaf towards the root), so the parts add up to 100 %.
PARTS = [
    ("socket send (the syscall: wakes the peer)", re.compile(r"^untilConcludes |^_SendmsgMixin\.writeSomeData|"
                                                            r"^Connection\.writeSomeData")),
    ("socket recv", re.compile(r"^(recvmsg|Connection\.doRead|_SendmsgMixin\.doRead) ")),
    ("TLS (ssl module, mediaproxy/tlslayer.py)", re.compile(r"mediaproxy/tlslayer\.py|/ssl\.py|OpenSSL/|cffi")),
    ("UDP sockets of the port pairs (bind, close)", re.compile(r"twisted/internet/udp\.py|^socket\.|socket\.py")),
    ("logging (stdlib and Twisted's log events)", re.compile(r"logging/__init__\.py|twisted/logger/|"
                                                             r"(LogPublisher|msg|err) \(twisted/python/log\.py")),
    ("JSON", re.compile(r"json/")),
    ("IP address parsing (ipaddress)", re.compile(r"ipaddress\.py")),
    ("request framing and parsing (mediaproxy/protocol)", re.compile(r"mediaproxy/protocol/")),
    ("relay: sessions, streams, ports, statistics", re.compile(r"mediaproxy/relay/")),
    ("dispatcher: core, front ends, relay link", re.compile(r"mediaproxy/dispatcher/")),
    ("Deferreds", re.compile(r"twisted/internet/defer\.py")),
    ("reactor and transports (epoll, buffers, callLater)", re.compile(r"twisted/")),
]


def part_of(stack) -> str:
    for frame in reversed(stack):
        for name, regex in PARTS:
            if regex.search(frame):
                return name
    return "other"


def parse_raw(path: Path):
    """py-spy raw (collapsed) output: {tuple of frames: count}."""
    stacks = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


IDLE = re.compile(r"^(EPollReactor\.doPoll|_lean_poll\.<locals>\.poll) ")


def summarize(stacks, seconds: float, cpu: float) -> dict:
    """Shares of the busy samples (those not waiting in epoll)."""
    idle = sum(n for stack, n in stacks.items() if IDLE.match(stack[-1]))
    stacks = {stack: n for stack, n in stacks.items() if not IDLE.match(stack[-1])}
    total = sum(stacks.values()) or 1
    parts = collections.Counter()
    for stack, n in stacks.items():
        parts[part_of(stack)] += n
    parts = {name: round(100.0 * n / total, 1) for name, n in parts.most_common()}
    own = collections.Counter()
    for stack, n in stacks.items():
        own[stack[-1]] += n
    return {"cpu_cores": round(cpu / seconds, 3), "busy_samples": total, "idle_samples": idle,
            "parts_pct": parts,
            "top_self_pct": [(frame, round(100.0 * n / total, 1)) for frame, n in own.most_common(25)]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float,
                        help="open loop: sessions/s, all clients together (default: closed loop, back to back)")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL: Python's own work, without the time in syscalls")
    parser.add_argument("--svg", type=Path, help="also write flame graphs (dispatcher.svg, relay.svg) here")
    args = parser.parse_args(argv)
    if not PY_SPY.exists():
        print("bench.control_profile: install py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2

    from bench import control
    from bench.relay import cpu_seconds

    opts = control.Options(smoke=False)
    opts.clients = args.clients
    workdir = Path(tempfile.mkdtemp(prefix="mpb-control-profile-"))
    report = {}
    try:
        with control.environment(opts, workdir, reference=False) as bench:
            bench.run("ours", args.clients, 1.0)            # warm up
            pids = bench.daemons.pids()
            spies = {}
            for name, pid in pids.items():
                raw = workdir / f"{name}.txt"
                spies[name] = (raw, subprocess.Popen(
                    [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
                     "--duration", str(int(args.seconds + 2)), "--output", str(raw), "--nonblocking"]
                    + (["--gil"] if args.gil else []),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(1.0)                                  # py-spy attached
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            load = {"mode": "open", "session_rate": args.rate} if args.rate else {}
            result = bench.run("ours", args.clients, args.seconds, **load)
            elapsed = time.monotonic() - started
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            for name, (raw, spy) in spies.items():
                spy.wait(timeout=args.seconds + 30)
                report[name] = summarize(parse_raw(raw), elapsed, cpu[name])
                if args.svg:
                    args.svg.mkdir(parents=True, exist_ok=True)
                    shutil.copy(raw, args.svg / f"{name}.txt")
            report["load"] = {k: v for k, v in result.items() if not k.startswith("_")}
            if args.svg:
                for name in pids:
                    raw = args.svg / f"{name}.txt"
                    if raw.exists():
                        subprocess.run(["sh", "-c", 'which flamegraph.pl >/dev/null && flamegraph.pl "$0" > "$1"',
                                        raw, args.svg / f"{name}.svg"], check=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
