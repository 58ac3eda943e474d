"""A call whose media died is ended in the proxy (SPEC §4): the dispatcher
sends the proxy's management interface the JSON-RPC request that ends the
SIP dialog, in the proxy's own flavour. The proxy here is a datagram socket
that checks the exact request, as OpenSIPS' MI and Kamailio's jsonrpcs
sockets take it."""

import json
import socket

import pytest

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Party, log_lines, parse_address_reply

pytestmark = pytest.mark.integration

STREAM_TIMEOUT = 1


class FakeProxyRPC:
    """The proxy's datagram management socket: records requests, answers if told to."""

    def __init__(self, path, answer=True):
        self.path = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.answer = answer

    def next_request(self, timeout):
        self.sock.settimeout(timeout)
        data, sender = self.sock.recvfrom(65536)
        request = json.loads(data)
        if self.answer:
            self.sock.sendto(json.dumps({"jsonrpc": "2.0", "result": {}, "id": request["id"]}).encode(), sender)
        return request

    def assert_silent(self, wait):
        self.sock.settimeout(wait)
        with pytest.raises(socket.timeout):
            self.sock.recvfrom(65536)

    def close(self):
        self.sock.close()


@pytest.fixture
def proxy_rpc(cluster, tmp_path):
    rpc = FakeProxyRPC(cluster.runtime_root / "proxy-rpc.sock")
    yield rpc
    rpc.close()


def start(cluster, rpc, proxy="auto"):
    cluster.start_dispatcher(sections={"OpenSIPS": {"socket_path": rpc.path, "proxy": proxy}})
    cluster.start_relay(RELAY_A, stream_timeout=STREAM_TIMEOUT)


def silent_call(proxy, call_id, dialog_id, answered=True):
    """A call that is set up (and answered) but never sends media."""
    caller, callee = Party("caller"), Party("callee")
    try:
        offer = proxy.update(call_id, "request", caller.media(), dialog_id=dialog_id)
        parse_address_reply(offer)
        if answered:
            parse_address_reply(proxy.update(call_id, "reply", callee.media(), to_tag="callee-tag",
                                             dialog_id=dialog_id))
    finally:
        caller.close()
        callee.close()


def test_opensips_gets_dlg_end_dlg_with_the_dialog_id(cluster, proxy_rpc):
    start(cluster, proxy_rpc)
    with cluster.proxy() as proxy:
        silent_call(proxy, "dead-call", "4242")
    request = proxy_rpc.next_request(timeout=15)
    assert request == {"jsonrpc": "2.0", "method": "dlg_end_dlg", "params": ["4242"], "id": request["id"]}
    cluster.dispatcher.wait_for_log(r"session dead-call: the proxy ended dialog 4242", timeout=5)
    assert cluster.sessions() == []
    cluster.assert_alive()


def test_kamailio_gets_dlg_end_dlg_with_the_two_numbers(cluster, proxy_rpc):
    start(cluster, proxy_rpc)
    with cluster.proxy() as proxy:
        silent_call(proxy, "dead-kamailio-call", "3117:942")
    request = proxy_rpc.next_request(timeout=15)
    assert (request["method"], request["params"]) == ("dlg.end_dlg", [3117, 942])


def test_the_configured_flavour_wins_over_the_form_of_the_id(cluster, proxy_rpc):
    start(cluster, proxy_rpc, proxy="opensips")
    with cluster.proxy() as proxy:
        silent_call(proxy, "forced-opensips", "12:34")
    request = proxy_rpc.next_request(timeout=15)
    assert (request["method"], request["params"]) == ("dlg_end_dlg", ["12:34"])


def test_a_proxy_that_does_not_answer_is_logged_and_nothing_else_happens(cluster, tmp_path):
    rpc = FakeProxyRPC(cluster.runtime_root / "mute-rpc.sock", answer=False)
    try:
        start(cluster, rpc)
        with cluster.proxy() as proxy:
            silent_call(proxy, "unanswered", "77")
            rpc.next_request(timeout=15)
            cluster.dispatcher.wait_for_log(r"session unanswered: the proxy did not answer", timeout=10)
            # the dispatcher goes on serving
            silent_call(proxy, "next-call", "78", answered=False)
        cluster.assert_alive()
    finally:
        rpc.close()


def test_a_call_that_was_never_answered_is_not_ended_in_the_proxy(cluster, proxy_rpc):
    start(cluster, proxy_rpc)
    with cluster.proxy() as proxy:
        silent_call(proxy, "never-answered", "99", answered=False)
    cluster.dispatcher.wait_for_log(r"session never-answered expired", timeout=15)
    proxy_rpc.assert_silent(wait=1.0)
    assert log_lines(cluster.dispatcher, "dialog 99") == []
