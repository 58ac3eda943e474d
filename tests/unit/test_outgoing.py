"""outgoing: what a reactor turn wrote to a connection leaves in one send() after the poll,
and bytes never change order, whoever ends up sending them."""

import pytest

from mediaproxy import outgoing


class Reactor:
    def __init__(self):
        self.polls = 0

    def doIteration(self, timeout):
        self.polls += 1


class Socket:
    def __init__(self, room=None, error=None):
        self.sent = []
        self.room = room              # bytes the socket buffer takes; None: all
        self.error = error

    def send(self, data):
        if self.error is not None:
            raise self.error
        taken = data if self.room is None else data[:self.room]
        self.sent.append(taken)
        return len(taken)


class Transport:
    """What outgoing reads of Twisted's FileDescriptor, and its write()."""

    def __init__(self, sock):
        self.socket = sock
        self.connected, self.disconnecting, self.producer = True, False, None
        self.dataBuffer, self._tempDataBuffer = b"", []
        self.written = []

    def write(self, data):
        self.written.append(data)
        self._tempDataBuffer.append(data)


@pytest.fixture
def reactor():
    reactor = Reactor()
    outgoing.install(reactor)
    yield reactor
    outgoing._pending = outgoing._before_push = None


def turn(reactor):
    reactor.doIteration(0)


def test_a_turns_writes_leave_in_one_send_after_the_poll(reactor):
    sock = Socket()
    transport = Transport(sock)
    outgoing.write(transport, b"1 10.0.0.1 40000\r\n")
    outgoing.write(transport, b"2 removed\r\n")
    assert sock.sent == []
    turn(reactor)
    assert sock.sent == [b"1 10.0.0.1 40000\r\n2 removed\r\n"] and transport.written == []
    turn(reactor)
    assert len(sock.sent) == 1


class WatchedReactor(Reactor):
    """Records what the socket had been given when the reactor polled."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock
        self.sent_at_poll = []

    def doIteration(self, timeout):
        self.sent_at_poll.append(list(self.sock.sent))


def test_what_timers_wrote_leaves_before_the_poll_waits():
    sock = Socket()
    reactor = WatchedReactor(sock)
    outgoing.install(reactor)
    try:
        outgoing.write(Transport(sock), b"written by a timer")      # timers run before the poll
        turn(reactor)
    finally:
        outgoing._pending = outgoing._before_push = None
    assert reactor.sent_at_poll == [[b"written by a timer"]]


def test_what_the_socket_does_not_take_is_left_to_twisted(reactor):
    sock = Socket(room=4)
    transport = Transport(sock)
    outgoing.write(transport, b"abcdefgh")
    turn(reactor)
    assert sock.sent == [b"abcd"] and transport.written == [b"efgh"]
    outgoing.write(transport, b"ijkl")           # Twisted still holds bytes: these go after them
    turn(reactor)
    assert sock.sent == [b"abcd"] and transport.written == [b"efgh", b"ijkl"]


@pytest.mark.parametrize("error", [BlockingIOError(), ConnectionResetError()])
def test_a_socket_that_takes_nothing_leaves_it_all_to_twisted(reactor, error):
    transport = Transport(Socket(error=error))
    outgoing.write(transport, b"data")
    turn(reactor)
    assert transport.written == [b"data"]


def test_a_closing_connection_is_left_to_twisted(reactor):
    sock = Socket()
    transport = Transport(sock)
    transport.disconnecting = True
    outgoing.write(transport, b"last")
    turn(reactor)
    assert sock.sent == [] and transport.written == [b"last"]


def test_flush_hands_the_turns_bytes_to_twisted_at_once(reactor):
    sock = Socket()
    transport = Transport(sock)
    outgoing.write(transport, b"close_notify")
    outgoing.flush(transport)
    assert transport.written == [b"close_notify"]
    turn(reactor)
    assert sock.sent == []


def test_without_install_a_write_is_the_transports():
    transport = Transport(Socket())
    outgoing.write(transport, b"now")
    assert transport.written == [b"now"]
