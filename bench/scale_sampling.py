"""One traffic sampling pass of the relay at N kernel entries (bench/scale.py, issue 8 item 7).

    python -m bench.scale_sampling --relay-ip IP --entries 5000,20000 [--passes 20]

Runs inside a network namespace of the benchmark where the kernel path can
start (it calls the relay's own start_kernel_path: hooks, traffic counter
rule, inhibitor set, NAT probe). For each N it installs N kernel entries
through ConntrackTable.install (1000 a batch, as bench/entries.py does;
latched MediaStreams, RTP only, so one entry each) and times:

  sampling_pass     RelayCore.sample_traffic: what the relay's TimerService
                    runs every traffic_sampling_period
                    (RelayService._sample_traffic): KernelForwarding
                    .traffic_bytes(), i.e. one read of the mangle table's
                    counter rule through python-iptables;
  refresh_counters  KernelForwarding.refresh_counters(): one ctnetlink dump
                    of the entries with the relay's mark, counted into the
                    streams (what `sessions` and every _reap do);
  reap              KernelForwarding._read_table(), the table read of _reap
                    (refresh_counters + the set of the gone ones).

Median (and max) of --passes passes each, in ms, wall and process CPU
(this machine is shared: wall time includes waiting for a CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_streams(count: int, relay_ip: str):
    """Latched one-stream calls; 10,000 per pair of party addresses (198.18.1.10+k, 198.18.2.20+k)."""
    from mediaproxy.relay.streams import CALLEE, CALLER, RTP, MediaStream

    streams = []
    for i in range(count):
        block, j = divmod(i, 10000)
        stream = MediaStream("audio", 10000 + 2 * j, 30000 + 2 * j, 0.0)
        stream.call_id = f"scale-sampling-{i}"
        caller, callee = stream.leg(CALLER), stream.leg(CALLEE)
        caller.latched[RTP] = (f"198.18.1.{10 + block}", 20000 + 2 * j)
        callee.latched[RTP] = (f"198.18.2.{20 + block}", 40000 + 2 * j)
        caller.media_seen[RTP] = callee.media_seen[RTP] = True
        streams.append(stream)
    return streams


def timed(function, passes: int) -> dict:
    """Wall and process CPU time (user + system: the kernel's dump work is done in our recv) per pass."""
    times, cpu = [], []
    for _ in range(passes):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3),
            "min_ms": round(min(times), 3), "cpu_median_ms": round(statistics.median(cpu), 3),
            "cpu_max_ms": round(max(cpu), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay-ip", required=True)
    parser.add_argument("--entries", default="5000,20000")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--mark", type=lambda text: int(text, 0), default=0x4D5C)
    parser.add_argument("--port-range", default="10000:60000")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    from twisted.internet import reactor

    from mediaproxy.relay.core import RelayCore
    from mediaproxy.relay.kernel import ctnetlink
    from mediaproxy.relay.kernel.conntrack import entry_for
    from mediaproxy.relay.kernel.forwarding import KernelForwarding
    from mediaproxy.relay.kernel.setup import start_kernel_path
    from mediaproxy.relay.ports import PortPool
    from mediaproxy.relay.streams import RTP

    port_range = tuple(int(x) for x in args.port_range.split(":"))
    table, events = start_kernel_path(args.relay_ip, args.mark, port_range)
    forwarding = KernelForwarding(args.relay_ip, reactor, table, events, port_range)
    core = RelayCore(args.relay_ip, PortPool(*port_range), forwarding, time.time())
    results = []
    try:
        installed = 0
        for count in sorted(int(x) for x in args.entries.split(",")):
            streams = make_streams(count, args.relay_ip)[installed:]
            entries = [entry_for(stream, RTP, args.relay_ip) for stream in streams]
            start = time.perf_counter()
            for k in range(0, len(entries), 1000):
                installed += len(table.install(entries[k:k + 1000]))
            install_s = time.perf_counter() - start
            in_kernel = len(table.netlink.dump(args.mark))
            item = {"entries": count, "installed": len(table), "in_kernel": in_kernel,
                    "install_s": round(install_s, 3)}
            item["sampling_pass"] = timed(lambda: core.sample_traffic(time.time()), args.passes)
            item["traffic_bytes"] = timed(forwarding.traffic_bytes, args.passes)
            item["refresh_counters"] = timed(forwarding.refresh_counters, max(2, args.passes // 6))
            item["reap"] = timed(forwarding._read_table, max(2, args.passes // 6))
            results.append(item)
    finally:
        requests = []
        for entry in table.netlink.dump(args.mark):
            seq = table.netlink.next_seq()
            requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
        if requests:
            table.netlink.transact(requests)
        forwarding.stop()
        table.netlink.close()
    buckets = None
    try:
        buckets = int(Path("/proc/sys/net/netfilter/nf_conntrack_buckets").read_text())
    except (OSError, ValueError):
        pass
    json.dump({"runs": results, "conntrack_buckets": buckets}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
