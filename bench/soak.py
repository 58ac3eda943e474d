"""Soak (issue 9 item 6): calls churning at 1,000 concurrent for 30 minutes.

    python -m bench.soak [--minutes 30] [--calls 1000] [--smoke] [--output DIR]     # make soak

One media-dispatcher (SQLite accounting) and one media-relay (kernel path
on) in the benchmark's relay namespace, as bench/scale.py has them. CALLS
calls are set up through the proxy socket and their media handed to the
kernel (bench/tools/scalesend.c sends RTP and RTCP for both parties and
keeps the entries alive); then, every second, the oldest CALLS/100 calls
are removed and as many new ones set up, so the whole set turns over every
100 s. Both daemons' RSS and descriptors are sampled every 10 s. At the end
every call is removed and the relay must be back to nothing: no session, no
port pair, no kernel entry.

Figures (KEYS), targets from the issue:
  soak_relay_rss_growth_pct, soak_dispatcher_rss_growth_pct
      RSS at the end against RSS after the warm-up (the first fifth of the
      run): < 5 %
  soak_relay_fd_growth, soak_dispatcher_fd_growth
      descriptors at the end against after the warm-up: 0 (no growth)
  soak_error_lines      ERROR/CRITICAL lines and tracebacks in both logs: 0
  soak_accounting_missing
      calls that ended (removed, or expired) without their accounting row: 0
  soak_leaked           sessions + port pairs + kernel entries left after the
                        last remove: 0
and soak_minutes, soak_calls (concurrent), soak_calls_ended.

Its section in bench/RESULTS.md and its keys in bench/results.json are
replaced by each soak run and kept by `make bench`.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEYS = ("soak_minutes", "soak_calls", "soak_calls_ended", "soak_relay_rss_growth_pct",
        "soak_dispatcher_rss_growth_pct", "soak_relay_fd_growth", "soak_dispatcher_fd_growth", "soak_error_lines",
        "soak_accounting_missing", "soak_leaked")
TARGETS = {"soak_relay_rss_growth_pct": ("< 5", lambda v: v < 5), "soak_dispatcher_rss_growth_pct": ("< 5", lambda v: v < 5),
           "soak_relay_fd_growth": ("<= 0", lambda v: v <= 0), "soak_dispatcher_fd_growth": ("<= 0", lambda v: v <= 0),
           "soak_error_lines": ("0", lambda v: v == 0), "soak_accounting_missing": ("0", lambda v: v == 0),
           "soak_leaked": ("0", lambda v: v == 0)}
TITLES = {"soak_minutes": "minutes of churn", "soak_calls": "concurrent calls", "soak_calls_ended": "calls ended",
          "soak_relay_rss_growth_pct": "relay RSS growth after warm-up, %",
          "soak_dispatcher_rss_growth_pct": "dispatcher RSS growth after warm-up, %",
          "soak_relay_fd_growth": "relay descriptors, growth after warm-up",
          "soak_dispatcher_fd_growth": "dispatcher descriptors, growth after warm-up",
          "soak_error_lines": "ERROR/CRITICAL lines and tracebacks in the logs",
          "soak_accounting_missing": "ended calls without their accounting row",
          "soak_leaked": "sessions, port pairs and kernel entries left at the end"}
SAMPLE_EVERY = 10.0             # seconds
KEEPALIVE_EVERY = 20.0          # seconds: the keep-alive senders are restarted with the current calls
TURNOVER_S = 100                # the whole set of calls is replaced in this many seconds
WAVE = 250                      # calls set up and handed to the kernel at a time while filling
ERROR_MARKS = (" ERROR: ", " CRITICAL: ", "Traceback (most recent call last)")


def log(message: str) -> None:
    print(f"[bench.soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Churn:
    """The calls in place, oldest first, and the party port indices free for new ones."""

    def __init__(self, daemons, sender, capacity: int):
        from bench.relay import ProxyClient

        self.daemons, self.sender = daemons, sender
        self.calls = collections.deque()
        self.free = collections.deque(range(capacity))
        self.serial = 0
        self.ended = 0
        self.proxy = ProxyClient(daemons.socket_path, timeout=20)

    def add(self, count: int) -> list:
        """`count` new calls, their media handed to the kernel."""
        from bench.relay import Call, parse_reply
        from bench.scale import CALLEE_PORT0, CALLER_PORT0
        from bench.topology import CALLEE_IP, CALLER_IP

        new = []
        for _ in range(count):
            index = self.free.popleft()
            self.serial += 1
            call_id = f"soak-{self.serial}@{CALLER_IP}"
            caller_port, callee_port = CALLER_PORT0 + 2 * index, CALLEE_PORT0 + 2 * index
            _, callee_facing = parse_reply(self.proxy.update(call_id, "request",
                                                             f"audio:{CALLER_IP}:{caller_port}:sendrecv", CALLER_IP))
            _, caller_facing = parse_reply(self.proxy.update(call_id, "reply",
                                                             f"audio:{CALLEE_IP}:{callee_port}:sendrecv", CALLEE_IP,
                                                             to_tag="callee-tag"))
            call = Call(call_id, caller_port, callee_port, caller_facing, callee_facing)
            call.index = index
            new.append(call)
        if new:
            self.sender.burst(new, rounds=2, gap_ms=100)
        self.calls.extend(new)
        return new

    def remove(self, count: int) -> int:
        """End the `count` oldest calls; how many the dispatcher answered `removed`."""
        removed = 0
        for _ in range(min(count, len(self.calls))):
            call = self.calls.popleft()
            if self.proxy.remove(call.call_id) == "removed":
                removed += 1
            self.free.append(call.index)        # reused last: the parties' old entries are long gone
        self.ended += removed
        return removed

    def close(self) -> None:
        self.proxy.close()


def growth(samples, key: str, warmup: int) -> tuple:
    """(end value, after-warm-up value): medians of three samples each."""
    after = [s[key] for s in samples[warmup:warmup + 3]]
    end = [s[key] for s in samples[-3:]]
    return statistics.median(end), statistics.median(after)


def error_lines(*processes) -> list[str]:
    lines = []
    for process in processes:
        lines.extend(line for line in process.log_text().splitlines() if any(mark in line for mark in ERROR_MARKS))
    return lines


def accounted(database: Path) -> int:
    try:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT COUNT(*) FROM media_sessions").fetchone()[0]
    except sqlite3.Error:
        return 0


def run(minutes: float = 30.0, calls: int = 1000, smoke: bool = False, workdir: Path | None = None) -> dict:
    sample_every = 2.0 if smoke else SAMPLE_EVERY
    from bench.relay import Daemons, shut_down
    from bench.scale import CALLER_PORT0, RELAY_PORT_RANGE, Sender, build_tool, process_figures
    from bench.topology import RoutedTopology
    from tests.support.processes import ProcessManager, wait_for

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mpb-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    binary = build_tool()
    tmp = Path(tempfile.mkdtemp(prefix="mpb-soak-streams-"))
    database = workdir / "accounting.sqlite"
    capacity = 2 * calls                # party port indices: freed ones rest a whole turnover before reuse
    per_tick = max(1, calls // TURNOVER_S)
    manager = ProcessManager(workdir / "logs")
    figures = dict.fromkeys(KEYS)
    details: dict = {"calls": calls, "minutes": minutes, "per_second": per_tick, "sample_every_s": sample_every}
    samples = []
    daemons = sender = churn = None
    try:
        with RoutedTopology() as topo:
            try:
                for host in ("caller", "callee"):   # the parties have no sockets: drop quietly, no ICMP
                    topo.run(host, ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport",
                                    f"{CALLER_PORT0}:{CALLER_PORT0 + 2 * capacity + 1}", "-j", "DROP"])
                daemons = Daemons(topo, workdir, manager, RELAY_PORT_RANGE)
                daemons.start(relay_options={"reconnect_delay": 0.2}, dispatcher_sections={
                    "Dispatcher": {"accounting": "database"}, "Database": {"dburi": f"sqlite:///{database}"}})
                sender = Sender(topo, binary, tmp)
                churn = Churn(daemons, sender, capacity)
                started = time.monotonic()
                while len(churn.calls) < calls:
                    churn.add(min(WAVE, calls - len(churn.calls)))
                    want = 2 * len(churn.calls)
                    wait_for(lambda: daemons.relay_summary().get("kernel_entries", 0) >= want, timeout=60,
                             interval=0.2, ignore=(OSError, ValueError),
                             message=f"{want} kernel entries for {len(churn.calls)} calls")
                sender.keep_alive(list(churn.calls), 5)
                details["fill_s"] = round(time.monotonic() - started, 1)
                log(f"{calls} calls in the kernel after {details['fill_s']} s; churning {per_tick}/s for "
                    f"{minutes} min")

                end = time.monotonic() + minutes * 60
                next_sample = next_keepalive = time.monotonic()
                while time.monotonic() < end:
                    tick = time.monotonic()
                    churn.remove(per_tick)
                    churn.add(per_tick)
                    now = time.monotonic()
                    if now >= next_keepalive:
                        sender.keep_alive(list(churn.calls), 5)
                        next_keepalive = now + KEEPALIVE_EVERY
                    if now >= next_sample:
                        figures_now = process_figures(daemons)
                        samples.append({"t": round(now - started, 1),
                                        **{f"{name}_{k}": v for name, values in figures_now.items()
                                           for k, v in values.items()}})
                        next_sample = now + sample_every
                        if len(samples) % 6 == 1:
                            log(f"{churn.ended} calls ended; {samples[-1]}")
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

                sender.stop_keepalive()
                churn.remove(len(churn.calls))

                def settled():
                    summary = daemons.relay_summary()
                    return summary if summary.get("session_count") == 0 and \
                        summary.get("port_pairs", {}).get("used") == 0 and not summary.get("kernel_entries") else None
                try:
                    summary = wait_for(settled, timeout=30, interval=0.5, ignore=(OSError, ValueError))
                except AssertionError:
                    summary = daemons.relay_summary()
                figures["soak_leaked"] = (summary.get("session_count", 0) + summary.get("port_pairs", {}).get("used", 0)
                                          + (summary.get("kernel_entries") or 0))
                details["final_summary"] = summary
                expired = len([line for line in daemons.dispatcher.log_text().splitlines() if " expired on relay " in line])
                deadline = time.monotonic() + 30         # the records of the last removes are being written
                while accounted(database) < churn.ended + expired and time.monotonic() < deadline:
                    time.sleep(0.5)
                figures["soak_accounting_missing"] = max(churn.ended + expired - accounted(database), 0)
                details["expired"] = expired
                errors = error_lines(daemons.dispatcher, daemons.relay)
                figures["soak_error_lines"] = len(errors)
                details["error_lines"] = errors[:10]
            except AssertionError as exc:       # a wait_for that ran out: the figures say what is known
                details["failed"] = str(exc)[:300]
                log(f"soak failed: {details['failed']}")
            finally:
                if churn is not None:
                    churn.close()
                if sender is not None:
                    sender.stop_keepalive()
                shut_down(daemons, manager)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    figures["soak_minutes"] = minutes
    figures["soak_calls"] = calls
    figures["soak_calls_ended"] = churn.ended if churn is not None else 0
    details["samples"] = samples
    if len(samples) >= 4:
        warmup = min(max(1, len(samples) // 5), len(samples) - 3)
        for name in ("relay", "dispatcher"):
            rss_end, rss_after = growth(samples, f"{name}_rss_kb", warmup)
            fds_end, fds_after = growth(samples, f"{name}_fds", warmup)
            figures[f"soak_{name}_rss_growth_pct"] = round(100.0 * (rss_end - rss_after) / rss_after, 2)
            figures[f"soak_{name}_fd_growth"] = int(fds_end - fds_after)
            details[f"{name}_rss_kb"] = [rss_after, rss_end]
            details[f"{name}_fds"] = [fds_after, fds_end]
    rows = [{"figure": key, "value": figures[key], "target": TARGETS[key][0] if key in TARGETS else None,
             "status": ("not checked (smoke)" if smoke else "not measured" if figures[key] is None
                        else "met" if TARGETS[key][1](figures[key]) else "missed") if key in TARGETS else "info"}
            for key in KEYS]
    return {"figures": figures, "rows": rows, "details": details}


def markdown(answer: dict, smoke: bool) -> str:
    d = answer["details"]
    lines = ["## Soak (issue 9 item 6)", "",
             f"`make soak`: {d['calls']} concurrent calls (kernel path), {d['per_second']} ended and as many set "
             f"up every second, for {d['minutes']} min; RSS and descriptors every {d['sample_every_s']:.0f} s; growth "
             "is the end against after the warm-up (the first fifth)." + (" Smoke run: not judged." if smoke else ""),
             "", "| Figure | Key | Value | Target | |", "|---|---|---|---|---|"]
    for row in answer["rows"]:
        lines.append(f"| {TITLES[row['figure']]} | `{row['figure']}` | "
                     f"{row['value']} | {row['target'] or ''} | {row['status'] if row['status'] != 'info' else ''} |")
    for name in ("relay", "dispatcher"):
        if f"{name}_rss_kb" in d:
            lines.append("")
            lines.append(f"- {name}: RSS {d[f'{name}_rss_kb'][0]:.0f} -> {d[f'{name}_rss_kb'][1]:.0f} KB, "
                         f"descriptors {d[f'{name}_fds'][0]:.0f} -> {d[f'{name}_fds'][1]:.0f}")
    if d.get("expired"):
        lines.append(f"- {d['expired']} calls expired on the relay during the run (accounted as expired)")
    if d.get("error_lines"):
        lines.append("- error lines: " + "; ".join(f"`{line[:160]}`" for line in d["error_lines"][:5]))
    if d.get("failed"):
        lines.append(f"- the run stopped early: {d['failed']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench import report

    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="20 s with 60 calls, nothing judged; "
                                                             "writes to bench/build/smoke unless --output is given")
    parser.add_argument("--output", type=Path, help="where RESULTS.md and results.json are (default bench/)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.calls = min(args.minutes, 0.3), min(args.calls, 60)
    output = args.output or (HERE / "build" / "smoke" if args.smoke else HERE)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, stop)
    signal.alarm(int(args.minutes * 60) + 600)
    workdir = Path(tempfile.mkdtemp(prefix="mpb-soak-"))
    try:
        answer = run(args.minutes, args.calls, args.smoke, workdir)
    except KeyboardInterrupt as exc:
        print(f"bench.soak: {exc}; logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    output.mkdir(parents=True, exist_ok=True)
    report.replace_section(output, "soak", markdown(answer, args.smoke), answer["figures"], answer["details"])
    print(json.dumps(answer["figures"], indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    failed = [key for key, (_, ok) in TARGETS.items() if answer["figures"][key] is None or not ok(answer["figures"][key])]
    return 0 if args.smoke or not failed else 3


if __name__ == "__main__":
    sys.exit(main())
