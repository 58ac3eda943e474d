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
from dataclasses import dataclass

from mediaproxy.relay.kernel import ctnetlink, ipset
from mediaproxy.relay.kernel.ctnetlink import Tuple5
from mediaproxy.relay.streams import CALLEE, CALLER, RTP

log = logging.getLogger("mediaproxy.relay")

UDP_STREAM_TIMEOUT = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
IPV4_UDP_HEADERS = 28


def udp_stream_timeout() -> int:
    """How long the kernel keeps a running UDP entry without traffic."""
    try:
        with open(UDP_STREAM_TIMEOUT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 120


@dataclass(eq=False, slots=True)
class KernelEntry:
    stream: object
    component: int
    orig: Tuple5              # caller -> relay:A (+component)
    callee: tuple             # where the kernel sends the caller's packets
    relay_b: tuple            # from where


def entry_for(stream, component: int, relay_ip: str) -> KernelEntry:
    caller, callee = stream.leg(CALLER), stream.leg(CALLEE)
    caller_ip, caller_port = caller.latched[component]
    orig = Tuple5(caller_ip, relay_ip, caller_port, caller.port + component)
    return KernelEntry(stream, component, orig, callee.latched[component], (relay_ip, callee.port + component))


class ConntrackTable:
    """What of the kernel's conntrack table is ours, and the batched changes to it."""

    def __init__(self, netlink, iptables, relay_ip: str, mark: int, inhibitor_set: str):
        self.netlink = netlink
        self.iptables = iptables
        self.inhibitor_set = inhibitor_set
        self.relay_ip = relay_ip
        self.mark = mark
        self.by_orig = {}             # orig Tuple5 -> KernelEntry
        self.by_port = {}             # relay port (even, either leg) -> its stream's KernelEntry list, one
                                      # list shared by both legs' ports
        self.kernel_ports = set()     # relay ports (RTP or RTCP, both legs) whose packets the kernel relays

    def __len__(self):
        return len(self.by_orig)

    def remove_leftovers(self, port_range) -> int:
        """Delete what an earlier run left: entries with our mark, and the user-space
        path's entries of our ports (with the same ports reused they would clash
        with the new calls' entries and make the kernel rewrite their ports)."""
        low, high = port_range

        def ours(entry):
            if entry.mark == self.mark:
                return True
            flow = entry.orig
            return flow is not None and entry.proto == socket.IPPROTO_UDP and ((flow.dst == self.relay_ip and low <= flow.dport < high)
                                         or (flow.src == self.relay_ip and low <= flow.sport < high))
        requests = []
        for entry in self.netlink.dump(None):
            if ours(entry):
                seq = self.netlink.next_seq()
                requests.append((seq, ctnetlink.encode_delete(seq, entry.orig)))
        self.netlink.transact(requests)
        self.by_orig.clear()
        self.by_port.clear()
        self.kernel_ports.clear()
        return len(requests)

    def install(self, entries) -> list:
        """Hand these sub-streams to the kernel; returns the ones that were installed."""
        if not entries:
            return []
        incoming = []
        for entry in entries:
            incoming.append(entry.orig)
            callee_ip, callee_port = entry.callee
            incoming.append(Tuple5(callee_ip, self.relay_ip, callee_port, entry.relay_b[1]))
        next_seq, requests, creates = self.netlink.next_seq, [], []
        # (the loops below run for every sub-stream handed over: written out, without helpers)
        chunks = [ipset.Members(incoming[i:i + ipset.MAX_MEMBERS])
                  for i in range(0, len(incoming), ipset.MAX_MEMBERS)]
        inhibitions = []
        for chunk in chunks:
            seq = next_seq()
            requests.append((seq, ipset.encode_add(seq, self.inhibitor_set, chunk)))
            inhibitions.append(seq)
        encode_delete, encode_nat_entry4 = ctnetlink.encode_delete, ctnetlink.encode_nat_entry4
        for flow in incoming:                                   # the entries of the user-space path
            seq = next_seq()
            requests.append((seq, encode_delete(seq, flow)))
        timeout, mark = udp_stream_timeout(), self.mark
        for entry in entries:
            seq = next_seq()
            requests.append((seq, encode_nat_entry4(seq, entry.orig, entry.callee, entry.relay_b, timeout, mark)))
            creates.append((seq, entry))
        for chunk in chunks:
            seq = next_seq()
            requests.append((seq, ipset.encode_del(seq, self.inhibitor_set, chunk)))
        errors = self.netlink.transact(requests)["errors"]
        failed = [errors[seq] for seq in inhibitions if errors.get(seq)]
        if failed:
            log.warning("the inhibitor set %s refused %d flows (%s): packets arriving during this hand-over "
                        "could make wrong entries", self.inhibitor_set, len(incoming), os.strerror(failed[0]))
        installed = []
        for seq, entry in creates:
            error = errors.get(seq)
            if error:
                log.warning("session %s: the kernel refused the %s entry %s: %s", entry.stream.call_id,
                            "RTP" if entry.component == RTP else "RTCP", entry.orig, os.strerror(error))
                continue
            self.by_orig[entry.orig] = entry
            if entry.component == RTP:
                entry.stream.in_kernel = True
            shared = self.by_port.get(entry.stream.leg(CALLER).port)
            if shared is None:
                shared = []
                for leg in entry.stream.legs.values():
                    self.by_port[leg.port] = shared
            shared.append(entry)
            for leg in entry.stream.legs.values():
                self.kernel_ports.add(leg.port + entry.component)
            installed.append(entry)
        return installed

    def remove_port(self, port: int) -> list:
        """Remove the entries of the streams on this port, counting their last packets first."""
        entries = list(self.by_port.get(port, ()))
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
            self.fold(entry)
        return list(entries)

    def _forget(self, entry: KernelEntry) -> None:
        self.by_orig.pop(entry.orig, None)
        if entry.component == RTP:
            entry.stream.in_kernel = False
        shared = self.by_port.get(entry.stream.leg(CALLER).port)
        if shared is not None and entry in shared:
            shared.remove(entry)
        for leg in entry.stream.legs.values():
            self.kernel_ports.discard(leg.port + entry.component)
            if not shared:
                self.by_port.pop(leg.port, None)

    def ended(self, entry: KernelEntry, kernel_entry=None) -> None:
        """The kernel destroyed the entry by itself; kernel_entry carries its last counters.

        Its sub-stream goes back to user space: media from both parties again
        (after a pause, or hold) hands it to the kernel anew.
        """
        self._forget(entry)
        if kernel_entry is not None:
            self.count(entry, kernel_entry)
        self.fold(entry)
        for leg in entry.stream.legs.values():
            leg.media_seen[entry.component] = False

    @staticmethod
    def fold(entry: KernelEntry) -> None:
        """An entry is gone: what it counted becomes part of the legs' settled counts."""
        c = entry.component
        for leg in entry.stream.legs.values():
            leg.packets[c] += leg.kernel_packets[c]
            leg.bytes[c] += leg.kernel_bytes[c]
            leg.kernel_packets[c] = leg.kernel_bytes[c] = 0

    @staticmethod
    def count(entry: KernelEntry, kernel_entry) -> None:
        """The kernel's counters of an entry, into the stream's legs.

        The kernel counts IP packets; like user space we count UDP payload,
        so the IPv4 and UDP headers (28 bytes a packet) come off.
        """
        caller, callee = entry.stream.leg(CALLER), entry.stream.leg(CALLEE)
        c = entry.component
        caller.kernel_packets[c] = kernel_entry.orig_packets
        caller.kernel_bytes[c] = kernel_entry.orig_bytes - IPV4_UDP_HEADERS * kernel_entry.orig_packets
        callee.kernel_packets[c] = kernel_entry.reply_packets
        callee.kernel_bytes[c] = kernel_entry.reply_bytes - IPV4_UDP_HEADERS * kernel_entry.reply_packets

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

    def refresh_counters(self) -> set:
        """Read every entry of ours; returns the ones the kernel no longer has."""
        seen = set()
        for kernel_entry in self.netlink.dump(self.mark):
            entry = self.by_orig.get(kernel_entry.orig)
            if entry is not None:
                self.count(entry, kernel_entry)
                seen.add(kernel_entry.orig)
        return {entry for orig, entry in self.by_orig.items() if orig not in seen}
