"""Parked ports: the sockets of kernel-relayed ports are closed and opened
again when the kernel stops relaying them; a raw socket tells which parked
port a packet from a new address went to: the port's leg counts it dropped
and says whether the port listens again."""

import os
import socket

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from mediaproxy.relay.kernel.parking import PortParking, _Catcher, destination_port, source_address


class FakeListening:
    def __init__(self, port, receiver):
        self.port, self.receiver = port, receiver
        self.drained = self.closed = False

    def drain(self):
        self.drained = True

    def stopListening(self):
        self.closed = True


class FakeForwarding:
    """What PortParking uses of a UserspaceForwarding."""

    ip = "127.0.0.1"

    def __init__(self):
        self.sockets, self.receivers, self.listened = {}, {}, []
        self.kernel_ports = set()

    def open(self, port, receiver, ip_version=None):
        self.receivers[port] = receiver
        for p in (port, port + 1):
            self.sockets[p] = self.listen(p, receiver)

    def listen(self, port, receiver):
        self.listened.append(port)
        return FakeListening(port, receiver)


class FakeLeg:
    """A port pair's receiver, as parking sees it: a stream's leg."""

    def __init__(self):
        self.strangers = []
        self.may_latch = True            # strict_source = no

    def __call__(self, component, source, data, now):
        return None

    def dropped_by_kernel(self, component, source, now):
        self.strangers.append((component, source))
        return self.may_latch


receiver = FakeLeg()


CALLER = ("198.51.100.7", 4000)


@pytest.fixture
def parking():
    forwarding = FakeForwarding()
    forwarding.open(40000, receiver)
    forwarding.listened.clear()
    return PortParking(forwarding, Clock(), expected_source=lambda port: (CALLER,) if port == 40000 else ())


def test_a_parked_port_is_drained_and_closed_until_it_is_woken(parking):
    forwarding = parking.forwarding
    listening = forwarding.sockets[40000]
    parking.park(40000)
    assert listening.drained and listening.closed
    assert 40000 not in forwarding.sockets and 40001 in forwarding.sockets
    assert len(parking) == 1
    parking.wake(40000)
    assert forwarding.listened == [40000]
    assert forwarding.sockets[40000].receiver is receiver and len(parking) == 0


def test_waking_an_open_or_unknown_port_does_nothing(parking):
    parking.wake(40000)
    parking.wake(40100)
    assert parking.forwarding.listened == []


def test_a_closed_pair_is_not_woken(parking):
    forwarding = parking.forwarding
    parking.park(40000)
    parking.park(40001)
    assert len(parking) == 2
    parking.forget(40000)                       # the stream ended: the forwarding closes the pair
    del forwarding.receivers[40000]
    assert len(parking) == 0
    parking.wake(40001)
    parking._packet_to(40000, ("203.0.113.9", 5000))
    assert forwarding.listened == [] and len(parking) == 0


def test_a_port_that_cannot_be_listened_on_again_stays_parked(parking):
    forwarding = parking.forwarding
    parking.park(40000)
    listen, forwarding.listen = forwarding.listen, lambda port, receiver: (_ for _ in ()).throw(
        CannotListenError("127.0.0.1", port, OSError(98, "Address already in use")))
    parking.wake(40000)
    assert len(parking) == 1 and 40000 not in forwarding.sockets
    forwarding.listen = listen
    parking._packet_to(40000, ("203.0.113.9", 5000))     # a stranger's packet tries again
    assert forwarding.listened == [40000] and len(parking) == 0


def test_only_a_strangers_packet_wakes_a_parked_port(parking):
    forwarding = parking.forwarding
    receiver.strangers.clear()
    parking.park(40000)
    parking._packet_to(40000, CALLER)           # a copy of the party's packet from before the hand-over
    assert forwarding.listened == [] and receiver.strangers == []
    parking._packet_to(40000, ("203.0.113.9", 5000))
    assert forwarding.listened == [40000]
    assert receiver.strangers == [(0, ("203.0.113.9", 5000))]
    parking._packet_to(40002, ("203.0.113.9", 5000))   # not parked: nothing
    assert forwarding.listened == [40000] and len(receiver.strangers) == 1


def test_with_strict_source_a_strangers_packet_is_counted_and_the_port_stays_parked(parking):
    forwarding = parking.forwarding
    receiver.strangers.clear()
    receiver.may_latch = False
    try:
        parking.park(40001)
        for n in range(3):
            parking._packet_to(40001, ("203.0.113.9", 5001 + n))
    finally:
        receiver.may_latch = True
    assert receiver.strangers == [(1, ("203.0.113.9", 5001)), (1, ("203.0.113.9", 5002)),
                                  (1, ("203.0.113.9", 5003))]
    assert forwarding.listened == [] and parking.is_parked(40001) and len(parking) == 1


def test_destination_port_of_raw_packets():
    header = bytes([0x45]) + bytes(19)
    assert destination_port(header + b"\x9c\x40\x9c\x41") == 40001
    options = bytes([0x46]) + bytes(23)
    assert destination_port(options + b"\x00\x01\x9c\x40") == 40000
    assert destination_port(header + b"\x00") is None
    assert destination_port(b"") is None
    assert source_address(bytes([0x45]) + bytes(11) + bytes([192, 0, 2, 1]) + bytes(4) + b"\x0f\xa0\x9c\x40") == \
        ("192.0.2.1", 4000)


def test_the_raw_socket_reports_packets_to_its_port_range_only():
    if os.geteuid() != 0:
        pytest.skip("a raw socket needs root")
    low = 47000
    caught = []
    catcher = _Catcher("127.0.0.1", (low, low + 4), lambda port, source: caught.append(port))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for port in (low - 1, low, low + 3, low + 4, low + 1):
                sender.sendto(b"x" * 200, ("127.0.0.1", port))
        catcher.sock.setblocking(True)
        catcher.sock.settimeout(2)
        for _ in range(3):
            caught.append(destination_port(catcher.sock.recv(64)))
        catcher.sock.setblocking(False)
        catcher.doRead()                        # nothing more: the other ports were filtered out
    finally:
        catcher.close()
    assert caught == [low, low + 3, low + 1]
