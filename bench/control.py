"""Control-plane benchmark (issue 8 item 1): sessions set up and torn down per
second, as the SIP proxy's module does it, against Debian's rtpengine.

    python -m bench.control [--smoke] [--keep-logs]      # as root; prints the result dict as JSON

Ours: media-dispatcher and media-relay (real processes, scripts/, mutual TLS
with certificates from tls/make-certs, the relay with ``kernel_forwarding =
no``: the control path only) in the benchmark's relay namespace
(bench/relay.py Daemons, bench/topology.py RoutedTopology). A session is what
the OpenSIPS/Kamailio mediaproxy module sends over the dispatcher's UNIX
socket: ``update`` (the caller's INVITE, one audio stream), ``update`` (the
callee's 200 OK), ``remove`` (BYE); the dispatcher forwards each to the relay
over TLS, the relay binds two RTP/RTCP port pairs on the offer.

The reference: rtpengine (/usr/bin/rtpengine) in the same namespace, in user
space (``--table=-1``), ng protocol on 127.0.0.1 UDP: ``offer``, ``answer``,
``delete`` with the same SDP (the one the mediaproxy module's ``media`` header
describes); its answers must say ``"result": "ok"`` and carry the SDP
rewritten to its address and a port it allocated.

Clients (bench/control_client.py): separate processes, blocking sockets,
plain Python, the same loop for both servers; each a run of sequential
sessions with distinct call ids. The machine's speed drifts by a third
within seconds (see bench/README), so the servers take turns in slices of a
fraction of a second, the same client processes switching from one to the
next, and each round's figures of all servers come from the same seconds;
the figures are medians over the rounds:

  closed loop, 1 and 8 clients: ours, rtpengine, the floor, a quarter of a
  second each, ten turns a round;
  open loop, 8 clients: our peak (closed loop, half a second), then ours,
  rtpengine and the floor, a second each, at 80 % of that peak (each
  request sent at its scheduled time, its latency counted from that time),
  then rtpengine and the floor each at 80 % of its own peak (measured the
  same way just before), four turns a round; a round's p99 is over its
  open-loop slices, and is also split into the server's answer time (from
  when the client sent the request) and how late the client sent it (behind
  its own unanswered request).

A third server, the floor (bench/control_floor.py): the same two hops (UNIX
socket, then TLS with our certificates, in Twisted) with no work at either
end, to show what the hops themselves cost on this machine.

Figures: control_rate_1, control_rate_1_rtpengine, control_rate_8,
control_rate_8_rtpengine (sessions/s), control_p99_ms (ours, open loop),
control_rate_1_floor, control_rate_8_floor.
Targets (issue 8): rate ratio >= 0.5 with 1 client, >= 0.8 with 8, p99 < 5 ms.
The clients' and the daemons' CPU during every run are in "details".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEYS = ("control_rate_1", "control_rate_1_rtpengine", "control_rate_8", "control_rate_8_rtpengine",
        "control_p99_ms", "control_rate_1_floor", "control_rate_8_floor")
TARGET_RATIO_1 = 0.5
TARGET_RATIO_8 = 0.8
TARGET_P99_MS = 5.0
OPEN_LOOP_LOAD = 0.8

RTPENGINE = "/usr/bin/rtpengine"
NG_PORT = 22222
OUR_PORTS = (30000, 40000)              # the relay's port_range: 5000 pairs
RTPENGINE_PORTS = (40000, 49999)        # rtpengine's --port-min/--port-max
CALLER_SDP_IP = "198.18.1.10"           # what the SDP says (no media is sent)
CALLEE_SDP_IP = "198.18.2.20"
PDEATHSIG = ("setpriv", "--pdeathsig", "KILL")
KINDS = ("offer", "answer", "remove")
SERVERS = ("ours", "rtpengine", "floor")     # floor: bench/control_floor.py, the same hops with no work
FLOOR_PORT = 25070
OWN_PEAK_SERVERS = ("rtpengine", "floor")    # also measured in the open loop at 80 % of their own peak
SLICE_GAP = 0.01                        # between two slices: the sessions under way end first


class Options:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.clients = 8
        # closed loop: a round is `turns` turns of the three servers, `slice` seconds each
        self.rounds = 1 if smoke else 5
        self.turns = 2 if smoke else 10
        self.slice = 0.1 if smoke else 0.25
        # open loop: a round is `open_turns` turns of: our peak (closed loop, `peak_slice` s), then
        # each server at 80 % of that peak for `open_slice` s
        self.open_rounds = 1 if smoke else 3
        self.open_turns = 1 if smoke else 4
        self.peak_slice = 0.2 if smoke else 0.5
        self.open_slice = 0.3 if smoke else 1.0
        self.warmup = 0.2 if smoke else 1.0


def log(message: str) -> None:
    print(f"[bench.control {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values, q: float):
    if not values:
        return None
    values = sorted(values)
    index = min(len(values) - 1, max(0, int(round(q / 100.0 * len(values) + 0.5)) - 1))
    return values[index]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- the reference --

def start_rtpengine(manager, topo, relay_ip: str):
    ns = topo.ns("relay")
    process = manager.start("rtpengine", [
        RTPENGINE, "--config-file=none", "--foreground", "--log-stderr", "--log-level=4", "--table=-1",
        f"--interface={relay_ip}", f"--listen-ng=127.0.0.1:{NG_PORT}",
        f"--port-min={RTPENGINE_PORTS[0]}", f"--port-max={RTPENGINE_PORTS[1]}",
        "--delete-delay=0",                 # ports and calls go at `delete` (else kept 30 s: the range would run out)
        "--pidfile=/dev/null"], netns=ns)
    # ready when it answers a ping
    from bench.control_client import bdecode, bencode
    from tests.support.netns import socket_in_netns
    import socket

    deadline = time.monotonic() + 15
    while True:
        process.assert_running()
        with socket_in_netns(ns, type=socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(b"probe " + bencode({"command": "ping"}), ("127.0.0.1", NG_PORT))
                data = sock.recv(4096)
                if bdecode(data.partition(b" ")[2]).get("result") == b"pong":
                    return process
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rtpengine does not answer on 127.0.0.1:{NG_PORT}:\n{process.tail()}")
        time.sleep(0.1)


# -- the clients --

class Clients:
    """Client processes (bench/control_client.py) in the relay namespace, kept across runs."""

    def __init__(self, topo, count: int, log_dir: Path):
        self.procs = []
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            with open(log_dir / f"client-{index}.log", "ab") as err:
                self.procs.append(subprocess.Popen(
                    [*PDEATHSIG, *topo.command("relay", [sys.executable, "-m", "bench.control_client"])],
                    cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1))
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("a control client did not start (see its log)")

    def run(self, jobs: list[dict], timeout: float) -> list[dict]:
        for proc, job in zip(self.procs, jobs):
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        answers = []
        deadline = time.monotonic() + timeout
        for proc, job in zip(self.procs, jobs):
            import select
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            if not ready:
                raise RuntimeError(f"a control client did not answer within {timeout:.0f} s")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("a control client exited")
            answer = json.loads(line)
            if "fatal" in answer:
                raise RuntimeError(f"a control client failed on {job['server']}: {answer['fatal']}")
            answers.append(answer)
        return answers

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(json.dumps({"quit": True}) + "\n")
                    proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class Floor:
    """bench/control_floor.py's two processes in the relay namespace, used like Daemons."""

    def __init__(self, manager, topo, certs: Path, runtime: Path, relay_ip: str):
        self.socket_path = runtime / "floor.sock"
        ns = topo.ns("relay")
        script = str(HERE / "control_floor.py")
        self.front = manager.start("floor-front", [sys.executable, script, "front", str(certs), str(self.socket_path),
                                                   relay_ip, str(FLOOR_PORT)], netns=ns)
        self.front.wait_for_log(r"listening", timeout=15)
        self.back = manager.start("floor-back", [sys.executable, script, "back", str(certs), relay_ip,
                                                 str(FLOOR_PORT)], netns=ns)
        self.front.wait_for_log(r"back connected", timeout=15)

    def pids(self) -> dict:
        return {"floor-front": self.front.command_pid, "floor-back": self.back.command_pid}


class Bench:
    def __init__(self, opts: Options, topo, clients: Clients, daemons, rtpengine, relay_ip: str, floor=None):
        self.floor = floor
        self.opts = opts
        self.topo = topo
        self.clients = clients
        self.daemons = daemons
        self.rtpengine = rtpengine
        self.relay_ip = relay_ip
        self.job_id = 0

    def pids(self, daemons=None) -> dict:
        pids = dict((daemons or self.daemons).pids())
        if self.rtpengine is not None and daemons is None:
            pids["rtpengine"] = self.rtpengine.command_pid
        if self.floor is not None and daemons is None:
            pids.update(self.floor.pids())
        return pids

    def run(self, server: str, clients: int, seconds: float, mode: str = "closed",
            session_rate: float | None = None, daemons=None) -> dict:
        """One run: `clients` clients on `server` ("ours", "rtpengine" or "floor") for `seconds`; the
        summary (and raw latencies). `daemons`: another dispatcher + relay to measure instead of
        ours (A/B). `session_rate`: the open loop's rate, all clients together."""
        piece = {"server": server, "seconds": seconds, "mode": mode}
        if mode == "open":
            piece["request_rate"] = 3 * session_rate
        return self.take_turns(clients, [piece], daemons=daemons)[0]

    def take_turns(self, clients: int, pieces: list[dict], daemons=None) -> list[dict]:
        """`clients` clients run the slices of `pieces` one after the other ({"server", "seconds",
        "mode"}; an open-loop slice has a "request_rate" of all clients together, or a "load" and
        "rate_of": that fraction of what the clients did in that earlier closed slice; "daemons":
        another dispatcher + relay for this slice than `daemons` or ours). The summary
        of each slice; a slice's daemons' CPU is that of the whole job over their own slices' time
        (the other servers' daemons are idle meanwhile)."""
        from bench.relay import cpu_seconds

        self.job_id += 1
        start = time.monotonic() + 0.15          # every client connected and waiting
        plan = []
        for piece in pieces:
            server = "ours" if piece["server"] == "floor" else piece["server"]   # the floor speaks ours
            target = piece.get("daemons") or daemons or (self.floor if piece["server"] == "floor" else self.daemons)
            entry = {"server": server, "start": start, "end": start + piece["seconds"],
                     "mode": piece.get("mode", "closed"),
                     "target": str(target.socket_path) if server == "ours" else ["127.0.0.1", NG_PORT]}
            for key in ("load", "rate_of"):
                if key in piece:
                    entry[key] = piece[key]
            plan.append((entry, piece.get("request_rate")))
            start += piece["seconds"] + SLICE_GAP
        jobs = []
        for index in range(clients):
            slices = []
            for number, (entry, request_rate) in enumerate(plan):
                entry = dict(entry, prefix=f"b{os.getpid()}-{self.job_id}-{number}-{index}")
                if request_rate is not None:
                    entry["request_rate"] = request_rate
                slices.append(entry)
            jobs.append({"slices": slices, "index": index, "clients": clients, "caller": CALLER_SDP_IP,
                         "callee": CALLEE_SDP_IP, "relay_ip": self.relay_ip, "port0": 2000 + 20 * index,
                         "ports": RTPENGINE_PORTS})
        pids = self.pids(daemons)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        answers = self.clients.run(jobs, timeout=start - time.monotonic() + 30)
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        summaries = []
        for number, piece in enumerate(pieces):
            results = [a["slices"][number] for a in answers]
            summaries.append(_summary(piece["server"], clients, piece.get("mode", "closed"), results))
        busy = collections.Counter()
        for summary in summaries:
            busy[summary["server"]] += summary["seconds"]
        for summary in summaries:
            server = summary["server"]
            summary["daemons_cpu"] = {
                name: round((cpu_after[name] - cpu_before[name]) / max(busy[server], 1e-6), 3)
                for name in pids if daemons is not None or _belongs(name, server)}
        return summaries


def _summary(server: str, clients: int, mode: str, results: list[dict]) -> dict:
    """One slice, all clients (their results of it): rate, latencies (and the raw ones), the
    clients' CPU."""
    window = max(max(a["last"] for a in results) - min(a["first"] for a in results), 1e-6)
    summary = _described(server, clients, mode, window, sum(a["sessions"] for a in results),
                         sum(a["errors"] for a in results), [f for a in results for f in a["failures"]],
                         {kind: [v for a in results for v in a["latency_us"][kind]] for kind in KINDS},
                         sum(a["cpu"] for a in results) / window)
    if mode == "open":
        summary["offered_rate"] = round(sum(a.get("request_rate", 0) for a in results) / 3, 1)
        _split(summary, [(x, y) for a in results for kind in KINDS
                         for x, y in zip(a["latency_us"][kind], a.get("late_us", {}).get(kind, ()))])
        # how much later than planned a client began (busy with the slice before: see control_client)
        summary["shifted_ms"] = round(1000 * max(a.get("shifted", 0.0) for a in results), 1)
    return summary


def _split(summary: dict, pairs: list) -> None:
    """An open-loop run's latencies (from the time each request was due) split in two: how late the
    client sent it (behind its own unanswered request, or waiting for a CPU) and the server's
    answer time after that; each part's p99 (`pairs`: (latency, late) in microseconds, kept raw)."""
    summary["_pairs"] = pairs
    summary["late_p99_ms"] = _ms(percentile([late for _, late in pairs], 99))
    summary["answer_p99_ms"] = _ms(percentile([latency - late for latency, late in pairs], 99))
    summary["answer_mean_ms"] = _ms(statistics.fmean([latency - late for latency, late in pairs])) if pairs else None


def combined(slices: list[dict]) -> dict:
    """The slices of one server in one round as one run: their sessions over their time."""
    first = slices[0]
    seconds = max(sum(s["seconds"] for s in slices), 1e-6)
    summary = _described(first["server"], first["clients"], first["mode"], seconds,
                         sum(s["sessions"] for s in slices), sum(s["errors"] for s in slices),
                         [f for s in slices for f in s["failures"]],
                         {kind: [v for s in slices for v in s["_latencies"][kind]] for kind in KINDS},
                         sum(s["clients_cpu"] * s["seconds"] for s in slices) / seconds)
    summary["slices"] = len(slices)
    summary["daemons_cpu"] = first["daemons_cpu"]
    if first["mode"] == "open":
        summary["offered_rate"] = round(sum(s["offered_rate"] * s["seconds"] for s in slices) / seconds, 1)
        _split(summary, [pair for s in slices for pair in s["_pairs"]])
        summary["shifted_ms"] = max(s["shifted_ms"] for s in slices)
    return summary


def _described(server, clients, mode, seconds, sessions, errors, failures, latencies, clients_cpu) -> dict:
    """What a run's summary says (`latencies`: microseconds by kind, kept raw as `_latencies`)."""
    return {
        "server": server, "clients": clients, "mode": mode, "seconds": round(seconds, 3),
        "sessions": sessions, "errors": errors, "rate": round(sessions / seconds, 1), "failures": failures[:5],
        "latency_ms": {kind: {"p50": _ms(percentile(v, 50)), "p99": _ms(percentile(v, 99)), "n": len(v)}
                       for kind, v in latencies.items()},
        "all_p99_ms": _ms(percentile([x for v in latencies.values() for x in v], 99)),
        "clients_cpu": round(clients_cpu, 3),          # cores, the clients together
        "_latencies": latencies,
    }


def _ms(us):
    return None if us is None else round(us / 1000.0, 3)


def _pooled(runs, kind=None, q=99):
    values = [x for r in runs for k, v in r["_latencies"].items() if kind in (None, k) for x in v]
    return _ms(percentile(values, q))


def _row(figure, value, reference=None, ratio=None, target=None, status=None):
    return {"figure": figure, "value": value, "reference": reference, "ratio": ratio, "target": target,
            "status": status}


def _status(smoke: bool, ok) -> str:
    if smoke:
        return "not checked (smoke)"
    if ok is None:
        return "not measured"
    return "met" if ok else "missed"


@contextlib.contextmanager
def environment(opts: Options, workdir: Path, reference: bool = True):
    """The relay namespace with media-dispatcher, media-relay, rtpengine (if `reference`) and the
    client processes; everything is stopped and removed on the way out, also on failure."""
    from bench.relay import Daemons, shut_down
    from bench.topology import RELAY_IP, RoutedTopology
    from tests.support.processes import ProcessManager

    if reference and not os.access(RTPENGINE, os.X_OK):
        raise RuntimeError(f"{RTPENGINE} is missing: apt-get install rtpengine-daemon (make deps)")
    manager = ProcessManager(workdir / "logs")
    daemons = clients = None
    with RoutedTopology() as topo:
        try:
            daemons = Daemons(topo, workdir, manager, OUR_PORTS)
            daemons.start(relay_options={"kernel_forwarding": "no"})
            rtpengine = start_rtpengine(manager, topo, RELAY_IP) if reference else None
            floor = Floor(manager, topo, workdir / "tls", daemons.runtime, RELAY_IP) if reference else None
            clients = Clients(topo, opts.clients, workdir / "logs")
            yield Bench(opts, topo, clients, daemons, rtpengine, RELAY_IP, floor)
        finally:
            if clients is not None:
                clients.stop()
            shut_down(daemons, manager)


def run(smoke: bool, workdir: Path) -> dict:
    opts = Options(smoke)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    figures = dict.fromkeys(KEYS)
    details: dict = {"loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
                     "options": {k: v for k, v in vars(opts).items()}}
    notes: list[str] = []
    rows: list[dict] = []
    runs: list[dict] = []
    with environment(opts, workdir) as bench:
        log("daemons, rtpengine and clients up; warming up")
        for server in SERVERS:
            warm = bench.run(server, opts.clients, opts.warmup)
            if warm["errors"] or not warm["sessions"]:
                raise RuntimeError(f"{server}: warm-up failed: {warm['failures']}")

        # -- closed loop: the servers take turns every `slice` seconds, so that each round's
        # figures of all three come from the same seconds (this machine's speed drifts) --
        for round_ in range(opts.rounds):
            for clients_n in (1, opts.clients):
                pieces = [{"server": server, "seconds": opts.slice}
                          for _ in range(opts.turns) for server in SERVERS]
                slices = bench.take_turns(clients_n, pieces)
                for server in SERVERS:
                    r = combined([x for x in slices if x["server"] == server])
                    r["round"] = round_
                    runs.append(r)
                    log(f"round {round_ + 1}/{opts.rounds} {server}, {clients_n} client(s): {r['rate']:.0f} "
                        f"sessions/s, p99 {r['all_p99_ms']} ms, clients' CPU {r['clients_cpu']:.2f}, "
                        f"errors {r['errors']}")

        def of(server, n, mode="closed"):
            return [r for r in runs if r["server"] == server and r["clients"] == n and r["mode"] == mode]

        def round_ratios(n):
            out = []
            for round_ in range(opts.rounds):
                ours = [r for r in of("ours", n) if r["round"] == round_]
                ref = [r for r in of("rtpengine", n) if r["round"] == round_]
                if ours and ref and ref[0]["rate"] > 0:
                    out.append(ours[0]["rate"] / ref[0]["rate"])
            return out

        for n, key in ((1, "control_rate_1"), (opts.clients, "control_rate_8")):
            figures[key] = median([r["rate"] for r in of("ours", n)])
            figures[key + "_rtpengine"] = median([r["rate"] for r in of("rtpengine", n)])
            figures[key + "_floor"] = median([r["rate"] for r in of("floor", n)])

        # -- open loop at 80 % of our 8-client peak: ours, rtpengine and the floor at that same rate --
        # The peak is measured (closed loop) just before each open slice: this machine's speed drifts
        # by a third over minutes, and 80 % of a rate measured earlier can be all of it now.
        peak = max(r["rate"] for r in of("ours", opts.clients))
        offered_rates, peaks = [], []
        # Then rtpengine and the floor each at 80 % of its own peak: the same target put to the reference
        # and to the bare hops, on this machine.
        own_peaks = {server: [] for server in OWN_PEAK_SERVERS}
        open_own = {server: [] for server in OWN_PEAK_SERVERS}
        for round_ in range(opts.open_rounds):
            pieces = []
            for _ in range(opts.open_turns):
                measured = len(pieces)
                pieces.append({"server": "ours", "seconds": opts.peak_slice})
                pieces += [{"server": server, "seconds": opts.open_slice, "mode": "open", "load": OPEN_LOOP_LOAD,
                            "rate_of": measured} for server in SERVERS]
                for server in OWN_PEAK_SERVERS:
                    pieces.append({"server": server, "seconds": opts.peak_slice, "own_peak": True})
                    pieces.append({"server": server, "seconds": opts.open_slice, "mode": "open",
                                   "load": OPEN_LOOP_LOAD, "rate_of": len(pieces) - 1, "own_peak": True})
            slices = bench.take_turns(opts.clients, pieces)
            ours_rate = [x for x, p in zip(slices, pieces) if not p.get("own_peak")]
            peaks += [x["rate"] for x in ours_rate if x["mode"] == "closed"]
            for server in SERVERS:
                r = combined([x for x in ours_rate if x["server"] == server and x["mode"] == "open"])
                r["round"] = round_
                runs.append(r)
                if server == "ours":
                    offered_rates.append(r["offered_rate"])
                log(f"open loop {round_ + 1}/{opts.open_rounds} {server} at {r['offered_rate']:.0f} sessions/s "
                    f"(80% of our peak just before each of its slices): {r['rate']:.0f} done, "
                    f"p99 {r['all_p99_ms']} ms (the server's answer {r['answer_p99_ms']} ms), errors {r['errors']}")
            for server in OWN_PEAK_SERVERS:
                own = [x for x, p in zip(slices, pieces) if p.get("own_peak") and x["server"] == server]
                own_peaks[server] += [x["rate"] for x in own if x["mode"] == "closed"]
                r = combined([x for x in own if x["mode"] == "open"])
                r["round"], r["own_peak"] = round_, True
                open_own[server].append(r)
                log(f"open loop {round_ + 1}/{opts.open_rounds} {server} at {r['offered_rate']:.0f} sessions/s "
                    f"(80% of its own peak): {r['rate']:.0f} done, p99 {r['all_p99_ms']} ms (the server's answer "
                    f"{r['answer_p99_ms']} ms), errors {r['errors']}")
        all_own = [r for server in OWN_PEAK_SERVERS for r in open_own[server]]
        offered = median(offered_rates)
        details["open_loop_rates"] = [round(rate, 1) for rate in offered_rates]
        details["open_loop_peaks"] = [round(rate, 1) for rate in peaks]
        open_ours, open_ref = of("ours", opts.clients, "open"), of("rtpengine", opts.clients, "open")
        open_floor = of("floor", opts.clients, "open")
        # each round is a p99 of its own (some 20,000 requests): the figure is the median round's,
        # as the rates are medians of rounds; the rounds pooled are in the notes
        figures["control_p99_ms"] = median([r["all_p99_ms"] for r in open_ours])
        ref_p99 = median([r["all_p99_ms"] for r in open_ref])
        details["control_p99_ms_pooled"] = _pooled(open_ours)
        details["control_p99_ms_pooled_rtpengine"] = _pooled(open_ref)

        errors = sum(r["errors"] for r in runs + all_own)
        if errors:
            notes.append(f"{errors} requests failed: {[f for r in runs + all_own for f in r['failures']][:5]}")

        # -- the table --
        for n, key, target in ((1, "control_rate_1", TARGET_RATIO_1),
                               (opts.clients, "control_rate_8", TARGET_RATIO_8)):
            ratios = round_ratios(n)
            ratio = median(ratios)
            rows.append(_row(f"sessions/s (update+update+remove), {n} client{'s' if n > 1 else ''}",
                             figures[key], figures[key + "_rtpengine"],
                             None if ratio is None else round(ratio, 3), f">= {target} x rtpengine",
                             _status(smoke, None if ratio is None else ratio >= target)))
            details[f"ratios_{n}"] = [round(x, 3) for x in ratios]
            floor = figures[key + "_floor"]
            reference = figures[key + "_rtpengine"]
            rows.append(_row(f"sessions/s, {n} client{'s' if n > 1 else ''}: the floor (the same hops, no work)",
                             floor, reference, None if not (floor and reference) else round(floor / reference, 3),
                             None, "info"))
        p99 = figures["control_p99_ms"]
        rows.append(_row(f"p99 latency ms, open loop at 80% of our peak ({offered:.0f} sessions/s, "
                         f"{opts.clients} clients)", p99, ref_p99,
                         None if not (p99 and ref_p99) else round(p99 / ref_p99, 2), f"< {TARGET_P99_MS} ms",
                         _status(smoke, None if p99 is None else p99 < TARGET_P99_MS)))
        for n in (1, opts.clients):
            for kind in KINDS:
                for q in (50, 99):
                    ours_v = _pooled(of("ours", n), kind, q)
                    ref_v = _pooled(of("rtpengine", n), kind, q)
                    rows.append(_row(f"{kind} p{q} ms, {n} client{'s' if n > 1 else ''} (closed loop)", ours_v,
                                     ref_v, None if not (ours_v and ref_v) else round(ours_v / ref_v, 2),
                                     None, "info"))
        floor_p99 = median([r["all_p99_ms"] for r in open_floor])
        rows.append(_row("p99 latency ms, open loop at the same rate: the floor (the same hops, no work)", floor_p99,
                         ref_p99, None if not (floor_p99 and ref_p99) else round(floor_p99 / ref_p99, 2), None,
                         "info"))
        for kind in KINDS:
            ours_v, ref_v = _pooled(open_ours, kind, 99), _pooled(open_ref, kind, 99)
            rows.append(_row(f"{kind} p99 ms, open loop", ours_v, ref_v,
                             None if not (ours_v and ref_v) else round(ours_v / ref_v, 2), None, "info"))
        for part, label in (("answer_p99_ms", "the server's answer (from when the client sent the request)"),
                            ("late_p99_ms", "how late the clients sent (behind their own unanswered request, "
                                            "or waiting for a CPU)")):
            ours_v, ref_v = median([r[part] for r in open_ours]), median([r[part] for r in open_ref])
            rows.append(_row(f"p99 ms, open loop, of {label}", ours_v, ref_v,
                             None if not (ours_v and ref_v) else round(ours_v / ref_v, 2), None, "info"))
        for server in OWN_PEAK_SERVERS:
            own_p99 = median([r["all_p99_ms"] for r in open_own[server]])
            details[f"control_p99_ms_{server}_own_peak"] = own_p99
            details[f"open_loop_rates_{server}_own_peak"] = [r["offered_rate"] for r in open_own[server]]
            what = "the reference" if server == "rtpengine" else "the bare hops"
            rows.append(_row(f"p99 latency ms, open loop: {server} at 80% of its own peak "
                             f"({median([r['offered_rate'] for r in open_own[server]]):.0f} sessions/s), the same "
                             f"target put to {what}", own_p99, None, None, f"< {TARGET_P99_MS} ms",
                             "info: " + _status(smoke, None if own_p99 is None else own_p99 < TARGET_P99_MS)))

        # -- where the time goes --
        def mean_of(rs, path):
            values = []
            for r in rs:
                v = r
                for p in path:
                    v = v.get(p) if isinstance(v, dict) else None
                values.append(v)
            return median(values)

        for n in (1, opts.clients):
            for server in SERVERS:
                rs = of(server, n)
                cpu = {name: mean_of(rs, ("daemons_cpu", name)) for name in bench.pids()}
                notes.append(
                    f"{server}, {n} client(s): {median([r['rate'] for r in rs]):.0f} sessions/s; CPU cores busy "
                    f"(median): clients {mean_of(rs, ('clients_cpu',)):.2f}, " +
                    ", ".join(f"{name} {value:.2f}" for name, value in cpu.items() if value is not None and
                              _belongs(name, server)))
        for n in (1, opts.clients):
            key = "control_rate_1" if n == 1 else "control_rate_8"
            ours, floor, ref = figures[key], figures[key + "_floor"], figures[key + "_rtpengine"]
            if ours and floor and ref:
                notes.append(f"{n} client(s): the floor (the same UNIX socket and TLS hops in Twisted, no work at "
                             f"either end) did {floor:.0f} sessions/s, {floor / ref:.2f} of rtpengine; ours did "
                             f"{ours / floor:.2f} of the floor: the rest is the daemons' own work on each request "
                             f"(framing and parsing in both daemons, session state, four UDP sockets opened and "
                             f"closed a call, three log lines a call, TLS; `python -m bench.control_profile` "
                             f"shows the split)")
        notes.append("hops: a session's three requests wake a process 10 times on their way with ours (the "
                     "dispatcher and the relay for the two updates, the dispatcher alone for the remove, which "
                     "it answers before the relay does) and 6 times with rtpengine (one process); on this "
                     "machine a wake-up alone costs some 100 us, which the floor shows")
        notes.append("the machine has %d CPUs shared by the clients and the servers: a client's CPU is taken "
                     "from the server it measures (each client is a blocking Python loop, ~%.0f us of its own "
                     "CPU a session)" % (os.cpu_count() or 1, _client_cost_us(runs)))
        notes.append("open loop: " + ", ".join(f"{rate:.0f}" for rate in offered_rates) + " sessions/s offered "
                     f"in its rounds (in each slice 80% of our 8-client rate in the {opts.peak_slice:g} s just "
                     f"before it, which ranged {min(peaks):.0f}-{max(peaks):.0f}; the best closed-loop round did "
                     f"{peak:.0f}); p99 of every request, latency from its scheduled time")
        def each(rs, key="all_p99_ms"):
            return _each_round(rs, key)
        notes.append(f"open loop p99 of each round (ms): ours {each(open_ours)}; rtpengine {each(open_ref)}; the "
                     f"floor {each(open_floor)}; the figure is the median round's. All rounds pooled: ours "
                     f"{details['control_p99_ms_pooled']} ms, rtpengine {details['control_p99_ms_pooled_rtpengine']} "
                     "ms: a round in which the processes on this machine's CPUs fall behind for some tens of ms "
                     "(rtpengine's rounds and the floor's show such bursts too) decides the pooled figure")
        for server in OWN_PEAK_SERVERS:
            notes.append(f"open loop, {server} at 80% of its own peak (its peak in the {opts.peak_slice:g} s before "
                         f"each slice: {', '.join(f'{r:.0f}' for r in own_peaks[server])} sessions/s): p99 of each "
                         f"round (ms) {each(open_own[server])}, the server's answer "
                         f"{each(open_own[server], 'answer_p99_ms')}")
        notes.append("open loop p99 of each round, split (ms): the server's answer, from when the client sent "
                     f"the request: ours {each(open_ours, 'answer_p99_ms')}; rtpengine "
                     f"{each(open_ref, 'answer_p99_ms')}; the floor {each(open_floor, 'answer_p99_ms')}; how "
                     f"late the clients sent: ours {each(open_ours, 'late_p99_ms')}; rtpengine "
                     f"{each(open_ref, 'late_p99_ms')}; the floor {each(open_floor, 'late_p99_ms')} (a client "
                     "has one request out at a time: while the server falls behind, the client's next requests "
                     "wait, and their latency counts from when they were due)")
        def busy(rs):
            return ", ".join("-" if not r["answer_mean_ms"] else
                             f"{3 * r['offered_rate'] / opts.clients * r['answer_mean_ms'] / 10:.0f}%" for r in rs)
        notes.append("open loop: how busy each client's connection was (its requests a second times their mean "
                     f"answer time), in each round: ours {busy(open_ours)}; rtpengine at our rate {busy(open_ref)}; "
                     f"the floor at our rate {busy(open_floor)}; " + "; ".join(
                         f"{server} at its own peak {busy(open_own[server])}" for server in OWN_PEAK_SERVERS) +
                     f". Each of the {opts.clients} connections has one request out at a time (as in the closed "
                     "loop that sets the peak): its next request waits behind a slow answer, so the busier the "
                     "connections, the further a short slowdown of the machine spreads over the requests behind "
                     "it (how late the clients sent, above)")
        notes.append("open loop: a client still busy with the slice before began its slice that much later (its "
                     "schedule shifted, so that no server is charged with the backlog of the one before); the "
                     "largest shift in each round (ms): " + "; ".join(
                         f"{name} {each(rs, 'shifted_ms')}" for name, rs in
                         (("ours", open_ours), ("rtpengine", open_ref), ("the floor", open_floor),
                          *((f"{server} at its own peak", open_own[server]) for server in OWN_PEAK_SERVERS))))
        details["runs"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs + all_own]
        details["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return {"figures": figures, "rows": rows, "details": details, "notes": notes}


def _each_round(runs, key: str) -> str:
    """A figure of each round (ms), as the notes list them."""
    return ", ".join("-" if r[key] is None else f"{r[key]:.1f}" for r in runs)


def _belongs(process: str, server: str) -> bool:
    if server == "floor":
        return process.startswith("floor-")
    return process == "rtpengine" if server == "rtpengine" else process in ("relay", "dispatcher")


def _client_cost_us(runs) -> float:
    costs = [r["clients_cpu"] * r["seconds"] / r["sessions"] * 1e6 for r in runs
             if r["mode"] == "closed" and r["sessions"]]
    return median(costs) or 0.0


class _Stopped(BaseException):
    pass


def _stop(signum, frame):
    for other in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(other, signal.SIG_IGN)
    raise _Stopped(f"stopped by {signal.Signals(signum).name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, no target checked")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and configs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.control: needs root (network namespaces)", file=sys.stderr)
        return 2
    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    signal.alarm(100 if args.smoke else 300)
    workdir = Path(tempfile.mkdtemp(prefix="mpb-control-"))
    try:
        result = run(args.smoke, workdir)
    except _Stopped as exc:
        print(f"bench.control: {exc}; namespaces and daemons removed; logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    print(json.dumps(result, indent=1))
    if args.keep_logs:
        print(f"bench.control: logs in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
