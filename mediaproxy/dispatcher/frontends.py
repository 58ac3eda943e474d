"""The dispatcher's two front ends: the proxy module's UNIX socket and the
management port. Both are thin: framing in, Dispatcher calls, replies out,
in the order the requests came."""

import collections
import logging

from twisted.internet import defer, tcp, unix
from twisted.internet.protocol import Factory, Protocol, ServerFactory

from mediaproxy import outgoing
from mediaproxy.peer import VerifiedPeerProtocol
from mediaproxy.protocol import management
from mediaproxy.protocol.framing import FramingError, LineSplitter, RequestReader, encode_line

log = logging.getLogger("mediaproxy.dispatcher")

MAX_MANAGEMENT_LINE = 1024


_CLOSE = object()
ERROR_LINE = encode_line("error")


class OrderedReplies:
    """Writes answers in request order even when later ones are ready first."""

    def __init__(self, write, close=None):
        self._write = write
        self._close = close
        self._queue = collections.deque()      # [data, ready] per request, oldest first

    def add_close(self) -> None:
        """Close the connection once every earlier answer is written."""
        self._queue.append([_CLOSE, True])
        self._flush()

    def reserve(self):
        """A place for the next answer: the function to call with it (bytes, or None for nothing)."""
        slot = [None, False]
        self._queue.append(slot)

        def ready(data):
            slot[0], slot[1] = data, True
            if self._queue[0] is slot:
                self._flush()
        return ready

    def add(self, deferred: defer.Deferred) -> None:
        ready = self.reserve()

        def failed(failure):
            log.error("no answer could be made: %s", failure.getErrorMessage())
            ready(None)
        deferred.addCallbacks(ready, failed)

    def _flush(self):
        queue = self._queue
        while queue and queue[0][1]:
            data = queue.popleft()[0]
            if data is _CLOSE:
                queue.clear()
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
        self.replies = OrderedReplies(self._write)
        log.debug("proxy connection")

    def _write(self, data):
        outgoing.write(self.transport, data)

    def dataReceived(self, data):
        for request in self.reader.feed(data):
            ready = self.replies.reserve()
            if isinstance(request, FramingError):
                self.dispatcher.unreadable_proxy_request(request)
                ready(ERROR_LINE)
                continue
            answer = _LineAnswer(ready)
            try:
                self.dispatcher.handle_proxy_request(request, answer)
            except Exception:
                log.exception("%s request (call_id %s) failed", request.command[:20],
                              request.headers.get("call_id", "-"))
                answer("error")

    def connectionLost(self, reason):
        log.debug("proxy connection closed")


class _LineAnswer:
    """Takes the dispatcher's answer once, as a reply line; later calls are ignored."""

    __slots__ = ("_ready",)

    def __init__(self, ready):
        self._ready = ready

    def __call__(self, text: str) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready(encode_line(text))


class ProxyFactory(ServerFactory):
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def buildProtocol(self, addr):
        protocol = ProxyProtocol(self.dispatcher)
        protocol.factory = self
        return protocol


class _ProxyConnection(unix.Server):
    """A proxy module's connection, read with recv(): Twisted reads UNIX connections with
    recvmsg() for the descriptors a peer may pass, through a Python wrapper, on every read;
    the proxy module passes none."""
    doRead = tcp.Connection.doRead


class _ProxyPort(unix.Port):
    transport = _ProxyConnection


def listen_for_proxy(reactor, path: str, dispatcher, mode: int):
    """The proxy module's UNIX socket (the listening port, started)."""
    port = _ProxyPort(path, ProxyFactory(dispatcher), mode=mode, reactor=reactor)
    port.startListening()
    return port


class ManagementProtocol(VerifiedPeerProtocol):
    """One management connection. A client that sends no complete command for
    idle_timeout seconds is closed: else a client that connects and never
    speaks, or trickles a line that never ends, holds its socket for ever."""

    peer_kind = "management client"
    idle_timeout = None

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.splitter = LineSplitter(MAX_MANAGEMENT_LINE)
        self.replies = None
        self.closing = False
        self._idle_call = None

    def connectionMade(self):
        super().connectionMade()
        self.replies = OrderedReplies(self.transport.write, self.transport.loseConnection)
        if self.verified:           # plain TCP; over TLS the clock starts after the handshake
            self._restart_idle_timer()

    def peer_verified(self):
        self._restart_idle_timer()

    def _restart_idle_timer(self):
        if self.idle_timeout is None or self.clock is None:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_timed_out)

    def _idle_timed_out(self):
        self._idle_call = None
        log.warning("management client %s sent no command for %s s: closed", self.peer_ip, self.idle_timeout)
        self.transport.abortConnection()

    def dataReceived(self, data):
        if not self.verified:
            return
        for line in self.splitter.feed(data):
            if self.closing:
                return
            self._restart_idle_timer()
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

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None


class ManagementFactory(Factory):
    """credentials None: plain TCP. idle_timeout None: clients may stay idle for ever."""

    def __init__(self, dispatcher, credentials=None, passport=None, verify_interval=300, clock=None,
                 idle_timeout=None, handshake_timeout=None):
        self.dispatcher = dispatcher
        self.credentials = credentials
        self.passport = passport
        self.verify_interval = verify_interval
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr):
        protocol = ManagementProtocol(self.dispatcher)
        protocol.factory = self
        protocol.credentials = self.credentials
        protocol.passport = self.passport
        protocol.verify_interval = self.verify_interval
        protocol.clock = self.clock
        protocol.idle_timeout = self.idle_timeout
        if self.credentials is None:
            protocol.verified = True     # plain TCP: no handshake to wait for
        return protocol
