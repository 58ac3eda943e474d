"""User-space forwarding's sockets: the next port pairs of the pool are bound ahead
(`prepare`), and a new call's `open` takes them as they are."""

import socket

import pytest

from mediaproxy.relay.forwarding import PortUnavailable
from mediaproxy.relay.userspace import UserspaceForwarding


class Reactor:
    """What UserspaceForwarding uses of the reactor: its poller is one reader, read by hand here."""

    def __init__(self):
        self.readers = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)

    def seconds(self):
        return 100.0


def free_pairs(count: int, ip: str = "127.0.0.1") -> list:
    """`count` even ports whose pairs nobody holds now, on `ip` (from where the kernel's ephemeral
    choice points, through 20000-59999 once at most)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((ip, 0))
        port = probe.getsockname()[1] & ~1
    found = []
    for _ in range(20000):
        port = 20000 + (port + 2 - 20000) % 40000
        if bindable(port, ip) and bindable(port + 1, ip):
            found.append(port)
            if len(found) == count:
                return found
    raise AssertionError("fewer than %d free port pairs on %s" % (count, ip))


def bindable(port: int, ip: str = "127.0.0.1") -> bool:
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Leg:
    """A stream's packet path: records what it is given, sends nothing on."""

    def __init__(self):
        self.packets = []

    def __call__(self, component, source, data, now):
        self.packets.append((component, data))
        return None


def deliver(forwarding, port: int, data: bytes, ip: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(data, (ip, port))
    for _ in range(100):                # the datagram is on loopback: read at once, a few tries at most
        ready = forwarding.poller.epoll.poll(0.05)
        if ready:
            forwarding.poller.doRead()
            return
    raise AssertionError("nothing arrived on port %d" % port)


@pytest.fixture
def forwarding():
    forwarding = UserspaceForwarding("127.0.0.1", Reactor())
    yield forwarding
    for port in list(forwarding.receivers):
        forwarding.close(port)
    forwarding.stop()


def test_prepared_pairs_are_bound_and_open_takes_them(forwarding):
    first, second = free_pairs(2)
    forwarding.prepare([first, second])
    assert not any(bindable(port) for port in (first, first + 1, second, second + 1))
    ready = forwarding.ready[first]
    leg = Leg()
    forwarding.open(first, leg)
    assert [forwarding.sockets[first], forwarding.sockets[first + 1]] == ready
    assert first not in forwarding.ready and second in forwarding.ready
    deliver(forwarding, first + 1, b"rtcp")
    assert leg.packets == [(1, b"rtcp")]


def test_a_packet_to_a_prepared_port_is_dropped_and_the_call_never_sees_it(forwarding):
    port, = free_pairs(1)
    forwarding.prepare([port])
    deliver(forwarding, port, b"stray")
    leg = Leg()
    forwarding.open(port, leg)
    deliver(forwarding, port, b"rtp")
    assert leg.packets == [(0, b"rtp")]
    assert forwarding.packets_forwarded == 0


def test_pairs_no_longer_next_are_closed_and_closing_a_call_frees_its_ports(forwarding):
    first, second, third = free_pairs(3)
    forwarding.prepare([first, second])
    forwarding.prepare([second, third])
    assert bindable(first) and bindable(first + 1)
    assert sorted(forwarding.ready) == sorted([second, third])
    forwarding.open(second, Leg())
    forwarding.close(second)
    assert bindable(second) and bindable(second + 1)


def test_a_pair_someone_else_holds_is_not_prepared_and_open_says_so(forwarding):
    port, = free_pairs(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", port + 1))
        forwarding.prepare([port])
        assert port not in forwarding.ready and bindable(port)
        with pytest.raises(PortUnavailable):
            forwarding.open(port, Leg())
    assert bindable(port)


def test_a_pair_opened_for_the_other_ip_version_is_bound_there():
    try:
        port, = free_pairs(1, "::1")
    except OSError:
        pytest.skip("no IPv6 on loopback")
    forwarding = UserspaceForwarding({4: "127.0.0.1", 6: "::1"}, Reactor())
    try:
        forwarding.prepare([port])
        leg = Leg()
        forwarding.open(port, leg, 6)
        assert bindable(port) and not bindable(port, "::1")
        deliver(forwarding, port, b"rtp6", "::1")
        assert leg.packets == [(0, b"rtp6")]
        forwarding.close(port)
    finally:
        forwarding.stop()


def test_stop_closes_the_prepared_pairs():
    forwarding = UserspaceForwarding("127.0.0.1", Reactor())
    port, = free_pairs(1)
    forwarding.prepare([port])
    forwarding.stop()
    assert bindable(port) and bindable(port + 1) and forwarding.ready == {}
