"""Garbage on each of the dispatcher's three sockets: answered with `error`
or dropped, and the daemons go on serving calls (SPEC §2, §3, §5)."""

import os
import random
import socket
import ssl

import pytest

from mediaproxy import __version__
from tests.integration.conftest import RELAYS
from tests.integration.daemons import Call, ProxyClient, management_tls_context
from tests.support.certs import make_ca

pytestmark = pytest.mark.integration

MEDIA = "audio:127.0.0.1:7000:sendrecv"
GOOD_UPDATE = {"type": "request", "call_id": "x", "from_tag": "a", "cseq": "1", "media": MEDIA}


def random_garbage(size: int, seed: int) -> bytes:
    """Random bytes with some line ends, so the readers see lines as well."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for _ in range(size // 200):
        position = rng.randrange(size)
        data[position:position + 2] = b"\r\n"
    return bytes(data[:size])


def assert_a_call_completes(cluster, call_id):
    with cluster.proxy() as proxy:
        call = Call(proxy, call_id)
        try:
            call.exchange()
            assert proxy.remove(call_id) == "removed"
        finally:
            call.close()


def header_block(headers) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items())


BAD_REQUESTS = {
    "oversized header line": b"update\r\n" + header_block(GOOD_UPDATE) + b"x_big: " + b"a" * 70000 + b"\r\n\r\n",
    "oversized command line": b"update" + b" " * 20000 + b"y" * 20000 + b"\r\ncall_id: x\r\n\r\n",
    "request too large": b"update\r\n" + b"".join(b"h%d: %s\r\n" % (n, b"v" * 9000) for n in range(10)) + b"\r\n",
    "too many headers": b"update\r\n" + b"".join(b"h%d: v\r\n" % n for n in range(100)) + b"\r\n",
    "non-UTF-8 header": b"update\r\n" + header_block(GOOD_UPDATE) + b"user_agent: \xff\xfe\xc3\x28\r\n\r\n",
    "non-UTF-8 command": b"\xc0\xafupdate\r\ncall_id: x\r\n\r\n",
    "header without colon": b"update\r\n" + header_block(GOOD_UPDATE) + b"this is no header\r\n\r\n",
    "header name with a space": b"update\r\n" + header_block(GOOD_UPDATE) + b"bad name: v\r\n\r\n",
    "unknown command": b"explode\r\ncall_id: x\r\n\r\n",
    "no call_id": b"update\r\ntype: request\r\nfrom_tag: a\r\ncseq: 1\r\nmedia: " + MEDIA.encode() + b"\r\n\r\n",
    "bad type": b"update\r\n" + header_block({**GOOD_UPDATE, "type": "offer"}) + b"\r\n",
    "bad cseq": b"update\r\n" + header_block({**GOOD_UPDATE, "cseq": "-1"}) + b"\r\n",
    "bad media address": b"update\r\n" + header_block({**GOOD_UPDATE, "media": "audio:nowhere:7000:sendrecv"}) + b"\r\n",
    "bad media port": b"update\r\n" + header_block({**GOOD_UPDATE, "media": "audio:127.0.0.1:99999:sendrecv"}) + b"\r\n",
    "bad media direction": b"update\r\n" + header_block({**GOOD_UPDATE, "media": "audio:127.0.0.1:7000:both"}) + b"\r\n",
    "too many streams": b"update\r\n" + header_block({**GOOD_UPDATE, "media": ",".join([MEDIA] * 40)}) + b"\r\n",
    "bad signaling_ip": b"update\r\n" + header_block({**GOOD_UPDATE, "signaling_ip": "{not json"}) + b"\r\n",
    "bad media_relay": b"update\r\n" + header_block({**GOOD_UPDATE, "media_relay": "relay.example"}) + b"\r\n",
}


def test_bad_requests_on_the_proxy_socket_get_error_and_the_connection_keeps_working(two_relays):
    with two_relays.proxy() as proxy:
        for name, data in BAD_REQUESTS.items():
            proxy.send_raw(data)
            assert proxy.read_line() == "error", name
        proxy.assert_no_reply()
        # All of them at once, in one write: one `error` each, in order.
        proxy.send_raw(b"".join(BAD_REQUESTS.values()))
        assert [proxy.read_line() for _ in BAD_REQUESTS] == ["error"] * len(BAD_REQUESTS)
        proxy.assert_no_reply()
        # The same connection still serves a call.
        call = Call(proxy, "after-bad-requests")
        try:
            call.exchange()
            assert proxy.remove("after-bad-requests") == "removed"
        finally:
            call.close()
    assert two_relays.sessions() == []
    two_relays.assert_alive()


def test_random_bytes_on_the_proxy_socket(two_relays):
    for seed in range(3):
        with two_relays.proxy() as proxy:
            garbage = random_garbage(100_000, seed)
            for start in range(0, len(garbage), 4096):
                proxy.send_raw(garbage[start:start + 4096])
            # End whatever request the garbage left open, then ask for real.
            proxy.send_raw(b"\r\n\r\n\r\n")
            proxy.send_raw(b"update\r\n" + header_block({**GOOD_UPDATE, "call_id": f"after-random-{seed}"}) + b"\r\n")
            replies = []
            while not replies or replies[-1] == "error":
                replies.append(proxy.read_line())
            assert replies[-1].split()[0] in RELAYS, replies
            assert proxy.remove(f"after-random-{seed}") == "removed"
    # A client that sends garbage and hangs up in the middle of a request.
    with ProxyClient(two_relays.socket_path) as proxy:
        proxy.send_raw(b"update\r\ncall_id: half\r\n" + os.urandom(3000))
    assert_a_call_completes(two_relays, "after-random")
    two_relays.assert_alive()


def test_garbage_on_the_relay_port(two_relays, tmp_path):
    address = ("127.0.0.1", two_relays.listen_port)
    ca_pem = two_relays.certs.path / "ca.pem"
    # Plain TCP: random bytes, then something that looks like the link protocol.
    for payload in (random_garbage(50_000, 7), b"update 1\r\ncall_id: x\r\n\r\nping\r\n", b"\x16\x03\x01\x00\x00"):
        with socket.create_connection(address, timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except ConnectionError:
                pass          # the dispatcher may reset the connection: that is fine
    # TLS without a client certificate, and with one of another CA.
    other = make_ca("Other CA", "Elsewhere", directory=tmp_path / "other").issue("relay", "relay")
    for context in (management_tls_context(ca_pem), management_tls_context(ca_pem, other.cert_path, other.key_path)):
        with socket.create_connection(address, timeout=5) as raw:
            try:
                with context.wrap_socket(raw) as sock:
                    sock.sendall(b"1 error\r\nping\r\n")
                    assert sock.recv(65536) == b""
            except (ssl.SSLError, ConnectionError):
                pass
    # Nothing of this became a relay, and calls go on.
    assert sorted(entry["ip"] for entry in two_relays.summary()) == sorted(RELAYS)
    assert_a_call_completes(two_relays, "after-relay-port-garbage")
    assert "Traceback" not in two_relays.dispatcher.log_text()
    two_relays.assert_alive()


def test_garbage_on_the_management_port(two_relays):
    with two_relays.management() as client:
        # An oversized line: one `error`, then the connection works.
        client.send_raw(b"s" * 5000 + b"\r\n")
        assert client.read_answer() == ["error"]
        client.send_raw(b"x" * 3000)
        client.send_raw(b"y" * 3000 + b"\r\nversion\r\n")
        assert client.read_answer() == ["error"]
        assert client.read_answer() == [__version__]
        # Non-UTF-8 and unknown commands.
        client.send_raw(b"\xff\xfe\xfd\r\nsummary please\r\n")
        assert client.read_answer() == ["error"]
        assert client.read_answer() == ["error"]
        assert client.command("version") == [__version__]
    for seed in range(3):
        with two_relays.management() as client:
            garbage = random_garbage(20_000, 100 + seed).replace(b"quit", b"qu1t").replace(b"exit", b"ex1t")
            client.send_raw(garbage + b"\r\nversion\r\n")
            answers = []
            while answers[-1:] != [[__version__]]:
                answers.append(client.read_answer())
            assert all(answer == ["error"] for answer in answers[:-1]), answers
    assert_a_call_completes(two_relays, "after-management-garbage")
    two_relays.assert_alive()
