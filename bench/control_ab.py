"""A/B of the control path: the daemons of another tree (by default the last
commit, from `git archive HEAD`) against this checkout's, interleaved in one
run, 8 clients and 1 client (bench/control.py's clients and scenario).

    python -m bench.control_ab [--base DIR] [--rounds 6] [--seconds 2]
    python -m bench.control_ab --open [--base DIR] [--rounds 6]

--open compares the p99 of the open loop instead: 8 clients, each pair at 80 %
of its own peak measured in the half second before each of its one-second
slices, the two pairs taking turns, four turns a round.

Both pairs run in the same namespace: this checkout's dispatcher on the
relay namespace's address, the other one on 127.0.0.1. Prints per client
count the median rate of each and the median of the per-round ratios (new/base).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class _Loopback:
    """The benchmark topology seen with 127.0.0.1 as the relay's address (for the second pair)."""

    def __init__(self, topo):
        self._topo = topo
        self.addresses = dict(topo.addresses, relay="127.0.0.1")

    def __getattr__(self, name):
        return getattr(self._topo, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a tree with scripts/ and mediaproxy/ (default: git HEAD)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--open", action="store_true", help="the open loop's p99 at 80%% of each one's peak")
    args = parser.parse_args(argv)

    from bench import control
    from bench import relay as bench_relay

    opts = control.Options(smoke=False)
    workdir = Path(tempfile.mkdtemp(prefix="mpb-control-ab-"))
    base = args.base
    if base is None:
        base = workdir / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD", "scripts", "mediaproxy"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    runs = {"base": {1: [], 8: []}, "new": {1: [], 8: []}}
    try:
        with control.environment(opts, workdir / "new", reference=False) as bench:
            from tests.support.processes import ProcessManager
            manager = ProcessManager(workdir / "base-logs")
            saved = bench_relay.DISPATCHER, bench_relay.RELAY
            try:
                bench_relay.DISPATCHER = base / "scripts" / "media-dispatcher"
                bench_relay.RELAY = base / "scripts" / "media-relay"
                other = bench_relay.Daemons(_Loopback(bench.topo), workdir / "base", manager, (20000, 30000))
                other.start(relay_options={"kernel_forwarding": "no"})
            finally:
                bench_relay.DISPATCHER, bench_relay.RELAY = saved
            try:
                for daemons in (other, None):
                    bench.run("ours", 8, 1.0, daemons=daemons)
                if args.open:
                    print(json.dumps(open_loop(bench, other, args.rounds), indent=1))
                    return 0
                for round_ in range(args.rounds):
                    for n in (8, 1):
                        for name, daemons in (("base", other), ("new", None)) if round_ % 2 else \
                                (("new", None), ("base", other)):
                            r = bench.run("ours", n, args.seconds, daemons=daemons)
                            r.pop("_latencies")
                            runs[name][n].append(r)
                            print(f"round {round_} {name} {n}: {r['rate']:.0f}/s p99 {r['all_p99_ms']} ms "
                                  f"cpu {r['daemons_cpu']} errors {r['errors']}", file=sys.stderr, flush=True)
            finally:
                manager.stop_all()
                other.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = {}
    for n in (1, 8):
        ratios = [b["rate"] and a["rate"] / b["rate"] for a, b in zip(runs["new"][n], runs["base"][n])]
        out[n] = {"base": statistics.median(r["rate"] for r in runs["base"][n]),
                  "new": statistics.median(r["rate"] for r in runs["new"][n]),
                  "ratio_new_base": round(statistics.median(ratios), 3),
                  "p99_base": statistics.median(r["all_p99_ms"] for r in runs["base"][n]),
                  "p99_new": statistics.median(r["all_p99_ms"] for r in runs["new"][n]),
                  "cpu_per_session_us_base": statistics.median(
                      1e6 * sum(r["daemons_cpu"].values()) / r["rate"] for r in runs["base"][n]),
                  "cpu_per_session_us_new": statistics.median(
                      1e6 * sum(r["daemons_cpu"].values()) / r["rate"] for r in runs["new"][n])}
    print(json.dumps(out, indent=1))
    return 0


def open_loop(bench, other, rounds: int) -> dict:
    """bench.control's open loop (its slices and load), the two pairs taking turns."""
    from bench import control

    opts = control.Options(smoke=False)
    p99 = {"base": [], "new": []}
    slices = {"base": [], "new": []}
    for round_ in range(rounds):
        pieces = []
        for turn in range(opts.open_turns):
            for name, daemons in (("base", other), ("new", None)) if (round_ + turn) % 2 else \
                    (("new", None), ("base", other)):
                measured = len(pieces)
                pieces.append({"server": "ours", "seconds": opts.peak_slice, "daemons": daemons, "name": name})
                pieces.append({"server": "ours", "seconds": opts.open_slice, "mode": "open",
                               "load": control.OPEN_LOOP_LOAD, "rate_of": measured, "daemons": daemons,
                               "name": name})
        done = bench.take_turns(8, pieces)
        for name in p99:
            mine = [s for s, piece in zip(done, pieces) if piece["name"] == name and s["mode"] == "open"]
            slices[name] += [s["all_p99_ms"] for s in mine]
            p99[name].append(control.combined(mine)["all_p99_ms"])
            peaks = [s["rate"] for s, piece in zip(done, pieces) if piece["name"] == name and s["mode"] == "closed"]
            print(f"round {round_} {name}: p99 {p99[name][-1]} ms (slices {[s['all_p99_ms'] for s in mine]}), "
                  f"peaks {peaks}", file=sys.stderr, flush=True)
    return {name: {"p99_rounds": values, "p99_median_round": statistics.median(values),
                   "p99_median_slice": statistics.median(slices[name])} for name, values in p99.items()}


if __name__ == "__main__":
    sys.exit(main())
