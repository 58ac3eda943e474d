"""Mutual TLS on the relay port and the management port (SPEC §3, §5)."""

import socket
import ssl

import pytest

from mediaproxy import __version__
from tests.integration.conftest import RELAY_A
from tests.integration.daemons import log_lines, management_tls_context, write_foreign_relay_certs
from tests.support.certs import make_ca

pytestmark = pytest.mark.integration

INTRUDER = "127.0.0.4"


def test_a_relay_with_a_certificate_of_another_ca_is_refused(cluster, tmp_path):
    cluster.start_dispatcher()
    cluster.start_relay(RELAY_A)
    other_ca = make_ca("Other CA", "MediaProxy Test", directory=tmp_path / "other-ca")
    certs = write_foreign_relay_certs(tmp_path / "intruder-tls", cluster.certs, other_ca)
    # reconnect_delay 60: a single attempt during the test
    intruder = cluster.start_relay(INTRUDER, certs_path=certs, wait=False, reconnect_delay=60)
    cluster.dispatcher.wait_for_log(r"relay 127\.0\.0\.4\b", timeout=10)
    intruder.wait_for_log(r"lost dispatcher|failed", timeout=10)
    intruder.assert_running()
    assert [entry["ip"] for entry in cluster.summary()] == [RELAY_A]
    lines = log_lines(cluster.dispatcher, INTRUDER)
    assert len(lines) == 1, lines
    assert " WARNING: " in lines[0]
    assert "TLS handshake with relay 127.0.0.4 failed: certificate not signed by our CA (O=MediaProxy Test, " \
        "CN=relay)" in lines[0]
    assert "Traceback" not in cluster.dispatcher.log_text()
    cluster.assert_alive()


def test_a_relay_that_does_not_match_the_passport_is_refused(cluster, tmp_path):
    cluster.start_dispatcher(passport="O:MediaProxy Test, CN:relay*")
    cluster.start_relay(RELAY_A)            # CN=relay: admitted
    certs = write_foreign_relay_certs(tmp_path / "intruder-tls", cluster.certs, cluster.certs.ca, cn="intruder")
    cluster.start_relay(INTRUDER, certs_path=certs, wait=False, reconnect_delay=60)
    cluster.dispatcher.wait_for_log(r"refused relay 127\.0\.0\.4 .*passport", timeout=10)
    assert [entry["ip"] for entry in cluster.summary()] == [RELAY_A]
    assert "Traceback" not in cluster.dispatcher.log_text()
    cluster.assert_alive()


def test_a_passport_refusal_is_logged_once(cluster, tmp_path):
    cluster.start_dispatcher(passport="CN:relay*")
    certs = write_foreign_relay_certs(tmp_path / "intruder-tls", cluster.certs, cluster.certs.ca, cn="intruder")
    intruder = cluster.start_relay(INTRUDER, certs_path=certs, wait=False, reconnect_delay=60)
    cluster.dispatcher.wait_for_log(r"refused relay 127\.0\.0\.4 .*passport", timeout=10)
    # The intruder has seen its connection end: the dispatcher is done with it.
    intruder.wait_for_log(r"lost dispatcher", timeout=10)
    cluster.management_command("version")      # one more round trip through the dispatcher's reactor
    lines = log_lines(cluster.dispatcher, INTRUDER)
    assert len(lines) == 1, lines


def tls_management_fails(cluster, context) -> str:
    """Connect and ask `version`: how the connection failed (it must not answer,
    and it must not leave the client hanging either)."""
    try:
        with cluster.management(context, timeout=5) as client:
            client.send_raw(b"version\r\n")
            data = client.recv()
    except (ssl.SSLError, ConnectionError, socket.timeout, TimeoutError) as exc:
        return type(exc).__name__
    assert data == b"", f"the management port answered {data!r}"
    return "closed"


def test_management_over_tls_requires_a_client_certificate_of_the_ca(cluster, tmp_path):
    cluster.start_dispatcher(management_use_tls=True)
    ca_pem = cluster.certs.path / "ca.pem"

    # No client certificate: the handshake fails (TLS 1.3: on the first read).
    assert tls_management_fails(cluster, management_tls_context(ca_pem)) != "TimeoutError"
    # A certificate of another CA: refused too.
    other = make_ca("Other CA", "Elsewhere", directory=tmp_path / "other-ca").issue("admin", "admin")
    assert tls_management_fails(cluster, management_tls_context(ca_pem, other.cert_path, other.key_path)) \
        != "TimeoutError"
    # A certificate of our CA: served.
    admin = cluster.certs.ca.issue("admin", "admin", directory=tmp_path / "admin")
    context = management_tls_context(ca_pem, admin.cert_path, admin.key_path)
    with cluster.management(context) as client:
        assert client.command("version") == [__version__]
        assert client.command("summary") == []
        assert client.command("bogus") == ["error"]
        client.send_raw(b"quit\r\n")
        assert client.wait_closed() == b""
    # A plain TCP client gets nothing either.
    with cluster.management() as client:
        client.send_raw(b"version\r\n")
        try:
            data = client.recv()
        except (ConnectionError, socket.timeout, TimeoutError):
            data = b""
        assert not data.startswith(__version__.encode())
    cluster.assert_alive()


def test_a_relay_checking_dispatcher_names_takes_only_a_certificate_for_the_address_it_dials(cluster):
    # The test PKI's dispatcher certificate names 127.0.0.1 (and localhost) in its subjectAltName.
    cluster.start_dispatcher()
    cluster.start_relay(RELAY_A, verify_dispatcher_names="yes")
    assert [entry["ip"] for entry in cluster.summary()] == [RELAY_A]
    # A dispatcher whose certificate is for another name is refused by the relay.
    cluster.certs.replace("dispatcher", san_ips=["192.0.2.1"], san_dns=["elsewhere.example.com"])
    cluster.restart_dispatcher()
    relay = cluster.start_relay("127.0.0.5", wait=False, verify_dispatcher_names="yes")
    relay.wait_for_log(r"refused dispatcher 127\.0\.0\.1 .*its certificate is not for 127\.0\.0\.1", timeout=10)
    assert "127.0.0.5" not in [entry["ip"] for entry in cluster.summary()]
