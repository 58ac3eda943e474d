"""The relays' last answers to one command (`summary`, `sessions`), for the
metrics port and the status page.

Asked again only when someone reads them and they are older than
`max_age`, so a dozen browsers and a Prometheus server cost the relays one
round a second, and nothing when nobody looks. A reader waits for the
round it started at most `wait` seconds: a relay that does not answer (its
command times out after relay_timeout) never holds up a scrape; it is
shown with its last answer and as not answering. A relay is never asked
twice at once.
"""

import json
import logging

from twisted.internet import defer

log = logging.getLogger("mediaproxy.dispatcher")


class RelayAnswers:
    def __init__(self, dispatcher, command: str, kind: type, clock, max_age: float = 1.0, wait: float = 1.0,
                 headers=None):
        self.dispatcher = dispatcher
        self.command = command
        self.kind = kind                # dict or list: what a valid answer decodes to
        self.clock = clock
        self.max_age = max_age
        self.wait = wait
        self.headers = headers
        self.answers = {}               # relay ip -> its last valid answer
        self.answered_at = {}           # relay ip -> clock time of that answer
        self.failing = set()            # relay ips whose last answer failed (or was not valid)
        self._asking = set()            # relay ips with a command out
        self._asked_at = None
        self._readers = []              # [deferred, timer, relay ips it waits for]

    def fresh(self) -> defer.Deferred:
        """Fires with self once the relays asked now answered, or after `wait` s."""
        self._forget_disconnected()
        now = self.clock.seconds()
        if self._asked_at is not None and now - self._asked_at < self.max_age:
            return defer.succeed(self)
        self._asked_at = now
        asked = set()
        for relay in list(self.dispatcher.relays.values()):
            if relay.ip not in self._asking:
                self._ask(relay)
                asked.add(relay.ip)
        asked &= self._asking           # some may have answered at once
        if not asked:
            return defer.succeed(self)
        deferred = defer.Deferred()
        reader = [deferred, None, asked]
        reader[1] = self.clock.callLater(self.wait, self._release, reader)
        self._readers.append(reader)
        return deferred

    def answer(self, ip: str):
        """The relay's last valid answer, or None."""
        return self.answers.get(ip)

    def age(self, ip: str):
        """Seconds since the relay's last valid answer, or None."""
        at = self.answered_at.get(ip)
        return None if at is None else max(self.clock.seconds() - at, 0.0)

    def _ask(self, relay) -> None:
        self._asking.add(relay.ip)
        relay.send(self.command, self.headers, lambda result: self._answered(relay, result))

    def _answered(self, relay, result) -> None:
        self._asking.discard(relay.ip)
        value = None
        if isinstance(result, str):
            try:
                value = json.loads(result)
            except (ValueError, RecursionError):
                pass
        if self.dispatcher.relays.get(relay.ip) is relay:       # not an answer of an old connection
            if isinstance(value, self.kind):
                self.answers[relay.ip] = value
                self.answered_at[relay.ip] = self.clock.seconds()
                self.failing.discard(relay.ip)
            else:
                self.failing.add(relay.ip)
        for reader in list(self._readers):
            reader[2].discard(relay.ip)
            if not reader[2]:
                self._release(reader)

    def _release(self, reader) -> None:
        if reader not in self._readers:
            return
        self._readers.remove(reader)
        if reader[1].active():
            reader[1].cancel()
        reader[0].callback(self)

    def _forget_disconnected(self) -> None:
        for ip in list(self.answers):
            if ip not in self.dispatcher.relays:
                del self.answers[ip]
                del self.answered_at[ip]
        self.failing &= set(self.dispatcher.relays)
