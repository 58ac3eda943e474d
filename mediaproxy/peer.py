"""Checks on the certificate of a TLS peer, for the Twisted protocols of both daemons.

A connection must finish its TLS handshake within handshake_timeout; then the
peer's subject is checked against the passport; every verify_interval the
certificate is checked again for expiry and revocation. Each refusal, drop or
failed handshake is one log line.
"""

import logging

from zope.interface import implementer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol

from mediaproxy.tls import Credentials, handshake_failure_text, identity_mismatch, passport_mismatch, subject_text

log = logging.getLogger("mediaproxy.tls")

HANDSHAKE_TIMEOUT = 10     # seconds; [TLS] handshake_timeout when the factory carries it


def unmapped(ip: str) -> str:
    """An IPv4 peer of a socket listening on [::] shows as ::ffff:a.b.c.d; it is a.b.c.d to the
    operator (media_relay, drain, logs) as on an IPv4 socket."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


@implementer(IHandshakeListener)
class VerifiedPeerProtocol(Protocol):
    """Base of protocols on mutually authenticated TLS connections.

    Subclasses set `peer_kind` (for logs) and implement `peer_verified()`;
    `credentials`, `passport`, `verify_interval` and `clock` come from the
    factory, which may also have a `handshake_timeout`. A subclass that
    overrides connectionMade or connectionLost calls this class's.
    """

    peer_kind = "peer"
    credentials: Credentials = None
    passport = None
    expected_name = None            # a host name or IP the certificate must be for (service-identity)
    verify_interval = 300
    clock = None
    verified = False
    refused = False                 # refused or dropped before verification, and logged already
    _verify_call = None
    _handshake_call = None

    _peer_ip = None

    @property
    def peer_ip(self) -> str:
        # asked on every request of the link (the owner of a session, the relay it goes to)
        if self._peer_ip is None:
            self._peer_ip = unmapped(self.transport.getPeer().host)
        return self._peer_ip

    def connectionMade(self):
        # A peer that connects and never finishes the handshake (or never speaks)
        # would hold its socket for ever.
        if not self.verified and self.clock is not None:
            timeout = getattr(self.factory, "handshake_timeout", None) or HANDSHAKE_TIMEOUT
            self._handshake_call = self.clock.callLater(timeout, self._handshake_timed_out, timeout)

    def _handshake_timed_out(self, timeout):
        self._handshake_call = None
        if self.verified:
            return
        log.warning("TLS handshake with %s %s not done within %s s: dropped", self.peer_kind,
                    self._peer_or_unknown(), timeout)
        self.refused = True
        self.transport.abortConnection()

    def handshakeCompleted(self):
        self._cancel_handshake_timeout()
        cert = self.transport.getPeerCertificate()
        mismatch = passport_mismatch(cert, self.passport) if cert is not None else "no certificate"
        if not mismatch and self.expected_name:
            mismatch = identity_mismatch(cert, self.expected_name)
        if mismatch:
            log.warning("refused %s %s (%s): %s", self.peer_kind, self.peer_ip,
                        subject_text(cert) if cert is not None else "-", mismatch)
            self.refused = True
            self.transport.abortConnection()
            return
        self.verified = True
        self.peer_certificate = cert
        self._schedule_verification()
        self.peer_verified()

    def peer_verified(self):
        """The handshake completed and the peer is who the passport says."""

    def _schedule_verification(self):
        if self.credentials is not None and self.clock is not None:
            self._verify_call = self.clock.callLater(self.verify_interval, self._verify_again)

    def _verify_again(self):
        self._verify_call = None
        problem = self.credentials.problem_with(self.peer_certificate)
        if problem:
            log.warning("dropped %s %s (%s): %s", self.peer_kind, self.peer_ip,
                        subject_text(self.peer_certificate), problem)
            self.transport.abortConnection()
        else:
            self._schedule_verification()

    def _cancel_handshake_timeout(self):
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def connectionLost(self, reason):
        self._cancel_handshake_timeout()
        if self._verify_call is not None and self._verify_call.active():
            self._verify_call.cancel()
        self._verify_call = None
        if not self.verified and not self.refused:
            log.warning("TLS handshake with %s %s failed: %s", self.peer_kind, self._peer_or_unknown(),
                        handshake_failure_text(reason))

    def _peer_or_unknown(self):
        try:
            return unmapped(self.transport.getPeer().host)
        except Exception:
            return "(unknown)"
