"""The relay's session table and command handling (sans-IO).

Takes the dispatcher's commands as values with the current time and answers
with the reply text; opens and closes port pairs through the injected
Forwarding. Nothing here knows about Twisted or sockets.
"""

import functools
import json
import logging

from mediaproxy import __version__
from mediaproxy.protocol.media import MediaError, streams_ip_version
from mediaproxy.protocol.proxy import RequestError, parse_remove, parse_update
from mediaproxy.protocol.relaylink import REMOVED
from mediaproxy.relay.forwarding import Forwarding, PortUnavailable, addresses_by_version, primary_version
from mediaproxy.relay.ports import PortPool, PortsExhausted
from mediaproxy.relay.session import Session, session_from_state, session_state
from mediaproxy.relay.statistics import relay_summary, session_statistics
from mediaproxy.relay.streams import CALLEE, CALLER, CLOSED, MediaStream

log = logging.getLogger("mediaproxy.relay")

MAX_BIND_ATTEMPTS = 64


def _names(session, text: str) -> bool:
    """Whether the session's call id, tags or URIs contain `text` (lower case)."""
    return any(text in (value or "").lower()
               for value in (session.call_id, session.from_tag, session.to_tag, session.from_uri, session.to_uri))


def _may_time_out(session, recent: float) -> bool:
    """Whether a stream of the session was silent in user space since `recent`, or no stream
    is left: the sessions check_timeouts must look at."""
    live = False
    for stream in session.streams:
        if stream is not None and stream.end_time is None:
            if not stream.in_kernel and stream.last_activity <= recent:
                return True
            live = True
    return not live


class _VersionedAllocator:
    """The relay as a session's StreamAllocator: its streams' ports open on the relay's address
    of the session's IP version."""

    __slots__ = ("core", "ip_version")

    def __init__(self, core, ip_version):
        self.core, self.ip_version = core, ip_version

    def open_stream(self, media_type: str, now: float) -> MediaStream:
        return self.core.open_stream(media_type, now, self.ip_version)

    def close_stream(self, stream: MediaStream, status: str, now: float) -> None:
        self.core.close_stream(stream, status, now)


class RelayCore:
    """`advertised_ip`: what replies announce, one address or one per IP version ({4: ..., 6: ...});
    a session is relayed on the relay's address of its SDP's version, and an offer of a version
    the relay has no address of is refused."""

    def __init__(self, advertised_ip, ports: PortPool, forwarding: Forwarding, now: float,
                 routable=lambda ip: True, version: str = __version__, stream_timeout: float = 90,
                 on_hold_timeout: float = 7200, relatch_after: float = None):
        self.advertised_ips = addresses_by_version(advertised_ip)
        self.main_version = primary_version(self.advertised_ips)
        self.advertised_ip = self.advertised_ips[self.main_version]
        # the main version's streams are opened without one: forwardings (and test doubles) that
        # know a single address need not know about versions
        self._allocators = {v: _VersionedAllocator(self, None if v == self.main_version else v)
                            for v in self.advertised_ips}
        self.ports = ports
        self.forwarding = forwarding
        # asked for the SDP address of every packet until a party latches: remembered
        self.routable = functools.lru_cache(maxsize=4096)(routable)
        self.version = version
        self.stream_timeout = stream_timeout
        self.on_hold_timeout = on_hold_timeout
        self.relatch_after = relatch_after        # None: strict source (see MediaStream)
        self.started = now
        self.sessions = {}
        self.halting = False
        self.bps_relayed = 0
        self._sampled_bytes = 0
        self._sampled_at = now

    # Commands from the dispatcher.

    def handle(self, command: str, headers, now: float, owner: str = None) -> str:
        """A dispatcher's command; `owner` names that dispatcher, whose sessions are its own."""
        if command == "update":
            return self.update(headers, now, owner)
        if command == "remove":
            return self.remove(headers, now)
        if command == "summary":
            return json.dumps(self.summary(now))
        if command == "sessions":
            mine = [s for s in self.sessions.values() if owner is None or s.owner == owner]
            if headers.get("match"):
                # the management interface's `find`: only the sessions whose ids or URIs hold the text
                text = headers["match"].lower()
                mine = [s for s in mine if _names(s, text)]
            if headers.get("brief") == "yes":
                # the dispatcher's reconcile: which sessions, not their statistics (nor a table read)
                return json.dumps([{"call_id": s.call_id, "from_tag": s.from_tag, "to_tag": s.to_tag,
                                    "dialog_id": s.dialog_id} for s in mine])
            self.forwarding.refresh_counters()
            return json.dumps([session_statistics(s, self.advertised_ips[s.ip_version], now) for s in mine])
        return "error"

    def update(self, headers, now: float, owner: str = None) -> str:
        try:
            request = parse_update(headers)
        except RequestError as e:
            log.warning("update refused: %s (call_id %s)", e, headers.get("call_id"))
            return "error"
        session = self.sessions.get(request.call_id)
        is_new = session is None
        if is_new:
            if request.media is None:
                return self.advertised_ip
            if self.halting:
                log.info("refused new session %s: shutting down", request.call_id)
                return "halting"
        ip_version = self._ip_version(request, session)
        if ip_version is None:
            return "error"
        if is_new:
            session = Session(request.call_id, request.from_tag, now)
            session.owner = owner
            session.ip_version = ip_version
        try:
            ports = session.update(request, self._allocators[ip_version], now)
        except PortsExhausted as e:
            log.error("no ports for session %s: %s", request.call_id, e)
            if is_new:
                session.close(self, now)
            return "error"
        if is_new:
            self.sessions[request.call_id] = session
            log.info("session %s created (%s)", request.call_id,
                     ", ".join(stream.media_type for stream in session.active_streams) or "no streams")
        return " ".join([self.advertised_ips[ip_version]] + [str(port) for port in ports])

    def _ip_version(self, request, session):
        """The IP version of the update's session, or None (logged) when it cannot be relayed: a
        version the relay has no address of, or another one than the session's (no bridging).
        A hold address (0.0.0.0, ::) decides the version of a new session only."""
        try:
            version = streams_ip_version(request.media or (), count_hold=session is None)
        except MediaError as e:
            log.error("session %s refused: %s", request.call_id, e)
            return None
        if session is not None:
            if version is not None and version != session.ip_version:
                log.error("session %s: refused an IPv%d %s in an IPv%d session: the relay does not bridge IPv4 "
                          "and IPv6", request.call_id, version, "request" if request.is_request else "reply",
                          session.ip_version)
                return None
            return session.ip_version
        version = version or self.main_version          # no enabled stream: nothing is opened anyway
        if version not in self.advertised_ips:
            log.error("session %s refused: its SDP is IPv%d and the relay has no IPv%d address (relay_ip)",
                      request.call_id, version, version)
            return None
        return version

    def remove(self, headers, now: float) -> str:
        try:
            request = parse_remove(headers)
        except RequestError as e:
            log.warning("remove refused: %s", e)
            return "error"
        session = self.sessions.pop(request.call_id, None)
        if session is None:
            log.warning("remove of unknown session %s", request.call_id)
            return "error"
        session.close(self, now)
        log.info("session %s removed", request.call_id)
        if headers.get("statistics") == "no":           # a dispatcher without accounting
            self._release(session)
            return REMOVED
        return json.dumps(self._final_statistics(session, now))

    def summary(self, now: float) -> dict:
        summary = relay_summary(self, now)
        summary["port_pairs"] = {"used": self.ports.used_count, "free": self.ports.free_count,
                                 "set_aside": len(self.ports.set_aside_ports)}
        summary.update(self.forwarding.status())
        return summary

    def stream_expired(self, stream: MediaStream, status: str, timeout_wait: int, now: float):
        """A stream ended by itself (no traffic).

        When it was the session's last stream, the session ends too: returns
        (the dispatcher that owns it, its statistics) for the `expired` report.
        """
        session = self.sessions.get(stream.call_id)
        if session is None or stream.ended:
            return None
        stream.timeout_wait = timeout_wait
        self.close_stream(stream, status, now)
        log.info("session %s: %s stream ended: %s", session.call_id, stream.media_type, status)
        if session.active_streams:
            return None
        del self.sessions[session.call_id]
        session.close(self, now)
        log.info("session %s expired", session.call_id)
        return session.owner, self._final_statistics(session, now)

    def check_timeouts(self, now: float) -> list:
        """End the streams silent for too long; (owner, statistics) of each session that ended with them."""
        expired = []
        # Every second over every session: most are running (in the kernel, or with recent
        # media) and are passed over cheaply; only the others are looked at closely.
        recent = now - min(self.stream_timeout, self.on_hold_timeout)
        for session in list(self.sessions.values()):
            if not _may_time_out(session, recent):
                continue
            for stream in session.active_streams:
                timed_out = stream.timed_out(now, self.stream_timeout, self.on_hold_timeout)
                if timed_out is not None:
                    result = self.stream_expired(stream, *timed_out, now)
                    if result is not None:
                        expired.append(result)
            if not session.active_streams and session.call_id in self.sessions:
                # every stream was rejected or disabled: nothing will ever time out
                if now - session.created >= self.stream_timeout:
                    del self.sessions[session.call_id]
                    session.close(self, now)
                    log.info("session %s expired: it has no streams", session.call_id)
                    expired.append((session.owner, self._final_statistics(session, now)))
        return expired

    def _final_statistics(self, session, now: float) -> dict:
        """The statistics of a session that has ended. Then its streams' reference cycles (leg and
        stream, leg and leg) are broken: the session is freed at once, not by the cycle collector,
        whose passes over the garbage of some fifty calls at a time took 1-2 ms each."""
        statistics = session_statistics(session, self.advertised_ips[session.ip_version], now)
        self._release(session)
        return statistics

    @staticmethod
    def _release(session) -> None:
        for stream in session.all_streams:
            stream.release()

    def close_all(self, now: float) -> None:
        for session in self.sessions.values():
            session.close(self, now)
        self.sessions.clear()

    # Calls carried over a restart (mediaproxy.relay.state).

    def saved_sessions(self) -> list:
        return [session_state(session) for session in self.sessions.values()]

    def restore(self, states, now: float) -> list:
        """Sessions saved by the previous run, with the ports of their live streams bound again
        (kernel entries are the forwarding's to adopt); returns them. A session that cannot be
        rebuilt is logged and left out; a stream whose ports are taken ends as closed."""
        sessions = []
        for data in states:
            try:
                session = session_from_state(data, self.routable)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                log.error("session %s could not be restored: %r", data.get("call_id"), e)
                continue
            if session.ip_version not in self.advertised_ips:
                log.error("session %s could not be restored: it is IPv%d and the relay has no IPv%d address now",
                          session.call_id, session.ip_version, session.ip_version)
                continue
            if session.call_id not in self.sessions:
                sessions.append(session)
        live = [stream for session in sessions for stream in session.all_streams if not stream.ended]
        refused = self.ports.claim(leg.port for stream in live for leg in stream.legs)
        opened = set()
        for session in sessions:
            for stream in session.all_streams:
                if not stream.ended:
                    stream.listener = self.forwarding
                    stream.relatch_after = self.relatch_after      # this run's configuration
                    self._reopen(stream, refused, opened, now, self._allocators[session.ip_version].ip_version)
            self.sessions[session.call_id] = session
            log.info("session %s restored (%s)", session.call_id,
                     ", ".join(stream.media_type for stream in session.active_streams) or "no streams")
        return sessions

    def _reopen(self, stream: MediaStream, refused: set, opened: set, now: float, ip_version=None) -> None:
        mine = []
        try:
            for leg in stream.legs:
                if leg.port in refused or leg.port in opened:
                    raise PortUnavailable(leg.port)
                self.forwarding.open(leg.port, leg, ip_version)
                opened.add(leg.port)
                mine.append(leg.port)
        except (PortUnavailable, OSError) as e:
            log.error("session %s: the %s stream cannot have its ports %s again (%s): it is closed",
                      stream.call_id, stream.media_type, "/".join(str(leg.port) for leg in stream.legs), e)
            for port in mine:
                self.forwarding.close(port)
                opened.discard(port)
            for leg in stream.legs:
                if leg.port not in refused and leg.port not in opened:     # claimed for this stream alone
                    self.ports.release(leg.port)
            stream.end(CLOSED, now)

    # Traffic figures.

    def sample_traffic(self, now: float) -> int:
        """Bits per second relayed since the previous sample."""
        total = self.forwarding.traffic_bytes()
        elapsed = now - self._sampled_at
        if elapsed > 0:
            self.bps_relayed = int(max(total - self._sampled_bytes, 0) * 8 / elapsed)
        self._sampled_bytes, self._sampled_at = total, now
        return self.bps_relayed

    # StreamAllocator, used by Session.

    def open_stream(self, media_type: str, now: float, ip_version: int = None) -> MediaStream:
        """A stream with its two port pairs open on the relay's address of `ip_version` (None: the main one)."""
        stream = MediaStream(media_type, 0, 0, now, self.routable, self.relatch_after)
        stream.listener = self.forwarding
        bound = []
        try:
            for party in (CALLER, CALLEE):
                leg = stream.leg(party)
                leg.port = self._bind(stream, party, ip_version)
                bound.append(leg.port)
        except PortsExhausted:
            for port in bound:
                self.forwarding.close(port)
                self.ports.release(port)
            raise
        return stream

    def _bind(self, stream: MediaStream, party: str, ip_version=None) -> int:
        receiver = stream.leg(party)       # a leg is its party's packet path
        for _ in range(MAX_BIND_ATTEMPTS):
            port = self.ports.allocate()
            try:
                self.forwarding.open(port, receiver, ip_version)
            except PortUnavailable:
                log.warning("port pair %d/%d is in use by another program: set aside", port, port + 1)
                self.ports.set_aside(port)
                continue
            except OSError as e:
                # out of descriptors or buffers: the port is fine, this request gets an error
                self.ports.release(port)
                raise PortsExhausted("cannot open sockets: %s" % (e.strerror or e)) from None
            return port
        raise PortsExhausted("%d port pairs in a row could not be bound" % MAX_BIND_ATTEMPTS)

    def close_stream(self, stream: MediaStream, status: str, now: float) -> None:
        if stream.ended:
            return
        stream.end(status, now)
        for leg in stream.legs:
            self.forwarding.close(leg.port)
            self.ports.release(leg.port)
