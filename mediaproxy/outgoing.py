"""Control-path writes, sent by one send() at the end of the reactor turn that made them.

A proxy request crosses four sockets on its way to a relay and back. Twisted
sends what a protocol writes at the reactor's next turn, after asking epoll
to watch the socket for writability and then to stop watching it: two more
system calls and a turn of latency for every reply line. With `install`,
the control protocols `write` through here instead: what one turn wrote to
a connection is sent when the reactor has handled what its poll returned,
with one send() straight on the socket when Twisted holds nothing for that
connection (the common case: the socket buffer has room). What the socket
does not take is handed to Twisted, which sends it when it can, after what
it already holds, so the order of the bytes is kept.

Without `install` (unit tests, other reactors) `write` is transport.write.

`install` also polls an epoll reactor without Twisted's per-event log
context (log.callWithLogger: a context dict copied and pushed for every
ready socket, about a tenth of a daemon's time per request); what the
context gave, the selectable's name on an unhandled error, is logged here.
"""

import logging

log = logging.getLogger("mediaproxy")

_pending = None         # transport -> [bytes] written in this turn; None: not installed
_before_push = None     # callbacks to run once before this turn's writes are sent (see before_push)
_turn_ends = []         # what else is done once a turn, after the writes (see at_turn_end)


def install(reactor) -> None:
    """Send what was written after each poll of `reactor` (a posix reactor), and before it."""
    global _pending, _before_push
    _pending, _before_push = {}, []
    poll = _lean_poll(reactor) or reactor.doIteration
    turn_ends = _turn_ends

    def push_poll_push(timeout):
        if _pending or _before_push:    # written by timers (they run before the poll): the poll may wait long
            push()
        for turn_end in turn_ends:
            turn_end()
        poll(timeout)
        if _pending or _before_push:
            push()
        for turn_end in turn_ends:
            turn_end()
    reactor.doIteration = push_poll_push


def before_push(callback) -> bool:
    """Have `callback()` called once before what this turn wrote is sent (TLS seals what a
    connection was written in the turn as one record); False when not installed: do it now."""
    if _before_push is None:
        return False
    _before_push.append(callback)
    return True


def at_turn_end(callback) -> None:
    """Call `callback()` after each poll's events have been handled and their writes sent, and
    before each poll (for what timers did): e.g. to write out the log lines of the turn at once."""
    _turn_ends.append(callback)


def _lean_poll(reactor):
    """EPollReactor.doPoll without the log context around each event; None for other reactors."""
    from twisted.internet.epollreactor import EPollReactor
    if not isinstance(reactor, EPollReactor):
        return None
    poller, selectables, handle = reactor._poller, reactor._selectables, reactor._doReadOrWrite

    def poll(timeout):
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)       # catches what doRead/doWrite raise
                except Exception:
                    log.exception("handling events of %s failed", selectable.logPrefix())
    return poll


def write(transport, data: bytes) -> None:
    """Send `data` on `transport` (Twisted's transport of a stream socket) at the end of this turn."""
    if _pending is None:
        transport.write(data)
        return
    chunks = _pending.get(transport)
    if chunks is None:
        _pending[transport] = [data]
    else:
        chunks.append(data)


def flush(transport) -> None:
    """Hand what waits for `transport` to Twisted now: before loseConnection, which closes the
    connection once Twisted's own buffer is sent."""
    if _pending:
        chunks = _pending.pop(transport, None)
        if chunks:
            transport.write(b"".join(chunks))


def push() -> None:
    """Send what every connection was written in this turn, now."""
    while _before_push:
        _before_push.pop(0)()
    while _pending:
        transport, chunks = _pending.popitem()
        _send(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _send(transport, data: bytes) -> None:
    sock = getattr(transport, "socket", None)
    if (sock is not None and transport.connected and not transport.disconnecting and transport.producer is None
            and not transport.dataBuffer and not transport._tempDataBuffer):
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            transport.write(data)      # Twisted meets the error at its own try and closes as it does
            return
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
