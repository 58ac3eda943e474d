"""Throwaway PKIs for tests: a CA, certificates, CRLs, certs_path layouts.

    ca = make_ca("Test CA", "MediaProxy Test", directory=tmp_path)
    relay = ca.issue("relay", cn="relay1")                  # relay.crt, relay.key
    old = ca.issue("old", cn="relay2", not_after=ago(days=1))   # expired
    ca.write_ca(tmp_path)                                   # ca.pem
    ca.write_crl(tmp_path, revoked=[old])                   # crl.pem

    certs = make_certs_dir(tmp_path / "tls")     # ca.pem, crl.pem,
    certs.relay.cert_path                        # dispatcher.crt/.key,
    certs.revoke("relay")                        # relay.crt/.key

Keys are EC P-256 (fast to make) unless key_type="rsa". Certificates carry
the extensions of tls/make-certs (serverAuth + clientAuth); the CA makes
CRLs signed with its key. Times are timezone-aware UTC datetimes; `ago()` and
`from_now()` build them relative to now.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA",
    "CertsDir",
    "Issued",
    "ago",
    "from_now",
    "make_ca",
    "make_certs_dir",
]

# Passport attribute names (as the configuration spells them) -> OIDs.
SUBJECT_ATTRIBUTES = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "EMAIL": NameOID.EMAIL_ADDRESS,
}

DEFAULT_DAYS = 365

PathLike = str | os.PathLike


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def ago(**delta) -> datetime.datetime:
    """now - timedelta(**delta), e.g. ago(days=1)."""
    return utcnow() - datetime.timedelta(**delta)


def from_now(**delta) -> datetime.datetime:
    """now + timedelta(**delta), e.g. from_now(seconds=5)."""
    return utcnow() + datetime.timedelta(**delta)


def _new_key(key_type: str):
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError("key_type must be 'ec' or 'rsa', not %r" % (key_type,))


def _name(org: str | None, ou: str | None, cn: str, extra: Mapping[str, str] | None) -> x509.Name:
    """Subject in the usual order: C, ST, L, O, OU, CN, EMAIL."""
    values = dict(extra or {})
    unknown = set(values) - set(SUBJECT_ATTRIBUTES)
    if unknown:
        raise ValueError("unknown subject attributes %s (known: %s)"
                         % (sorted(unknown), ", ".join(SUBJECT_ATTRIBUTES)))
    if org is not None:
        values["O"] = org
    if ou is not None:
        values["OU"] = ou
    values["CN"] = cn
    return x509.Name([x509.NameAttribute(oid, values[key])
                      for key, oid in SUBJECT_ATTRIBUTES.items() if values.get(key) is not None])


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)     # atomic: a daemon re-reading the file sees old or new
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    """A certificate made by a CA, with its key and where they were written."""

    name: str
    certificate: x509.Certificate
    key: object
    cert_path: Path | None = None
    key_path: Path | None = None

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: PathLike, name: str | None = None) -> "Issued":
        """Write <name>.crt and <name>.key (mode 600) into directory; returns
        a copy with those paths (name defaults to this certificate's)."""
        directory = Path(directory)
        name = name or self.name
        cert_path = _write(directory / (name + ".crt"), self.cert_pem)
        key_path = _write(directory / (name + ".key"), self.key_pem, 0o600)
        return Issued(name, self.certificate, self.key, cert_path, key_path)

    def pyopenssl(self):
        """(OpenSSL.crypto.X509, OpenSSL.crypto.PKey) of this certificate."""
        from OpenSSL import crypto
        return (crypto.X509.from_cryptography(self.certificate),
                crypto.PKey.from_cryptography_key(self.key))


class CA:
    """A certificate authority: issues certificates and signs CRLs."""

    def __init__(self, certificate: x509.Certificate, key, directory: PathLike):
        self.certificate = certificate
        self.key = key
        self.directory = Path(directory)
        self.revoked: dict[int, datetime.datetime] = {}

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def subject(self) -> x509.Name:
        return self.certificate.subject

    def _organization(self) -> str | None:
        attrs = self.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return attrs[0].value if attrs else None

    def issue(self, name: str, cn: str, org: str | None = None, ou: str | None = None, *,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None,
              san_ips: Iterable[str] = (), san_dns: Iterable[str] = (),
              subject: Mapping[str, str] | None = None,
              key_type: str = "ec", directory: PathLike | None = None,
              write: bool = True) -> Issued:
        """Make a certificate for `cn` and write <name>.crt and <name>.key into
        `directory` (default: the CA's directory; write=False: nowhere).

        org defaults to the CA's O. not_before defaults to an hour ago and
        not_after to DEFAULT_DAYS from now: pass past dates for an expired
        certificate, future ones for one not yet valid. subject adds other
        attributes by passport name: {"C": "NL", "L": "Amsterdam",
        "ST": "NH", "EMAIL": "ops@example.com"}.
        """
        if org is None:
            org = self._organization()
        not_before = not_before or ago(hours=1)
        not_after = not_after or from_now(days=DEFAULT_DAYS)
        key = _new_key(key_type)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(org, ou, cn, subject))
            .issuer_name(self.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=(key_type == "rsa"), data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        alt_names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in san_ips]
        alt_names += [x509.DNSName(dns) for dns in san_dns]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        issued = Issued(name, builder.sign(self.key, hashes.SHA256()), key)
        if write:
            issued = issued.write(directory if directory is not None else self.directory)
        return issued

    def write_ca(self, directory: PathLike | None = None, name: str = "ca.pem") -> Path:
        """Write the CA certificate as directory/ca.pem."""
        directory = Path(directory) if directory is not None else self.directory
        return _write(directory / name, self.cert_pem)

    def write_key(self, directory: PathLike | None = None, name: str = "ca.key") -> Path:
        directory = Path(directory) if directory is not None else self.directory
        return _write(directory / name, _key_pem(self.key), 0o600)

    def revoke(self, *certificates, when: datetime.datetime | None = None) -> None:
        """Remember certificates (Issued, x509.Certificate or serial numbers)
        as revoked for the next write_crl()."""
        for c in certificates:
            self.revoked[_serial(c)] = when or ago(seconds=1)

    def make_crl(self, revoked: Sequence | None = None, *,
                 last_update: datetime.datetime | None = None,
                 next_update: datetime.datetime | None = None) -> x509.CertificateRevocationList:
        """A CRL listing `revoked` (default: everything passed to revoke()).
        next_update in the past makes an expired CRL."""
        entries = dict(self.revoked)
        if revoked is not None:
            entries = {_serial(c): entries.get(_serial(c), ago(seconds=1)) for c in revoked}
        last_update = last_update or ago(hours=1)
        next_update = next_update or from_now(days=DEFAULT_DAYS)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.subject)
            .last_update(last_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(_crl_number()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        for serial, when in sorted(entries.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        return builder.sign(self.key, hashes.SHA256())

    def write_crl(self, directory: PathLike | None = None, revoked: Sequence | None = None, *,
                  name: str = "crl.pem", **kwargs) -> Path:
        """Write make_crl(revoked, **kwargs) as directory/crl.pem (atomically,
        so a daemon re-reading it never sees half a file)."""
        directory = Path(directory) if directory is not None else self.directory
        crl = self.make_crl(revoked, **kwargs)
        return _write(directory / name, crl.public_bytes(serialization.Encoding.PEM))


_crl_counter = 0


def _crl_number() -> int:
    global _crl_counter
    _crl_counter += 1
    return _crl_counter


def _serial(c) -> int:
    if isinstance(c, Issued):
        return c.serial
    if isinstance(c, x509.Certificate):
        return c.serial_number
    if isinstance(c, int):
        return c
    raise TypeError("cannot revoke %r: give an Issued, a Certificate or a serial number" % (c,))


def make_ca(subject_cn: str = "MediaProxy Test CA", org: str | None = "MediaProxy Test", *,
            directory: PathLike | None = None,
            not_before: datetime.datetime | None = None,
            not_after: datetime.datetime | None = None,
            key_type: str = "ec", write: bool = False) -> CA:
    """A new self-signed CA. Its directory (default: a new temporary one) is
    where issue() writes unless told otherwise; write=True also writes ca.pem
    and ca.key there."""
    if directory is None:
        directory = tempfile.mkdtemp(prefix="mediaproxy-ca-")
    key = _new_key(key_type)
    name = _name(org, None, subject_cn, None)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or ago(hours=1))
        .not_valid_after(not_after or from_now(days=DEFAULT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = CA(certificate, key, directory)
    if write:
        ca.write_ca()
        ca.write_key()
    return ca


@dataclass
class CertsDir:
    """A certs_path directory: ca.pem, crl.pem, dispatcher.* and relay.*."""

    path: Path
    ca: CA
    dispatcher: Issued | None
    relay: Issued | None
    extra: dict[str, Issued] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Issued:
        if name in ("dispatcher", "relay"):
            issued = getattr(self, name)
            if issued is not None:
                return issued
        return self.extra[name]

    def revoke(self, *names_or_certs) -> Path:
        """Revoke certificates (names in this directory, Issued or serials)
        and rewrite crl.pem."""
        self.ca.revoke(*(self[c] if isinstance(c, str) else c for c in names_or_certs))
        return self.ca.write_crl(self.path)

    def replace(self, name: str, **issue_kwargs) -> Issued:
        """Issue a new certificate for `name` ("relay", "dispatcher", ...) in
        this directory, e.g. replace("relay", cn="relay", not_after=...)."""
        old = self[name]
        cn = issue_kwargs.pop("cn", old.certificate.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value)
        issued = self.ca.issue(name, cn, directory=self.path, **issue_kwargs)
        if name in ("dispatcher", "relay"):
            setattr(self, name, issued)
        else:
            self.extra[name] = issued
        return issued


def make_certs_dir(path: PathLike, org: str = "MediaProxy Test", relay_cn: str = "relay",
                   dispatcher_cn: str = "dispatcher", *,
                   ca: CA | None = None, ca_cn: str | None = None,
                   relay_ou: str | None = None, dispatcher_ou: str | None = None,
                   dispatcher_san_ips: Sequence[str] = ("127.0.0.1",),
                   dispatcher_san_dns: Sequence[str] = ("localhost",),
                   relay_san_ips: Sequence[str] = (), relay_san_dns: Sequence[str] = (),
                   relay: bool = True, dispatcher: bool = True,
                   relay_kwargs: Mapping | None = None,
                   dispatcher_kwargs: Mapping | None = None,
                   crl: bool = True, ca_key: bool = False) -> CertsDir:
    """A complete certs_path in `path` (created if needed): ca.pem, crl.pem
    (empty; crl=False: none), dispatcher.crt/.key and relay.crt/.key.

    ca: an existing CA to sign with (e.g. the dispatcher's and the relay's
    directories from one CA), else a new one "<org> CA". relay=False or
    dispatcher=False leaves that pair out. relay_kwargs / dispatcher_kwargs go
    to CA.issue (not_before, not_after, subject, key_type, ...). ca_key=True
    also writes ca.key.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca = make_ca(ca_cn or "%s CA" % org, org, directory=path)
    ca.write_ca(path)
    if ca_key:
        ca.write_key(path)
    dispatcher_cert = relay_cert = None
    if dispatcher:
        dispatcher_cert = ca.issue("dispatcher", dispatcher_cn, org, dispatcher_ou,
                                   san_ips=dispatcher_san_ips, san_dns=dispatcher_san_dns,
                                   directory=path, **dict(dispatcher_kwargs or {}))
    if relay:
        relay_cert = ca.issue("relay", relay_cn, org, relay_ou,
                              san_ips=relay_san_ips, san_dns=relay_san_dns,
                              directory=path, **dict(relay_kwargs or {}))
    if crl:
        ca.write_crl(path)
    return CertsDir(path, ca, dispatcher_cert, relay_cert)
