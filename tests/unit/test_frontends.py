"""The dispatcher's front ends, driven in memory: the proxy module's socket
(one reply line per request, in order) and the management port (SPEC §5)."""

import json
import random

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mediaproxy import __version__
from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.frontends import ManagementFactory, ManagementProtocol, ProxyFactory

UPDATE = (b"update\r\ntype: request\r\ncall_id: %s\r\ncseq: 1 INVITE\r\nfrom_tag: alice\r\nto_tag: \r\n"
          b"media: audio:10.0.0.5:4000:sendrecv\r\n\r\n")


def written(transport):
    data = transport.value()
    transport.clear()
    return data


class PendingDispatcher:
    """Every request and command gets a Deferred the test fires."""

    def __init__(self):
        self.requests = []
        self.commands = []

    def handle_proxy_request(self, request, answer):
        deferred = defer.Deferred()
        self.requests.append((request, deferred))
        deferred.addCallback(answer)
        if request.headers.get("call_id") == "fails":
            raise RuntimeError("unexpected")

    def management_command(self, command):
        deferred = defer.Deferred()
        self.commands.append((command, deferred))
        return deferred

    def unreadable_proxy_request(self, error):
        pass


class Relay:
    """A relay link that answers at once."""

    def __init__(self, ip="10.1.0.1"):
        self.ip, self.active, self.halting = ip, True, False
        self.transport = None

    def send(self, name, headers, answered, raw=None):
        self.send_command(name, headers).addCallback(answered)

    def send_command(self, name, headers=None):
        if name == "update":
            return defer.succeed("%s 40000" % self.ip)
        if name == "sessions":
            return defer.succeed(json.dumps([{"call_id": "c1"}, {"call_id": "c2"}]))
        if name == "summary":
            return defer.succeed(json.dumps({"ip": self.ip, "status": "active", "session_count": 2}))
        return defer.succeed("error")


def proxy_connection(dispatcher):
    protocol = ProxyFactory(dispatcher).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


@pytest.fixture
def dispatcher():
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    dispatcher.relay_connected(Relay())
    return dispatcher


# The proxy module's socket

def test_an_update_is_answered_with_one_line(dispatcher):
    proxy = proxy_connection(dispatcher)
    proxy.dataReceived(UPDATE % b"c1")
    assert written(proxy.transport) == b"10.1.0.1 40000\r\n"


def test_replies_keep_the_request_order_when_a_later_one_is_ready_first():
    pending = PendingDispatcher()
    proxy = proxy_connection(pending)
    proxy.dataReceived(UPDATE % b"c1" + UPDATE % b"c2" + UPDATE % b"c3")
    (_, first), (_, second), (_, third) = pending.requests
    second.callback("10.1.0.2 40002")
    assert proxy.transport.value() == b""
    first.callback("10.1.0.1 40000")
    assert written(proxy.transport) == b"10.1.0.1 40000\r\n10.1.0.2 40002\r\n"
    third.callback("error")
    assert written(proxy.transport) == b"error\r\n"


@pytest.mark.parametrize("bad, counted_as", [
    (b"update\r\nno colon\r\n\r\n", "update"),                                       # bad header line
    (b"update\r\ntype: request\r\ncseq: 1\r\nfrom_tag: a\r\n\r\n", "update"),       # no call_id
    (b"update\r\n" + b"x: " + b"y" * 70000 + b"\r\n\r\n", "update"),                 # oversized
    (b"update\r\ncall_id: c\xff\r\n\r\n", "update"),                                 # not UTF-8
    (b"subscribe\r\ncall_id: c1\r\n\r\n", "other"),                                  # unknown command
])
def test_a_malformed_request_gets_error_is_counted_and_the_next_request_works(dispatcher, bad, counted_as):
    proxy = proxy_connection(dispatcher)
    proxy.dataReceived(bad)
    assert written(proxy.transport) == b"error\r\n"
    assert dispatcher.counters.requests[counted_as].outcomes == {"malformed": 1}
    proxy.dataReceived(UPDATE % b"c1")
    assert written(proxy.transport) == b"10.1.0.1 40000\r\n"
    assert not proxy.transport.disconnecting


def test_an_error_for_a_malformed_request_waits_for_the_answers_before_it():
    pending = PendingDispatcher()
    proxy = proxy_connection(pending)
    proxy.dataReceived(UPDATE % b"c1" + b"update\r\nno colon\r\n\r\n")
    assert proxy.transport.value() == b""
    pending.requests[0][1].callback("10.1.0.1 40000")
    assert written(proxy.transport) == b"10.1.0.1 40000\r\nerror\r\n"


def test_remove_is_answered_on_the_same_connection(dispatcher):
    proxy = proxy_connection(dispatcher)
    proxy.dataReceived(b"remove\r\ncall_id: unknown\r\nfrom_tag: a\r\nto_tag: b\r\n\r\n")
    assert written(proxy.transport) == b"error\r\n"


def test_a_cseq_of_odd_digits_gets_error_and_the_connection_keeps_working(dispatcher):
    proxy = proxy_connection(dispatcher)
    proxy.dataReceived(b"update\r\ntype: request\r\ncall_id: c1\r\ncseq: \xc2\xb2 INVITE\r\nfrom_tag: a\r\n\r\n")
    proxy.dataReceived(UPDATE % b"c2")
    assert written(proxy.transport) == b"error\r\n10.1.0.1 40000\r\n"


def test_a_request_that_fails_inside_the_dispatcher_gets_error_and_later_ones_still_get_answers():
    pending = PendingDispatcher()
    proxy = proxy_connection(pending)
    proxy.dataReceived(UPDATE % b"fails" + UPDATE % b"c2")
    (_, first), (_, second) = pending.requests
    second.callback("10.1.0.1 40002")
    assert written(proxy.transport) == b"error\r\n10.1.0.1 40002\r\n"
    first.callback("10.1.0.1 40000")            # an answer after the failure is not written
    assert written(proxy.transport) == b""


# The management port

def management_connection(dispatcher):
    protocol = ManagementFactory(dispatcher).buildProtocol(None)      # plain TCP: no TLS to verify
    protocol.makeConnection(StringTransport())
    return protocol


def test_management_summary(dispatcher):
    management = management_connection(dispatcher)
    management.dataReceived(b"summary\r\n")
    assert written(management.transport) == \
        json.dumps({"ip": "10.1.0.1", "status": "active", "session_count": 2, "draining": False}).encode() + \
        b"\r\n\r\n"


def test_management_sessions_has_a_line_per_session(dispatcher):
    management = management_connection(dispatcher)
    management.dataReceived(b"sessions\r\n")
    lines = written(management.transport).split(b"\r\n")
    assert [json.loads(line)["call_id"] for line in lines[:2]] == ["c1", "c2"]
    assert lines[2:] == [b"", b""]


def test_management_version_unknown_and_empty_lines(dispatcher):
    management = management_connection(dispatcher)
    management.dataReceived(b"VERSION\r\n\r\nreboot\r\n")
    assert written(management.transport) == __version__.encode() + b"\r\n\r\nerror\r\n\r\n"


def test_management_answers_keep_the_command_order():
    pending = PendingDispatcher()
    management = management_connection(pending)
    management.dataReceived(b"summary\r\nversion\r\n")
    (_, summary), (_, version) = pending.commands
    version.callback(["1.0"])
    assert management.transport.value() == b""
    summary.callback([])
    assert written(management.transport) == b"\r\n1.0\r\n\r\n"


@pytest.mark.parametrize("word", [b"quit", b"exit", b"QUIT"])
def test_quit_closes_after_the_earlier_answers(word):
    pending = PendingDispatcher()
    management = management_connection(pending)
    management.dataReceived(b"summary\r\n" + word + b"\r\nversion\r\n")
    assert not management.transport.disconnecting
    pending.commands[0][1].callback(['{"ip": "10.1.0.1"}'])
    assert written(management.transport) == b'{"ip": "10.1.0.1"}\r\n\r\n'
    assert management.transport.disconnecting
    assert len(pending.commands) == 1                 # nothing after quit is read


def test_quit_alone_closes_at_once(dispatcher):
    management = management_connection(dispatcher)
    management.dataReceived(b"quit\r\n")
    assert management.transport.disconnecting and management.transport.value() == b""


def test_an_overlong_management_line_is_an_error_and_the_next_command_works(dispatcher):
    management = management_connection(dispatcher)
    management.dataReceived(b"x" * 5000 + b"\r\nversion\r\n")
    assert written(management.transport) == b"error\r\n\r\n" + __version__.encode() + b"\r\n\r\n"


def test_a_tls_management_client_is_not_read_before_it_is_verified(dispatcher):
    management = ManagementProtocol(dispatcher)
    management.makeConnection(StringTransport())
    management.dataReceived(b"version\r\n")
    assert management.transport.value() == b""
