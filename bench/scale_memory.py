"""Where a call's memory goes, in the sans-IO cores (bench/scale.py, issue 8 item 3):

    python -m bench.scale_memory [--sessions N]

Builds N one-stream calls the way the daemons hold them, each part measured
on its own under tracemalloc (bytes per session, by the source line that
allocated them and by object type):

  relay_core      RelayCore + MemoryForwarding: offer and answer through
                  RelayCore.update (the proxy's headers), then one RTP and
                  one RTCP packet from each party (latched, codec known);
  relay_kernel    what the kernel path adds per stream: the two KernelEntry
                  objects of ConntrackTable.install (a netlink stand-in that
                  accepts everything) and its by_port index (parked ports
                  keep nothing: PortParking counts them);
  dispatcher      Dispatcher.sessions: one SessionRecord per call, as
                  Dispatcher._update makes it.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELAY_IP, CALLER_IP, CALLEE_IP = "198.18.1.1", "198.18.1.10", "198.18.2.20"
TOP = 12


def _types() -> Counter:
    counts = Counter()
    for obj in gc.get_objects():
        counts[type(obj).__name__] += 1
    return counts


class Measured:
    """tracemalloc and gc counts around one part."""

    def __init__(self, name: str, sessions: int):
        self.name, self.sessions = name, sessions

    def __enter__(self):
        gc.collect()
        self.types = _types()
        self.snapshot = tracemalloc.take_snapshot()
        self.current = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        gc.collect()
        after = tracemalloc.take_snapshot()
        current = tracemalloc.get_traced_memory()[0]
        diff = after.compare_to(self.snapshot, "lineno")
        lines = []
        for stat in diff[:TOP]:
            frame = stat.traceback[0]
            name = frame.filename
            for root in (str(REPO) + "/", sys.prefix + "/"):
                if name.startswith(root):
                    name = name[len(root):]
            lines.append({"where": f"{name}:{frame.lineno}",
                          "bytes_per_session": round(stat.size_diff / self.sessions, 1),
                          "blocks_per_session": round(stat.count_diff / self.sessions, 2)})
        types = _types()
        counts = {name: round((types[name] - self.types.get(name, 0)) / self.sessions, 2) for name in types
                  if types[name] - self.types.get(name, 0) >= self.sessions / 2}
        self.result = {"bytes_per_session": round((current - self.current) / self.sessions, 1),
                       "by_line": lines,
                       "objects_per_session": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}
        return False


def headers(i: int, kind: str) -> dict:
    """The proxy module's update headers (bench.relay.ProxyClient.update's)."""
    caller = kind == "request"
    ip = CALLER_IP if caller else CALLEE_IP
    return {"type": kind, "dialog_id": "", "call_id": f"scale-{i}@{CALLER_IP}", "cseq": "1 INVITE",
            "from_uri": "sip:bench@example.com", "to_uri": "sip:relay@example.com",
            "from_tag": "caller-tag", "to_tag": "" if caller else "callee-tag",
            "user_agent": "mediaproxy-bench", "signaling_ip": ip,
            "media": f"audio:{ip}:{(10000 if caller else 30000) + 2 * (i % 10000)}:sendrecv"}


class FakeNetlink:
    """ConntrackTable's netlink socket, accepting everything (no kernel involved)."""

    def __init__(self):
        self._seq = itertools.count(1)

    def next_seq(self):
        return next(self._seq)

    def transact(self, requests):
        for _ in requests:
            pass
        return {"errors": {}, "entries": {}}


def build_relay(n: int):
    from mediaproxy.relay.core import RelayCore
    from mediaproxy.relay.forwarding import MemoryForwarding
    from mediaproxy.relay.ports import PortPool

    forwarding = MemoryForwarding()
    core = RelayCore(RELAY_IP, PortPool(4000, 4000 + 4 * n + 8), forwarding, 0.0)
    rtp = bytes([0x80, 0]) + b"\x00" * 10 + b"\xd5" * 160
    rtcp = bytes([0x80, 201, 0, 1]) + b"\x00" * 4
    with Measured("relay_core", n) as measured:
        for i in range(n):
            offer = core.update(headers(i, "request"), 1.0, owner=RELAY_IP).split()
            answer = core.update(headers(i, "reply"), 1.0, owner=RELAY_IP).split()
            callee_facing, caller_facing = int(offer[1]), int(answer[1])
            for component, data in ((0, rtp), (1, rtcp)):
                forwarding.deliver(caller_facing + component, (CALLER_IP, 10000 + 2 * (i % 10000) + component),
                                   data, 2.0)
                forwarding.deliver(callee_facing + component, (CALLEE_IP, 30000 + 2 * (i % 10000) + component),
                                   data, 2.0)
        forwarding.sent.clear()        # the test double's record of packets: not part of a session
    return core, measured.result


def build_kernel(core, n: int):
    from mediaproxy.relay.kernel.conntrack import ConntrackTable, entry_for

    streams = [s for session in core.sessions.values() for s in session.active_streams]
    table = ConntrackTable(FakeNetlink(), None, RELAY_IP, 0x4D50, "mediaproxy-4d50")
    with Measured("relay_kernel", n) as measured:
        batch = []
        for stream in streams:
            for component in (0, 1):
                batch.append(entry_for(stream, component, RELAY_IP))
            if len(batch) >= 256:
                table.install(batch)
                batch = []
        table.install(batch)
    return table, measured.result


def build_dispatcher(n: int):
    from mediaproxy.dispatcher.core import Dispatcher, SessionRecord

    class Clock:
        @staticmethod
        def seconds():
            return 1.0

    dispatcher = Dispatcher(Clock())
    with Measured("dispatcher", n) as measured:
        for i in range(n):
            call_id = f"scale-{i}@{CALLER_IP}"
            dispatcher.sessions[call_id] = SessionRecord(call_id, RELAY_IP, 1.0, None, "caller-tag", None, 1.0)
    return dispatcher, measured.result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10000)
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib

    for module in ("mediaproxy.dispatcher.core", "mediaproxy.relay.core", "mediaproxy.relay.kernel.conntrack",
                   "twisted.internet.defer"):
        importlib.import_module(module)          # imported outside the measurements

    tracemalloc.start(1)
    keep = []
    core, relay_core = build_relay(args.sessions)
    keep.append(core)
    kernel, relay_kernel = build_kernel(core, args.sessions)
    keep.append(kernel)
    dispatcher, dispatcher_result = build_dispatcher(args.sessions)
    keep.append(dispatcher)
    parts = {"relay_core": relay_core, "relay_kernel": relay_kernel, "dispatcher": dispatcher_result}
    total = sum(part["bytes_per_session"] for part in parts.values())
    json.dump({"sessions": args.sessions, "bytes_per_session": round(total, 1), "parts": parts}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
