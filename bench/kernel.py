"""Kernel path benchmark (issue 4, issue 8 item 6).

Packets per second delivered at the callee through the relay namespace, in
one run, three ways:

  a. plain  — plain IP forwarding: the caller sends to the callee's own
              address and the relay namespace routes it (untracked);
  b. ref    — the reference: the caller sends to relay:A and a DNAT+SNAT
              conntrack entry made by hand with the conntrack CLI sends it
              on as relay:B -> callee:Y (the kernel's own ceiling);
  c. relay  — our relay's kernel path: calls set up through the dispatcher's
              proxy socket, both parties latched, the relay's own conntrack
              entries forwarding caller -> relay:A as relay:B -> callee:Y.

The machine's speed drifts (a shared VM: a CPU-bound loop here swings by 2x
within seconds), so figures taken one after the other cannot be compared.
The sender therefore interleaves the scenarios (one group of streams per
scenario, 10 ms slices in turn) and the receiver counts per group: every
ratio comes from the same seconds of the same run.

Phases:
  0. pristine: plain forwarding in the fresh namespace (no netfilter table
     at all), for information;
  B. hooks on (nat table + a conntrack rule), the CLI's entries: a and b
     interleaved -> the reference ratio b/a;
  C. media-dispatcher + media-relay running: a, b and c interleaved -> c/b;
     then c alone while the relay process's CPU time is read; the relay's
     user-space packet counter and the entries' kernel counters show who
     forwarded.
Plus entries created/removed per second: the conntrack CLI (one process per
entry), and the relay's ConntrackTable API (bench/entries.py).

Plain forwarding in phases B and C is untracked (raw PREROUTING CT
--notrack for the callee's address): conntrack is on in the namespace then,
and without that every plain stream would get an entry of its own.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import conntrack as ct
from bench.relay import Daemons, cpu_seconds, rss_kb, shut_down
from bench.tools import BlastResult, Stream, blast, build_tools
from bench.topology import CALLEE_IP, CALLER_IP, RELAY_IP, RoutedTopology

PLAIN, REFERENCE, RELAY, REFERENCE_EV = 0, 1, 2, 3
NAMES = {PLAIN: "plain", REFERENCE: "reference", RELAY: "relay", REFERENCE_EV: "reference_ev"}

# Ports (see README): no two scenarios share a port anywhere.
PLAIN_CALLER, PLAIN_CALLEE = 20000, 30000             # + i
REF_CALLER, REF_RELAY_A, REF_RELAY_B, REF_CALLEE = 21000, 40000, 41000, 31000   # + i
RELAY_CALLER, RELAY_CALLEE = 22000, 32000             # + 2i (even: RTP)
RELAY_PORT_RANGE = (50000, 56000)                     # 4 ports a stream: 1500 streams
CLI_CALLER, CLI_RELAY_A, CLI_RELAY_B, CLI_CALLEE = 25000, 45000, 46000, 35000   # + i
# the reference again, its entries made while the relay runs (a conntrack event listener)
EV_CALLER, EV_RELAY_A, EV_RELAY_B, EV_CALLEE = 24000, 47000, 48000, 34000        # + i
RELAY_MARK = 0x4D50                                   # the relay's default conntrack mark
API_MARK = 0x4D5B


@dataclass
class Options:
    streams: tuple[int, ...] = (1, 1000)
    rounds: int = 5                     # interleaved blasts per stream count, packet sender
    udp_rounds: int = 1                 # the same with the UDP-socket sender (cross-check)
    group_seconds: float = 1.2          # sending time per scenario within one blast
    cpu_seconds: float = 15.0           # relay-only blast while its CPU is read: one traffic
                                        # sampling period (15 s by default), so a pass falls inside
    cli_entries: int = 200
    api_runs: str = "1000:1000,1000:100,200:10,50:1"
    netlink_entries: int = 1000
    reference_ev: bool = True           # phase C: also the CLI's entries made while the relay runs
    size: int = 172
    smoke: bool = False

    @classmethod
    def smoke_options(cls) -> "Options":
        return cls(streams=(1, 20), rounds=1, udp_rounds=1, group_seconds=0.35, cpu_seconds=1.0,
                   cli_entries=20, api_runs="100:100,10:1", netlink_entries=100, smoke=True)


@dataclass
class Results:
    numbers: dict = field(default_factory=dict)      # results.json
    details: dict = field(default_factory=dict)      # per blast, per run (results.json "details")
    notes: list = field(default_factory=list)        # what happened, for RESULTS.md
    available: dict = field(default_factory=dict)    # scenario -> None or the reason it was not measured


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- streams of each scenario --

def plain_streams(n: int) -> list[Stream]:
    return [Stream(PLAIN, CALLEE_IP, PLAIN_CALLER + i, PLAIN_CALLEE + i, PLAIN_CALLEE + i) for i in range(n)]


def reference_entries(n: int, late: bool = False) -> list[ct.NatEntry]:
    if late:
        return [ct.NatEntry(EV_CALLER + i, EV_RELAY_A + i, EV_CALLEE + i, EV_RELAY_B + i) for i in range(n)]
    return [ct.NatEntry(REF_CALLER + i, REF_RELAY_A + i, REF_CALLEE + i, REF_RELAY_B + i) for i in range(n)]


def reference_streams(n: int, late: bool = False) -> list[Stream]:
    return [Stream(REFERENCE_EV if late else REFERENCE, RELAY_IP, e.sport, e.dport, e.callee_port)
            for e in reference_entries(n, late)]


def relay_streams(calls, n: int) -> list[Stream]:
    return [Stream(RELAY, RELAY_IP, c.caller_port, c.caller_facing, c.callee_port) for c in calls[:n]]


# -- checks by traffic --

def _rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, 0x4D504245) + b"\xd5" * 160


def probe(topo, source_port: int, destination: tuple[str, int], callee_port: int, timeout: float = 2.0):
    """Send one packet from the caller; the (ip, port) it came from at the callee, or None."""
    from tests.support.netns import socket_in_netns

    with socket_in_netns(topo.ns("callee"), type=socket.SOCK_DGRAM) as receiver, \
            socket_in_netns(topo.ns("caller"), type=socket.SOCK_DGRAM) as sender:
        receiver.bind((CALLEE_IP, callee_port))
        receiver.settimeout(timeout)
        sender.bind((CALLER_IP, source_port))
        sender.sendto(_rtp(1), destination)
        try:
            _, source = receiver.recvfrom(2048)
            return source
        except socket.timeout:
            return None


def latch(topo, calls, timeout: float = 30.0) -> int:
    """Both parties of every call send RTP to their relay port until each has
    received the other's (the relay latches a party from its first packet).
    Returns the rounds it took."""
    from tests.support.netns import socket_in_netns

    callers, callees = [], []
    try:
        for call in calls:
            a = socket_in_netns(topo.ns("caller"), type=socket.SOCK_DGRAM)
            callers.append(a)
            a.bind((CALLER_IP, call.caller_port))
            a.setblocking(False)
            b = socket_in_netns(topo.ns("callee"), type=socket.SOCK_DGRAM)
            callees.append(b)
            b.bind((CALLEE_IP, call.callee_port))
            b.setblocking(False)
        pending = set(range(len(calls)))
        got_caller, got_callee = set(), set()
        deadline = time.monotonic() + timeout
        rounds = 0
        while pending:
            rounds += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(calls)} calls did not carry media both ways")
            for i in pending:
                callers[i].sendto(_rtp(rounds), (RELAY_IP, calls[i].caller_facing))
                callees[i].sendto(_rtp(rounds), (RELAY_IP, calls[i].callee_facing))
            time.sleep(0.05)
            for i in list(pending):
                for sockets, got in ((callers, got_caller), (callees, got_callee)):
                    try:
                        while True:
                            sockets[i].recv(2048)
                            got.add(i)
                    except BlockingIOError:
                        pass
                if i in got_caller and i in got_callee:
                    pending.discard(i)
        return rounds
    finally:
        for sock in callers + callees:
            sock.close()


def relay_entries(topo) -> list[ct.ListedEntry]:
    return [e for e in ct.list_entries(topo, "-m", str(RELAY_MARK)) if e.dport != 0]


def wait_relay_entries(topo, calls, timeout: float = 20.0) -> list[ct.ListedEntry]:
    wanted = {(c.caller_port, c.caller_facing) for c in calls}
    deadline = time.monotonic() + timeout
    while True:
        entries = relay_entries(topo)
        have = {(e.sport, e.dport) for e in entries if e.src == CALLER_IP and e.dst == RELAY_IP}
        if wanted <= have:
            return entries
        if time.monotonic() > deadline:
            raise TimeoutError(f"the relay made {len(wanted & have)} of {len(wanted)} kernel entries")
        time.sleep(0.2)


# -- the measurements --

def interleaved(topo, binaries, groups: dict[int, list[Stream]], n: int, opts: Options, mode: str) -> dict:
    streams = [s for group in sorted(groups) for s in groups[group][:n]]
    seconds = opts.group_seconds * len(groups)
    result = blast(topo, binaries, streams, seconds, mode=mode, size=opts.size)
    return summarize(result)


def summarize(result: BlastResult) -> dict:
    """One blast: per scenario the packets delivered at the callee over the
    time spent sending it ("pps"), and per round of slices the rate of each
    scenario ("cycles": the ratios are taken within a round, then the median)."""
    out = {"mode": result.mode, "seconds": round(result.seconds, 3),
           # the sender's CPU time over its wall time: well under 1 when other work took its CPU
           "sender_cpu_share": round(result.sender_cpu / result.seconds, 3) if result.seconds else None,
           "cpus": result.cpu_shares}
    # The sender's CPU time while sending includes the forwarding done in its context (softirq,
    # tick-based accounting): the share of its CPU the measured path got; the rest went to other work.
    out["path_cpu_share"] = out["sender_cpu_share"]
    for g, r in result.groups.items():
        out[NAMES[g]] = {"streams": r.streams, "sent": r.sent, "received": r.received, "errors": r.errors,
                         "seconds": round(r.seconds, 4), "pps": round(r.pps, 1)}
    out["cycles"] = [{NAMES[g]: round(pps, 1) for g, pps in cycle.items()} for cycle in result.cycles()]
    for top, bottom in (("reference", "plain"), ("relay", "reference"), ("relay", "reference_ev"),
                        ("reference_ev", "reference")):
        ratios = cycle_ratios([out], top, bottom)
        if ratios:
            out[f"{top}/{bottom}"] = round(statistics.median(ratios), 4)
    return out


def cycle_ratios(runs, top: str, bottom: str) -> list[float]:
    """top/bottom in every round of slices of these blasts."""
    return [c[top] / c[bottom] for run in runs for c in run.get("cycles", [])
            if top in c and bottom in c and c[bottom] > 0]


def cycle_costs(runs, top: str, bottom: str) -> list[float]:
    """1/top - 1/bottom (us a packet) in every round of slices."""
    return [1e6 / c[top] - 1e6 / c[bottom] for run in runs for c in run.get("cycles", [])
            if c.get(top, 0) > 0 and c.get(bottom, 0) > 0]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio_of(run: dict, top: str, bottom: str):
    """The blast's ratio: the median over its rounds of slices, else from its totals."""
    if f"{top}/{bottom}" in run:
        return run[f"{top}/{bottom}"]
    if top in run and bottom in run and run[bottom]["pps"] > 0:
        return run[top]["pps"] / run[bottom]["pps"]
    return None


def delivered_ratio(run: dict, top: str, bottom: str):
    if top in run and bottom in run and run[bottom]["pps"] > 0:
        return run[top]["pps"] / run[bottom]["pps"]
    return None


def ensure_reference(topo, n: int, late: bool = False) -> int:
    """The CLI's entries expire after nf_conntrack_udp_timeout without packets
    (unreplied UDP): put back any that are gone. Returns how many were put back."""
    wanted = reference_entries(n, late)
    have = {(e.sport, e.dport) for e in ct.list_entries(topo, "-s", CALLER_IP, "-d", RELAY_IP)}
    missing = [e for e in wanted if (e.sport, e.dport) not in have]
    if missing:
        ct.run_each(topo, [ct.insert_command(e) for e in missing])
    return len(missing)


def run(opts: Options, workdir: Path) -> Results:
    from tests.support.processes import ProcessManager

    results = Results()
    numbers, details = results.numbers, results.details
    binaries = build_tools()
    n_max = max(opts.streams)
    manager = ProcessManager(workdir / "logs")
    daemons = None
    details["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with RoutedTopology() as topo:
        try:
            topo.ping()
            details["topology"] = {"caller": CALLER_IP, "relay": RELAY_IP, "callee": CALLEE_IP,
                                   "namespaces": [topo.ns(h) for h in ("caller", "relay", "callee")]}

            # -- phase 0: pristine plain forwarding (no netfilter table in the relay namespace) --
            details["pristine"] = {}
            for n in opts.streams:
                run_ = interleaved(topo, binaries, {PLAIN: plain_streams(n)}, n, opts, "packet")
                details["pristine"][n] = run_
                numbers[f"plain_pps_pristine_{n}"] = round(run_["plain"]["pps"])
                log(f"pristine plain forwarding, {n} streams: {run_['plain']['pps']:.0f} packets/s")

            # -- hooks; the reference's entries, and how fast the CLI makes them --
            topo.sysctl("relay", "net.netfilter.nf_conntrack_acct", "1")
            ct.enable_hooks(topo)
            ct.notrack_destination(topo, CALLEE_IP)
            cli = [ct.NatEntry(CLI_CALLER + i, CLI_RELAY_A + i, CLI_CALLEE + i, CLI_RELAY_B + i)
                   for i in range(opts.cli_entries)]
            seconds, failed = ct.run_each(topo, [ct.insert_command(e) for e in cli])
            made = len([e for e in ct.list_entries(topo, "-s", CALLER_IP, "-d", RELAY_IP)
                        if CLI_RELAY_A <= e.dport < CLI_RELAY_A + len(cli)])
            numbers["entries_installed_per_s_cli"] = round(made / seconds, 1)
            seconds, failed_delete = ct.run_each(topo, [ct.delete_command(e) for e in cli])
            left = len([e for e in ct.list_entries(topo, "-s", CALLER_IP, "-d", RELAY_IP)
                        if CLI_RELAY_A <= e.dport < CLI_RELAY_A + len(cli)])
            numbers["entries_removed_per_s_cli"] = round((made - left) / seconds, 1)
            details["cli_entries"] = {"entries": len(cli), "created": made, "insert_failures": failed,
                                      "delete_failures": failed_delete, "left": left}
            log(f"conntrack CLI: {numbers['entries_installed_per_s_cli']} entries/s created, "
                f"{numbers['entries_removed_per_s_cli']} removed")

            seconds, failed = ct.run_each(topo, [ct.insert_command(e) for e in reference_entries(n_max)])
            details["reference_setup"] = {"entries": n_max, "seconds": round(seconds, 3), "failures": failed}
            entry = reference_entries(1)[0]
            source = probe(topo, entry.sport, (RELAY_IP, entry.dport), entry.callee_port)
            if source != (RELAY_IP, entry.snat_port):
                raise RuntimeError(f"the hand-made NAT entry does not apply: the callee got {source} "
                                   f"instead of a packet from {RELAY_IP}:{entry.snat_port}")
            source = probe(topo, PLAIN_CALLER, (CALLEE_IP, PLAIN_CALLEE), PLAIN_CALLEE)
            if source != (CALLER_IP, PLAIN_CALLER):
                raise RuntimeError(f"plain forwarding does not work: the callee got {source}")
            tracked = [e for e in ct.list_entries(topo, "-d", CALLEE_IP) if e.sport == PLAIN_CALLER]
            if tracked:
                raise RuntimeError("plain forwarding is tracked despite the NOTRACK rule")
            # unreplied entries live nf_conntrack_udp_timeout (30 s) after their
            # last packet: long enough between the blasts of this run, but the
            # relay's entries must not die while a blast of 1 stream runs
            topo.sysctl("relay", "net.netfilter.nf_conntrack_udp_timeout", "120")

            # -- phase B: plain and reference, interleaved --
            phase_b = details["phase_b"] = {}
            for mode, rounds in (("packet", opts.rounds), ("udp", opts.udp_rounds)):
                for r in range(rounds):
                    for n in opts.streams:
                        ensure_reference(topo, n_max)
                        run_ = interleaved(topo, binaries, {PLAIN: plain_streams(n), REFERENCE: reference_streams(n)},
                                           n, opts, mode)
                        phase_b.setdefault(mode, {}).setdefault(n, []).append(run_)
                        log(f"phase B {mode} sender, {n} streams: plain {run_['plain']['pps']:.0f}, "
                            f"reference {run_['reference']['pps']:.0f} packets/s "
                            f"(ratio {ratio_of(run_, 'reference', 'plain'):.3f})")

            # -- phase C: the relay --
            module_missing = kernel_path_missing()
            reason = module_missing
            if reason is None:
                try:
                    daemons = Daemons(topo, workdir, manager, RELAY_PORT_RANGE)
                    calls = start_relay(topo, daemons, n_max, details)
                except Exception as exc:
                    reason = one_line_reason(exc, manager)
                    log(f"the relay's kernel path cannot be measured: {type(exc).__name__}: {exc}")
                    for title, tail in manager.log_tails(20):
                        log(f"{title}:\n{tail}")
            if reason is None:
                try:
                    measure_relay(topo, binaries, opts, calls, daemons, results)
                except Exception as exc:
                    reason = f"failed while measuring: {one_line_reason(exc, manager)}"
                    log(f"the relay's kernel path: {reason}")
                daemons.stop()
                time.sleep(0.5)
                numbers["relay_entries_left_after_stop"] = len(relay_entries(topo))
            results.available["relay"] = reason

            # -- the relay's entry API, driven directly (needs its code, not its daemon) --
            api_reason = module_missing
            if api_reason is None:
                try:
                    record_api(measure_api(topo, opts), results)
                except Exception as exc:
                    api_reason = f"{type(exc).__name__}: {str(exc).strip()[-400:]}"
                    log(f"the relay's entry API cannot be measured: {api_reason}")
            results.available["entries_api"] = api_reason
            if api_reason is not None:
                results.notes.append(f"Entries per second of the relay's API: not measured ({api_reason})")
        finally:
            shut_down(daemons, manager)
    derive(opts, results)
    return results


def start_relay(topo, daemons: Daemons, n_max: int, details: dict):
    """The daemons, n_max calls set up and latched, their kernel entries
    listed and one proven by traffic; returns the calls."""
    daemons.start()
    log("dispatcher and relay running")
    start = time.monotonic()
    calls = daemons.setup_calls(n_max, CALLER_IP, CALLEE_IP, RELAY_CALLER, RELAY_CALLEE)
    setup_s = time.monotonic() - start
    start = time.monotonic()
    rounds = latch(topo, calls)
    latch_s = time.monotonic() - start
    entries = wait_relay_entries(topo, calls)
    details["relay_setup"] = {"calls": len(calls), "setup_s": round(setup_s, 3), "latch_rounds": rounds,
                              "latch_s": round(latch_s, 3),
                              "latched_and_handed_over_s": round(time.monotonic() - start, 3),
                              "kernel_entries": len(entries)}
    log(f"{len(calls)} calls set up in {setup_s:.1f} s, latched, {len(entries)} kernel entries")
    # the reference once more, made now that the relay listens for conntrack events (new entries
    # then get the kernel's event cache, as the relay's own do): a second reference, and a measure
    # of how far apart two sets of equal entries land
    seconds, failed = ct.run_each(topo, [ct.insert_command(e) for e in reference_entries(n_max, late=True)])
    details["reference_ev_setup"] = {"entries": n_max, "seconds": round(seconds, 3), "failures": failed}
    entry = reference_entries(1, late=True)[0]
    source = probe(topo, entry.sport, (RELAY_IP, entry.dport), entry.callee_port)
    if source != (RELAY_IP, entry.snat_port):
        raise RuntimeError(f"the second hand-made NAT entry does not apply: the callee got {source}")
    call = calls[0]
    key = (call.caller_port, call.caller_facing)
    before = {(e.sport, e.dport): e.packets for e in relay_entries(topo)}
    source = probe(topo, call.caller_port, (RELAY_IP, call.caller_facing), call.callee_port)
    after = {(e.sport, e.dport): e.packets for e in relay_entries(topo)}
    if source != (RELAY_IP, call.callee_facing):
        raise RuntimeError(f"the relay's path does not deliver: the callee got {source}, "
                           f"expected a packet from {RELAY_IP}:{call.callee_facing}")
    if after.get(key, 0) <= before.get(key, 0):
        raise RuntimeError("the probe reached the callee but not through the relay's kernel entry")
    return calls


def record_api(api: dict, results: Results) -> None:
    numbers = results.numbers
    results.details["entries_api"] = api
    numbers["conntrack_dump_ms_empty"] = round(api["empty_dump_ms"], 2)
    numbers["conntrack_buckets"] = api["conntrack_buckets"]
    table_runs = [item for item in api["runs"] if item["api"].startswith("ConntrackTable")]
    biggest = max((item["batch"] for item in table_runs), default=None)
    for item in api["runs"]:
        if item in table_runs and item["batch"] == biggest:
            numbers["entries_installed_per_s"] = round(item["installed_per_s"])
            numbers["entries_removed_per_s"] = round(item["removed_per_s"])
            numbers["entries_api_batch"] = item["batch"]
            numbers["entries_api_missing"] = item["missing"]
            numbers[f"conntrack_dump_ms_{item['entries']}"] = round(item["dump_ms"], 2)
        elif item in table_runs:
            numbers[f"entries_installed_per_s_batch_{item['batch']}"] = round(item["installed_per_s"])
        else:
            numbers["entries_installed_per_s_netlink"] = round(item["installed_per_s"])
            numbers["entries_removed_per_s_netlink"] = round(item["removed_per_s"])


def measure_relay(topo, binaries, opts: Options, calls, daemons: Daemons, results: Results) -> None:
    details = results.details
    phase_c = details["phase_c"] = {}
    n_max = max(opts.streams)
    for mode, rounds in (("packet", opts.rounds), ("udp", opts.udp_rounds)):
        for r in range(rounds):
            for n in opts.streams:
                lost = ensure_reference(topo, n_max)
                if lost:
                    results.notes.append(f"{lost} of the first reference entries had expired and were made "
                                         "again while the relay ran")
                ensure_reference(topo, n_max, late=True)
                groups = {PLAIN: plain_streams(n), REFERENCE: reference_streams(n), RELAY: relay_streams(calls, n)}
                if opts.reference_ev:
                    groups[REFERENCE_EV] = reference_streams(n, late=True)
                run_ = interleaved(topo, binaries, groups, n, opts, mode)
                phase_c.setdefault(mode, {}).setdefault(n, []).append(run_)
                log(f"phase C {mode} sender, {n} streams: plain {run_['plain']['pps']:.0f}, reference "
                    f"{run_['reference']['pps']:.0f}, relay {run_['relay']['pps']:.0f}"
                    + (f", reference made while the relay runs {run_['reference_ev']['pps']:.0f}"
                       if "reference_ev" in run_ else "")
                    + f" packets/s (relay/reference {ratio_of(run_, 'relay', 'reference'):.3f})")
    # the relay's CPU while the kernel carries all of its streams
    pids = daemons.pids()
    time.sleep(0.5)
    summary_before = daemons.relay_summary()
    counters_before = {(e.sport, e.dport): e.packets for e in relay_entries(topo)}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall = time.monotonic()
    result = blast(topo, binaries, relay_streams(calls, n_max), opts.cpu_seconds, mode="packet", size=opts.size)
    wall = time.monotonic() - wall
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    counters_after = {(e.sport, e.dport): e.packets for e in relay_entries(topo)}
    summary_after = daemons.relay_summary()
    group = result.groups[RELAY]
    kernel_packets = sum(counters_after.get(k, 0) - counters_before.get(k, 0) for k in counters_after)
    cpu = {name: 100.0 * (cpu_after[name] - cpu_before[name]) / wall for name in pids}
    details["relay_cpu"] = {
        "streams": n_max, "wall_s": round(wall, 3), "sent": group.sent, "received": group.received,
        "pps": round(group.pps), "kernel_entry_packets": kernel_packets,
        "cpu_percent": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_total_s": {k: round(v, 2) for k, v in cpu_after.items()},   # since start: proves the pids
        "userspace_packets_before": summary_before.get("userspace_packets"),
        "userspace_packets_after": summary_after.get("userspace_packets"),
        "kernel_entries": summary_after.get("kernel_entries"),
        "rss_kb": {name: rss_kb(pid) for name, pid in pids.items()}}
    results.numbers["relay_cpu_percent_kernel_blast"] = round(cpu["relay"], 2)
    results.numbers["dispatcher_cpu_percent_kernel_blast"] = round(cpu["dispatcher"], 2)
    results.numbers["relay_pps_cpu_blast"] = round(group.pps)
    if summary_before.get("userspace_packets") is not None and summary_after.get("userspace_packets") is not None:
        results.numbers["relay_userspace_packets_during_blast"] = (summary_after["userspace_packets"]
                                                                   - summary_before["userspace_packets"])
    results.numbers["relay_kernel_carried_fraction"] = round(kernel_packets / group.sent, 4) if group.sent else None
    log(f"relay alone, {n_max} streams, {group.pps:.0f} packets/s for {wall:.1f} s: relay CPU {cpu['relay']:.2f}%, "
        f"dispatcher {cpu['dispatcher']:.2f}%, kernel entries counted {kernel_packets} of {group.sent} sent")


def one_line_reason(exc: BaseException, manager) -> str:
    """Why the relay could not be measured, in one line: the exception, and
    the daemons' last critical or error log line if there is one."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {first}"
    for process in manager.processes:
        for line in reversed(process.log_text().splitlines()):
            if " CRITICAL: " in line or " ERROR: " in line:
                reason += f" ({process.name}: {line.split(': ', 1)[-1].strip()})"
                break
    return reason[:400]


def kernel_path_missing() -> str | None:
    """None when the relay has a kernel path to measure, else why not."""
    try:
        from mediaproxy.relay.kernel.conntrack import ConntrackTable  # noqa: F401
        from mediaproxy.relay.kernel.setup import start_kernel_path  # noqa: F401
    except ImportError as exc:
        return f"mediaproxy.relay.kernel is not there yet ({exc})"
    try:
        import iptc  # noqa: F401
    except Exception as exc:
        return f"python-iptables cannot be used: {exc}"
    return None


def measure_api(topo, opts: Options) -> dict:
    argv = [sys.executable, "-m", "bench.entries", "--relay-ip", RELAY_IP, "--runs", opts.api_runs,
            "--netlink-entries", str(opts.netlink_entries), "--mark", hex(API_MARK)]
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(topo.command("relay", argv), capture_output=True, text=True, timeout=180,
                            cwd=repo, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"bench.entries failed: {result.stderr.strip()[-2000:]}")
    data = json.loads(result.stdout)
    for item in data["runs"]:
        log(f"{item['api']}: {item['entries']} entries, batch {item['batch']}: "
            f"{item['installed_per_s']:.0f} installed/s, {item['removed_per_s']:.0f} removed/s, "
            f"missing {item['missing']}, left {item['left']}")
    return data


def derive(opts: Options, results: Results) -> None:
    """Medians over the rounds; per-packet costs; the ratios issue 8 names."""
    numbers, details = results.numbers, results.details
    api, bare = numbers.get("entries_installed_per_s"), numbers.get("entries_installed_per_s_netlink")
    if api and bare and api < 20000:
        results.notes.append(
            f"Entries: the relay's ConntrackTable.install makes {api:,.0f} entries/s (batches of "
            f"{numbers.get('entries_api_batch')}), bare netlink batches of the same entries {bare:,.0f}/s: of "
            f"{1e6 / api:,.0f} us an entry, {1e6 / api - 1e6 / bare:,.0f} us are spent on the rest of a hand-over "
            f"(deleting the user-space entries, the inhibitor set's members, encoding and bookkeeping).")
        smaller = [v for k, v in numbers.items() if k.startswith("entries_installed_per_s_batch_")]
        if smaller and min(smaller) >= 0.5 * api:
            results.notes[-1] += (" Smaller batches make about as many a second (down to "
                                  f"{min(smaller):,.0f}/s): the cost is per entry, not per batch.")
    for phase in ("phase_b", "phase_c"):
        shares = [run["path_cpu_share"] for by_n in details.get(phase, {}).values() for runs in by_n.values()
                  for run in runs if run.get("path_cpu_share") is not None]
        if shares:
            numbers[f"path_cpu_share_{phase}"] = round(statistics.median(shares), 3)
        for mode, by_n in details.get(phase, {}).items():
            suffix = "" if mode == "packet" else "_udp_sender"
            for n, runs in by_n.items():
                with_relay = "_with_relay" if phase == "phase_c" else ""
                for name in ("plain", "reference", "relay"):
                    value = median(run[name]["pps"] for run in runs if name in run)
                    if value is not None:
                        key = f"relay_pps_{n}{suffix}" if name == "relay" else f"{name}_pps_{n}{with_relay}{suffix}"
                        numbers[key] = round(value)
                ratios = cycle_ratios(runs, "reference", "plain")
                if ratios:
                    numbers[f"reference_pps_ratio_{n}{with_relay}{suffix}"] = round(statistics.median(ratios), 4)
                    numbers[f"reference_pps_ratio_{n}{with_relay}_delivered{suffix}"] = round(
                        median(delivered_ratio(run, "reference", "plain") for run in runs), 4)
                    numbers[f"conntrack_nat_us_per_packet_{n}{with_relay}{suffix}"] = round(
                        statistics.median(cycle_costs(runs, "reference", "plain")), 3)
                if phase != "phase_c":
                    continue
                ratios = cycle_ratios(runs, "relay", "reference")
                if ratios:
                    numbers[f"kernel_pps_ratio_{n}{suffix}"] = round(statistics.median(ratios), 4)
                    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                    numbers[f"kernel_pps_ratio_{n}_q1{suffix}"] = round(quartiles[0], 4)
                    numbers[f"kernel_pps_ratio_{n}_q3{suffix}"] = round(quartiles[2], 4)
                    numbers[f"kernel_pps_ratio_{n}_cycles{suffix}"] = len(ratios)
                    numbers[f"kernel_pps_ratio_{n}_delivered{suffix}"] = round(
                        median(delivered_ratio(run, "relay", "reference") for run in runs), 4)
                    numbers[f"relay_extra_us_per_packet_{n}{suffix}"] = round(
                        statistics.median(cycle_costs(runs, "relay", "reference")), 3)
                numbers[f"relay_lost_{n}{suffix}"] = sum(run["relay"]["sent"] - run["relay"]["received"]
                                                        for run in runs if "relay" in run)
                for top, bottom, key in (("relay", "reference_ev", f"kernel_pps_ratio_{n}_vs_reference_ev{suffix}"),
                                         ("reference_ev", "reference", f"reference_ev_pps_ratio_{n}{suffix}")):
                    ratios = cycle_ratios(runs, top, bottom)
                    if ratios:
                        numbers[key] = round(statistics.median(ratios), 4)
    lost = [(phase, mode, n, name, run[name]["sent"] - run[name]["received"], run[name]["sent"])
            for phase in ("pristine", "phase_b", "phase_c")
            for mode, by_n in (details.get(phase, {}).items() if phase != "pristine"
                               else [("packet", {n: [r] for n, r in details.get("pristine", {}).items()})])
            for n, runs in by_n.items() for run in runs for name in ("plain", "reference", "relay", "reference_ev")
            if name in run and run[name]["sent"] - run[name]["received"] > 0.001 * run[name]["sent"]]
    for phase, mode, n, name, count, sent in lost:
        results.notes.append(f"{phase}, {mode} sender, {n} streams: {count} of {sent} {name} packets were not "
                             f"delivered (the rates count delivered packets; the ratios assume none lost)")
