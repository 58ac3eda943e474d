"""Kernel entries carried over a relay restart, as the state file holds them.

A relay restarted with keep_calls_on_restart leaves its NAT entries (and its
inhibitor rule) in the kernel, which goes on relaying and counting the
running streams while no relay process runs. The state file names each
entry by its stream's caller-facing port and component, with the two
parties' addresses and the kernel's counters as last read (which the legs'
counts already hold). The next start keeps those entries when it removes an
earlier run's leftovers and adopts them (ConntrackTable.adopt): what the
kernel counted meanwhile is added, and an entry it no longer has timed out
while the relay was away.
"""

from mediaproxy.relay.forwarding import addresses_by_version
from mediaproxy.relay.kernel.conntrack import KernelEntry
from mediaproxy.relay.kernel.ctnetlink import Tuple5


def entry_state(entry: KernelEntry) -> dict:
    return {"port": entry.stream.caller.port, "component": entry.component,
            "caller": list(entry.caller), "callee": list(entry.callee),
            "counted": [entry.caller_packets, entry.caller_bytes, entry.callee_packets, entry.callee_bytes]}


def _orig(state: dict, relay_ips: dict) -> Tuple5:
    """The entry's original tuple: caller -> the relay's address of the caller's IP version."""
    ip, port = state["caller"]
    if not isinstance(ip, str):
        raise TypeError("caller address %r" % (ip,))
    return Tuple5(ip, relay_ips[6 if ":" in ip else 4], int(port), int(state["port"]) + int(state["component"]))


def saved_flows(states, relay_ip) -> frozenset:
    """The original tuples of the saved entries: what a start must not remove as leftovers.
    `relay_ip`: the relay's address, or its addresses by IP version."""
    relay_ips = addresses_by_version(relay_ip)
    flows = set()
    for state in states:
        try:
            flows.add(_orig(state, relay_ips))
        except (KeyError, TypeError, ValueError):
            continue
    return frozenset(flows)


def entries_from_state(states, streams_by_port: dict, relay_ip) -> tuple:
    """(KernelEntry of each saved entry whose stream was restored, original tuples of the others)."""
    relay_ips = addresses_by_version(relay_ip)
    entries, orphans = [], []
    for state in states:
        try:
            orig = _orig(state, relay_ips)
        except (KeyError, TypeError, ValueError):
            continue         # not kept by saved_flows either (nor one of an IP version the relay lost): removed as a leftover
        try:
            component = int(state["component"])
            stream = streams_by_port.get(orig.dport - component)
            caller, callee = state["caller"], state["callee"]
            entry = KernelEntry(stream, component, (caller[0], int(caller[1])), (callee[0], int(callee[1])),
                                orig.dst)
            counted = [int(value) for value in state["counted"]]
            entry.caller_packets, entry.caller_bytes, entry.callee_packets, entry.callee_bytes = counted
        except (KeyError, TypeError, ValueError, IndexError):
            stream = None
        if stream is None or stream.ended or component not in (0, 1):
            orphans.append(orig)
        else:
            entries.append(entry)
    return entries, orphans
