"""The test PKI helper makes what it promises: chains that verify, expired,
not-yet-valid and revoked certificates that do not, and a certs_path layout
that openssl and pyOpenSSL accept."""

import datetime
import os
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from tests.support.certs import ago, from_now, make_ca, make_certs_dir


def add_crl(store, crl) -> None:
    """pyOpenSSL before 23.1 (Debian 12 ships 23.0) takes only its own CRL type."""
    import OpenSSL
    if tuple(int(part) for part in OpenSSL.__version__.split(".")[:2]) < (23, 1):
        crl = crypto.CRL.from_cryptography(crl)
    store.add_crl(crl)


def store_for(ca_path, crl_path=None):
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(
        x509.load_pem_x509_certificate(ca_path.read_bytes())))
    if crl_path is not None:
        add_crl(store, x509.load_pem_x509_crl(crl_path.read_bytes()))
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    return store


def not_valid_after(cert):
    """The expiry as an aware datetime (cryptography before 42, as in Debian 12, has only the naive one)."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def verify(store, cert_path):
    """None if cert_path verifies against store, else OpenSSL's error message."""
    cert = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    try:
        crypto.X509StoreContext(store, cert).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return None


@pytest.fixture
def ca(tmp_path):
    ca = make_ca("Unit CA", "MediaProxy Unit", directory=tmp_path)
    ca.write_ca()
    return ca


def test_issued_certificate_verifies_and_carries_the_subject(ca, tmp_path):
    relay = ca.issue("relay", cn="relay1", ou="EU", subject={"C": "NL", "EMAIL": "ops@example.com"},
                     san_ips=["10.0.0.1"], san_dns=["relay1.example.com"])
    assert relay.cert_path == tmp_path / "relay.crt"
    assert relay.key_path == tmp_path / "relay.key"
    assert os.stat(relay.key_path).st_mode & 0o777 == 0o600
    assert verify(store_for(tmp_path / "ca.pem"), relay.cert_path) is None

    cert = x509.load_pem_x509_certificate(relay.cert_path.read_bytes())
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.ORGANIZATION_NAME] == "MediaProxy Unit"     # the CA's O by default
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "EU"
    assert subject[NameOID.COMMON_NAME] == "relay1"
    assert subject[NameOID.COUNTRY_NAME] == "NL"
    assert subject[NameOID.EMAIL_ADDRESS] == "ops@example.com"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["relay1.example.com"]


def test_expired_and_not_yet_valid_certificates_fail(ca, tmp_path):
    store = store_for(tmp_path / "ca.pem")
    expired = ca.issue("expired", cn="relay", not_before=ago(days=2), not_after=ago(days=1))
    future = ca.issue("future", cn="relay", not_before=from_now(days=1))
    assert "expired" in verify(store, expired.cert_path)
    assert "not yet valid" in verify(store, future.cert_path)


def test_certificate_of_another_ca_fails(ca, tmp_path):
    other = make_ca("Other CA", "MediaProxy Unit", directory=tmp_path / "other")
    stranger = other.issue("relay", cn="relay")
    assert "unable to get local issuer certificate" in verify(store_for(tmp_path / "ca.pem"),
                                                              stranger.cert_path)


def test_revoked_certificate_fails_with_crl_check(ca, tmp_path):
    good = ca.issue("good", cn="relay1")
    bad = ca.issue("bad", cn="relay2")
    crl_path = ca.write_crl(tmp_path, revoked=[bad])
    store = store_for(tmp_path / "ca.pem", crl_path)
    assert verify(store, good.cert_path) is None
    assert "revoked" in verify(store, bad.cert_path)
    # without the CRL check the same certificate passes
    assert verify(store_for(tmp_path / "ca.pem"), bad.cert_path) is None


def test_expired_crl_fails(ca, tmp_path):
    relay = ca.issue("relay", cn="relay")
    crl_path = ca.write_crl(tmp_path, last_update=ago(days=2), next_update=ago(days=1))
    assert "CRL has expired" in verify(store_for(tmp_path / "ca.pem", crl_path), relay.cert_path)


def test_make_certs_dir_layout_and_revocation(tmp_path):
    certs = make_certs_dir(tmp_path / "tls", org="MediaProxy Unit", relay_cn="relay7")
    names = sorted(os.listdir(certs.path))
    assert names == ["ca.pem", "crl.pem", "dispatcher.crt", "dispatcher.key", "relay.crt", "relay.key"]
    store = store_for(certs.path / "ca.pem", certs.path / "crl.pem")
    assert verify(store, certs.path / "dispatcher.crt") is None
    assert verify(store, certs.path / "relay.crt") is None
    assert certs.relay.certificate.subject.rfc4514_string() == "CN=relay7,O=MediaProxy Unit"

    certs.revoke("relay")
    store = store_for(certs.path / "ca.pem", certs.path / "crl.pem")
    assert "revoked" in verify(store, certs.path / "relay.crt")
    assert verify(store, certs.path / "dispatcher.crt") is None

    # a second directory signed by the same CA (a relay host) trusts the first
    relay_host = make_certs_dir(tmp_path / "relay-host", ca=certs.ca, dispatcher=False,
                                relay_kwargs={"not_after": ago(seconds=1), "not_before": ago(days=1)})
    assert sorted(os.listdir(relay_host.path)) == ["ca.pem", "crl.pem", "relay.crt", "relay.key"]
    assert "expired" in verify(store_for(certs.path / "ca.pem"), relay_host.path / "relay.crt")


def test_certs_dir_works_for_a_tls_context(tmp_path):
    """The key and certificate pair up, and openssl's own verify agrees."""
    make_certs_dir(tmp_path)
    for name in ("dispatcher", "relay"):
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_file(str(tmp_path / (name + ".crt")))
        context.use_privatekey_file(str(tmp_path / (name + ".key")))
        context.check_privatekey()
    if shutil.which("openssl"):
        result = subprocess.run(
            ["openssl", "verify", "-crl_check", "-CAfile", str(tmp_path / "ca.pem"),
             "-CRLfile", str(tmp_path / "crl.pem"),
             str(tmp_path / "dispatcher.crt"), str(tmp_path / "relay.crt")],
            capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_rsa_keys(ca, tmp_path):
    relay = ca.issue("relay", cn="relay", key_type="rsa")
    assert relay.key.key_size == 2048
    assert verify(store_for(tmp_path / "ca.pem"), relay.cert_path) is None


# The shipped sample set and tls/make-certs (the tools an operator uses).

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TLS = os.path.join(REPO, "tls")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def test_shipped_samples_verify_for_years(tmp_path):
    from pathlib import Path
    tls = Path(TLS)
    store = store_for(tls / "ca.pem", tls / "crl.pem")
    for name in ("dispatcher", "relay"):
        assert verify(store, tls / (name + ".crt")) is None
        cert = x509.load_pem_x509_certificate((tls / (name + ".crt")).read_bytes())
        assert not_valid_after(cert) > from_now(days=365 * 10)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == \
            "MediaProxy Sample"
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_file(str(tls / (name + ".crt")))
        context.use_privatekey_file(str(tls / (name + ".key")))
        context.check_privatekey()


@needs_openssl
def test_make_certs_script_new_set_extra_relay_and_revocation(tmp_path):
    script = os.path.join(TLS, "make-certs")
    run = lambda *args: subprocess.run(["bash", script, *args], capture_output=True, text=True,
                                       stdin=subprocess.DEVNULL, timeout=60)
    ca_dir, relay_dir = tmp_path / "ca", tmp_path / "relay2"
    result = run("--days", "30", "--org", "Example Ltd", "--dispatcher-cn", "disp1", str(ca_dir))
    assert result.returncode == 0, result.stderr
    assert run(str(ca_dir)).returncode != 0           # refuses to overwrite
    result = run("--ca-from", str(ca_dir), "--relay-cn", "relay2", str(relay_dir))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(relay_dir)) == ["ca.pem", "crl.pem", "relay.crt", "relay.key"]

    store = store_for(ca_dir / "ca.pem", ca_dir / "crl.pem")
    for path in (ca_dir / "dispatcher.crt", ca_dir / "relay.crt", relay_dir / "relay.crt"):
        assert verify(store, path) is None
    disp = x509.load_pem_x509_certificate((ca_dir / "dispatcher.crt").read_bytes())
    assert disp.subject.rfc4514_string() == "CN=disp1,O=Example Ltd"
    assert not_valid_after(disp) < from_now(days=31)

    result = run("revoke", str(ca_dir), str(relay_dir / "relay.crt"), "keyCompromise")
    assert result.returncode == 0, result.stderr
    result = run("revoke", str(ca_dir), "relay")         # by name, keeps the first entry
    assert result.returncode == 0, result.stderr
    store = store_for(ca_dir / "ca.pem", ca_dir / "crl.pem")
    assert "revoked" in verify(store, relay_dir / "relay.crt")
    assert "revoked" in verify(store, ca_dir / "relay.crt")
    assert verify(store, ca_dir / "dispatcher.crt") is None
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(list(crl)) == 2

    # a certificate of another CA is refused
    other = make_certs_dir(tmp_path / "other")
    assert run("revoke", str(ca_dir), str(other.path / "relay.crt")).returncode != 0
