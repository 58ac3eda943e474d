"""The management interface's commands (SPEC §5 and ours), on top of the dispatcher.

Each command answers a list of lines (JSON objects, one per line, or a
single word), as a Deferred; a command it cannot carry out answers
`error`. SPEC §5's `sessions`, `summary`, `version`, and these additions:

  find TEXT       the sessions whose call id, tags or URIs contain TEXT
                  (case-insensitive): one statistics line each, as `sessions`
  end CALL_ID     end a session: its relay tears it down, the proxy is asked
                  to end the dialog, accounting is written; answers the
                  session's statistics line
  drain IP        no new sessions on that relay (running calls go on), until
  undrain IP      undrain; both answer the relay's status line
  relay IP        one relay in detail: its summary, port use, how it forwards,
                  and what the dispatcher knows of it
  accounting      the accounting back-ends' status, one line each
"""

import json
import logging

from twisted.internet import defer

from mediaproxy import __version__
from mediaproxy.dispatcher.relaylink import RelayError
from mediaproxy.protocol.relaylink import decode_answer

log = logging.getLogger("mediaproxy.dispatcher")

MATCHED_FIELDS = ("call_id", "from_tag", "to_tag", "from_uri", "to_uri")


def session_matches(statistics: dict, text: str) -> bool:
    """Whether a session's call id, tags or URIs contain `text` (lower case)."""
    return any(text in str(statistics.get(name) or "").lower() for name in MATCHED_FIELDS)


class ManagementCommands:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._commands = {
            "sessions": (self._sessions, False), "summary": (self._summary, False),
            "version": (self._version, False), "accounting": (self._accounting, False),
            "find": (self._find, True), "end": (self._end, True), "drain": (self._drain, True),
            "undrain": (self._undrain, True), "relay": (self._relay, True),
        }

    def run(self, command: str) -> defer.Deferred:
        """`command` as the front end read it: its word in lower case, then its argument if any."""
        word, _, argument = command.partition(" ")
        argument = argument.strip()
        handler, takes_argument = self._commands.get(word, (None, False))
        if handler is None or takes_argument != bool(argument):
            return defer.succeed(["error"])
        return defer.maybeDeferred(handler, argument) if takes_argument else defer.maybeDeferred(handler)

    # SPEC §5

    def _version(self):
        return [__version__]

    def _accounting(self):
        return [json.dumps(status) for backend in self.dispatcher.accounting
                for status in getattr(backend, "status", lambda: [])()]

    @defer.inlineCallbacks
    def _sessions(self, match: str = None):
        headers = {"match": match} if match else None
        lines = []
        for relay, sessions in (yield self._ask_all_relays("sessions", list, headers)):
            if sessions is None:
                log.warning("relay %s did not list its sessions", relay.ip)
                continue
            if match:       # a relay that does not know `match` lists them all
                sessions = [s for s in sessions if isinstance(s, dict) and session_matches(s, match.lower())]
            lines.extend(json.dumps(session) for session in sessions)
        return lines

    @defer.inlineCallbacks
    def _summary(self):
        lines = []
        for relay, summary in (yield self._ask_all_relays("summary", dict)):
            lines.append(json.dumps(self._relay_line(relay, summary)))
        return lines

    # Ours

    def _find(self, text):
        return self._sessions(match=text)

    @defer.inlineCallbacks
    def _end(self, call_id):
        statistics = yield self.dispatcher.end_session(call_id)
        return ["error"] if statistics is None else [json.dumps(statistics)]

    def _drain(self, ip):
        return self._set_draining(ip, True)

    def _undrain(self, ip):
        return self._set_draining(ip, False)

    def _set_draining(self, ip, draining: bool):
        dispatcher = self.dispatcher
        if ip not in dispatcher.relays and ip not in dispatcher.draining:
            return ["error"]
        if draining and ip not in dispatcher.draining:
            dispatcher.draining.add(ip)
            log.info("relay %s drained: no new sessions there", ip)
        elif not draining and ip in dispatcher.draining:
            dispatcher.draining.discard(ip)
            log.info("relay %s undrained: it takes new sessions again", ip)
        relay = dispatcher.relays.get(ip)
        return [json.dumps({"ip": ip, "connected": relay is not None, "draining": draining,
                            "session_count": self._session_count(ip)})]

    @defer.inlineCallbacks
    def _relay(self, ip):
        relay = self.dispatcher.relays.get(ip)
        if relay is None:
            return ["error"]
        try:
            summary = decode_answer((yield relay.send_command("summary")))
        except RelayError:
            summary = None
        line = self._relay_line(relay, summary if isinstance(summary, dict) else None)
        line["active"] = relay.active
        line["dispatcher_session_count"] = self._session_count(ip)
        return [json.dumps(line)]

    # Helpers

    def _relay_line(self, relay, summary) -> dict:
        fields = summary or {"status": "error"}
        line = {"ip": relay.ip, **{k: v for k, v in fields.items() if k != "ip"}}
        line["draining"] = relay.ip in self.dispatcher.draining
        return line

    def _session_count(self, ip) -> int:
        return sum(1 for record in self.dispatcher.sessions.values() if record.relay_ip == ip)

    @defer.inlineCallbacks
    def _ask_all_relays(self, command, kind, headers=None):
        """(relay, its JSON answer, or None when it failed or is not a `kind`) for every relay."""
        relays = list(self.dispatcher.relays.values())
        results = yield defer.DeferredList([relay.send_command(command, headers) for relay in relays],
                                           consumeErrors=True)
        answers = []
        for relay, (ok, answer) in zip(relays, results):
            value = decode_answer(answer) if ok else None
            answers.append((relay, value if isinstance(value, kind) else None))
        return answers
