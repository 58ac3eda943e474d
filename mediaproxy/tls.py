"""Mutual TLS between dispatchers, relays and management clients.

Both sides present a certificate signed by the CA in certs_path; crl.pem,
when present, is honoured at the handshake and re-read at each periodic
re-verification; a passport restricts the peer's subject further.
"""

import logging
import os
import re
import weakref

from cryptography import x509
from cryptography.x509.oid import NameOID
import OpenSSL
from OpenSSL import SSL, crypto
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

log = logging.getLogger("mediaproxy.tls")


class TLSError(Exception):
    """The TLS files cannot be used; the daemon does not start."""


_OPENSSL_VERSION = tuple(int(part) for part in OpenSSL.__version__.split(".")[:2])


def add_crl(store, crl) -> None:
    """Add a cryptography CRL to a pyOpenSSL store; pyOpenSSL before 23.1
    (Debian 12 ships 23.0) takes only its own CRL type."""
    if _OPENSSL_VERSION < (23, 1):
        crl = crypto.CRL.from_cryptography(crl)
    store.add_crl(crl)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError("cannot read the %s %s: %s" % (what, path, e.strerror or e)) from None


SUBJECT_NAMES = {NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
                 NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
                 NameOID.COMMON_NAME: "CN", NameOID.EMAIL_ADDRESS: "emailAddress"}


def subject_attributes(cert) -> list:
    """(short name, value) pairs of the certificate's subject, e.g. ("CN", "relay")."""
    return [(SUBJECT_NAMES.get(attribute.oid, attribute.oid.dotted_string), str(attribute.value))
            for attribute in cert.to_cryptography().subject]


def subject_text(cert) -> str:
    return ", ".join("%s=%s" % pair for pair in subject_attributes(cert))


# OpenSSL's X509_V_ERR_* codes a peer's certificate most often fails with, in
# an operator's words (the numbers are part of OpenSSL's stable API).
VERIFY_ERRORS = {
    2: "certificate not signed by our CA",               # UNABLE_TO_GET_ISSUER_CERT
    3: "no CRL of its CA",                               # UNABLE_TO_GET_CRL
    7: "bad certificate signature",                      # CERT_SIGNATURE_FAILURE
    9: "certificate not yet valid",                      # CERT_NOT_YET_VALID
    10: "certificate expired",                           # CERT_HAS_EXPIRED
    11: "crl.pem not yet valid",                         # CRL_NOT_YET_VALID
    12: "crl.pem expired",                               # CRL_HAS_EXPIRED
    18: "self-signed certificate",                       # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "certificate not signed by our CA",              # SELF_SIGNED_CERT_IN_CHAIN
    20: "certificate not signed by our CA",              # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "certificate not signed by our CA",              # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "certificate revoked",                           # CERT_REVOKED
    26: "certificate not allowed for TLS authentication",  # INVALID_PURPOSE
}


def handshake_failure_text(failure) -> str:
    """Why a handshake ended: OpenSSL's reason without its [('SSL routines',
    '', ...)] wrapping (e.g. 'wrong version number' for a client that does not
    speak TLS), or that the other side closed the connection."""
    if failure.check(ConnectionDone, ConnectionLost):
        return "connection closed before the handshake ended"
    error = failure.value
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [entry[-1] for entry in error.args[0] if isinstance(entry, tuple) and entry and entry[-1]]
        if reasons:
            return "; ".join(reasons)
    return failure.getErrorMessage()


class Credentials:
    """The CA, the optional CRL, and this daemon's certificate and key."""

    def __init__(self, certs_path: str, name: str):
        self.certs_path = certs_path
        self.ca_path = os.path.join(certs_path, "ca.pem")
        self.crl_path = os.path.join(certs_path, "crl.pem")
        self.cert_path = os.path.join(certs_path, name + ".crt")
        self.key_path = os.path.join(certs_path, name + ".key")
        self.ca_certificates = self._load_ca()
        try:
            self.certificate = crypto.load_certificate(crypto.FILETYPE_PEM, _read(self.cert_path, "certificate"))
        except crypto.Error:
            raise TLSError("%s is not a PEM certificate" % self.cert_path) from None
        try:
            self.private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, _read(self.key_path, "private key"))
        except crypto.Error:
            raise TLSError("%s is not a PEM private key (or it is encrypted)" % self.key_path) from None
        if self.certificate.has_expired():
            raise TLSError("the certificate %s has expired" % self.cert_path)
        self._crl_stamp = None
        self._crl = None
        self._context = None
        # Why a handshake's peer certificate was rejected, by SSL connection: OpenSSL's
        # own error on the server side only says "certificate verify failed".
        self._verify_failures = weakref.WeakKeyDictionary()
        self.context()         # a key that does not fit, or a bad crl.pem, stops start-up here

    def _load_ca(self):
        data = _read(self.ca_path, "CA certificate")
        # One certificate per PEM block (cryptography 38, in Debian 12, cannot load several at once).
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
        try:
            certificates = [x509.load_pem_x509_certificate(block) for block in blocks]
        except ValueError:
            certificates = []
        if not certificates:
            raise TLSError("%s holds no PEM certificate" % self.ca_path)
        return [crypto.X509.from_cryptography(c) for c in certificates]

    def _current_crl(self):
        """The CRL as it is on disk now (re-read when the file changes), or None."""
        try:
            stat = os.stat(self.crl_path)
        except FileNotFoundError:
            self._crl_stamp, self._crl = None, None
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._crl_stamp:
            try:
                self._crl = x509.load_pem_x509_crl(_read(self.crl_path, "CRL"))
            except ValueError:
                raise TLSError("%s is not a PEM CRL" % self.crl_path) from None
            self._crl_stamp = stamp
            self._context = None
        return self._crl

    def context(self) -> SSL.Context:
        try:
            crl = self._current_crl()
        except TLSError as e:
            if self._context is None:
                raise
            log.error("%s: the CRL read before stays in force", e)
            return self._context
        if self._context is None:
            self._context = self._make_context(crl)
        return self._context

    def _make_context(self, crl) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        try:
            context.use_certificate_chain_file(self.cert_path)
            context.use_privatekey_file(self.key_path)
            context.check_privatekey()
        except SSL.Error:
            raise TLSError("the key %s does not belong to the certificate %s" % (self.key_path, self.cert_path)) from None
        context.load_verify_locations(self.ca_path)
        store = context.get_cert_store()
        if crl is not None:
            add_crl(store, crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                           self._remember_verify_failure)
        context.set_session_id(b"mediaproxy")
        return context

    def _remember_verify_failure(self, connection, cert, errno, depth, ok):
        if not ok and connection not in self._verify_failures:
            reason = VERIFY_ERRORS.get(errno, "certificate verify error %d" % errno)
            self._verify_failures[connection] = "%s (%s)" % (reason, subject_text(cert))
        return ok

    def verify_failure(self, connection) -> str:
        """Why the peer certificate of this SSL connection was rejected ('' when it was not)."""
        try:
            return self._verify_failures.get(connection, "")
        except TypeError:             # not an SSL connection (a test's transport)
            return ""

    def problem_with(self, peer) -> str:
        """Why an established peer's certificate is no longer good ('' when it is)."""
        if peer is None:
            return "no certificate"
        if peer.has_expired():
            return "certificate expired"
        try:
            crl = self._current_crl()
        except TLSError as e:
            log.error("%s", e)
            return ""
        if crl is not None:
            serial = peer.get_serial_number()
            issuer = peer.to_cryptography().issuer
            if crl.issuer == issuer and crl.get_revoked_certificate_by_serial_number(serial) is not None:
                return "certificate revoked"
        return ""


@implementer(IOpenSSLContextFactory)
class ContextFactory:
    """What Twisted's listenSSL/connectSSL take: a fresh context when the CRL changed."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials

    def getContext(self) -> SSL.Context:
        return self.credentials.context()


def _matches(pattern: str, value: str) -> bool:
    """`*x` matches a suffix, `x*` a prefix, `*x*` a substring; nothing else is special."""
    if len(pattern) > 1 and pattern.startswith("*") and pattern.endswith("*"):
        return pattern[1:-1] in value
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def identity_mismatch(connection, name: str) -> str:
    """'' when the peer's certificate is for `name` (a host name or an IP, in its subjectAltName)."""
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address
    try:
        if re.match(r"^[0-9.]+$|:", name):
            verify_ip_address(connection, name)
        else:
            verify_hostname(connection, name)
    except VerificationError:
        return "its certificate is not for %s" % name
    except Exception as e:            # e.g. a certificate without subjectAltName
        return "its certificate is not for %s (%s)" % (name, e)
    return ""


def passport_mismatch(cert, passport) -> str:
    """'' when the certificate's subject satisfies the passport, else what differs."""
    if not passport:
        return ""
    subject = dict(subject_attributes(cert))
    for attribute, pattern in passport.items():
        value = subject.get(attribute)
        if value is None or not _matches(pattern, value):
            return "%s is %r, the passport wants %r" % (attribute, value, pattern)
    return ""

