"""TLS credentials (load errors, CRL), passports, and the periodic re-check of
a peer's certificate by the protocols of both daemons."""

import logging
import os

import ssl

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mediaproxy.peer import HANDSHAKE_TIMEOUT, VerifiedPeerProtocol
from mediaproxy.tls import (Credentials, TLSError, first_certificate, handshake_failure_text, handshake_started,
                            passport_mismatch, subject_attributes)
from tests.support.certs import ago, from_now, make_ca, make_certs_dir


@pytest.fixture
def certs(tmp_path):
    return make_certs_dir(tmp_path / "tls", org="AG Projects", relay_cn="relay1.example.com")


def x509(issued):
    return issued.pyopenssl()[0]


# Loading

def test_good_credentials_load(certs):
    credentials = Credentials(str(certs.path), "relay")
    assert ("CN", "relay1.example.com") in subject_attributes(credentials.certificate)
    assert len(credentials.ca_certificates) == 1
    assert isinstance(credentials.ssl_context(True), ssl.SSLContext)
    assert isinstance(credentials.ssl_context(False), ssl.SSLContext)


@pytest.mark.parametrize("missing, what", [("ca.pem", "CA certificate"), ("relay.crt", "certificate"),
                                           ("relay.key", "private key")])
def test_a_missing_file_is_named(certs, missing, what):
    os.unlink(certs.path / missing)
    with pytest.raises(TLSError) as error:
        Credentials(str(certs.path), "relay")
    assert what in str(error.value) and missing in str(error.value)


@pytest.mark.parametrize("broken", ["ca.pem", "relay.crt", "relay.key"])
def test_a_file_that_is_not_pem_is_named(certs, broken):
    (certs.path / broken).write_text("this is not PEM\n")
    with pytest.raises(TLSError, match=broken.replace(".", r"\.")):
        Credentials(str(certs.path), "relay")


def test_a_key_that_does_not_match_the_certificate_fails_the_context(certs):
    os.replace(certs.path / "dispatcher.key", certs.path / "relay.key")
    with pytest.raises(TLSError, match="does not belong"):
        Credentials(str(certs.path), "relay").ssl_context(False)


def test_a_key_that_does_not_match_the_certificate_stops_loading(certs):
    os.replace(certs.path / "dispatcher.key", certs.path / "relay.key")
    with pytest.raises(TLSError, match="does not belong"):
        Credentials(str(certs.path), "relay")


def test_an_expired_own_certificate_stops_loading(certs):
    certs.replace("relay", not_before=ago(days=10), not_after=ago(days=1))
    with pytest.raises(TLSError, match="expired"):
        Credentials(str(certs.path), "relay")


def test_a_crl_that_is_not_pem_fails_the_context(certs):
    (certs.path / "crl.pem").write_text("garbage\n")
    with pytest.raises(TLSError, match="crl.pem"):
        Credentials(str(certs.path), "relay").ssl_context(False)


def test_the_context_is_made_again_when_the_crl_changes(certs):
    credentials = Credentials(str(certs.path), "dispatcher")
    first = credentials.ssl_context(True)
    assert credentials.ssl_context(True) is first
    certs.revoke("relay")
    assert credentials.ssl_context(True) is not first


def test_a_crl_broken_later_leaves_the_context_of_the_last_good_one(certs, caplog):
    credentials = Credentials(str(certs.path), "dispatcher")
    first = credentials.ssl_context(True)
    (certs.path / "crl.pem").write_text("garbage, and longer than before\n")
    assert credentials.ssl_context(True) is first
    assert "the CRL read before stays in force" in caplog.text


def test_no_crl_is_fine(certs):
    os.unlink(certs.path / "crl.pem")
    credentials = Credentials(str(certs.path), "dispatcher")
    assert isinstance(credentials.ssl_context(True), ssl.SSLContext)
    assert credentials.problem_with(x509(certs.relay)) == ""


# Re-checks of a connected peer

def test_problem_with(certs):
    credentials = Credentials(str(certs.path), "dispatcher")
    assert credentials.problem_with(x509(certs.relay)) == ""
    assert credentials.problem_with(None) == "no certificate"
    expired = certs.ca.issue("old", cn="relay2", not_before=ago(days=3), not_after=ago(days=1), write=False)
    assert credentials.problem_with(x509(expired)) == "certificate expired"


def test_a_revocation_after_start_is_found(certs):
    credentials = Credentials(str(certs.path), "dispatcher")
    relay = x509(certs.relay)
    assert credentials.problem_with(relay) == ""
    certs.revoke("relay")
    assert credentials.problem_with(relay) == "certificate revoked"


def test_a_serial_revoked_by_another_ca_is_not_this_certificates(certs, tmp_path):
    other = make_ca("Other CA", "AG Projects", directory=tmp_path / "other")
    other.write_crl(certs.path, revoked=[certs.relay.serial])
    credentials = Credentials(str(certs.path), "dispatcher")
    assert credentials.problem_with(x509(certs.relay)) == ""


# Passports

@pytest.fixture
def relay_cert(certs):
    issued = certs.ca.issue("r", cn="relay1.example.com", ou="EU", write=False,
                            subject={"C": "NL", "L": "Amsterdam", "ST": "NH", "EMAIL": "ops@example.com"})
    return x509(issued)


@pytest.mark.parametrize("passport", [
    None, {},
    {"O": "AG Projects"},
    {"O": "AG Projects", "CN": "relay1.example.com"},
    {"CN": "relay*"},
    {"CN": "*.example.com"},
    {"CN": "*"},
    {"OU": "EU", "C": "NL", "L": "Amsterdam", "ST": "NH"},
    {"emailAddress": "*@example.com"},
])
def test_passports_that_match(relay_cert, passport):
    assert passport_mismatch(relay_cert, passport) == ""


@pytest.mark.parametrize("passport, attribute", [
    ({"O": "AG"}, "O"),
    ({"O": "AG Projects", "CN": "relay2*"}, "CN"),
    ({"CN": "*.example.net"}, "CN"),
    ({"CN": "relay1"}, "CN"),                      # no `*`: the whole value must match
    ({"CN": "RELAY1.EXAMPLE.COM"}, "CN"),
    ({"OU": "US"}, "OU"),
    ({"C": "DE"}, "C"),
])
def test_passports_that_do_not_match_name_the_attribute(relay_cert, passport, attribute):
    mismatch = passport_mismatch(relay_cert, passport)
    assert mismatch.startswith(attribute + " is ")


def test_a_passport_attribute_the_subject_lacks_does_not_match(certs):
    assert "OU is None" in passport_mismatch(x509(certs.relay), {"OU": "EU"})


def test_only_the_star_at_the_ends_is_a_wildcard(certs):
    issued = certs.ca.issue("r", cn="relay-a1", write=False)
    assert passport_mismatch(x509(issued), {"CN": "relay-?*"}) != ""


# The protocols' peer checks (peer.py)

class TLSTransport(StringTransport):
    def __init__(self, certificate):
        super().__init__()
        self.certificate = certificate
        self.aborted = False
        self.handle = None

    def getPeerCertificate(self):
        return self.certificate

    def getHandle(self):
        return self.handle

    def abortConnection(self):
        self.aborted = True


class Peer(VerifiedPeerProtocol):
    peer_kind = "relay"

    def __init__(self):
        self.verified_calls = 0

    def peer_verified(self):
        self.verified_calls += 1


def connect(credentials, certificate, passport=None, verify_interval=300):
    peer = Peer()
    peer.credentials, peer.passport, peer.verify_interval = credentials, passport, verify_interval
    peer.clock = Clock()
    peer.makeConnection(TLSTransport(certificate))
    peer.handshakeCompleted()
    return peer


def test_a_peer_matching_the_passport_is_verified(certs):
    peer = connect(Credentials(str(certs.path), "dispatcher"), x509(certs.relay), {"CN": "relay*"})
    assert peer.verified and peer.verified_calls == 1 and not peer.transport.aborted


def test_a_peer_not_matching_the_passport_is_dropped(certs):
    peer = connect(Credentials(str(certs.path), "dispatcher"), x509(certs.relay), {"CN": "dispatcher*"})
    assert not peer.verified and peer.verified_calls == 0 and peer.transport.aborted


def test_a_peer_revoked_later_is_dropped_at_the_next_check(certs):
    peer = connect(Credentials(str(certs.path), "dispatcher"), x509(certs.relay), verify_interval=60)
    peer.clock.advance(60)
    assert not peer.transport.aborted
    certs.revoke("relay")
    peer.clock.advance(59)
    assert not peer.transport.aborted
    peer.clock.advance(1)
    assert peer.transport.aborted


def test_the_checks_stop_when_the_connection_is_lost(certs):
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone
    peer = connect(Credentials(str(certs.path), "dispatcher"), x509(certs.relay), verify_interval=60)
    peer.connectionLost(Failure(ConnectionDone()))
    assert peer.clock.getDelayedCalls() == []


# Why a handshake failed (tls.py), and the handshake timeout (peer.py)

def handshake(credentials, client=None):
    """A TLS handshake in memory between credentials' server side and a client presenting
    `client` (an Issued written to files, or None); returns the server side's ssl.SSLError,
    or None when the handshake succeeded."""
    def end(context, server_side):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return context.wrap_bio(incoming, outgoing, server_side=server_side), incoming, outgoing

    handshake_started(credentials.ssl_context(True))          # as tlslayer does for each connection
    server = end(credentials.ssl_context(True), True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client is not None:
        context.load_cert_chain(str(client.cert_path), str(client.key_path))
    client = end(context, False)
    for _ in range(5):
        for (side, _, outgoing), (_, incoming, _) in ((client, server), (server, client)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as error:
                error.peer_certificate = None
                der = getattr(side, "peer_certificate_der", None)
                if der:
                    from OpenSSL import crypto
                    error.peer_certificate = crypto.load_certificate(crypto.FILETYPE_ASN1, der)
                return error
            except ssl.SSLError as error:
                return error
            incoming.write(outgoing.read())
    return None


@pytest.mark.parametrize("issue, failure", [
    (dict(not_before=ago(days=10), not_after=ago(days=1)), "certificate expired (O=AG Projects, CN=intruder)"),
    (dict(not_before=from_now(days=1), not_after=from_now(days=9)),
     "certificate not yet valid (O=AG Projects, CN=intruder)"),
    ("revoked", "certificate revoked (O=AG Projects, CN=intruder)"),
    ("other CA", "certificate not signed by our CA (O=Elsewhere, CN=intruder)"),
])
def test_why_a_peer_certificate_was_rejected_at_the_handshake_is_told_with_its_subject(certs, tmp_path, issue,
                                                                                        failure):
    credentials = Credentials(str(certs.path), "dispatcher")
    clients = tmp_path / "clients"
    if issue == "other CA":
        client = make_ca("Other CA", "Elsewhere", directory=tmp_path / "other").issue("c", "intruder",
                                                                                     directory=clients)
    elif issue == "revoked":
        client = certs.ca.issue("c", "intruder", directory=clients)
        certs.revoke(client)
    else:
        client = certs.ca.issue("c", "intruder", directory=clients, **issue)
    assert handshake_failure_text(Failure(handshake(credentials, client))) == failure


def test_an_expired_crl_is_named_as_the_reason(certs):
    certs.ca.write_crl(certs.path, last_update=ago(days=10), next_update=ago(days=1))
    credentials = Credentials(str(certs.path), "dispatcher")
    assert handshake_failure_text(Failure(handshake(credentials, certs.relay))) \
        == "crl.pem expired (O=AG Projects, CN=relay1.example.com)"


def test_a_good_peer_certificate_passes(certs):
    assert handshake(Credentials(str(certs.path), "dispatcher"), certs.relay) is None


def test_a_peer_without_certificate_is_refused(certs):
    error = handshake(Credentials(str(certs.path), "dispatcher"), None)
    assert handshake_failure_text(Failure(error)) == "peer did not return a certificate"


def test_what_a_failed_handshake_says(certs):
    from twisted.internet.error import ConnectionDone, ConnectionLost
    server = Credentials(str(certs.path), "dispatcher").ssl_context(True)
    for sent, said in ((b"\x00" * 64, "wrong version number"), (b"GET / HTTP/1.1\r\n\r\n", "http request")):
        incoming = ssl.MemoryBIO()
        incoming.write(sent)
        with pytest.raises(ssl.SSLError) as error:
            server.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True).do_handshake()
        assert handshake_failure_text(Failure(error.value)) == said
    for error in (ConnectionDone(), ConnectionLost()):
        assert handshake_failure_text(Failure(error)) == "connection closed before the handshake ended"


def test_the_first_certificate_of_a_certificate_message():
    der = b"\x30\x82" + b"x" * 20
    entry = len(der).to_bytes(3, "big") + der
    tls12 = b"\x0b\x00\x00\x00" + (len(entry) + 3).to_bytes(3, "big") + entry + b"\x00\x00\x03abc"
    assert first_certificate(tls12, tls13=False) == der
    tls13 = b"\x0b\x00\x00\x00" + b"\x00" + (len(entry) + 2).to_bytes(3, "big") + entry + b"\x00\x00"
    assert first_certificate(tls13, tls13=True) == der
    assert first_certificate(b"\x0b\x00\x00\x00\x00\x00\x00\x00", tls13=True) is None     # no certificate
    assert first_certificate(tls12[:20], tls13=False) is None                              # cut short


class Factory:
    handshake_timeout = 3


def connected(credentials, factory=None):
    """A peer whose TCP connection is made and whose handshake has not finished."""
    peer = Peer()
    peer.credentials, peer.clock, peer.factory = credentials, Clock(), factory
    peer.makeConnection(TLSTransport(None))
    return peer


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_peer_that_never_finishes_the_handshake_is_dropped_after_the_timeout_with_one_line(certs, caplog):
    from twisted.internet.error import ConnectionAborted
    from twisted.python.failure import Failure
    peer = connected(Credentials(str(certs.path), "dispatcher"), Factory())
    peer.clock.advance(2.9)
    assert not peer.transport.aborted
    peer.clock.advance(0.1)
    assert peer.transport.aborted
    peer.connectionLost(Failure(ConnectionAborted()))
    assert warnings_of(caplog) == ["TLS handshake with relay 192.168.1.1 not done within 3 s: dropped"]
    assert peer.clock.getDelayedCalls() == []


def test_without_a_configured_timeout_the_default_applies(certs):
    peer = connected(Credentials(str(certs.path), "dispatcher"))
    peer.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not peer.transport.aborted
    peer.clock.advance(0.1)
    assert peer.transport.aborted


def test_a_finished_handshake_stops_the_handshake_timeout(certs):
    peer = connected(Credentials(str(certs.path), "dispatcher"), Factory())
    peer.transport.certificate = x509(certs.relay)
    peer.handshakeCompleted()
    peer.clock.advance(60)
    assert peer.verified and not peer.transport.aborted


def test_a_failed_handshake_is_one_line_naming_the_certificates_fault(certs, tmp_path, caplog):
    credentials = Credentials(str(certs.path), "dispatcher")
    expired = certs.ca.issue("c", "intruder", directory=tmp_path / "clients", not_before=ago(days=10),
                             not_after=ago(days=1))
    peer = connected(credentials)
    peer.connectionLost(Failure(handshake(credentials, expired)))
    assert warnings_of(caplog) == [
        "TLS handshake with relay 192.168.1.1 failed: certificate expired (O=AG Projects, CN=intruder)"]
    assert peer.clock.getDelayedCalls() == []


def test_an_ipv4_peer_of_a_dual_stack_socket_is_known_by_its_ipv4_address(certs):
    from twisted.internet.address import IPv6Address
    credentials = Credentials(str(certs.path), "dispatcher")
    peer = connect(credentials, x509(certs.relay))
    peer.transport.peerAddr = IPv6Address("TCP", "::ffff:192.0.2.7", 40123)
    assert peer.peer_ip == "192.0.2.7"
    peer = connect(credentials, x509(certs.relay))
    peer.transport.peerAddr = IPv6Address("TCP", "2001:db8::7", 40123)
    assert peer.peer_ip == "2001:db8::7"
