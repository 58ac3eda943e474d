"""Mutual TLS between dispatchers, relays and management clients.

Both sides present a certificate signed by the CA in certs_path; crl.pem,
when present, is honoured at the handshake and re-read at each periodic
re-verification; a passport restricts the peer's subject further. The
handshakes and records are the standard library's ssl module's (tlslayer);
certificates are inspected as pyOpenSSL X509 objects.
"""

import logging
import os
import re
import ssl
import _ssl

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.error import ConnectionDone, ConnectionLost

log = logging.getLogger("mediaproxy.tls")


class TLSError(Exception):
    """The TLS files cannot be used; the daemon does not start."""


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
    """Why a handshake ended, in an operator's words: the peer certificate's fault with its
    subject when there was one (tlslayer keeps the certificate OpenSSL rejected), else
    OpenSSL's reason (e.g. 'wrong version number' for a client that does not speak TLS,
    'sslv3 alert certificate revoked' for the alert a peer sent), or that the other side
    closed the connection."""
    if failure.check(ConnectionDone, ConnectionLost):
        return "connection closed before the handshake ended"
    error = failure.value
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = VERIFY_ERRORS.get(error.verify_code, error.verify_message)
        certificate = getattr(error, "peer_certificate", None)
        return "%s (%s)" % (reason, subject_text(certificate)) if certificate is not None else reason
    if isinstance(error, ssl.SSLError):
        match = re.match(r"\[[^]]*\] (.*?)(?: \(_ssl\.c:\d+\))?$", str(error))
        if match:
            return match.group(1)
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
        self._ssl_contexts = {}       # server_side -> ssl.SSLContext, for the CRL read last
        self.ssl_context(True)         # a key that does not fit, or a bad crl.pem, stops start-up here

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
            self._ssl_contexts.clear()
        return self._crl

    def ssl_context(self, server_side: bool) -> ssl.SSLContext:
        """The context of this side of a connection (tlslayer), made again when the CRL changed."""
        try:
            crl = self._current_crl()
        except TLSError as e:
            if not self._ssl_contexts:
                raise
            log.error("%s: the CRL read before stays in force", e)
            crl = self._crl
        context = self._ssl_contexts.get(server_side)
        if context is None:
            context = self._ssl_contexts[server_side] = self._make_context(server_side, crl)
        return context

    def _make_context(self, server_side: bool, crl) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False           # a peer is checked by its passport and expected_name
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError:
            raise TLSError("the key %s does not belong to the certificate %s" % (self.key_path, self.cert_path)) from None
        context.load_verify_locations(self.ca_path)
        if crl is not None:
            context.load_verify_locations(self.crl_path)      # OpenSSL takes the CRLs of a PEM file too
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

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


HANDSHAKE, CERTIFICATE = 22, 11       # TLS content type and handshake message type
TLS1_3 = 0x0304


_MSG_CALLBACK = getattr(_ssl._SSLContext, "_msg_callback", None)


def handshake_started(context: ssl.SSLContext) -> None:
    """Keep the peer's certificate (DER) on each SSLObject of `context` as `peer_certificate_der`
    as soon as it arrives, so that a handshake that fails on it can say whose it was: the ssl
    module has no verify callback, and OpenSSL forgets a certificate it rejected. OpenSSL's
    message callback is set on the C context directly (ssl.SSLContext's setter would turn three
    arguments into enums for every record); without it, failures are told without subject.

    The callback runs for every record of every connection of the context (a call into Python,
    twice a record): it is set from the first handshake under way to the end of the last one
    (handshake_ended; tlslayer calls both), and the connections that are up meanwhile pay for it."""
    under_way = getattr(context, "handshakes_under_way", 0)
    if under_way == 0 and _MSG_CALLBACK is not None:
        _MSG_CALLBACK.__set__(context, _seen_message)
    context.handshakes_under_way = under_way + 1


def handshake_ended(context: ssl.SSLContext) -> None:
    """Called once for each handshake_started: the handshake completed, failed, or its connection ended."""
    context.handshakes_under_way -= 1
    if context.handshakes_under_way == 0 and _MSG_CALLBACK is not None:
        _MSG_CALLBACK.__set__(context, None)


def _seen_message(conn, direction, version, content_type, message_type, data):
    if content_type == HANDSHAKE and message_type == CERTIFICATE and direction == "read":
        conn.peer_certificate_der = first_certificate(data, version == TLS1_3)


def first_certificate(message: bytes, tls13: bool):
    """The first (the peer's own) certificate of a TLS Certificate handshake message, or None."""
    at = 4                                            # type and length of the handshake message
    if tls13:
        at += 1 + message[at] if len(message) > at else 0     # certificate_request_context
    at += 3                                           # length of the certificate list
    if len(message) < at + 3:
        return None
    size = int.from_bytes(message[at:at + 3], "big")
    der = message[at + 3:at + 3 + size]
    return der if size and len(der) == size else None


def _matches(pattern: str, value: str) -> bool:
    """`*x` matches a suffix, `x*` a prefix, `*x*` a substring; nothing else is special."""
    if len(pattern) > 1 and pattern.startswith("*") and pattern.endswith("*"):
        return pattern[1:-1] in value
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def identity_mismatch(cert, name: str) -> str:
    """'' when the certificate is for `name` (a host name or an IP, in its subjectAltName)."""
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
    try:
        if re.match(r"^[0-9.]+$|:", name):
            verify_certificate_ip_address(cert.to_cryptography(), name)
        else:
            verify_certificate_hostname(cert.to_cryptography(), name)
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

