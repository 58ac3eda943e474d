"""Control-path writes sent at the end of the reactor turn that made them.

Twisted sends what a protocol writes at the reactor's next turn, and its TLS
layer (since Twisted 22.8) gathers small writes for one more turn first. A
proxy request crosses four sockets on its way to a relay and back, so those
turns were a large part of its latency and CPU. With `install`, the control
protocols `note` the transports they write to, and after the reactor has
handled what one poll returned, they are pushed out: what a busy turn wrote
to one connection still leaves together, in one TLS record and one send,
and a request alone on an idle daemon is not held back a turn.

Only a transport in plain connected state is pushed; anything else (a
closing connection, a full socket buffer) is left to Twisted as before.
Without `install` (unit tests, other reactors) `note` does nothing.
"""

from twisted.internet.abstract import FileDescriptor

_written = None         # transports written to in this turn; None: not installed


def install(reactor) -> None:
    """Push the noted transports after each poll of `reactor` (a posix reactor)."""
    global _written
    _written = []
    poll = reactor.doIteration

    def poll_then_push(timeout):
        poll(timeout)
        if _written:
            push()
    reactor.doIteration = poll_then_push


def note(transport) -> None:
    """`transport` was written to: push it out at the end of this turn."""
    if _written is not None and transport not in _written:
        _written.append(transport)


def push() -> None:
    """Send what the noted transports hold, now."""
    while _written:
        _push(_written.pop())


def _push(transport) -> None:
    aggregator = getattr(transport, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()              # TLS: encrypt now, into the TCP connection's buffer
    descriptor = _descriptor(transport)
    if descriptor is None or not descriptor.connected or descriptor.disconnecting or descriptor.producer:
        return
    if descriptor.dataBuffer or descriptor._tempDataBuffer:
        # What the reactor does when the socket is writable; an error stays in the buffer for
        # the reactor to find on its next turn, as before.
        descriptor.doWrite()


def _descriptor(transport):
    """The socket's FileDescriptor under a transport and Twisted's TLS layers, or None."""
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "_connection", None) or getattr(transport, "transport", None)
    return None
