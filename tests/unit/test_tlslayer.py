"""tlslayer: TLS by the standard library under Twisted protocols, two ends in memory."""

import _ssl
import ssl

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mediaproxy import outgoing
from mediaproxy.tls import Credentials, handshake_failure_text, subject_text
from mediaproxy.tlslayer import TLSFactory
from tests.support.certs import ago, make_certs_dir


@implementer(IHandshakeListener)
class Application(Protocol):
    def __init__(self):
        self.events = []
        self.received = b""
        self.lost = None

    def connectionMade(self):
        self.events.append("made")

    def handshakeCompleted(self):
        self.events.append("handshake")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


class Wire(StringTransport):
    def loseConnection(self):
        super().loseConnection()

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class Pair:
    """A client and a server TLSProtocol, their applications, and the bytes between them."""

    def __init__(self, server_credentials, client_credentials):
        self.server = TLSFactory(Factory.forProtocol(Application), lambda: server_credentials.ssl_context(True),
                                 server_side=True).buildProtocol(None)
        self.client = TLSFactory(Factory.forProtocol(Application), lambda: client_credentials.ssl_context(False),
                                 server_side=False).buildProtocol(None)
        self.apps = self.server.wrappedProtocol, self.client.wrappedProtocol
        self.server.makeConnection(Wire())
        self.client.makeConnection(Wire())

    def pump(self):
        """Carry bytes both ways until neither side has anything to send."""
        for _ in range(20):
            moved = False
            for sender, receiver in ((self.client, self.server), (self.server, self.client)):
                data = sender.transport.value()
                if data and receiver.wrappedProtocol is not None and not receiver.transport.disconnecting:
                    sender.transport.clear()
                    receiver.dataReceived(data)
                    moved = True
            if not moved:
                return
        raise AssertionError("the two ends never went quiet")

    def end(self):
        """The TCP connections close: each side's TLSProtocol learns it."""
        for side in (self.server, self.client):
            if side.wrappedProtocol is not None:
                side.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def certs(tmp_path):
    return make_certs_dir(tmp_path / "tls", org="AG Projects")


def credentials(certs, name="dispatcher"):
    return Credentials(str(certs.path), name)


def test_a_handshake_then_data_both_ways(certs):
    pair = Pair(credentials(certs), credentials(certs, "relay"))
    server, client = pair.apps
    assert server.events == client.events == ["made"]          # at TCP connect, before the handshake
    pair.pump()
    assert server.events == client.events == ["made", "handshake"]
    assert subject_text(pair.server.getPeerCertificate()) == "O=AG Projects, CN=relay"
    assert subject_text(pair.client.getPeerCertificate()) == "O=AG Projects, CN=dispatcher"
    pair.client.write(b"update 1\r\n\r\n")
    pair.server.writeSequence([b"1 10.0.0.1 ", b"40000\r\n"])
    pair.pump()
    assert server.received == b"update 1\r\n\r\n" and client.received == b"1 10.0.0.1 40000\r\n"
    wire = pair.client.transport.value()
    assert wire == b"" and b"update" not in pair.server.transport.value()


def test_records_are_watched_for_certificates_only_while_a_handshake_is_under_way(certs):
    # OpenSSL's message callback (what names a refused certificate) costs a call into Python
    # for every record: set while a connection of the context is in its handshake, not after
    server_credentials = credentials(certs)
    context = server_credentials.ssl_context(True)
    watching = _ssl._SSLContext._msg_callback.__get__
    first = Pair(server_credentials, credentials(certs, "relay"))
    second = Pair(server_credentials, credentials(certs, "relay"))
    assert context.handshakes_under_way == 2 and watching(context) is not None
    first.pump()
    assert context.handshakes_under_way == 1 and watching(context) is not None
    second.end()                                # lost before its handshake ended
    assert context.handshakes_under_way == 0 and watching(context) is None
    first.client.write(b"ping\r\n")
    first.pump()
    assert first.apps[0].received == b"ping\r\n"
    first.end()
    assert context.handshakes_under_way == 0


def tls_records(data):
    count = 0
    while data:
        data = data[5 + int.from_bytes(data[3:5], "big"):]
        count += 1
    return count


class Reactor:
    def doIteration(self, timeout):
        pass


def test_what_a_connection_is_written_in_a_reactor_turn_is_one_record(certs):
    pair = Pair(credentials(certs), credentials(certs, "relay"))
    pair.pump()
    reactor = Reactor()
    outgoing.install(reactor)
    try:
        pair.server.write(b"7 10.0.0.1 40000\r\n")
        pair.server.write(b"8 removed\r\n")
        assert pair.server.transport.value() == b""          # sealed at the end of the turn
        reactor.doIteration(0)
        assert tls_records(pair.server.transport.value()) == 1
    finally:
        outgoing._pending = outgoing._before_push = None
    pair.pump()
    assert pair.apps[1].received == b"7 10.0.0.1 40000\r\n8 removed\r\n"


def test_what_is_written_before_the_handshake_waits_for_it(certs):
    pair = Pair(credentials(certs), credentials(certs, "relay"))
    pair.client.write(b"ping\r\n")
    assert b"ping" not in pair.client.transport.value()
    pair.pump()
    assert pair.apps[0].received == b"ping\r\n"


def test_a_large_write_arrives_whole(certs):
    pair = Pair(credentials(certs), credentials(certs, "relay"))
    pair.pump()
    blob = bytes(range(256)) * 1000                         # several TLS records
    pair.server.write(blob)
    pair.pump()
    assert pair.apps[1].received == blob


def test_lose_connection_sends_close_notify_and_the_peer_closes(certs):
    pair = Pair(credentials(certs), credentials(certs, "relay"))
    pair.pump()
    pair.client.loseConnection()
    assert pair.client.transport.disconnecting
    pair.pump()
    assert pair.server.transport.disconnecting                  # it saw the close_notify
    pair.client.write(b"late")                                  # after loseConnection: dropped
    assert pair.apps[0].received == b""


def test_a_rejected_certificate_reaches_the_application_as_the_reason_with_its_subject(certs):
    certs.replace("relay", not_before=ago(days=10), not_after=ago(days=1))
    relay = Credentials.__new__(Credentials)          # its own certificate expired: it would not load
    relay.__dict__.update(vars(credentials(certs, "dispatcher")), cert_path=str(certs.path / "relay.crt"),
                          key_path=str(certs.path / "relay.key"), _ssl_contexts={})
    pair = Pair(credentials(certs), relay)
    pair.pump()
    pair.end()
    server, client = pair.apps
    assert "handshake" not in server.events
    assert isinstance(server.lost.value, ssl.SSLCertVerificationError)
    assert handshake_failure_text(server.lost) == "certificate expired (O=AG Projects, CN=relay)"
    assert handshake_failure_text(client.lost) == "sslv3 alert certificate expired"    # the alert it got


def test_garbage_instead_of_a_handshake_is_refused(certs):
    server = TLSFactory(Factory.forProtocol(Application), lambda: credentials(certs).ssl_context(True),
                        server_side=True).buildProtocol(None)
    application = server.wrappedProtocol
    server.makeConnection(Wire())
    server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.transport.disconnecting
    server.connectionLost(Failure(ConnectionDone()))
    assert handshake_failure_text(application.lost) == "http request"
