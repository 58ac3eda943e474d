"""The dispatcher's two front ends: the proxy module's UNIX socket and the
management port. Both are thin: framing in, Dispatcher calls, replies out,
in the order the requests came."""

import logging

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol, ServerFactory

from mediaproxy.peer import VerifiedPeerProtocol
from mediaproxy.protocol import management
from mediaproxy.protocol.framing import FramingError, LineSplitter, RequestReader, encode_line

log = logging.getLogger("mediaproxy.dispatcher")

MAX_MANAGEMENT_LINE = 1024


_CLOSE = object()


class OrderedReplies:
    """Writes answers in request order even when later ones are ready first."""

    def __init__(self, write, close=None):
        self._write = write
        self._close = close
        self._queue = []

    def add_close(self) -> None:
        """Close the connection once every earlier answer is written."""
        self._queue.append([None, _CLOSE, True])
        self._flush()

    def add(self, deferred: defer.Deferred) -> None:
        slot = [deferred, None, False]
        self._queue.append(slot)

        def ready(data):
            slot[1], slot[2] = data, True
            self._flush()

        def failed(failure):
            log.error("no answer could be made: %s", failure.getErrorMessage())
            ready(None)
        deferred.addCallbacks(ready, failed)

    def _flush(self):
        while self._queue and self._queue[0][2]:
            data = self._queue.pop(0)[1]
            if data is _CLOSE:
                self._queue.clear()
                self._close()
            elif data is not None:
                self._write(data)


class ProxyProtocol(Protocol):
    """One connection of the proxy module (each Kamailio/OpenSIPS worker keeps one open)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.reader = RequestReader()
        self.replies = None

    def connectionMade(self):
        self.replies = OrderedReplies(self.transport.write)
        log.debug("proxy connection")

    def dataReceived(self, data):
        for request in self.reader.feed(data):
            if isinstance(request, FramingError):
                log.warning("bad request from the proxy: %s", request)
                self.replies.add(defer.succeed(encode_line("error")))
                continue
            deferred = defer.maybeDeferred(self.dispatcher.proxy_request, request)
            deferred.addCallback(encode_line)
            deferred.addErrback(self._failed, request)
            self.replies.add(deferred)

    @staticmethod
    def _failed(failure, request):
        log.error("%s request (call_id %s) failed: %s: %s", request.command[:20], request.headers.get("call_id", "-"),
                  failure.type.__name__, failure.getErrorMessage())
        return encode_line("error")

    def connectionLost(self, reason):
        log.debug("proxy connection closed")


class ProxyFactory(ServerFactory):
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def buildProtocol(self, addr):
        protocol = ProxyProtocol(self.dispatcher)
        protocol.factory = self
        return protocol


class ManagementProtocol(VerifiedPeerProtocol):
    peer_kind = "management client"

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.splitter = LineSplitter(MAX_MANAGEMENT_LINE)
        self.replies = None
        self.closing = False

    def connectionMade(self):
        self.replies = OrderedReplies(self.transport.write, self.transport.loseConnection)

    def dataReceived(self, data):
        if not self.verified:
            return
        for line in self.splitter.feed(data):
            if self.closing:
                return
            if isinstance(line, FramingError):
                self.replies.add(defer.succeed(management.ERROR))
                continue
            command = management.parse_command(line)
            if not command:
                continue
            if command in ("quit", "exit"):
                self.closing = True
                self.replies.add_close()
                return
            deferred = defer.maybeDeferred(self.dispatcher.management_command, command)
            deferred.addCallback(management.encode_answer)
            deferred.addErrback(self._failed, command)
            self.replies.add(deferred)

    @staticmethod
    def _failed(failure, command):
        log.error("management command %s failed: %s: %s", command[:20], failure.type.__name__,
                  failure.getErrorMessage())
        return management.ERROR


class ManagementFactory(Factory):
    def __init__(self, dispatcher, credentials=None, passport=None, verify_interval=300, clock=None):
        self.dispatcher = dispatcher
        self.credentials = credentials
        self.passport = passport
        self.verify_interval = verify_interval
        self.clock = clock

    def buildProtocol(self, addr):
        protocol = ManagementProtocol(self.dispatcher)
        protocol.factory = self
        protocol.credentials = self.credentials
        protocol.passport = self.passport
        protocol.verify_interval = self.verify_interval
        protocol.clock = self.clock
        if self.credentials is None:
            protocol.verified = True     # plain TCP: no handshake to wait for
        return protocol
