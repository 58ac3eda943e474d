"""The relay's conntrack entries: one NAT entry per latched sub-stream.

A sub-stream (the RTP or the RTCP of a stream) whose two parties are
latched is handed to the kernel: the entry's original tuple is
caller -> relay:A, with DNAT to the callee's address and SNAT to relay:B,
so the kernel relays both directions. Entries carry the relay's mark.

Hand-overs are batched: the ones asked for in one reactor turn go to the
kernel in one netlink batch, which the kernel carries out in order: the
sub-streams' flows join the inhibitor set (their packets bypass conntrack),
the user-space path's entries are deleted, the NAT entries created, and the
flows leave the set again. A packet arriving meanwhile reaches the relay's
socket untracked instead of creating a wrong entry.
"""

import errno
import logging
import os
import socket

from mediaproxy.relay.kernel import ctnetlink, ipset
from mediaproxy.relay.forwarding import addresses_by_version
from mediaproxy.relay.kernel.ctnetlink import Tuple5
from mediaproxy.relay.streams import CALLEE, CALLER, RTP

log = logging.getLogger("mediaproxy.relay")

UDP_STREAM_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
IPV4_UDP_HEADERS = 28
IPV6_UDP_HEADERS = 48
UDP_HEADERS = {4: IPV4_UDP_HEADERS, 6: IPV6_UDP_HEADERS}      # IP version -> IP and UDP header bytes
DUMP_FAMILY = {frozenset([4]): socket.AF_INET, frozenset([6]): socket.AF_INET6}    # else AF_UNSPEC: both


def udp_stream_timeout() -> int:
    """How long the kernel keeps a running UDP entry without traffic."""
    try:
        with open(UDP_STREAM_TIMEOUT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 120


class KernelEntry:
    """One latched sub-stream the kernel relays: its NAT entry's original tuple is
    caller -> relay:A (+component), sent on to the callee from relay:B (+component).

    Tens of thousands are held at once: the tuples are made when asked for, from the
    two latched addresses (shared with the legs) and the legs' ports."""

    __slots__ = ("stream", "component", "caller", "callee", "relay_ip",
                 "caller_packets", "caller_bytes", "callee_packets", "callee_bytes")

    def __init__(self, stream, component: int, caller: tuple, callee: tuple, relay_ip: str):
        self.stream = stream
        self.component = component
        self.caller = caller          # where the caller's packets come from (its latched address)
        self.callee = callee          # where the kernel sends them
        self.relay_ip = relay_ip
        # what the kernel counted so far (UDP payload), already added to the legs' counts
        self.caller_packets = self.caller_bytes = self.callee_packets = self.callee_bytes = 0

    @property
    def orig(self) -> Tuple5:
        """caller -> relay:A (+component)"""
        return Tuple5(self.caller[0], self.relay_ip, self.caller[1], self.stream.caller.port + self.component)

    @property
    def relay_b(self) -> tuple:
        """where the kernel sends the caller's packets from"""
        return self.relay_ip, self.stream.callee.port + self.component

    @property
    def ports(self) -> tuple:
        """The relay ports whose packets the entry relays: relay:A and relay:B (+component)."""
        stream = self.stream
        if self.component == RTP:
            return stream.caller.port, stream.callee.port
        return stream.caller.port + 1, stream.callee.port + 1

    def is_orig(self, flow: Tuple5) -> bool:
        """Whether a flow the kernel reported is this entry's original tuple."""
        caller = self.caller
        return (flow.sport == caller[1] and flow.dport == self.stream.caller.port + self.component
                and flow.src == caller[0] and flow.dst == self.relay_ip)

    def __repr__(self):
        return "KernelEntry(%s, %s)" % (self.stream.call_id, self.orig)


def entry_for(stream, component: int, relay_ip: str) -> KernelEntry:
    caller, callee = stream.leg(CALLER), stream.leg(CALLEE)
    if component == RTP:
        return KernelEntry(stream, component, caller.latched_rtp, callee.latched_rtp, relay_ip)
    return KernelEntry(stream, component, caller.latched_rtcp, callee.latched_rtcp, relay_ip)


def _grown(now: int, before: int) -> int:
    """How much a kernel counter grew since it was read (from 0 if it was zeroed meanwhile)."""
    return now - before if now >= before else now


def _by_version(value, version: int) -> dict:
    """A mapping IP version -> value, or one value (of that version)."""
    return dict(value) if isinstance(value, dict) else {version: value}


class ConntrackTable:
    """What of the kernel's conntrack table is ours, and the batched changes to it.

    `relay_ip`, `iptables`, `inhibitor_set`: one (IPv4 or IPv6 only) or one per IP version
    ({4: ..., 6: ...}). The relay's addresses of every version are looked after (leftovers
    removed, dumps); the kernel relays the versions it has an inhibitor set for (`versions`).
    """

    def __init__(self, netlink, iptables, relay_ip, mark: int, inhibitor_set):
        self.netlink = netlink
        self.relay_ips = addresses_by_version(relay_ip)
        main = min(self.relay_ips)
        self.relay_ip = self.relay_ips[main]
        self.inhibitor_sets = _by_version(inhibitor_set, main)
        self.inhibitor_set = self.inhibitor_sets.get(main)
        self.iptables_by_version = _by_version(iptables, main)
        self.iptables = self.iptables_by_version.get(main)
        self.versions = frozenset(self.inhibitor_sets)
        self.unavailable = {}         # IP version -> why the kernel does not relay it (see setup)
        self.dump_family = DUMP_FAMILY.get(frozenset(self.relay_ips), socket.AF_UNSPEC)
        self.mark = mark
        # Relay port (RTP or RTCP, either leg) -> the KernelEntry that relays its packets: each
        # entry under its two ports. Its keys are the ports the kernel relays (kernel_ports).
        self.by_port = {}

    def _dump(self, mark) -> list:
        """The entries with `mark` (all for None) of the relay's IP versions."""
        if self.dump_family == socket.AF_INET:
            return self.netlink.dump(mark)
        return self.netlink.dump(mark, self.dump_family)

    @property
    def kernel_ports(self):
        """The relay ports whose packets the kernel relays (`in` is all it answers fast)."""
        return self.by_port

    def __len__(self):
        return len(self.by_port) // 2

    def entries(self) -> set:
        return set(self.by_port.values())

    def find(self, orig: Tuple5):
        """Our entry whose original tuple the kernel reported, or None."""
        entry = self.by_port.get(orig.dport)
        return entry if entry is not None and entry.is_orig(orig) else None

    def relays(self, stream, component: int) -> bool:
        """Whether the kernel relays this sub-stream."""
        return stream.caller.port + component in self.by_port

    def remove_leftovers(self, port_range, keep=frozenset()) -> int:
        """Delete what an earlier run left: entries with our mark, and the user-space
        path's entries of our ports (with the same ports reused they would clash
        with the new calls' entries and make the kernel rewrite their ports).
        `keep`: original tuples of entries whose calls this run restores (see adopt)."""
        low, high = port_range
        relay_ips = set(self.relay_ips.values())

        def ours(entry):
            if entry.orig in keep:
                return False
            if entry.mark == self.mark:
                return True
            flow = entry.orig
            return flow is not None and entry.proto == socket.IPPROTO_UDP and (
                (flow.dst in relay_ips and low <= flow.dport < high) or (flow.src in relay_ips and low <= flow.sport < high))
        requests = []
        for entry in self._dump(None):
            if ours(entry):
                seq = self.netlink.next_seq()
                requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
        self.netlink.transact(requests)
        self.by_port.clear()
        return len(requests)

    def install(self, entries) -> list:
        """Hand these sub-streams to the kernel; returns the ones that were installed."""
        if not entries:
            return []
        incoming = {}             # IP version -> the flows of its sub-streams that reach the relay
        for entry in entries:
            callee_ip, callee_port = entry.callee
            flows = incoming.setdefault(6 if ":" in entry.relay_ip else 4, [])
            flows.append(entry.orig)
            flows.append(Tuple5(callee_ip, entry.relay_ip, callee_port, entry.relay_b[1]))
        next_seq, requests, creates = self.netlink.next_seq, [], []
        # (the loops below run for every sub-stream handed over: written out, without helpers)
        chunks = [(self.inhibitor_sets[version], ipset.Members(flows[i:i + ipset.MAX_MEMBERS]))
                  for version, flows in incoming.items() for i in range(0, len(flows), ipset.MAX_MEMBERS)]
        inhibitions = []
        for name, chunk in chunks:
            seq = next_seq()
            requests.append((seq, ipset.encode_add(seq, name, chunk)))
            inhibitions.append(seq)
        encode_delete, encode_nat_entry4 = ctnetlink.encode_delete, ctnetlink.encode_nat_entry4
        for flows in incoming.values():                         # the entries of the user-space path
            for flow in flows:
                seq = next_seq()
                requests.append((seq, encode_delete(seq, flow)))
        timeout, mark = udp_stream_timeout(), self.mark
        for entry in entries:
            seq = next_seq()
            encode = encode_nat_entry4 if ":" not in entry.relay_ip else ctnetlink.encode_nat_entry
            requests.append((seq, encode(seq, entry.orig, entry.callee, entry.relay_b, timeout, mark)))
            creates.append((seq, entry))
        for name, chunk in chunks:
            seq = next_seq()
            requests.append((seq, ipset.encode_del(seq, name, chunk)))
        errors = self.netlink.transact(requests)["errors"]
        failed = [errors[seq] for seq in inhibitions if errors.get(seq)]
        if failed:
            log.warning("the inhibitor set %s refused %d flows (%s): packets arriving during this hand-over "
                        "could make wrong entries", "/".join(sorted(self.inhibitor_sets.values())),
                        sum(map(len, incoming.values())), os.strerror(failed[0]))
        installed = []
        for seq, entry in creates:
            error = errors.get(seq)
            if error:
                log.warning("session %s: the kernel refused the %s entry %s: %s", entry.stream.call_id,
                            "RTP" if entry.component == RTP else "RTCP", entry.orig, os.strerror(error))
                continue
            if entry.component == RTP:
                entry.stream.in_kernel = True
            for port in entry.ports:
                self.by_port[port] = entry
            installed.append(entry)
        return installed

    def remove_port(self, port: int) -> list:
        """Remove the entries of the stream on this port pair, counting their last packets first."""
        entries = [entry for entry in (self.by_port.get(port), self.by_port.get(port + 1)) if entry is not None]
        if not entries:
            return []
        requests, gets = [], {}
        for entry in entries:
            self._forget(entry)
            seq = self.netlink.next_seq()
            requests.append((seq, ctnetlink.encode_get(seq, entry.orig)))
            gets[seq] = entry
        for entry in entries:
            seq = self.netlink.next_seq()
            requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
        found = self.netlink.transact(requests)["entries"]
        for seq, entry in gets.items():
            if seq in found:
                self.count(entry, found[seq])
        return entries

    def _forget(self, entry: KernelEntry) -> None:
        if entry.component == RTP:
            entry.stream.in_kernel = False
        for port in entry.ports:
            if self.by_port.get(port) is entry:
                del self.by_port[port]

    def ended(self, entry: KernelEntry, kernel_entry=None) -> None:
        """The kernel destroyed the entry by itself; kernel_entry carries its last counters.

        Its sub-stream goes back to user space: media from both parties again
        (after a pause, or hold) hands it to the kernel anew.
        """
        self._forget(entry)
        if kernel_entry is not None:
            self.count(entry, kernel_entry)
        for leg in entry.stream.legs:
            leg.media_seen[entry.component] = False

    @staticmethod
    def count(entry: KernelEntry, kernel_entry) -> None:
        """The kernel's counters of an entry, into the stream's legs: what they grew by since
        they were last read (an entry counts from its creation; the legs count everything).

        The kernel counts IP packets; like user space we count UDP payload,
        so the IP and UDP headers (28 bytes a packet, 48 with IPv6) come off.
        """
        caller, callee = entry.stream.caller, entry.stream.callee
        headers = IPV6_UDP_HEADERS if ":" in entry.relay_ip else IPV4_UDP_HEADERS
        packets = kernel_entry.orig_packets
        octets = kernel_entry.orig_bytes - headers * packets
        caller.packet_count += _grown(packets, entry.caller_packets)
        caller.byte_count += _grown(octets, entry.caller_bytes)
        entry.caller_packets, entry.caller_bytes = packets, octets
        packets = kernel_entry.reply_packets
        octets = kernel_entry.reply_bytes - headers * packets
        callee.packet_count += _grown(packets, entry.callee_packets)
        callee.byte_count += _grown(octets, entry.callee_bytes)
        entry.callee_packets, entry.callee_bytes = packets, octets

    def confirm_gone(self, entries) -> list:
        """Of entries a dump did not list, the ones the kernel really no longer has (a dump
        of a table that changes meanwhile may miss one); the others are counted."""
        requests, gets = [], {}
        for entry in entries:
            seq = self.netlink.next_seq()
            requests.append((seq, ctnetlink.encode_get(seq, entry.orig)))
            gets[seq] = entry
        answer = self.netlink.transact(requests)
        gone = []
        for seq, entry in gets.items():
            found = answer["entries"].get(seq)
            if found is not None:
                self.count(entry, found)
            elif answer["errors"].get(seq) == errno.ENOENT:
                gone.append(entry)
        return gone

    def adopt(self, entries, unwanted=()) -> tuple:
        """Take over NAT entries an earlier run left relaying restored calls (their counters as
        it last read them, in the entries): (the ones the kernel still has, counted since;
        the ones it no longer has). `unwanted`: flows of saved entries no call claims, deleted."""
        wanted = {entry.orig: entry for entry in entries}
        adopted = []
        for kernel_entry in self._dump(self.mark):
            entry = wanted.pop(kernel_entry.orig, None)
            if entry is not None:
                self.count(entry, kernel_entry)
                adopted.append(entry)
        missed = list(wanted.values())
        gone = self.confirm_gone(missed) if missed else []      # (a dump may miss an entry)
        adopted.extend(entry for entry in missed if entry not in gone)
        for entry in adopted:
            if entry.component == RTP:
                entry.stream.in_kernel = True
            for port in entry.ports:
                self.by_port[port] = entry
        requests = []
        for flow in unwanted:
            seq = self.netlink.next_seq()
            requests.append((seq, ctnetlink.encode_delete(seq, flow)))
        if requests:
            self.netlink.transact(requests)
        return adopted, gone

    def refresh_counters(self) -> set:
        """Read every entry of ours; returns the ones the kernel no longer has."""
        seen = set()
        for kernel_entry in self._dump(self.mark):
            entry = self.find(kernel_entry.orig)
            if entry is not None:
                self.count(entry, kernel_entry)
                seen.add(entry)
        return self.entries() - seen
