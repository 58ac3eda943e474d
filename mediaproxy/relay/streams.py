"""A media stream between the two parties of a call, and its packet path (sans-IO).

Each stream holds two legs: the relay's port pair facing the caller and the
one facing the callee (RTP on the even port, RTCP on the next). A leg
latches onto its party's real address from the first packet that party
sends; afterwards only that address is accepted. A packet received on one
leg is sent out of the other leg's port to the other party.
"""

from typing import Callable

from mediaproxy.protocol.media import MediaDescription
from mediaproxy.relay.rtp import codec_name, is_stun, rtp_payload_type

CALLER, CALLEE = "caller", "callee"
RTP, RTCP = 0, 1
PARTIES = (CALLER, CALLEE)

# How streams end (SPEC §6).
CLOSED, REJECTED = "closed", "rejected"
NO_TRAFFIC_TIMEOUT, ON_HOLD_TIMEOUT = "no-traffic timeout", "on hold timeout"
CONNTRACK_TIMEOUT, UNSELECTED_ICE = "conntrack timeout", "unselected ICE candidate"


def other_party(party: str) -> str:
    return CALLEE if party == CALLER else CALLER


class Leg:
    """The relay's port pair facing one party, and what it learnt of that party."""

    __slots__ = ("port", "sdp_address", "latched", "media_seen", "packets", "bytes", "kernel_packets",
                 "kernel_bytes", "dropped", "codec", "on_hold", "ice", "first_packet_time")

    def __init__(self, port: int):
        self.port = port
        self.sdp_address = None           # (ip, port) the party announced in its SDP
        self.latched = [None, None]       # real (ip, port) per component, from its first packet
        self.media_seen = [False, False]  # a packet other than STUN came, per component
        self.packets = [0, 0]             # received from the party in user space, per component
        self.bytes = [0, 0]
        self.kernel_packets = [0, 0]      # forwarded from the party by the kernel, per component
        self.kernel_bytes = [0, 0]
        self.dropped = 0                  # packets from addresses other than the latched one
        self.codec = None
        self.on_hold = False
        self.ice = False
        self.first_packet_time = None

    def reset_latch(self):
        self.latched = [None, None]
        self.media_seen = [False, False]

    @property
    def packet_count(self) -> int:
        return sum(self.packets) + sum(self.kernel_packets)

    @property
    def byte_count(self) -> int:
        return sum(self.bytes) + sum(self.kernel_bytes)

    def describe(self, media: MediaDescription) -> bool:
        """Take the party's SDP for this stream; True when its address changed (re-latch needed)."""
        self.on_hold = media.on_hold
        self.ice = media.ice
        if media.ip in ("0.0.0.0", "::"):   # RFC 2543 hold: keep what we know
            return False
        address = (media.ip, media.port)
        changed = self.sdp_address is not None and self.sdp_address != address
        self.sdp_address = address
        if changed:
            self.reset_latch()
        return changed


class StreamListener:
    """Told of the latching events of streams (the forwarding uses them for the kernel path)."""

    def latched(self, stream: "MediaStream", component: int) -> None:
        """Both parties of a sub-stream (RTP or RTCP) are latched."""

    def unlatched(self, stream: "MediaStream") -> None:
        """A party's address changed: its latch is gone."""


class MediaStream:
    """One m-line of the call, relayed between a caller leg and a callee leg."""

    listener = StreamListener()

    def __init__(self, media_type: str, caller_port: int, callee_port: int, now: float,
                 routable: Callable[[str], bool] = lambda ip: True):
        self.media_type = media_type
        self.call_id = None
        self.legs = {CALLER: Leg(caller_port), CALLEE: Leg(callee_port)}
        self.created = now
        self.last_activity = now          # the last packet, or the last change of hold: timers count from here
        self.in_kernel = False            # its RTP is relayed by the kernel, whose entry times it out
        self.first_media_time = None
        self.end_time = None
        self.status = None                # set when the stream ends: closed, rejected, ... timeout
        self.timeout_wait = 0
        self._routable = routable

    @property
    def ended(self) -> bool:
        return self.end_time is not None

    @property
    def on_hold(self) -> bool:
        return self.legs[CALLER].on_hold or self.legs[CALLEE].on_hold

    @property
    def current_status(self) -> str:
        if self.status is not None:
            return self.status
        return "on hold" if self.on_hold else "active"

    def leg(self, party: str) -> Leg:
        return self.legs[party]

    def end(self, status: str, now: float) -> None:
        if self.end_time is None:
            self.status = status
            self.end_time = now

    def is_latched(self, component: int) -> bool:
        """Both parties latched and sending media (not only STUN): the kernel may take over."""
        return all(leg.media_seen[component] for leg in self.legs.values())

    def describe(self, party: str, media: MediaDescription, now: float) -> None:
        """Take `party`'s SDP for this stream; a changed address undoes its latch."""
        was_on_hold = self.on_hold
        if self.legs[party].describe(media):
            self.listener.unlatched(self)
        if self.on_hold != was_on_hold:
            self.last_activity = now      # hold and un-hold start the timer that fits again

    @property
    def ice(self) -> bool:
        return all(leg.ice for leg in self.legs.values())

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
        # The per-packet path of user-space forwarding: the common case (a latched party, media
        # seen, codec known) takes no call and as few lookups as possible.
        if self.end_time is not None:
            return None
        legs = self.legs
        leg = legs[party]
        latched = leg.latched
        if latched[component] != source:
            if latched[component] is not None:
                leg.dropped += 1
                return None
            latched[component] = source
        leg.packets[component] += 1
        leg.bytes[component] += len(data)
        self.last_activity = now
        peer = legs[CALLEE if party == CALLER else CALLER]
        if not leg.media_seen[component]:
            self._media_check(leg, peer, component, data, now)
        if leg.codec is None and component == RTP:
            payload_type = rtp_payload_type(data)
            if payload_type is not None:
                leg.codec = codec_name(payload_type)
        destination = peer.latched[component]
        if destination is None:
            destination = self._sdp_destination(peer, component)
            if destination is None:
                return None
        return peer.port + component, destination

    def _media_check(self, leg: Leg, peer: Leg, component: int, data: bytes, now: float) -> None:
        """Until a party's first packet other than STUN: STUN is relayed but never hands a
        stream to the kernel (ICE may still move it)."""
        if is_stun(data):
            return
        leg.media_seen[component] = True
        if leg.first_packet_time is None:
            leg.first_packet_time = now
            if self.first_media_time is None:
                self.first_media_time = now
        if peer.media_seen[component]:
            self.listener.latched(self, component)

    def _sdp_destination(self, peer: Leg, component: int):
        """Before the peer latched: its SDP address, if it may be sent to."""
        address = peer.sdp_address
        if address is None:
            return None
        ip, port = address
        return (ip, port + component) if self._routable(ip) else None
