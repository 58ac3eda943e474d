"""Who may not use the dispatcher's ports, and what that costs it (issue 9,
"TLS and access"): every bad certificate, non-TLS client, silent client and
flood of idle connections is refused or timed out with one log line, and the
dispatcher goes on serving calls and management commands meanwhile.

Each attack comes from its own loopback address, so its log lines can be
counted; the real relay is 127.0.0.2.
"""

import os
import re
import resource
import select
import socket
import ssl
import time

import pytest

from mediaproxy import __version__
from tests.integration.conftest import RELAY_A
from tests.integration.daemons import REPLY_TIMEOUT, Call, free_tcp_port, management_tls_context
from tests.support.certs import ago, from_now
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

HANDSHAKE_TIMEOUT = 1      # [TLS] handshake_timeout of these tests' dispatchers
IDLE_TIMEOUT = 1           # [Dispatcher] management_idle_timeout
FLOOD = 2000               # idle connections on each port
ACCEPT_BATCH = 40          # connections opened before waiting for the dispatcher to accept them
EXPOSED_WARNING = "is plain TCP on an address other hosts may reach"


# -- helpers --

def start(cluster, management_use_tls=True, handshake_timeout=HANDSHAKE_TIMEOUT,
          management_idle_timeout=IDLE_TIMEOUT):
    """A dispatcher with short access timeouts and one relay, RELAY_A."""
    cluster.start_dispatcher(management_use_tls=management_use_tls,
                             sections={"TLS": {"certs_path": cluster.certs.path,
                                               "handshake_timeout": handshake_timeout}},
                             management_idle_timeout=management_idle_timeout)
    cluster.start_relay(RELAY_A)


def port_address(cluster, port):
    return ("127.0.0.1", cluster.listen_port if port == "relay" else cluster.management_port)


def lines_of(process, ip):
    """The daemon's log lines that name ``ip`` (as a whole address)."""
    pattern = re.compile(r"(?<![\d.])%s(?![\d.])" % re.escape(ip))
    return [line for line in process.log_text().splitlines() if pattern.search(line) and not line.startswith("# ")]


def wait_for_lines(process, ip, needle, count=1, timeout=10.0):
    """Wait until exactly the lines about ``ip`` are ``count`` lines with ``needle``; returns them."""
    def logged():
        lines = lines_of(process, ip)
        return lines if len(lines) >= count else None
    lines = wait_for(logged, timeout=timeout, message=f"{count} log line(s) about {ip}")
    assert len(lines) == count and all(needle in line and " WARNING: " in line for line in lines), lines
    return lines


def connect(address, source, timeout=REPLY_TIMEOUT):
    return socket.create_connection(address, timeout=timeout, source_address=(source, 0))


def tls_exchange(address, source, ca_pem, issued=None, payload=b"version\r\n") -> bytes:
    """Handshake presenting ``issued`` (None: no certificate), send ``payload``:
    what came back (b"" when the dispatcher refused or closed). A dispatcher
    that leaves the client hanging fails the test (socket timeout)."""
    context = management_tls_context(ca_pem, issued and issued.cert_path, issued and issued.key_path)
    with connect(address, source) as raw:
        try:
            with context.wrap_socket(raw) as sock:
                sock.sendall(payload)
                return sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return b""


def wait_closed_by_peer(sock, timeout) -> float:
    """Seconds until the dispatcher closes ``sock`` (EOF or reset), bounded by ``timeout``."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def assert_still_serving(cluster, call_id):
    """A real call through the relay, and a management command."""
    with cluster.proxy() as proxy:
        call = Call(proxy, call_id)
        try:
            call.exchange()
            assert proxy.remove(call_id) == "removed"
        finally:
            call.close()
    assert cluster.management_command("version") == [__version__]
    assert [entry["ip"] for entry in cluster.summary()] == [RELAY_A]
    assert "Traceback" not in cluster.dispatcher.log_text()
    cluster.assert_alive()


# -- certificates --

@pytest.mark.parametrize("port", ["relay", "management"])
def test_expired_not_yet_valid_revoked_and_missing_client_certificates_are_refused(cluster, tmp_path, port):
    start(cluster)
    ca = cluster.certs.ca
    ca_pem = cluster.certs.path / "ca.pem"
    issued = tmp_path / "issued"
    attacks = {
        "127.0.0.21": (ca.issue("expired", "relay", not_before=ago(days=10), not_after=ago(days=1),
                                directory=issued), "certificate expired (O=MediaProxy Test, CN=relay)"),
        "127.0.0.22": (ca.issue("early", "relay", not_before=from_now(days=1), not_after=from_now(days=30),
                                directory=issued), "certificate not yet valid"),
        "127.0.0.23": (ca.issue("revoked", "relay", directory=issued), "certificate revoked"),
        "127.0.0.24": (None, "peer did not return a certificate"),
    }
    cluster.certs.revoke(attacks["127.0.0.23"][0])     # the dispatcher reads the new crl.pem at once
    payload = b"1 error\r\nping\r\n" if port == "relay" else b"version\r\n"
    for source, (certificate, reason) in attacks.items():
        assert tls_exchange(port_address(cluster, port), source, ca_pem, certificate, payload) == b""
        kind = "relay" if port == "relay" else "management client"
        wait_for_lines(cluster.dispatcher, source, f"TLS handshake with {kind} {source} failed: {reason}")
    # A certificate of the CA, valid and not revoked, is served on the management port.
    if port == "management":
        good = ca.issue("admin", "admin", directory=issued)
        answer = tls_exchange(port_address(cluster, port), "127.0.0.25", ca_pem, good)
        assert answer == (__version__ + "\r\n\r\n").encode()
    assert_still_serving(cluster, f"after-bad-certificates-{port}")


def test_a_relay_daemon_with_a_revoked_certificate_is_refused_at_the_handshake(cluster, tmp_path):
    start(cluster)
    intruder_ip = "127.0.0.26"
    certs = tmp_path / "revoked-tls"
    cluster.certs.ca.write_ca(certs)
    cluster.certs.revoke(cluster.certs.ca.issue("relay", "relay", directory=certs))
    intruder = cluster.start_relay(intruder_ip, certs_path=certs, wait=False, reconnect_delay=60)
    wait_for_lines(cluster.dispatcher, intruder_ip,
                   f"TLS handshake with relay {intruder_ip} failed: certificate revoked")
    intruder.wait_for_log(r"dispatcher 127\.0\.0\.1.*certificate revoked", timeout=10)    # the alert it got
    intruder.assert_running()
    assert_still_serving(cluster, "after-revoked-relay")


# -- clients that do not speak TLS --

def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


NOT_TLS = {
    "127.0.0.31": b"summary\r\n",
    "127.0.0.32": bytes(range(256)) * 20,
    "127.0.0.33": b"GET / HTTP/1.1\r\nHost: dispatcher\r\n\r\n",
}


@pytest.mark.parametrize("port", ["relay", "management"])
def test_plain_tcp_and_garbage_on_a_tls_port_are_refused_with_one_line_each(cluster, port):
    start(cluster, handshake_timeout=30)       # so a refusal cannot be the timeout's
    address = port_address(cluster, port)
    kind = "relay" if port == "relay" else "management client"
    for source, payload in NOT_TLS.items():
        with connect(address, source) as sock:
            sock.sendall(payload)
            assert wait_closed_by_peer(sock, REPLY_TIMEOUT) < REPLY_TIMEOUT
        wait_for_lines(cluster.dispatcher, source, f"TLS handshake with {kind} {source} failed: ")
    # Half a ClientHello, then the client hangs up; and a connect-and-close (a port scan).
    for source, payload in (("127.0.0.34", client_hello()[:40]), ("127.0.0.35", b"")):
        with connect(address, source) as sock:
            sock.sendall(payload)
        wait_for_lines(cluster.dispatcher, source, f"TLS handshake with {kind} {source} failed: ")
    assert_still_serving(cluster, f"after-not-tls-{port}")


# -- clients that never finish --

@pytest.mark.parametrize("port", ["relay", "management"])
def test_a_tls_client_that_never_finishes_its_handshake_is_dropped_after_the_handshake_timeout(cluster, port):
    start(cluster)
    address = port_address(cluster, port)
    kind = "relay" if port == "relay" else "management client"
    hello = client_hello()
    stalled = {"127.0.0.41": b"",                 # connects and never speaks
               "127.0.0.42": hello[:len(hello) // 2],   # half a ClientHello
               "127.0.0.43": hello}               # a whole one, then nothing more
    sockets = {}
    for source, payload in stalled.items():
        sockets[source] = connect(address, source)
        sockets[source].sendall(payload)
    try:
        for source, sock in sockets.items():
            assert wait_closed_by_peer(sock, HANDSHAKE_TIMEOUT + REPLY_TIMEOUT) < HANDSHAKE_TIMEOUT + REPLY_TIMEOUT
            wait_for_lines(cluster.dispatcher, source,
                           f"TLS handshake with {kind} {source} not done within {HANDSHAKE_TIMEOUT} s: dropped")
    finally:
        for sock in sockets.values():
            sock.close()
    assert_still_serving(cluster, f"after-stalled-handshakes-{port}")


def test_a_plain_tcp_management_client_that_sends_no_command_is_closed_after_the_idle_timeout(cluster):
    start(cluster, management_use_tls=False)
    address = cluster.management_address
    silent = connect(address, "127.0.0.51")                 # connects and never speaks
    trickling = connect(address, "127.0.0.52")
    trickling.sendall(b"summ")                              # a line that never ends
    served = connect(address, "127.0.0.53")                 # one command, then nothing
    served.sendall(b"version\r\n")
    try:
        for source, sock in (("127.0.0.51", silent), ("127.0.0.52", trickling), ("127.0.0.53", served)):
            data = b""
            sock.settimeout(IDLE_TIMEOUT + REPLY_TIMEOUT)
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            assert data == (b"%s\r\n\r\n" % __version__.encode() if source == "127.0.0.53" else b""), data
            wait_for_lines(cluster.dispatcher, source,
                           f"management client {source} sent no command for {IDLE_TIMEOUT} s: closed")
    finally:
        for sock in (silent, trickling, served):
            sock.close()
    # Bound explicitly to loopback: no warning about an exposed management port.
    assert EXPOSED_WARNING not in cluster.dispatcher.log_text()
    assert_still_serving(cluster, "after-idle-management-clients")


# -- floods --

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def enough_file_descriptors():
    """Room for the flood in this process and in the daemons it starts (they inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * FLOOD + 1000
    if hard < needed:
        pytest.skip(f"the open-files hard limit {hard} leaves no room for {2 * FLOOD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle_connections(address, source, count, dispatcher_pid, fds_now) -> list:
    """``count`` connections that say nothing, opened in batches the dispatcher has
    accepted: a client faster than its accept loop would overflow Twisted's listen
    backlog (50) and wait out SYN retransmissions (1 s, 3 s, ...)."""
    sockets = []
    while len(sockets) < count:
        sockets += [connect(address, source) for _ in range(min(ACCEPT_BATCH, count - len(sockets)))]
        # (fds_now may count a connection of the set-up that is closing: a little slack)
        wait_for(lambda: open_fds(dispatcher_pid) >= fds_now + len(sockets) - 5, timeout=10, interval=0.005,
                 message=f"the dispatcher to accept {len(sockets)} connections from {source}")
    return sockets


def closed_by_peer(sockets) -> bool:
    """Whether the dispatcher has closed every one of ``sockets`` (EOF or reset), without blocking."""
    poller = select.epoll()
    try:
        for sock in sockets:
            poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        ready = poller.poll(0, len(sockets))
    finally:
        poller.close()
    return len(ready) == len(sockets)


def test_thousands_of_idle_connections_are_timed_out_while_calls_go_on(cluster, enough_file_descriptors):
    # Long enough for the test to open them all and set a call up while every one is held.
    timeout = 8
    start(cluster, management_use_tls=False, handshake_timeout=timeout, management_idle_timeout=timeout)
    fds_before = open_fds(cluster.dispatcher.pid)
    relay_source, management_source = "127.0.0.61", "127.0.0.62"
    opened = time.monotonic()
    flood = []
    try:
        flood += open_idle_connections(port_address(cluster, "relay"), relay_source, FLOOD,
                                       cluster.dispatcher.pid, fds_before)
        flood += open_idle_connections(cluster.management_address, management_source, FLOOD,
                                       cluster.dispatcher.pid, fds_before + FLOOD)
        # All held at once, and the dispatcher serves a call and its management port meanwhile.
        assert_still_serving(cluster, "during-the-flood")
        assert time.monotonic() - opened < timeout, "too slow to show the connections were held meanwhile"
        assert not lines_of(cluster.dispatcher, relay_source) and not lines_of(cluster.dispatcher, management_source)
        # Then every one of them is closed, with one line each.
        wait_for(lambda: closed_by_peer(flood), timeout=timeout + 20, interval=0.2,
                 message="the dispatcher to close every idle connection")
        wait_for_lines(cluster.dispatcher, relay_source,
                       f"TLS handshake with relay {relay_source} not done within {timeout} s: dropped", count=FLOOD)
        wait_for_lines(cluster.dispatcher, management_source,
                       f"management client {management_source} sent no command for {timeout} s: closed", count=FLOOD)
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: open_fds(cluster.dispatcher.pid) <= fds_before + 5, timeout=10,
             message="the dispatcher to release the connections' file descriptors")
    assert_still_serving(cluster, "after-the-flood")


# -- where the management port listens --

def test_plain_tcp_management_on_a_reachable_address_is_served_with_a_warning_at_start(cluster):
    port = free_tcp_port()
    cluster.start_dispatcher(management_use_tls=False, listen_management=f"0.0.0.0:{port}")
    cluster.management_port = port
    warnings = [line for line in cluster.dispatcher.log_text().splitlines() if EXPOSED_WARNING in line]
    assert len(warnings) == 1 and " WARNING: " in warnings[0] and f"0.0.0.0:{port}" in warnings[0], warnings
    assert cluster.management_command("version") == [__version__]
    cluster.assert_alive()
