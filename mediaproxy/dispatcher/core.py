"""The dispatcher: which relay holds which call, failover, and what the
management interface reports.

Requests arrive as framed values from the front ends and go to relays
through RelayLink.send_command; answers come back as Deferreds. Requests of
one call are handled one at a time, so a retransmitted first INVITE cannot
land a call on two relays.
"""

import json
import logging
import random
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer

from mediaproxy import __version__
from mediaproxy.dispatcher.relaylink import RelayError
from mediaproxy.dispatcher.selection import PreferredThenRandom
from mediaproxy.protocol.proxy import RemoveRequest, RequestError, UpdateRequest, parse_proxy_request

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
        self._call_locks = {}

    # Relays coming and going.

    def relay_connected(self, link) -> None:
        old = self.relays.get(link.ip)
        self.relays[link.ip] = link
        if old is not None and old is not link:
            log.info("relay %s reconnected: the old connection is closed", link.ip)
            old.transport.abortConnection()
        else:
            log.info("relay %s connected", link.ip)
        self.missing_relays.pop(link.ip, None)
        for call_id, headers in self.pending_removes.pop(link.ip, {}).items():
            self._send_remove(link, call_id, headers)
        self._reconcile(link)

    def relay_disconnected(self, link, reason: str) -> None:
        if self.relays.get(link.ip) is link:
            del self.relays[link.ip]
            log.warning("relay %s disconnected: %s", link.ip, reason)
            self.missing_relays.setdefault(link.ip, self.clock.seconds())

    @defer.inlineCallbacks
    def _reconcile(self, link):
        """Match our table with the relay's own list of our sessions: forget what it no
        longer has (it may have restarted), adopt what we did not know (we may have)."""
        try:
            # which sessions it has is all we need, not their statistics (a relay that does not
            # know `brief` sends them all the same)
            answer = yield link.send_command("sessions", {"brief": "yes"})
            held = {session["call_id"]: session for session in json.loads(answer)}
        except (RelayError, ValueError, TypeError, KeyError) as e:
            log.warning("could not list the sessions of relay %s: %s", link.ip, e)
            return
        now = self.clock.seconds()
        for call_id, record in list(self.sessions.items()):
            if record.relay_ip == link.ip and call_id not in held:
                del self.sessions[call_id]
                log.warning("session %s is gone from relay %s", call_id, link.ip)
                self._end_dialog(record)
        for call_id, session in held.items():
            record = self.sessions.get(call_id)
            if record is None:
                self.sessions[call_id] = SessionRecord(call_id, link.ip, now, session.get("dialog_id"),
                                                       session.get("from_tag"), session.get("to_tag"), now)
                log.info("session %s on relay %s adopted", call_id, link.ip)
            elif record.relay_ip == link.ip:
                record.last_seen = now

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
                lost = [call_id for call_id, r in self.sessions.items() if r.relay_ip == relay_ip]
                for call_id in lost:
                    del self.sessions[call_id]
                if lost:
                    log.warning("relay %s did not come back in %d s: forgot its %d sessions", relay_ip,
                                dead_relays_after, len(lost))
        for call_id, record in list(self.sessions.items()):
            if now - record.last_seen >= expired_sessions_after:
                del self.sessions[call_id]
                log.warning("session %s: nothing heard of it for %d s, forgotten", call_id, expired_sessions_after)

    def available_relays(self) -> list:
        return [relay for relay in self.relays.values() if relay.active and not relay.halting]

    # The proxy module.

    def proxy_request(self, request) -> defer.Deferred:
        try:
            parsed = parse_proxy_request(request)
        except RequestError as e:
            log.warning("refused %s request: %s (call_id %s)", request.command[:20], e,
                        request.headers.get("call_id", "-"))
            return defer.succeed("error")
        lock = self._call_locks.setdefault(parsed.call_id, defer.DeferredLock())
        if isinstance(parsed, UpdateRequest):
            deferred = lock.run(self._update, parsed, request.headers)
        else:
            deferred = lock.run(self._remove, parsed, request.headers)

        def release(result):
            if not lock.locked and not lock.waiting:
                self._call_locks.pop(parsed.call_id, None)
            return result
        return deferred.addBoth(release)

    def _holding_relay(self, record: SessionRecord):
        relay = self.relays.get(record.relay_ip)
        if relay is None:
            log.error("session %s: its relay %s is not connected", record.call_id, record.relay_ip)
        return relay

    @defer.inlineCallbacks
    def _update(self, update: UpdateRequest, headers):
        record = self.sessions.get(update.call_id)
        if record is not None:
            relay = self._holding_relay(record)
            if relay is None:
                return "error"
            try:
                result = yield relay.send_command("update", headers)
            except RelayError as e:
                log.error("session %s: %s", update.call_id, e)
                return "error"
            record.last_seen = self.clock.seconds()
            if update.dialog_id and not record.dialog_id:
                record.dialog_id = update.dialog_id
            return "error" if result == "halting" else result
        for relay in self.policy.order(self.available_relays(), update.media_relay, self.rng):
            try:
                result = yield relay.send_command("update", headers)
            except RelayError as e:
                log.warning("session %s: %s, trying the next relay", update.call_id, e)
                continue
            if result == "halting":
                log.info("relay %s is shutting down: no new sessions there", relay.ip)
                relay.halting = True
                continue
            if result == "error":
                log.warning("session %s: relay %s answered error, trying the next relay", update.call_id, relay.ip)
                continue
            now = self.clock.seconds()
            self.sessions[update.call_id] = SessionRecord(update.call_id, relay.ip, now, update.dialog_id,
                                                          update.from_tag, update.to_tag, now)
            log.info("session %s on relay %s", update.call_id, relay.ip)
            return result
        log.error("session %s: no relay could take it (%d connected)", update.call_id, len(self.relays))
        return "error"

    @defer.inlineCallbacks
    def _remove(self, remove: RemoveRequest, headers):
        # The record stays until the relay answered: a session whose relay is
        # unreachable now is still matched when the relay reports it later.
        record = self.sessions.get(remove.call_id)
        if record is None:
            # often the end of a call whose media had died: it expired, its dialog was ended
            log.info("remove of session %s, which is not known (or has expired)", remove.call_id)
            return "error"
        relay = self.relays.get(record.relay_ip)
        if relay is None:
            # e.g. the dispatcher restarted and the relay has not reconnected yet
            log.info("session %s: its relay %s is not connected, it is removed there when it is",
                     remove.call_id, record.relay_ip)
            self.pending_removes.setdefault(record.relay_ip, {})[remove.call_id] = dict(headers)
            return "removed"
        return (yield self._send_remove(relay, remove.call_id, headers))

    @defer.inlineCallbacks
    def _send_remove(self, relay, call_id: str, headers):
        try:
            result = yield relay.send_command("remove", headers)
        except RelayError as e:
            log.error("session %s: remove failed: %s", call_id, e)
            return "error"
        record = self.sessions.pop(call_id, None) or SessionRecord(call_id, relay.ip, self.clock.seconds())
        try:
            statistics = json.loads(result)
        except ValueError:
            statistics = None
        if not isinstance(statistics, dict):
            log.error("session %s: relay %s answered remove with %r", call_id, relay.ip, result[:80])
            return "error"
        self.session_ended(record, statistics, timed_out=False)
        return "removed"

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
        else:
            record = SessionRecord(call_id, link.ip, self.clock.seconds())
        log.info("session %s expired on relay %s", call_id, link.ip)
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

    # The management interface.

    def management_command(self, command: str) -> defer.Deferred:
        if command == "sessions":
            return self._all_sessions()
        if command == "summary":
            return self._summary()
        if command == "version":
            return defer.succeed([__version__])
        if command == "accounting":
            return defer.succeed([json.dumps(status) for backend in self.accounting
                                  for status in getattr(backend, "status", lambda: [])()])
        return defer.succeed(["error"])

    @defer.inlineCallbacks
    def _ask_all_relays(self, command, kind):
        """(relay, its JSON answer, or None when it failed or is not a `kind`) for every relay."""
        relays = list(self.relays.values())
        results = yield defer.DeferredList([relay.send_command(command) for relay in relays], consumeErrors=True)
        answers = []
        for relay, (ok, answer) in zip(relays, results):
            try:
                value = json.loads(answer) if ok else None
            except ValueError:
                value = None
            answers.append((relay, value if isinstance(value, kind) else None))
        return answers

    @defer.inlineCallbacks
    def _all_sessions(self):
        lines = []
        for relay, sessions in (yield self._ask_all_relays("sessions", list)):
            if sessions is None:
                log.warning("relay %s did not list its sessions", relay.ip)
                continue
            lines.extend(json.dumps(session) for session in sessions)
        return lines

    @defer.inlineCallbacks
    def _summary(self):
        lines = []
        for relay, summary in (yield self._ask_all_relays("summary", dict)):
            fields = summary or {"status": "error"}
            lines.append(json.dumps({"ip": relay.ip, **{k: v for k, v in fields.items() if k != "ip"}}))
        return lines
