"""The dispatcher: which relay holds which call, failover, and what the
management interface reports.

Requests arrive as framed values from the front ends and go to relays
through RelayLink.send, whose answers come back to a callback. Requests of
one call are handled one at a time, so a retransmitted first INVITE cannot
land a call on two relays.
"""

import collections
import logging
import random
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer

from mediaproxy.dispatcher.counters import (INTERNAL, MALFORMED, NO_RELAY, OK, RELAY_ERROR, RELAY_HALTING,
                                             RELAY_TIMEOUT, RELAY_UNAVAILABLE, UNKNOWN_SESSION, DispatcherCounters)
from mediaproxy.dispatcher.management import ManagementCommands
from mediaproxy.dispatcher.relaylink import RelayError, RelayTimeout
from mediaproxy.dispatcher.selection import PreferredThenRandom
from mediaproxy.protocol.proxy import RequestError, UpdateRequest, parse_proxy_request
from mediaproxy.protocol.relaylink import NO_STATISTICS, REMOVED, decode_answer

log = logging.getLogger("mediaproxy.dispatcher")


@dataclass
class SessionRecord:
    call_id: str
    relay_ip: str
    created: float
    dialog_id: Optional[str] = None
    from_tag: Optional[str] = None
    to_tag: Optional[str] = None
    last_seen: float = 0.0          # the last request or relay listing that named it
    from_uri: Optional[str] = None
    to_uri: Optional[str] = None
    offer_type: Optional[str] = None    # "request" or "reply": the update that created the session
    start_time: Optional[float] = None  # when the answer passed (what accounting of a lost session needs)


class Dispatcher:
    def __init__(self, clock, policy=None, rng=None, accounting=(), dialogs=None):
        self.clock = clock
        self.dialogs = dialogs          # ends SIP dialogs through the proxy (DialogTerminator), or None
        self.policy = policy or PreferredThenRandom()
        self.rng = rng or random.Random()
        self.accounting = list(accounting)
        self.relays = {}            # relay ip -> RelayLink
        self.sessions = {}          # call_id -> SessionRecord
        self.missing_relays = {}    # relay ip -> since when a relay holding sessions is not connected
        self.pending_removes = {}   # relay ip -> {call_id: headers} of removes waiting for it to come back
        self.removing = {}          # call_id -> SessionRecord of removes the proxy has had its answer to
        self.draining = set()       # relay ips an operator drained: no new sessions there
        self.management = ManagementCommands(self)
        self.counters = DispatcherCounters()     # what the metrics port reports
        self._busy_calls = {}       # call_id -> deque of the _Exchanges waiting for the one in progress

    # Relays coming and going.

    def relay_connected(self, link) -> None:
        old = self.relays.get(link.ip)
        self.relays[link.ip] = link
        if old is not None and old is not link:
            log.info("relay %s reconnected: the old connection is closed", link.ip)
            old.transport.abortConnection()
        else:
            log.info("relay %s connected", link.ip)
        lost_at = self.missing_relays.pop(link.ip, None)
        for call_id, headers in self.pending_removes.pop(link.ip, {}).items():
            self._send_remove(link, call_id, headers)
        self._reconcile(link, lost_at)

    def relay_disconnected(self, link, reason: str) -> None:
        if self.relays.get(link.ip) is link:
            del self.relays[link.ip]
            log.warning("relay %s disconnected: %s", link.ip, reason)
            self.missing_relays.setdefault(link.ip, self.clock.seconds())

    @defer.inlineCallbacks
    def _reconcile(self, link, lost_at=None):
        """Match our table with the relay's own list of our sessions: what it no longer has is
        lost (it restarted: they went when it was lost, at `lost_at`), what we did not know is
        adopted (we may have restarted)."""
        try:
            # which sessions it has is all we need, not their statistics (a relay that does not
            # know `brief` sends them all the same)
            answer = yield link.send_command("sessions", {"brief": "yes"})
            listed = decode_answer(answer)
            held = {session["call_id"]: session for session in listed if isinstance(session["call_id"], str)}
        except (RelayError, TypeError, KeyError) as e:
            log.warning("could not list the sessions of relay %s: %s", link.ip, e or type(e).__name__)
            return
        now = self.clock.seconds()
        for call_id, record in list(self.sessions.items()):
            if record.relay_ip == link.ip and call_id not in held:
                del self.sessions[call_id]
                self._session_lost(record, "gone from relay %s" % link.ip, lost_at or now)
        for call_id, session in held.items():
            record = self.sessions.get(call_id)
            if record is None:
                self.sessions[call_id] = SessionRecord(call_id, link.ip, now, _text(session.get("dialog_id")),
                                                       _text(session.get("from_tag")), _text(session.get("to_tag")),
                                                       now)
                log.info("session %s on relay %s adopted", call_id, link.ip)
            elif record.relay_ip == link.ip:
                record.last_seen = now

    def _session_lost(self, record: SessionRecord, why: str, lost_at: float) -> None:
        """A session its relay lost (it died, or restarted): accounted with what the dispatcher
        knows of it (no stream statistics, `relay_lost`), and its dialog ended."""
        log.warning("session %s lost: %s", record.call_id, why)
        started = record.start_time
        statistics = {"call_id": record.call_id, "from_tag": record.from_tag, "to_tag": record.to_tag,
                      "from_uri": record.from_uri, "to_uri": record.to_uri, "caller_ua": None, "callee_ua": None,
                      "username": None, "dialog_id": record.dialog_id, "start_time": started,
                      "duration": round(max(lost_at - started, 0.0), 3) if started is not None else 0,
                      "streams": [], "relay_lost": True}
        self.session_ended(record, statistics, timed_out=True)     # accounts it if it was answered
        if started is None:
            self._end_dialog(record)

    def restore(self, records) -> None:
        """Sessions saved by an earlier run; their relays are missing until they connect."""
        now = self.clock.seconds()
        for record in records:
            record.last_seen = max(record.last_seen, now)
            self.sessions.setdefault(record.call_id, record)
            if record.relay_ip not in self.relays:
                self.missing_relays.setdefault(record.relay_ip, now)
        if records:
            log.info("restored %d sessions on %d relays", len(records), len({r.relay_ip for r in records}))

    def clean_up(self, dead_relays_after: float, expired_sessions_after: float) -> None:
        """Forget the sessions of relays gone for too long, and sessions nothing named for too long."""
        now = self.clock.seconds()
        for relay_ip, since in list(self.missing_relays.items()):
            if relay_ip in self.relays:
                del self.missing_relays[relay_ip]
            elif now - since >= dead_relays_after:
                del self.missing_relays[relay_ip]
                lost = [r for r in self.sessions.values() if r.relay_ip == relay_ip]
                if lost:
                    log.warning("relay %s did not come back in %d s: its %d sessions are lost", relay_ip,
                                dead_relays_after, len(lost))
                for record in lost:
                    del self.sessions[record.call_id]
                    self._session_lost(record, "relay %s did not come back" % relay_ip, since)
        for call_id, record in list(self.sessions.items()):
            if now - record.last_seen >= expired_sessions_after:
                del self.sessions[call_id]
                log.warning("session %s: nothing heard of it for %d s, forgotten", call_id, expired_sessions_after)

    def available_relays(self) -> list:
        return [relay for relay in self.relays.values()
                if relay.active and not relay.halting and relay.ip not in self.draining]

    # The proxy module.
    #
    # Every request of the proxy passes here, so this path is written with plain callbacks
    # (RelayLink.send) rather than Deferreds: a request is an _Exchange, answered exactly once.

    def proxy_request(self, request) -> defer.Deferred:
        """handle_proxy_request with the answer as a Deferred (for callers off the hot path)."""
        deferred = defer.Deferred()
        self.handle_proxy_request(request, deferred.callback)
        return deferred

    def handle_proxy_request(self, request, answer) -> None:
        """Act on a request of the proxy module; `answer(text)` is called once, now or later.

        Requests of one call are handled one at a time, in the order they came."""
        started = self.counters.timer()
        try:
            parsed = parse_proxy_request(request)
        except RequestError as e:
            log.warning("refused %s request: %s (call_id %s)", request.command[:20], e,
                        request.headers.get("call_id", "-"))
            answer("error")
            self.counters.request_done(request.command.lower(), MALFORMED, started)
            return
        exchange = _Exchange(self, parsed, request.headers, answer, started, request.raw)
        waiting = self._busy_calls.get(parsed.call_id)
        if waiting is not None:
            waiting.append(exchange)        # an earlier request of this call is with a relay
            return
        self._busy_calls[parsed.call_id] = collections.deque()
        exchange.start()

    def unreadable_proxy_request(self, error) -> None:
        """A request of the proxy that could not be read (a bad header line, too large, not UTF-8):
        it is answered error by the front end, and counted as malformed."""
        log.warning("bad request from the proxy: %s", error)
        command = (error.command or "").partition(" ")[0].lower()
        self.counters.request_done(command, MALFORMED, self.counters.timer())

    def _exchange_done(self, call_id: str) -> None:
        waiting = self._busy_calls[call_id]
        if waiting:
            waiting.popleft().start()
        else:
            del self._busy_calls[call_id]

    def _holding_relay(self, record: SessionRecord):
        relay = self.relays.get(record.relay_ip)
        if relay is None:
            log.error("session %s: its relay %s is not connected", record.call_id, record.relay_ip)
        return relay

    def _update(self, exchange) -> None:
        update = exchange.request
        record = self.sessions.get(update.call_id)
        if record is None:
            candidates = self.policy.order(self.available_relays(), update.media_relay, self.rng)
            self._offer_to_next(exchange, iter(candidates))
            return
        relay = self._holding_relay(record)
        if relay is None:
            exchange.finish("error", RELAY_UNAVAILABLE)
            return

        def answered(result):
            if isinstance(result, RelayError):
                log.error("session %s: %s", update.call_id, result)
                exchange.finish("error", _failure_reason(result))
                return
            record.last_seen = self.clock.seconds()
            if update.dialog_id and not record.dialog_id:
                record.dialog_id = update.dialog_id
            if record.start_time is None and update.media is not None and update.type != record.offer_type \
                    and result not in ("error", "halting"):
                record.start_time = record.last_seen        # the answer
            if result == "halting":
                exchange.finish("error", RELAY_HALTING)
            else:
                exchange.finish(result)
        relay.send("update", exchange.headers, exchange.guarded(answered), exchange.raw)

    def _offer_to_next(self, exchange, candidates) -> None:
        """A new session: to the next relay of the policy's order until one takes it."""
        update = exchange.request
        relay = next(candidates, None)
        if relay is None:
            log.error("session %s: no relay could take it (%d connected)", update.call_id, len(self.relays))
            exchange.finish("error", NO_RELAY)
            return

        def answered(result):
            if isinstance(result, RelayError):
                log.warning("session %s: %s, trying the next relay", update.call_id, result)
            elif result == "halting":
                log.info("relay %s is shutting down: no new sessions there", relay.ip)
                relay.halting = True
            elif result == "error":
                log.warning("session %s: relay %s answered error, trying the next relay", update.call_id, relay.ip)
            else:
                now = self.clock.seconds()
                self.sessions[update.call_id] = SessionRecord(update.call_id, relay.ip, now, update.dialog_id,
                                                              update.from_tag, update.to_tag, now, update.from_uri,
                                                              update.to_uri, update.type)
                self.counters.sessions_created += 1
                exchange.finish(result)
                log.info("session %s on relay %s", update.call_id, relay.ip)
                return
            self._offer_to_next(exchange, candidates)
        relay.send("update", exchange.headers, exchange.guarded(answered), exchange.raw)

    def _remove(self, exchange) -> None:
        call_id = exchange.request.call_id
        record = self.sessions.get(call_id)
        if record is None:
            # often the end of a call whose media had died: it expired, its dialog was ended
            log.info("remove of session %s, which is not known (or has expired)", call_id)
            exchange.finish("error", UNKNOWN_SESSION)
            return
        relay = self.relays.get(record.relay_ip)
        if relay is None:
            # e.g. the dispatcher restarted and the relay has not reconnected yet. The record
            # stays: a session whose relay is unreachable now is matched when it reports it later.
            log.info("session %s: its relay %s is not connected, it is removed there when it is",
                     call_id, record.relay_ip)
            self.pending_removes.setdefault(record.relay_ip, {})[call_id] = dict(exchange.headers)
            exchange.finish("removed")
            return
        # The proxy is answered now, not when the relay has answered: a SIP worker of the proxy
        # waits on its socket for this line (for nothing but a log line), and what the relay
        # answers is for accounting. The relay gets the remove right after it, on its link.
        del self.sessions[call_id]
        self.removing[call_id] = record
        exchange.finish("removed")
        self._send_remove(relay, call_id, exchange.headers, exchange.raw)

    def _send_remove(self, relay, call_id: str, headers, raw=None) -> None:
        if not self.accounting:
            # nothing reads the statistics: the relay need not make and send them
            headers = dict(headers, statistics="no")
            raw = None if raw is None else raw + NO_STATISTICS

        def answered(result):
            record = self.removing.pop(call_id, None)
            if isinstance(result, RelayError):
                log.error("session %s: remove failed on relay %s: %s", call_id, relay.ip, result)
                if record is not None and call_id not in self.sessions:
                    # kept, and removed when the relay comes back (as for an unreachable relay)
                    self.sessions[call_id] = record
                    self.pending_removes.setdefault(relay.ip, {})[call_id] = dict(headers)
                return
            if record is None:
                record = self.sessions.pop(call_id, None) or SessionRecord(call_id, relay.ip, self.clock.seconds())
            if not result.startswith("{") and result != REMOVED:
                log.warning("session %s: relay %s answered remove with %r", call_id, relay.ip, result[:80])
                return
            if not self.accounting:
                return
            statistics = decode_answer(result)
            if not isinstance(statistics, dict):
                log.error("session %s: relay %s answered remove with %r", call_id, relay.ip, result[:80])
            elif statistics:
                self.session_ended(record, statistics, timed_out=False)
        relay.send("remove", headers, answered, raw)

    def late_answer(self, link, command: str, headers, result: str) -> None:
        """A relay answered a command after we gave up on it and moved on."""
        if command != "update" or result in ("error", "halting") or not headers:
            return
        call_id = headers.get("call_id")
        record = self.sessions.get(call_id)
        if record is not None and record.relay_ip == link.ip:
            return
        log.warning("relay %s took session %s after it timed out: removing it there", link.ip, call_id)
        tags = {name: headers[name] for name in ("call_id", "from_tag", "to_tag") if name in headers}
        link.send_command("remove", tags).addErrback(lambda failure: None)

    def session_expired(self, link, statistics: dict) -> None:
        call_id = statistics["call_id"]
        record = self.sessions.get(call_id)
        if record is not None and record.relay_ip == link.ip:
            del self.sessions[call_id]
        elif call_id in self.removing and self.removing[call_id].relay_ip == link.ip:
            record = self.removing.pop(call_id)          # it expired before the relay saw the remove
        else:
            record = SessionRecord(call_id, link.ip, self.clock.seconds())
        log.info("session %s expired on relay %s", call_id, link.ip)
        self.counters.session_expired(statistics)
        self.session_ended(record, statistics, timed_out=True)

    def session_ended(self, record: SessionRecord, statistics: dict, timed_out: bool) -> None:
        streams = statistics.get("streams") or []
        all_ice = bool(streams) and all(s.get("status") == "unselected ICE candidate" for s in streams)
        statistics["dialog_id"] = record.dialog_id or statistics.get("dialog_id")
        statistics["timed_out"] = timed_out and not all_ice
        statistics["all_streams_ice"] = all_ice
        if statistics.get("start_time") is None:
            return                                  # never answered: nothing to account
        if statistics["timed_out"]:
            record.dialog_id = statistics["dialog_id"]
            self._end_dialog(record)
        for backend in self.accounting:
            try:
                backend.save(statistics)
            except Exception:
                log.exception("accounting of session %s failed", record.call_id)

    def _end_dialog(self, record: SessionRecord) -> None:
        if self.dialogs is not None and record.dialog_id:
            self.dialogs.end_dialog(record.dialog_id, record.call_id)

    # The management interface (mediaproxy/dispatcher/management.py).

    def management_command(self, command: str) -> defer.Deferred:
        return self.management.run(command)

    def end_session(self, call_id: str) -> defer.Deferred:
        """End a session from the management interface: its relay removes it, the proxy is asked
        to end its dialog, it is accounted. Fires with its statistics, or None when it cannot."""
        record = self.sessions.get(call_id)
        relay = self.relays.get(record.relay_ip) if record is not None else None
        if relay is None:
            return defer.succeed(None)
        ended = defer.Deferred()

        def answered(result):
            statistics = None if isinstance(result, RelayError) else decode_answer(result)
            if not isinstance(statistics, dict):
                log.error("session %s: relay %s could not end it: %s", call_id, relay.ip, str(result)[:80])
                ended.callback(None)
                return
            self.sessions.pop(call_id, None)
            log.info("session %s ended by the management interface", call_id)
            self.session_ended(record, statistics, timed_out=False)
            self._end_dialog(record)
            ended.callback(statistics)
        relay.send("remove", {"call_id": call_id, "from_tag": record.from_tag or "", "to_tag": record.to_tag or ""},
                   answered)
        return ended


def _text(value):
    """A value a relay listed, kept when it is text (a call's id or tag), else None."""
    return value if isinstance(value, str) else None


def _failure_reason(error: RelayError) -> str:
    return RELAY_TIMEOUT if isinstance(error, RelayTimeout) else RELAY_UNAVAILABLE


class _Exchange:
    """One request of the proxy module on its way through the dispatcher: answered exactly once,
    and then the next waiting request of the same call goes."""

    __slots__ = ("dispatcher", "request", "headers", "raw", "started", "_answer", "_finished")

    def __init__(self, dispatcher: Dispatcher, request, headers, answer, started: float, raw=None):
        self.dispatcher = dispatcher
        self.request = request              # UpdateRequest or RemoveRequest
        self.headers = headers              # as the proxy sent them: forwarded to the relay
        self.raw = raw                      # the same, as the header lines came (None: not known)
        self.started = started              # counters.timer() when it came: its latency
        self._answer = answer
        self._finished = False

    def start(self) -> None:
        step = self.dispatcher._update if isinstance(self.request, UpdateRequest) else self.dispatcher._remove
        self.guarded(step)(self)

    def finish(self, text: str, reason: str = RELAY_ERROR) -> None:
        """Answer `text`; `reason` says why when it is `error`."""
        if self._finished:
            return
        self._finished = True
        command = "update" if isinstance(self.request, UpdateRequest) else "remove"
        self.dispatcher.counters.request_done(command, reason if text == "error" else OK, self.started)
        try:
            self._answer(text)
        finally:
            self.dispatcher._exchange_done(self.request.call_id)

    def guarded(self, step):
        """`step`, made to answer `error` if it fails: a bug must not leave the call waiting forever."""
        def run(*value):
            try:
                step(*value)
            except Exception:
                log.exception("request of session %s failed", self.request.call_id)
                self.finish("error", INTERNAL)
        return run
