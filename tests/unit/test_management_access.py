"""Who the management port keeps, driven in memory: the idle timeout of its
clients, the handshake timeout over TLS, and where the dispatcher binds it."""

import logging

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mediaproxy import __version__
from mediaproxy.configuration import parse_configuration
from mediaproxy.dispatcher.frontends import ManagementFactory
from mediaproxy.dispatcher.service import DispatcherService
from mediaproxy.tlslayer import TLSFactory
from tests.support.certs import make_certs_dir

IDLE = 30
HANDSHAKE = 10
VERSION_ANSWER = __version__.encode() + b"\r\n\r\n"


class VersionDispatcher:
    def management_command(self, command):
        return defer.succeed([__version__] if command == "version" else ["error"])


def connection(tls=False, clock=None):
    clock = clock or Clock()
    factory = ManagementFactory(VersionDispatcher(), credentials=object() if tls else None, clock=clock,
                                idle_timeout=IDLE, handshake_timeout=HANDSHAKE)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000)))
    return protocol, clock


def closing_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_client_that_never_sends_a_command_is_closed_after_the_idle_timeout_with_one_line(caplog):
    client, clock = connection()
    clock.advance(IDLE - 1)
    assert not client.transport.disconnected
    clock.advance(1)
    assert client.transport.disconnected
    assert closing_lines(caplog) == ["management client 192.0.2.7 sent no command for %d s: closed" % IDLE]
    client.connectionLost(Failure(ConnectionDone()))
    assert closing_lines(caplog) == ["management client 192.0.2.7 sent no command for %d s: closed" % IDLE]
    assert clock.getDelayedCalls() == []


def test_each_command_restarts_the_idle_clock():
    client, clock = connection()
    for _ in range(3):
        clock.advance(IDLE - 1)
        client.dataReceived(b"version\r\n")
    assert client.transport.value() == VERSION_ANSWER * 3
    clock.advance(IDLE - 1)
    assert not client.transport.disconnected
    clock.advance(1)
    assert client.transport.disconnected


def test_a_line_that_never_ends_does_not_restart_the_idle_clock():
    client, clock = connection()
    for _ in range(IDLE):
        client.dataReceived(b"s")          # a slow trickle, never a whole command
        clock.advance(1)
    assert client.transport.disconnected


def test_a_client_that_quits_leaves_no_timer_behind():
    client, clock = connection()
    client.dataReceived(b"quit\r\n")
    client.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_over_tls_the_handshake_timeout_comes_first_and_the_idle_clock_starts_after_verification(caplog):
    client, clock = connection(tls=True)
    clock.advance(HANDSHAKE - 1)
    client.verified = True                 # the handshake and the passport check passed (test_tls covers them)
    client._cancel_handshake_timeout()
    client.peer_verified()
    clock.advance(IDLE - 1)
    assert not client.transport.disconnected and closing_lines(caplog) == []
    clock.advance(1)
    assert client.transport.disconnected
    assert closing_lines(caplog) == ["management client 192.0.2.7 sent no command for %d s: closed" % IDLE]


def test_over_tls_a_client_that_never_finishes_the_handshake_is_dropped_with_one_line(caplog):
    client, clock = connection(tls=True)
    clock.advance(HANDSHAKE)
    assert client.transport.disconnected
    client.connectionLost(Failure(ConnectionDone()))
    assert closing_lines(caplog) == ["TLS handshake with management client 192.0.2.7 not done within %d s: dropped"
                                     % HANDSHAKE]
    assert clock.getDelayedCalls() == []


# Where the dispatcher binds the management port

EXPOSED = "is plain TCP on an address other hosts may reach"


@pytest.fixture
def certs(tmp_path):
    return make_certs_dir(tmp_path / "tls")


class ListeningReactor(MemoryReactorClock):
    """Records what is listened on; also the datagram socket the proxy answers to."""

    def listenUNIXDatagram(self, address, protocol, maxPacketSize=8192, mode=0o666, wantPID=0):
        return ClosedPort()


class ClosedPort:
    def stopListening(self):
        pass


def started_dispatcher(tmp_path, certs, dispatcher_section):
    configuration = parse_configuration("[Dispatcher]\n%s\n[TLS]\ncerts_path = %s\n" % (dispatcher_section, certs.path),
                                        str(tmp_path), str(tmp_path / "run"))
    reactor = ListeningReactor()
    service = DispatcherService(configuration, reactor)
    service.startService()
    return service, reactor


def management_listener(reactor, port):
    """(interface, TLS?) of what the dispatcher listens on at ``port``."""
    (listener,) = [(entry[3], isinstance(entry[1], TLSFactory)) for entry in reactor.tcpServers if entry[0] == port]
    return listener


@pytest.mark.parametrize("section, listener, warned", [
    ("", ("0.0.0.0", True), False),
    ("management_use_tls = no", ("127.0.0.1", False), False),
    ("management_use_tls = no\nlisten_management = 127.0.0.1:25061", ("127.0.0.1", False), False),
    ("management_use_tls = no\nlisten_management = 0.0.0.0:25061", ("0.0.0.0", False), True),
    ("management_use_tls = no\nlisten_management = 192.0.2.1:25061", ("192.0.2.1", False), True),
    ("listen_management = 0.0.0.0:25061", ("0.0.0.0", True), False),
])
def test_where_the_management_port_listens_and_when_the_dispatcher_warns(tmp_path, certs, caplog, section,
                                                                         listener, warned):
    service, reactor = started_dispatcher(tmp_path, certs, section)
    try:
        assert management_listener(reactor, 25061) == listener
        warnings = [r.getMessage() for r in caplog.records
                    if EXPOSED in r.getMessage() and r.levelno == logging.WARNING]
        assert len(warnings) == (1 if warned else 0), warnings
        if warned:
            assert "%s:25061" % listener[0] in warnings[0] and "management_use_tls = yes" in warnings[0]
    finally:
        service.stopService()
