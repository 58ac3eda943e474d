"""python -m bench [--smoke] [--output DIR] [...]: run the benchmarks, write
RESULTS.md and results.json (see bench/README)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL_LIMIT = 1500       # seconds: a full run stops by itself after this
SMOKE_LIMIT = 300
ACCOUNTING_LIMIT = 240  # seconds for bench.accounting's child (its servers and 1000 records a backend)
ACCOUNTING_SMOKE_LIMIT = 90


class Stopped(BaseException):
    """Not an Exception: the scenarios' error handling must not swallow it."""


def _stop(signum, frame):
    """Time limit, SIGTERM, SIGINT, SIGHUP: unwind, so that every namespace and
    daemon is removed on the way out. Further signals are ignored meanwhile
    (the clean-up is bounded in time; SIGKILL still works, and the next run
    removes what a killed one left)."""
    for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(other, signal.SIG_IGN)
    if signum == signal.SIGALRM:
        raise Stopped("the benchmark ran over its time limit")
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


def check_environment() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, conntrack, iptables)")
    for tool in ("ip", "conntrack", "iptables-legacy", "iptables-legacy-save", "setpriv", "unshare", "gcc",
                 "bash"):
        if shutil.which(tool) is None:
            problems.append(f"missing tool: {tool}")
    if (os.cpu_count() or 1) < 2:
        problems.append("needs 2 CPUs (sender and receiver pinned apart)")
    return problems


def run_accounting(results, smoke: bool) -> None:
    """bench.accounting (issue 6: records per second each accounting backend writes) in its child
    process; its figures join the kernel path's in results.numbers (None: not measured, and why)."""
    from bench import accounting

    try:
        answer = accounting.run_detailed(smoke=smoke, timeout=ACCOUNTING_SMOKE_LIMIT if smoke else ACCOUNTING_LIMIT)
    except Exception as exc:        # a timeout, a crash: the kernel path's figures are still written
        reason = " ".join(str(exc).split())[:300]
        answer = {"figures": dict.fromkeys(accounting.KEYS), "not_measured": dict.fromkeys(accounting.KEYS, reason),
                  "records": None}
        print(f"bench: accounting not measured: {reason}", file=sys.stderr)
    results.numbers.update(answer["figures"])
    results.details["accounting"] = {"records": answer["records"], "not_measured": answer["not_measured"]}
    results.available["accounting"] = None if any(answer["figures"].values()) else "; ".join(
        sorted(set(answer["not_measured"].values()))) or "not measured"


# Issue 8's benchmarks, each a module with KEYS and run(smoke, workdir) -> {"figures", "rows", "details",
# "notes"} (bench/README); run in this order after the kernel path's and the accounting figures.
MODULES = ("control", "userspace", "scale")


def run_module(name: str, results, smoke: bool, workdir: Path) -> None:
    """One issue-8 module; a failure costs its own figures only (None, with the reason)."""
    import importlib

    from bench.kernel import log

    try:
        module = importlib.import_module(f"bench.{name}")
    except ImportError as exc:
        results.available[name] = f"bench/{name}.py cannot be imported: {exc}"
        return
    log(f"{name}: running")
    started = time.time()
    try:
        answer = module.run(smoke, workdir / name)
    except Stopped:
        raise
    except Exception as exc:        # the other modules' figures are still written
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"bench: {name} not measured: {reason}", file=sys.stderr)
        results.numbers.update(dict.fromkeys(module.KEYS))
        results.available[name] = reason
        results.details[name] = {"error": reason}
        return
    results.numbers.update({key: answer["figures"].get(key) for key in module.KEYS})
    results.details[name] = {"rows": answer.get("rows", []), "details": answer.get("details", {}),
                             "seconds": round(time.time() - started, 1)}
    results.notes.extend(f"{name}: {note}" for note in answer.get("notes", []))
    results.available[name] = None
    if name == "control" and not smoke:
        profile_control(results)


def profile_control(results) -> None:
    """Where the control plane's time goes: bench.control_profile (py-spy on both daemons under the
    8-client load), its shares in the notes."""
    import json
    import subprocess

    from bench.kernel import log

    log("control: profiling both daemons under 8 clients (py-spy)")
    try:
        answer = subprocess.run([sys.executable, "-m", "bench.control_profile", "--seconds", "8"], cwd=REPO,
                                capture_output=True, text=True, timeout=180)
        report = json.loads(answer.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        results.notes.append(f"control: no profile ({' '.join(str(exc).split())[:200]}; needs py-spy in .venv)")
        return
    results.details["control"]["profile"] = report
    for daemon in ("dispatcher", "relay"):
        parts = report.get(daemon, {}).get("parts_pct", {})
        shares = ", ".join(f"{part} {share:.0f}%" for part, share in parts.items() if share >= 2)
        results.notes.append(f"control: where {daemon}'s time goes at {report['load']['rate']:.0f} sessions/s "
                             f"(py-spy, share of its busy samples; {report[daemon]['cpu_cores']:.2f} cores): "
                             f"{shares}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true",
                        help="every scenario for about a second, few streams, no targets checked; "
                             "writes to bench/build/smoke unless --output is given")
    parser.add_argument("--output", type=Path, help="where RESULTS.md and results.json go (default bench/)")
    parser.add_argument("--streams", help="comma list of stream counts (default 1,1000)")
    parser.add_argument("--rounds", type=int, help="interleaved blasts per stream count (default 5)")
    parser.add_argument("--udp-rounds", type=int, help="the same with the UDP-socket sender (default 1; 0: none)")
    parser.add_argument("--group-seconds", type=float, help="sending time per scenario in one blast, s (default 1.2)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and configs")
    parser.add_argument("--only", help="comma list of what to run: kernel, accounting, " + ", ".join(MODULES)
                        + " (default: all)")
    args = parser.parse_args(argv)

    from bench import kernel, report

    opts = kernel.Options.smoke_options() if args.smoke else kernel.Options()
    if args.streams:
        opts.streams = tuple(int(x) for x in args.streams.split(","))
    if args.rounds is not None:
        opts.rounds = args.rounds
    if args.udp_rounds is not None:
        opts.udp_rounds = args.udp_rounds
    if args.group_seconds is not None:
        opts.group_seconds = args.group_seconds
    output = args.output or (HERE / "build" / "smoke" if args.smoke else HERE)

    problems = check_environment()
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))    # 4 sockets a call, and the parties' sockets

    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop)
    signal.alarm(SMOKE_LIMIT if args.smoke else FULL_LIMIT)
    workdir = Path(tempfile.mkdtemp(prefix="mpb-work-"))
    started = time.time()
    wanted = set(args.only.split(",")) if args.only else {"kernel", "accounting", *MODULES}
    unknown = wanted - {"kernel", "accounting", *MODULES}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    try:
        results = kernel.run(opts, workdir) if "kernel" in wanted else kernel.Results()
        if "accounting" in wanted:
            run_accounting(results, args.smoke)
        for name in MODULES:
            if name in wanted:
                run_module(name, results, args.smoke, workdir)
    except Stopped as exc:
        print(f"bench: {exc}; namespaces and daemons removed; logs in {workdir}", file=sys.stderr)
        return 1
    except BaseException:
        print(f"bench: failed; logs in {workdir}", file=sys.stderr)
        raise
    finally:
        signal.alarm(0)
        for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
    elapsed = time.time() - started
    output.mkdir(parents=True, exist_ok=True)
    report.write(output, results, opts, elapsed)
    print(f"bench: {elapsed:.0f} s; wrote {output / 'RESULTS.md'} and {output / 'results.json'}", file=sys.stderr)
    if args.keep_logs:
        print(f"bench: logs and configs in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
