"""A media stream between the two parties of a call, and its packet path (sans-IO).

Each stream holds two legs: the relay's port pair facing the caller and the
one facing the callee (RTP on the even port, RTCP on the next). A leg
latches onto its party's real address from the first packet that party
sends; afterwards packets from any other address are dropped and counted.
With strict source (the default) only a new offer/answer that changes the
party's address undoes a latch; without it (`relatch_after` set) a party
silent for that long may be latched anew by a new source (a NAT that
rebinds, a phone that moves). A packet received on one leg is sent out of
the other leg's port to the other party.

A relay holds tens of thousands of these at once, so they are slotted and
keep their per-component state (RTP, RTCP) in pairs of attributes rather
than in lists; a leg is itself the receiver its port pair delivers to.
"""

import logging
from sys import intern
from typing import Callable, Optional

from mediaproxy.protocol.media import MediaDescription
from mediaproxy.relay.rtp import codec_name, is_stun, rtp_payload_type

log = logging.getLogger("mediaproxy.relay")

CALLER, CALLEE = "caller", "callee"
RTP, RTCP = 0, 1
PARTIES = (CALLER, CALLEE)

# How streams end (SPEC §6).
CLOSED, REJECTED = "closed", "rejected"
NO_TRAFFIC_TIMEOUT, ON_HOLD_TIMEOUT = "no-traffic timeout", "on hold timeout"
CONNTRACK_TIMEOUT, UNSELECTED_ICE = "conntrack timeout", "unselected ICE candidate"


def other_party(party: str) -> str:
    return CALLEE if party == CALLER else CALLER


def shared_address(address):
    """(ip, port) with the one copy of its IP string: the addresses a relay keeps (latched,
    announced) are few distinct IPs over many calls (gateways, NATs, RTP and RTCP of a party)."""
    ip, port = address
    return intern(ip), port


class PerComponent:
    """Two attributes of a leg, one per component, seen as an [RTP, RTCP] sequence: for tests
    and tools that index by component (the leg keeps them apart, smaller than a list)."""

    __slots__ = ("leg", "names")

    def __init__(self, leg, names):
        self.leg, self.names = leg, names

    def __getitem__(self, component: int):
        return getattr(self.leg, self.names[component])

    def __setitem__(self, component: int, value) -> None:
        setattr(self.leg, self.names[component], value)

    def __len__(self):
        return 2

    def __iter__(self):
        return iter((self[RTP], self[RTCP]))

    def __eq__(self, other):
        return list(self) == list(other)

    def __repr__(self):
        return repr(list(self))


def _per_component(rtp_name: str, rtcp_name: str, doc: str) -> property:
    names = (rtp_name, rtcp_name)

    def assign(leg, values):
        setattr(leg, rtp_name, values[RTP])
        setattr(leg, rtcp_name, values[RTCP])
    return property(lambda leg: PerComponent(leg, names), assign, doc=doc)


class Leg:
    """The relay's port pair facing one party, what it learnt of that party, and the packet
    path of that party's packets: calling the leg is receiving one (see __call__)."""

    __slots__ = ("stream", "peer", "port", "sdp_address", "latched_rtp", "latched_rtcp", "media_seen_rtp",
                 "media_seen_rtcp", "packet_count", "byte_count", "dropped", "codec", "on_hold", "ice",
                 "stranger_look")

    def __init__(self, stream: "MediaStream", port: int):
        self.stream = stream
        self.peer = None                  # the stream's other leg
        self.port = port
        self.sdp_address = None           # (ip, port) the party announced in its SDP
        self.latched_rtp = None           # real (ip, port) of the party's RTP, from its first packet
        self.latched_rtcp = None
        self.media_seen_rtp = False       # a packet other than STUN came (RTP)
        self.media_seen_rtcp = False
        self.packet_count = 0             # UDP payload received from the party, RTP and RTCP, in user
        self.byte_count = 0               # space and by the kernel (its counters are added as read)
        self.dropped = 0                  # packets from addresses other than the latched one
        self.codec = None
        self.on_hold = False
        self.ice = False
        self.stranger_look = None         # (packet_count, when): the party's count as a stranger last saw it

    latched = _per_component("latched_rtp", "latched_rtcp", "latched addresses as [RTP, RTCP]")
    media_seen = _per_component("media_seen_rtp", "media_seen_rtcp", "media seen as [RTP, RTCP]")

    @property
    def party(self) -> str:
        return CALLER if self is self.stream.caller else CALLEE

    def reset_latch(self):
        self.latched_rtp = self.latched_rtcp = None
        self.media_seen_rtp = self.media_seen_rtcp = False
        self.stranger_look = None

    def describe(self, media: MediaDescription) -> bool:
        """Take the party's SDP for this stream; True when its address changed (re-latch needed)."""
        self.on_hold = media.on_hold
        self.ice = media.ice
        if media.ip in ("0.0.0.0", "::"):   # RFC 2543 hold: keep what we know
            return False
        address = (media.ip, media.port)
        changed = self.sdp_address is not None and self.sdp_address != address
        if self.sdp_address != address:
            self.sdp_address = shared_address(address)
        if changed:
            self.reset_latch()
        return changed

    def __call__(self, component: int, source, data: bytes, now: float):
        """A packet from the party: where to send it, as (out_port, destination), or None to drop."""
        # The per-packet path of user-space forwarding: the common case (a latched party, media
        # seen, codec known) takes no call and as few lookups as possible.
        stream = self.stream
        if stream is None or stream.end_time is not None:       # None: released (see MediaStream.release)
            return None
        peer = self.peer
        if component:
            latched, media_seen, destination = self.latched_rtcp, self.media_seen_rtcp, peer.latched_rtcp
        else:
            latched, media_seen, destination = self.latched_rtp, self.media_seen_rtp, peer.latched_rtp
        if latched != source:
            if latched is not None:
                if stream.relatch_after is None or not self._party_silent(now):
                    self._drop(component, source, latched)
                    return None
                self._relatch(component, source, latched, now)
                media_seen = False
            self._latch(component, source)
        self.packet_count += 1
        self.byte_count += len(data)
        stream.last_activity = now
        if not media_seen:
            self._media_check(component, data, now)
        if self.codec is None and not component:
            payload_type = rtp_payload_type(data)
            if payload_type is not None:
                self.codec = codec_name(payload_type)
        if destination is None:
            destination = self._sdp_destination(component)
            if destination is None:
                return None
        return peer.port + component, destination

    def dropped_by_kernel(self, component: int, source, now: float) -> bool:
        """A packet from `source` reached this leg's parked port (see kernel/parking.py): the
        kernel relays only the latched party's packets there, and no socket took this one.
        It is counted as dropped; True when the port should listen again, so that the next
        ones are heard (the leg may latch them)."""
        if self.stream is None:
            return False
        latched = self.latched_rtcp if component else self.latched_rtp
        self._drop(component, source, latched)
        return latched is None or self.stream.relatch_after is not None

    def _drop(self, component: int, source, latched) -> None:
        self.dropped += 1
        self.stream.listener.dropped(self.stream)
        if self.dropped == 1:         # one line per leg: a stranger may send thousands
            log.info("session %s: dropping packets from %s to the %s's %s %s port, latched to %s",
                     self.stream.call_id, _text(source), self.party, self.stream.media_type,
                     "RTCP" if component else "RTP", _text(latched))

    def _party_silent(self, now: float) -> bool:
        """Whether the latched party sent nothing for relatch_after, as seen by the packets of
        strangers: its packet count, looked at by each of them, has not moved for that long.
        (A count, not a time: nothing is added to the per-packet path of the party.)"""
        stream = self.stream
        if stream.on_hold:
            return False              # silence is what hold is: nobody takes the party's place
        look = self.stranger_look
        if look is not None and look[0] == self.packet_count and now - look[1] >= stream.relatch_after:
            # The kernel's part of the count is only read when asked: ask before believing it.
            if not stream.listener.count_packets(stream):
                return False
            if look[0] == self.packet_count:
                return True
        if look is None or look[0] != self.packet_count:
            self.stranger_look = (self.packet_count, now)
        return False

    def _relatch(self, component: int, source, latched, now: float) -> None:
        """The party moved without a new offer: its latch is undone (both components; the
        other one latches on its next packet) and this source latched."""
        log.info("session %s: the %s's %s %s moved from %s to %s after %.1f s of silence: latched anew",
                 self.stream.call_id, self.party, self.stream.media_type, "RTCP" if component else "RTP",
                 _text(latched), _text(source), now - self.stranger_look[1])
        self.reset_latch()
        self.stream.listener.unlatched(self.stream)

    def _latch(self, component: int, source) -> None:
        if component:
            self.latched_rtcp = shared_address(source)
        else:
            self.latched_rtp = shared_address(source)

    def _media_check(self, component: int, data: bytes, now: float) -> None:
        """Until a party's first packet other than STUN: STUN is relayed but never hands a
        stream to the kernel (ICE may still move it)."""
        if is_stun(data):
            return
        if component:
            self.media_seen_rtcp = True
            both = self.peer.media_seen_rtcp
        else:
            self.media_seen_rtp = True
            both = self.peer.media_seen_rtp
        stream = self.stream
        if stream.first_media_time is None:
            stream.first_media_time = now
        if both:
            stream.listener.latched(stream, component)

    def _sdp_destination(self, component: int):
        """Before the peer latched: its SDP address, if it may be sent to."""
        address = self.peer.sdp_address
        if address is None:
            return None
        ip, port = address
        return (ip, port + component) if self.stream.routable(ip) else None


class StreamListener:
    """Told of the latching events of streams (the forwarding uses them for the kernel path)."""

    packets_dropped = 0       # strangers' packets dropped by all its streams (the summary's dropped_packets)

    def latched(self, stream: "MediaStream", component: int) -> None:
        """Both parties of a sub-stream (RTP or RTCP) are latched."""

    def unlatched(self, stream: "MediaStream") -> None:
        """A party's address changed: its latch is gone."""

    def dropped(self, stream: "MediaStream") -> None:
        """A packet from an address other than the latched one was dropped."""
        self.packets_dropped += 1

    def count_packets(self, stream: "MediaStream") -> bool:
        """Bring the legs' packet counts up to date (the kernel path reads its entries'
        counters); False when they could not be."""
        return True


NO_LISTENER = StreamListener()


def _any_address(ip: str) -> bool:
    return True


def _text(address) -> str:
    return "nobody" if address is None else "%s:%d" % address


class MediaStream:
    """One m-line of the call, relayed between a caller leg and a callee leg."""

    __slots__ = ("media_type", "call_id", "caller", "callee", "created", "last_activity", "in_kernel",
                 "first_media_time", "end_time", "status", "timeout_wait", "listener", "routable", "relatch_after")

    def __init__(self, media_type: str, caller_port: int, callee_port: int, now: float,
                 routable: Callable[[str], bool] = _any_address, relatch_after: Optional[float] = None):
        self.media_type = intern(media_type)
        self.call_id = None
        self.caller = Leg(self, caller_port)
        self.callee = Leg(self, callee_port)
        self.caller.peer, self.callee.peer = self.callee, self.caller
        self.created = now
        self.last_activity = now          # the last packet, or the last change of hold: timers count from here
        self.in_kernel = False            # its RTP is relayed by the kernel, whose entry times it out
        self.first_media_time = None
        self.end_time = None
        self.status = None                # set when the stream ends: closed, rejected, ... timeout
        self.timeout_wait = 0
        self.listener = NO_LISTENER
        self.routable = routable          # whether packets may go to an SDP address before a latch
        self.relatch_after = relatch_after    # None: strict source; else seconds of a party's silence
                                              # after which a new source may take its place

    def release(self) -> None:
        """Break the legs' references back to the stream and to each other, once nothing is
        asked of an ended stream any more (its session's final statistics are made)."""
        for leg in (self.caller, self.callee):
            leg.stream = leg.peer = None

    @property
    def legs(self) -> tuple:
        return self.caller, self.callee

    @property
    def ended(self) -> bool:
        return self.end_time is not None

    @property
    def on_hold(self) -> bool:
        return self.caller.on_hold or self.callee.on_hold

    @property
    def current_status(self) -> str:
        if self.status is not None:
            return self.status
        return "on hold" if self.on_hold else "active"

    def leg(self, party: str) -> Leg:
        return self.caller if party == CALLER else self.callee

    def end(self, status: str, now: float) -> None:
        if self.end_time is None:
            self.status = status
            self.end_time = now

    def is_latched(self, component: int) -> bool:
        """Both parties latched and sending media (not only STUN): the kernel may take over."""
        if component:
            return self.caller.media_seen_rtcp and self.callee.media_seen_rtcp
        return self.caller.media_seen_rtp and self.callee.media_seen_rtp

    def describe(self, party: str, media: MediaDescription, now: float) -> None:
        """Take `party`'s SDP for this stream; a changed address undoes its latch."""
        was_on_hold = self.on_hold
        if self.leg(party).describe(media):
            self.listener.unlatched(self)
        if self.on_hold != was_on_hold:
            self.last_activity = now      # hold and un-hold start the timer that fits again

    @property
    def ice(self) -> bool:
        return self.caller.ice and self.callee.ice

    def timed_out(self, now: float, stream_timeout: float, on_hold_timeout: float):
        """(status, timeout_wait) when this stream has been silent too long, else None.

        Streams the kernel relays are timed out by their conntrack entries instead.
        """
        if self.end_time is not None or self.in_kernel:
            return None
        wait = on_hold_timeout if self.on_hold else stream_timeout
        if now - self.last_activity < wait:
            return None
        if self.ice and self.first_media_time is None:
            return UNSELECTED_ICE, wait
        return (ON_HOLD_TIMEOUT if self.on_hold else NO_TRAFFIC_TIMEOUT), wait

    def on_packet(self, party: str, component: int, source, data: bytes, now: float):
        """A packet from `party`'s side: where to send it, as (out_port, destination), or None to drop."""
        return self.leg(party)(component, source, data, now)
