"""The dispatcher's end of a relay connection: commands out, replies matched by SEQ.

Keeps the pending commands by sequence number, the way twisted.names keeps
DNS queries by id. A command unanswered within relay_timeout fails with
RelayTimeout and marks the relay inactive; a relay silent for
relay_recover_interval after that is disconnected.

Every proxy request passes here, so `send` takes a plain callback, and the
timeouts are watched by one timer for the oldest pending command (commands
are sent in order and share one timeout) rather than one timer each.
"""

import logging

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from mediaproxy.peer import VerifiedPeerProtocol
from mediaproxy.protocol.framing import FramingError, LineSplitter, encode_line
from mediaproxy.protocol.relaylink import PONG, Expired, LinkError, Ping, Reply, encode_command, parse_relay_line

log = logging.getLogger("mediaproxy.dispatcher")

MAX_RELAY_LINE = 16 * 1024 * 1024    # a `sessions` answer of a busy relay is one long line
MAX_REMEMBERED_TIMEOUTS = 1024        # timed-out commands kept to recognise their late answers


class RelayError(Exception):
    """A relay could not carry out a command."""


class RelayTimeout(RelayError):
    pass


class RelayGone(RelayError):
    pass


class RelayLink(VerifiedPeerProtocol):
    peer_kind = "relay"

    def __init__(self, dispatcher, timeout: float, recover_interval: float):
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.recover_interval = recover_interval
        self.splitter = LineSplitter(MAX_RELAY_LINE)
        self.pending = {}                   # seq -> (callback, command, headers, deadline), oldest first
        self._timeout_call = None
        self.timed_out = {}                 # seq -> (command, headers) of commands that timed out
        self.seq = 0
        self.active = True
        self.halting = False
        self.connected_link = False
        self._recover_call = None

    counters = None        # the dispatcher's DispatcherCounters (set by the factory): timeouts counted there

    @property
    def ip(self) -> str:
        return self.peer_ip

    def peer_verified(self):
        self.connected_link = True
        self.dispatcher.relay_connected(self)

    def dataReceived(self, data):
        if not self.verified:
            return
        for line in self.splitter.feed(data):
            if isinstance(line, FramingError):
                log.warning("relay %s sent a bad line: %s", self.ip, line)
                continue
            if not line:
                continue
            self._relay_alive()
            try:
                message = parse_relay_line(line)
            except LinkError as e:
                log.warning("relay %s: %s", self.ip, e)
                continue
            if isinstance(message, Ping):
                self.transport.write(encode_line(PONG))
            elif isinstance(message, Reply):
                self._reply(message)
            elif isinstance(message, Expired):
                self.dispatcher.session_expired(self, message.statistics)

    def _reply(self, reply: Reply):
        entry = self.pending.pop(reply.seq, None)
        if entry is None:
            late = self.timed_out.pop(reply.seq, None)
            if late is None:
                log.warning("relay %s answered unknown command %d", self.ip, reply.seq)
            else:
                self.dispatcher.late_answer(self, late[0], late[1], reply.result)
            return
        self._answer(entry[0], reply.result)

    def _answer(self, answered, result):
        try:
            answered(result)
        except Exception:
            log.exception("handling an answer of relay %s failed", self.ip)

    def send(self, name: str, headers, answered, raw=None) -> None:
        """Send a command; `answered` gets its result text, or a RelayError, once. `raw`: the
        headers as the proxy sent them (framing.Request.raw), forwarded as they are."""
        if not self.connected_link:
            self._answer(answered, RelayGone("relay %s is not connected" % self.ip))
            return
        self.seq += 1
        self.pending[self.seq] = (answered, name, headers, self.clock.seconds() + self.timeout)
        if self._timeout_call is None:
            self._timeout_call = self.clock.callLater(self.timeout, self._check_timeouts)
        self.transport.write(encode_command(name, self.seq, headers or {}, raw))

    def send_command(self, name: str, headers=None) -> defer.Deferred:
        """`send`, with the answer as a Deferred (which fails with the RelayError)."""
        deferred = defer.Deferred()

        def answered(result):
            if isinstance(result, RelayError):
                deferred.errback(result)
            else:
                deferred.callback(result)
        self.send(name, headers, answered)
        return deferred

    def _check_timeouts(self):
        self._timeout_call = None
        now = self.clock.seconds()
        while self.pending:
            seq = next(iter(self.pending))
            deadline = self.pending[seq][3]
            if deadline > now:
                if self._timeout_call is not None:      # set by a command sent on a timed-out one's behalf
                    self._timeout_call.cancel()
                self._timeout_call = self.clock.callLater(deadline - now, self._check_timeouts)
                return
            self._timed_out(seq, *self.pending.pop(seq)[:3])

    def _timed_out(self, seq, answered, name, headers):
        if self.counters is not None:
            self.counters.relay_timed_out(self.ip, name)
        self.timed_out[seq] = (name, headers)
        if len(self.timed_out) > MAX_REMEMBERED_TIMEOUTS:
            del self.timed_out[next(iter(self.timed_out))]
        if name == "sessions":
            # a busy relay may take longer to list thousands of sessions: no sign of a dead one
            log.warning("relay %s did not list its sessions within %s s", self.ip, self.timeout)
        elif self.active:
            log.warning("relay %s did not answer within %s s: marked inactive", self.ip, self.timeout)
            self.active = False
            self._recover_call = self.clock.callLater(self.recover_interval, self._give_up)
        self._answer(answered, RelayTimeout("relay %s did not answer" % self.ip))

    def _relay_alive(self):
        if not self.active:
            log.info("relay %s is answering again: active", self.ip)
            self.active = True
            self._cancel_recover()

    def _give_up(self):
        self._recover_call = None
        log.warning("relay %s silent for %s s: disconnected", self.ip, self.recover_interval)
        self.transport.abortConnection()

    def _cancel_recover(self):
        if self._recover_call is not None and self._recover_call.active():
            self._recover_call.cancel()
        self._recover_call = None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._cancel_recover()
        was_connected, self.connected_link = self.connected_link, False
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None
        pending, self.pending = self.pending, {}
        for answered, _, _, _ in pending.values():
            self._answer(answered, RelayGone("relay %s disconnected" % self.ip))
        if was_connected:
            self.dispatcher.relay_disconnected(self, reason.getErrorMessage())


class RelayLinkFactory(ServerFactory):
    def __init__(self, dispatcher, config, credentials, clock):
        self.dispatcher = dispatcher
        self.config = config
        self.credentials = credentials
        self.clock = clock

    def buildProtocol(self, addr):
        link = RelayLink(self.dispatcher, self.config.relay_timeout, self.config.relay_recover_interval)
        link.factory = self
        link.credentials = self.credentials
        link.passport = self.config.passport
        link.verify_interval = self.verify_interval
        link.clock = self.clock
        link.counters = self.dispatcher.counters
        return link

    verify_interval = 300
