"""Kernel forwarding: user space for the first packets, conntrack for the rest.

The same sockets as user-space forwarding catch the first packets of every
party (that is how latching works); once both parties of a sub-stream are
latched, its packets are relayed by a conntrack NAT entry and never reach
Python again. Destroy events of those entries end their streams.

IPv4 and IPv6 streams alike; a stream of an IP version the kernel path could
not come up for (see setup) stays in user space.
"""

import logging

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from mediaproxy.relay.kernel.adoption import entries_from_state, entry_state
from mediaproxy.relay.kernel.conntrack import UDP_HEADERS, ConntrackTable, entry_for, udp_stream_timeout
from mediaproxy.relay.kernel.iptables import IptablesError
from mediaproxy.relay.kernel.netlink import EventSocket, NetlinkError, WalkSocket
from mediaproxy.relay.kernel.parking import PortParking
from mediaproxy.relay.streams import CALLER, CONNTRACK_TIMEOUT, RTCP, RTP
from mediaproxy.relay.userspace import UserspaceForwarding

log = logging.getLogger("mediaproxy.relay")

MIN_REAP_INTERVAL, MAX_REAP_INTERVAL = 1.0, 30.0     # seconds between reads of the table



@implementer(IReadDescriptor)
class _EventReader:
    def __init__(self, events: EventSocket, callback):
        self.events = events
        self.callback = callback

    def fileno(self):
        return self.events.fileno()

    def doRead(self):
        entries, overflowed = self.events.read()
        self.callback(entries, overflowed)

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "conntrack-events"


@implementer(IReadDescriptor)
class _Evictor:
    """The periodic walk of the table that makes the kernel destroy the entries that timed
    out (their destroy events end the streams); its answer, read when the reactor has time,
    is only its end."""

    def __init__(self, reactor, family: int):
        self.reactor = reactor
        self.family = family
        self.walk = WalkSocket()
        self.running = False

    def fileno(self):
        return self.walk.fileno()

    def start(self) -> None:
        self.walk.start(self.family)
        self.reactor.addReader(self)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.reactor.removeReader(self)
            self.running = False
        self.walk.close()

    def doRead(self):
        try:
            done = self.walk.finished()
        except (NetlinkError, OSError) as e:
            log.error("could not walk the kernel's conntrack table: %s", e)
            done = True
        if done:
            self.reactor.removeReader(self)
            self.running = False

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "conntrack-walk"


class KernelForwarding(UserspaceForwarding):
    """`ip`: the relay's address or its addresses by IP version, as for user space; the kernel
    relays the streams of the versions `table.versions`."""

    def __init__(self, ip, reactor, table: ConntrackTable, events: EventSocket, port_range=None):
        super().__init__(ip, reactor)
        self.parking = PortParking(self, reactor, port_range, self._relayed_sources)
        self.table = table
        self.kernel_ports = table.kernel_ports
        self.events = events
        self.on_expired = lambda stream, status, timeout_wait: None     # set by the relay service
        self._pending = {}
        self._handover_call = None
        self._kernel_bytes = 0
        self._reader = _EventReader(events, self._destroyed)
        reactor.addReader(self._reader)
        self._evictor = _Evictor(reactor, table.dump_family)
        self._kernel_versions = table.versions
        self._reap_call = None
        self._schedule_reap()

    def stop(self) -> None:
        if self._reap_call is not None and self._reap_call.active():
            self._reap_call.cancel()
        self.reactor.removeReader(self._reader)
        self.events.close()
        self._evictor.stop()
        self.parking.stop()
        super().stop()

    # Calls carried over a restart (mediaproxy.relay.kernel.adoption)

    def saved_entries(self) -> list:
        """The entries to leave in the kernel over a restart, their counters read now (first:
        the legs' counts then hold everything up to the save)."""
        self.refresh_counters()
        return [entry_state(entry) for entry in self.table.entries()]

    def adopt(self, streams, saved) -> None:
        """Relay again through the entries an earlier run left for these restored streams."""
        entries, orphans = entries_from_state(saved, {stream.caller.port: stream for stream in streams}, self.ips)
        try:
            adopted, gone = self.table.adopt(entries, orphans)
        except (NetlinkError, OSError) as e:
            log.error("could not adopt the %d kernel entries of the restored calls: %s", len(entries), e)
            adopted, gone = [], []          # in user space until their media hands them over again
        for entry in adopted:
            for port in entry.ports:
                self.parking.park(port)
            log.debug("session %s: %s %s relayed by the kernel since the previous run", entry.stream.call_id,
                      entry.stream.media_type, "RTP" if entry.component == RTP else "RTCP")
        for stream in streams:
            for component in (RTP, RTCP):
                if not stream.ended and not self.table.relays(stream, component):
                    # its parties' next media hands it to the kernel (again)
                    for leg in stream.legs:
                        leg.media_seen[component] = False
        if entries or orphans:
            log.info("kernel entries of the restored calls: %d adopted, %d ended while the relay was away, "
                     "%d of no restored call removed", len(adopted), len(gone), len(orphans))
        for entry in gone:
            self.table.ended(entry)
        self._entries_ended(gone)

    # StreamListener

    def latched(self, stream, component: int) -> None:
        if self._version_of(stream, component) not in self._kernel_versions:
            return           # its IP version is relayed in user space (see setup)
        self._pending[(id(stream), component)] = (stream, component)
        if self._handover_call is None:
            self._handover_call = self.reactor.callLater(0, self._hand_over)

    def unlatched(self, stream) -> None:
        try:
            removed = self.table.remove_port(stream.leg(CALLER).port)
        except (NetlinkError, OSError) as e:   # (a re-latch asks from the packet path: it must not break)
            log.error("session %s: could not remove the kernel entries of its %s stream: %s",
                      stream.call_id, stream.media_type, e)
            return
        self._wake(removed)
        if removed:
            log.info("session %s: a party moved, its %s stream is relayed in user space until it latches again",
                     stream.call_id, stream.media_type)

    def _hand_over(self) -> None:
        self._handover_call = None
        pending, self._pending = list(self._pending.values()), {}
        entries = []
        for stream, component in pending:
            if stream.ended or not stream.is_latched(component) or self.table.relays(stream, component):
                continue
            entries.append(entry_for(stream, component, self.ip_of(stream.caller.port)))
        try:
            installed = self.table.install(entries)
        except (NetlinkError, IptablesError, OSError) as e:
            log.error("could not hand %d sub-streams to the kernel, they stay in user space: %s", len(entries), e)
            return
        for entry in installed:
            for port in entry.ports:
                self.parking.park(port)
            log.debug("session %s: %s %s relayed by the kernel", entry.stream.call_id, entry.stream.media_type,
                      "RTP" if entry.component == RTP else "RTCP")

    # Forwarding

    def close(self, port: int) -> None:
        try:
            self.table.remove_port(port)
        except (NetlinkError, OSError) as e:
            log.error("could not remove the kernel entries of port %d: %s", port, e)
        self.parking.forget(port)
        super().close(port)

    @staticmethod
    def _version_of(stream, component: int) -> int:
        latched = stream.caller.latched[component]
        return 6 if latched is not None and ":" in latched[0] else 4

    def _relayed_sources(self, port: int) -> tuple:
        """The party whose packets to this relay port the kernel relays: the caller's to its
        caller-facing port, the callee's to the other (to the wrong port, a party is a stranger)."""
        entry = self.table.by_port.get(port)
        if entry is None:
            return ()
        return (entry.caller,) if port == entry.ports[0] else (entry.callee,)

    def count_packets(self, stream) -> bool:
        """The kernel's counters of the stream's entries, into its legs' counts now: asked
        before a silent party's place is given to a new source (strict_source = no)."""
        entries = [entry for entry in map(self.table.by_port.get, (stream.caller.port, stream.caller.port + 1))
                   if entry is not None]
        try:
            self.table.confirm_gone(entries)        # reads (and counts) the ones the kernel still has
        except (NetlinkError, OSError) as e:
            log.error("session %s: could not read the kernel's counters: %s", stream.call_id, e)
            return False
        return True

    def _wake(self, entries) -> None:
        """The kernel no longer relays these sub-streams: their ports listen again."""
        for entry in entries:
            if not entry.stream.ended:
                for port in entry.ports:
                    self.parking.wake(port)

    def refresh_counters(self) -> None:
        try:
            self.table.refresh_counters()
        except (NetlinkError, OSError) as e:
            log.error("could not read the kernel's counters: %s", e)

    def traffic_bytes(self) -> int:
        kernel_bytes = 0
        try:
            for version, iptables in self.table.iptables_by_version.items():
                packets, octets = iptables.kernel_traffic()
                kernel_bytes += octets - UDP_HEADERS[version] * packets
        except (IptablesError, OSError) as e:
            log.error("could not read the kernel's traffic counter: %s", e)
            return self.bytes_forwarded + self._kernel_bytes
        self._kernel_bytes = kernel_bytes
        return self.bytes_forwarded + self._kernel_bytes

    def status(self) -> dict:
        status = {"forwarding": "kernel", "userspace_packets": self.packets_forwarded,
                  "kernel_entries": len(self.table), "parked_ports": len(self.parking)}
        if self.table.unavailable:
            # e.g. {"kernel_ip_versions": [4], "userspace_ip_versions": [6]}: IPv6 in user space
            status["kernel_ip_versions"] = sorted(self.table.versions)
            status["userspace_ip_versions"] = sorted(self.table.unavailable)
        return status

    # Destroy events

    def _destroyed(self, kernel_entries, overflowed: bool) -> None:
        ended = []
        for kernel_entry in kernel_entries:
            if kernel_entry.mark != self.table.mark:
                continue
            entry = self.table.find(kernel_entry.orig)
            if entry is not None:
                self.table.ended(entry, kernel_entry)
                ended.append(entry)
        if overflowed:
            log.warning("conntrack events were lost (too many at once): reading the table instead")
            ended.extend(self._read_table())
        self._entries_ended(ended)

    def _read_table(self) -> list:
        """Read our entries (counters too); the ones the kernel no longer has have ended."""
        try:
            gone = self.table.confirm_gone(self.table.refresh_counters())
        except (NetlinkError, OSError) as e:
            log.error("could not read the kernel's conntrack table: %s", e)
            return []
        for entry in gone:
            self.table.ended(entry)
        return gone

    def _reap(self) -> None:
        """The kernel destroys a timed-out entry (and sends its destroy event) only when its
        garbage collection gets to it, up to a minute later, or when a table dump passes it.
        So while we have entries, a walk a few times per UDP timeout."""
        self._reap_call = None
        if len(self.table) and not self._evictor.running:
            try:
                self._evictor.start()
            except OSError as e:
                log.error("could not walk the kernel's conntrack table: %s", e)
        self._schedule_reap()

    def _schedule_reap(self) -> None:
        interval = min(max(udp_stream_timeout() / 4, MIN_REAP_INTERVAL), MAX_REAP_INTERVAL)
        self._reap_call = self.reactor.callLater(interval, self._reap)

    def _entries_ended(self, ended) -> None:
        if not ended:
            return
        timeout_wait = udp_stream_timeout()
        now = self.reactor.seconds()
        for entry in ended:
            if entry.component != RTP:
                continue
            if entry.stream.on_hold:
                # Silence is what hold is: the hold timer of user space takes over.
                entry.stream.last_activity = now
                continue
            self.on_expired(entry.stream, CONNTRACK_TIMEOUT, timeout_wait)
        self._wake(ended)
