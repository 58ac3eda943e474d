"""Micro-benchmark of the relay's kernel entry API, run inside a network
namespace where conntrack NAT works (the benchmark's relay namespace):

    python -m bench.entries --relay-ip IP [--runs COUNT:BATCH,...] [--mark M]

For each COUNT:BATCH it builds COUNT latched streams (real MediaStream
objects, as the relay core makes them), hands them to
``ConntrackTable.install`` BATCH at a time (what ``KernelForwarding`` does
with the hand-overs of one reactor turn: one netlink batch that puts the
flows in the NOTRACK inhibitor set, deletes old entries, creates the new
ones and takes the flows out of the set again), checks that the kernel has them all, then
removes them with ``ConntrackTable.remove_port`` one stream at a time (what
a session's end does: last counters, then delete). Also the ceiling without
the relay's bookkeeping and rules: the same entries created and deleted by
bare ``ConntrackSocket.transact`` batches.

Prints one JSON object: per run, entries, batch, install_s, remove_s,
installed_per_s, removed_per_s, missing (entries the kernel did not have),
dump_ms (one ctnetlink dump of our entries, COUNT of them, median of 3);
empty_dump_ms (a dump that finds nothing, mean of 5) and the kernel's
conntrack_buckets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def make_streams(count: int, relay_ip: str, caller_ip: str, callee_ip: str, base: int):
    from mediaproxy.relay.streams import CALLEE, CALLER, RTP, MediaStream

    streams = []
    for i in range(count):
        # relay ports: caller-facing base+2i, callee-facing base+2*count+2i (even pairs)
        stream = MediaStream("audio", base + 2 * i, base + 2 * count + 2 * i, 0.0)
        stream.call_id = f"bench-api-{i}"
        caller, callee = stream.leg(CALLER), stream.leg(CALLEE)
        caller.latched[RTP] = (caller_ip, 20000 + 2 * i)
        callee.latched[RTP] = (callee_ip, 30000 + 2 * i)
        caller.media_seen[RTP] = callee.media_seen[RTP] = True
        streams.append(stream)
    return streams


def run_api(table, streams, batch: int, relay_ip: str, mark: int) -> dict:
    from mediaproxy.relay.kernel.conntrack import entry_for
    from mediaproxy.relay.streams import CALLER, RTP

    entries = [entry_for(stream, RTP, relay_ip) for stream in streams]
    # What the first packets of both parties left in the kernel before a hand-over: the
    # user-space path's entries, which the hand-over deletes (without them every delete
    # fails, and the kernel answers each failure).
    from mediaproxy.relay.kernel import ctnetlink
    from mediaproxy.relay.kernel.ctnetlink import Tuple5

    netlink, requests = table.netlink, []
    for entry in entries:
        callee_ip, callee_port = entry.callee
        for flow in (entry.orig, Tuple5(callee_ip, relay_ip, callee_port, entry.relay_b[1])):
            seq = netlink.next_seq()
            requests.append((seq, ctnetlink.encode_plain_entry(seq, flow, 60)))
    netlink.transact(requests)
    start = time.perf_counter()
    installed = 0
    for k in range(0, len(entries), batch):
        installed += len(table.install(entries[k:k + batch]))
    install_s = time.perf_counter() - start
    dump_times = []
    for _ in range(3):
        start = time.perf_counter()
        dumped = table.netlink.dump(mark)
        dump_times.append(time.perf_counter() - start)
    dump_s = sorted(dump_times)[1]
    in_kernel = {entry.orig for entry in dumped}
    missing = sum(1 for entry in entries if entry.orig not in in_kernel)
    start = time.perf_counter()
    removed = 0
    for stream in streams:
        removed += len(table.remove_port(stream.leg(CALLER).port))
    remove_s = time.perf_counter() - start
    left = len(table.netlink.dump(mark))
    return {"api": "ConntrackTable.install/remove_port", "entries": len(entries), "batch": batch,
            "installed": installed, "missing": missing, "removed": removed, "left": left,
            "install_s": install_s, "remove_s": remove_s, "dump_ms": dump_s * 1000,
            "installed_per_s": installed / install_s if install_s > 0 else None,
            "removed_per_s": removed / remove_s if remove_s > 0 else None}


def run_netlink(netlink, streams, relay_ip: str, mark: int) -> dict:
    from mediaproxy.relay.kernel import ctnetlink
    from mediaproxy.relay.kernel.conntrack import entry_for
    from mediaproxy.relay.streams import RTP

    entries = [entry_for(stream, RTP, relay_ip) for stream in streams]
    start = time.perf_counter()
    requests = []
    for entry in entries:
        seq = netlink.next_seq()
        requests.append((seq, ctnetlink.encode_nat_entry4(seq, entry.orig, entry.callee, entry.relay_b, 120, mark)))
    errors = netlink.transact(requests)["errors"]
    install_s = time.perf_counter() - start
    failed = sum(1 for seq, _ in requests if errors.get(seq))
    start = time.perf_counter()
    requests = []
    for entry in entries:
        seq = netlink.next_seq()
        requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
    netlink.transact(requests)
    remove_s = time.perf_counter() - start
    return {"api": "ConntrackSocket.transact (no rules, no bookkeeping)", "entries": len(entries),
            "batch": len(entries), "installed": len(entries) - failed, "missing": failed,
            "install_s": install_s, "remove_s": remove_s,
            "installed_per_s": (len(entries) - failed) / install_s if install_s > 0 else None,
            "removed_per_s": len(entries) / remove_s if remove_s > 0 else None,
            "left": len(netlink.dump(mark))}


def remove_inhibitor(iptables, inhibitor_set: str) -> None:
    """The bench's standing inhibitor rule and its ipset (a relay keeps its own across runs)."""
    import iptc
    from pyroute2 import IPSet

    table = iptc.Table(iptc.Table.RAW)
    table.refresh()
    chain = iptc.Chain(table, "PREROUTING")
    for rule in chain.rules:
        if any(m.name == "comment" and m.comment == iptables.comment for m in rule.matches):
            chain.delete_rule(rule)
    sets = IPSet()
    try:
        sets.destroy(inhibitor_set)
    finally:
        sets.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay-ip", required=True)
    parser.add_argument("--caller-ip", default="198.18.1.10")
    parser.add_argument("--callee-ip", default="198.18.2.20")
    parser.add_argument("--runs", default="1000:1000,1000:100,200:10,50:1",
                        help="COUNT:BATCH list (default %(default)s)")
    parser.add_argument("--netlink-entries", type=int, default=1000)
    parser.add_argument("--mark", type=lambda text: int(text, 0), default=0x4D5B,
                        help="conntrack mark of the entries (not the relay's own)")
    parser.add_argument("--base-port", type=int, default=42000)
    args = parser.parse_args(argv)

    from mediaproxy.relay.kernel.conntrack import ConntrackTable
    from mediaproxy.relay.kernel.iptables import Iptables
    from mediaproxy.relay.kernel.netlink import ConntrackSocket

    from mediaproxy.relay.kernel.setup import make_inhibitor_set

    netlink = ConntrackSocket(timeout=10.0)
    iptables = Iptables(args.mark)
    inhibitor_set = "mediaproxy-%x" % args.mark
    make_inhibitor_set(inhibitor_set)
    iptables.ensure_inhibitor_rule(inhibitor_set)
    table = ConntrackTable(netlink, iptables, args.relay_ip, args.mark, inhibitor_set)
    results = []
    try:
        # a dump walks the kernel's whole conntrack hash table (all namespaces
        # share it), whatever the number of entries
        netlink.dump(args.mark)
        start = time.perf_counter()
        for _ in range(5):
            netlink.dump(args.mark)
        empty_dump_ms = (time.perf_counter() - start) / 5 * 1000
        for run in args.runs.split(","):
            count, batch = (int(x) for x in run.split(":"))
            streams = make_streams(count, args.relay_ip, args.caller_ip, args.callee_ip, args.base_port)
            results.append(run_api(table, streams, batch, args.relay_ip, args.mark))
        if args.netlink_entries:
            streams = make_streams(args.netlink_entries, args.relay_ip, args.caller_ip, args.callee_ip, args.base_port)
            results.append(run_netlink(netlink, streams, args.relay_ip, args.mark))
    finally:
        # nothing of ours stays behind: entries with our mark, inhibitor rules with our comment
        from mediaproxy.relay.kernel import ctnetlink

        requests = []
        for entry in netlink.dump(args.mark):
            seq = netlink.next_seq()
            requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
        if requests:
            netlink.transact(requests)
        iptables.remove_stale_inhibitors()
        remove_inhibitor(iptables, inhibitor_set)
        netlink.close()
    buckets = None
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_buckets") as f:
            buckets = int(f.read())
    except (OSError, ValueError):
        pass
    json.dump({"runs": results, "empty_dump_ms": empty_dump_ms, "conntrack_buckets": buckets}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
