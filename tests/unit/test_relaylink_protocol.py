"""Both ends of the dispatcher <-> relay link, driven in memory:
RelayLink (the dispatcher's side) and DispatcherLink (the relay's side)."""

import json
import random

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.relaylink import RelayGone, RelayLink, RelayTimeout
from mediaproxy.protocol.framing import MAX_REQUEST_SIZE, Request, RequestReader
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.dispatchers import DispatcherLink
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool

RELAY_IP = "10.1.0.1"
DISPATCHER_IP = "10.2.0.1"
TIMEOUT, RECOVER = 5, 60


class RecordingDispatcher:
    def __init__(self):
        self.connected, self.disconnected, self.expired, self.late = [], [], [], []

    def relay_connected(self, link):
        self.connected.append(link)

    def relay_disconnected(self, link, reason):
        self.disconnected.append((link, reason))

    def session_expired(self, link, statistics):
        self.expired.append((link, statistics))

    def late_answer(self, link, command, headers, result):
        self.late.append((command, headers, result))


def track(deferred):
    outcome = []
    deferred.addBoth(lambda value: outcome.append(value) or None)
    return outcome


def relay_link(dispatcher, verify=True):
    link = RelayLink(dispatcher, TIMEOUT, RECOVER)
    link.clock = Clock()
    link.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", RELAY_IP, 40123)))
    if verify:
        link.verified = True
        link.peer_verified()
    return link


def written(transport):
    data = transport.value()
    transport.clear()
    return data


@pytest.fixture
def dispatcher():
    return RecordingDispatcher()


@pytest.fixture
def link(dispatcher):
    return relay_link(dispatcher)


# RelayLink: the dispatcher's side

def test_a_verified_relay_is_announced_under_its_ip(dispatcher, link):
    assert dispatcher.connected == [link] and link.ip == RELAY_IP


def test_commands_are_written_with_a_sequence_number(link):
    link.send_command("update", {"call_id": "c1", "cseq": "1 INVITE"})
    link.send_command("summary")
    assert written(link.transport) == (b"update 1\r\ncall_id: c1\r\ncseq: 1 INVITE\r\n\r\n"
                                       b"summary 2\r\n\r\n")


def test_replies_are_matched_by_sequence_number(link):
    first = track(link.send_command("update", {"call_id": "c1"}))
    second = track(link.send_command("update", {"call_id": "c2"}))
    link.dataReceived(b"2 10.1.0.1 40002\r\n1 ")
    assert second == ["10.1.0.1 40002"] and first == []
    link.dataReceived(b"10.1.0.1 40000\r\n")
    assert first == ["10.1.0.1 40000"]
    assert link.pending == {}


def test_an_unanswered_command_times_out_and_marks_the_relay_inactive(link):
    outcome = track(link.send_command("update", {"call_id": "c1"}))
    link.clock.advance(TIMEOUT - 0.1)
    assert outcome == [] and link.active
    link.clock.advance(0.1)
    assert isinstance(outcome[0].value, RelayTimeout)
    assert not link.active


def test_a_late_answer_goes_to_the_dispatcher_and_makes_the_relay_active_again(link):
    outcome = track(link.send_command("update", {"call_id": "c1"}))
    link.clock.advance(TIMEOUT)
    link.dataReceived(b"1 10.1.0.1 40000\r\n")
    assert len(outcome) == 1 and isinstance(outcome[0].value, RelayTimeout)
    assert link.dispatcher.late == [("update", {"call_id": "c1"}, "10.1.0.1 40000")]
    assert link.active


def test_any_line_makes_an_inactive_relay_active_and_cancels_the_disconnect(link):
    track(link.send_command("update", {"call_id": "c1"}))
    link.clock.advance(TIMEOUT)
    link.clock.advance(RECOVER / 2)
    link.dataReceived(b"ping\r\n")
    assert link.active
    link.clock.advance(RECOVER)
    assert not link.transport.disconnected


def test_a_relay_silent_for_the_recover_interval_is_disconnected(link):
    track(link.send_command("update", {"call_id": "c1"}))
    link.clock.advance(TIMEOUT)
    link.clock.advance(RECOVER - 1)
    assert not link.transport.disconnected
    link.clock.advance(1)
    assert link.transport.disconnected


def test_ping_is_answered_with_pong(link):
    link.dataReceived(b"ping\r\nping\r\n")
    assert written(link.transport) == b"pong\r\npong\r\n"


def test_expired_is_passed_to_the_dispatcher(dispatcher, link):
    statistics = {"call_id": "c1", "start_time": 5.0, "streams": []}
    link.dataReceived(b"expired " + json.dumps(statistics).encode() + b"\r\n")
    assert dispatcher.expired == [(link, statistics)]


def test_bad_lines_are_skipped_and_the_link_keeps_working(dispatcher, link):
    outcome = track(link.send_command("summary"))
    link.dataReceived(b"hello\r\nexpired {broken\r\n\xff\xfe\r\n99 unknown\r\n\r\n1 {}\r\n")
    assert outcome == ["{}"]
    assert dispatcher.expired == [] and link.active


def test_a_lost_connection_fails_pending_commands_and_later_ones(dispatcher, link):
    outcome = track(link.send_command("update", {"call_id": "c1"}))
    link.connectionLost(Failure(ConnectionLost("reset")))
    assert isinstance(outcome[0].value, RelayGone)
    assert dispatcher.disconnected and dispatcher.disconnected[0][0] is link
    assert link.clock.getDelayedCalls() == []
    later = track(link.send_command("summary"))
    assert isinstance(later[0].value, RelayGone)
    assert written(link.transport) == b"update 1\r\ncall_id: c1\r\n\r\n"


def test_an_unverified_relay_gets_no_commands(dispatcher):
    link = relay_link(dispatcher, verify=False)
    outcome = track(link.send_command("summary"))
    assert isinstance(outcome[0].value, RelayGone)
    assert link.transport.value() == b""
    link.connectionLost(Failure(ConnectionLost("handshake failed")))
    assert dispatcher.connected == [] and dispatcher.disconnected == []


def test_with_the_real_dispatcher_a_new_relay_is_asked_for_its_sessions():
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    link = relay_link(dispatcher)
    assert written(link.transport) == b"sessions 1\r\nbrief: yes\r\n\r\n"   # the list only
    link.dataReceived(b"1 []\r\n")
    outcome = track(dispatcher.proxy_request(RequestReader().feed(
        b"update\r\ntype: request\r\ncall_id: c1\r\ncseq: 1 INVITE\r\nfrom_tag: a\r\n"
        b"media: audio:10.0.0.5:4000:sendrecv\r\n\r\n")[0]))
    assert written(link.transport).startswith(b"update 2\r\n")
    link.dataReceived(b"2 10.1.0.1 40000\r\n")
    assert outcome == ["10.1.0.1 40000"]
    assert dispatcher.sessions["c1"].relay_ip == RELAY_IP


# DispatcherLink: the relay's side

class Relay:
    """What DispatcherLink needs from the relay service, over a RelayCore."""

    def __init__(self):
        self.core = RelayCore("198.51.100.1", PortPool(40000, 40100), MemoryForwarding(), now=0.0)
        self.links = []

    def dispatcher_connected(self, link):
        self.links.append(link)

    def dispatcher_disconnected(self, link):
        self.links.remove(link)

    def handle_command(self, link, command):
        return self.core.handle(command.name, command.headers, 0.0, owner=link.peer_ip)


KEEPALIVE = 10
OFFER = (b"update 7\r\ntype: request\r\ncall_id: c1\r\ncseq: 1 INVITE\r\nfrom_tag: a\r\n"
         b"media: audio:10.0.0.5:4000:sendrecv\r\n\r\n")


def dispatcher_link(relay, verify=True):
    link = DispatcherLink(relay, KEEPALIVE)
    link.clock = Clock()
    link.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", DISPATCHER_IP, 25060)))
    if verify:
        link.verified = True
        link.peer_verified()
    return link


@pytest.fixture
def relay():
    return Relay()


@pytest.fixture
def dlink(relay):
    return dispatcher_link(relay)


def test_commands_are_answered_with_their_sequence_number(relay, dlink):
    assert relay.links == [dlink]
    dlink.dataReceived(OFFER)
    assert written(dlink.transport) == b"7 198.51.100.1 40002\r\n"
    assert relay.core.sessions["c1"].owner == DISPATCHER_IP


def test_commands_split_and_batched_are_answered_in_order(dlink):
    data = OFFER + b"summary 8\r\n\r\nsessions 9\r\n\r\nremove 10\r\ncall_id: c1\r\n\r\n"
    for i in range(0, len(data), 5):
        dlink.dataReceived(data[i:i + 5])
    lines = written(dlink.transport).split(b"\r\n")
    assert [line.split(b" ", 1)[0] for line in lines if line] == [b"7", b"8", b"9", b"10"]
    assert json.loads(lines[3].split(b" ", 1)[1])["call_id"] == "c1"


def test_nothing_is_read_before_the_dispatcher_is_verified(relay):
    link = dispatcher_link(relay, verify=False)
    link.dataReceived(OFFER)
    assert link.transport.value() == b"" and relay.core.sessions == {}


def test_a_bad_command_is_answered_error_and_the_next_one_answered(dlink):
    dlink.dataReceived(b"reboot 3\r\n\r\nupdate 4\r\nbroken header\r\n\r\nsummary 5\r\n\r\n")
    lines = [line for line in written(dlink.transport).split(b"\r\n") if line]
    assert lines[:2] == [b"3 error", b"4 error"]
    assert lines[2].startswith(b"5 {")


def test_a_command_that_fails_inside_the_relay_is_answered_error_and_the_link_keeps_working(relay, dlink, caplog):
    handle = relay.handle_command
    relay.handle_command = lambda link, command: 1 / 0 if command.seq == 8 else handle(link, command)
    dlink.dataReceived(OFFER.replace(b"update 7", b"update 8") + b"summary 9\r\n\r\n")
    lines = [line for line in written(dlink.transport).split(b"\r\n") if line]
    assert lines[0] == b"8 error" and lines[1].startswith(b"9 {")
    assert not dlink.transport.disconnecting
    assert "update command 8 (call_id c1) failed" in caplog.text


def test_the_relay_pings_every_keepalive_interval(dlink):
    assert dlink.transport.value() == b""
    dlink.clock.advance(KEEPALIVE)
    assert written(dlink.transport) == b"ping\r\n"
    dlink.dataReceived(b"pong\r\n")
    dlink.clock.advance(KEEPALIVE)
    assert written(dlink.transport) == b"ping\r\n"


def test_three_unanswered_pings_drop_the_link(dlink):
    for _ in range(3):
        dlink.clock.advance(KEEPALIVE)
        assert written(dlink.transport) == b"ping\r\n"
        assert not dlink.transport.disconnected
    dlink.clock.advance(KEEPALIVE)
    assert dlink.transport.disconnected


def test_a_pong_resets_the_count(dlink):
    for _ in range(2):
        dlink.clock.advance(KEEPALIVE)
    dlink.dataReceived(b"pong\r\n")
    for _ in range(3):
        dlink.clock.advance(KEEPALIVE)
    assert not dlink.transport.disconnected
    dlink.clock.advance(KEEPALIVE)
    assert dlink.transport.disconnected


def test_a_command_is_a_sign_of_life_too(dlink):
    for _ in range(3):
        dlink.clock.advance(KEEPALIVE)
    dlink.dataReceived(b"summary 1\r\n\r\n")
    dlink.clock.advance(KEEPALIVE)
    assert not dlink.transport.disconnected


def test_losing_the_link_stops_the_pings_and_tells_the_relay(relay, dlink):
    dlink.connectionLost(Failure(ConnectionLost("reset")))
    assert relay.links == []
    assert dlink.clock.getDelayedCalls() == []


def test_expired_is_sent_as_one_line(dlink):
    dlink.send_expired({"call_id": "c1", "streams": []})
    assert written(dlink.transport) == b'expired {"call_id":"c1","streams":[]}\r\n'


# Both ends together

MAX_EXCHANGES = 20          # a request and its answer take one; more means the ends never settle

def test_a_relay_link_round_trip(relay, dlink):
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    link = relay_link(dispatcher)

    def pump():
        for _ in range(MAX_EXCHANGES):
            if not (link.transport.value() or dlink.transport.value()):
                return
            dlink.dataReceived(written(link.transport))
            link.dataReceived(written(dlink.transport))
        raise AssertionError("the two ends still talk after %d exchanges" % MAX_EXCHANGES)
    pump()
    outcome = track(dispatcher.proxy_request(RequestReader().feed(OFFER.replace(b"update 7", b"update"))[0]))
    pump()
    assert outcome == ["198.51.100.1 40002"]
    dlink.clock.advance(KEEPALIVE)
    pump()
    assert dlink.unanswered_pings == 0


class Saved:
    """An accounting back-end that keeps what it is given."""

    def __init__(self):
        self.records = []

    def save(self, statistics):
        self.records.append(statistics)


@pytest.mark.parametrize("accounting", [False, True])
def test_the_relay_sends_a_removed_sessions_statistics_only_to_a_dispatcher_that_accounts(relay, dlink,
                                                                                         accounting):
    saved = Saved()
    dispatcher = Dispatcher(Clock(), rng=random.Random(1), accounting=[saved] if accounting else [])
    link = relay_link(dispatcher)
    told, answers = [], []

    def pump():
        for _ in range(MAX_EXCHANGES):
            if not (link.transport.value() or dlink.transport.value()):
                return
            commands = written(link.transport)
            told.append(commands)
            dlink.dataReceived(commands)
            answers.append(written(dlink.transport))
            link.dataReceived(answers[-1])
        raise AssertionError("the two ends still talk after %d exchanges" % MAX_EXCHANGES)
    pump()
    for request in (OFFER.replace(b"update 7", b"update"),
                    b"update\r\ntype: reply\r\ncall_id: c1\r\ncseq: 1 INVITE\r\nfrom_tag: a\r\nto_tag: b\r\n"
                    b"media: audio:10.0.0.6:5000:sendrecv\r\n\r\n",
                    b"remove\r\ncall_id: c1\r\nfrom_tag: a\r\nto_tag: b\r\n\r\n"):
        outcome = track(dispatcher.proxy_request(RequestReader().feed(request)[0]))
        pump()
        assert outcome and outcome[0] != "error"
    remove = next(commands for commands in told if commands.startswith(b"remove"))
    assert (b"statistics: no\r\n" in remove) is not accounting
    seq = remove.split(b"\r\n")[0].split()[1]
    answer = next(line for data in answers for line in data.split(b"\r\n") if line.startswith(seq + b" "))
    assert (answer == seq + b" removed") is not accounting
    assert relay.core.sessions == {} and relay.core.ports.used_count == 0
    assert [record["call_id"] for record in saved.records] == (["c1"] if accounting else [])
    assert "c1" not in dispatcher.sessions and "c1" not in dispatcher.removing


def test_every_request_the_dispatcher_accepts_is_answered_by_the_relay(relay, dlink):
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    link = relay_link(dispatcher)
    link.dataReceived(b"1 []\r\n")
    written(link.transport)
    head = (b"update\r\ntype: request\r\ncall_id: c1\r\ncseq: 1 INVITE\r\nfrom_tag: a\r\n"
            b"media: audio:10.0.0.5:4000:sendrecv\r\n")
    # pad with long headers to exactly the proxy side's request size limit (line lengths, without \r\n)
    size = sum(len(line) for line in head.split(b"\r\n"))
    pads = []
    while size < MAX_REQUEST_SIZE:
        name = b"x_%d: " % len(pads)
        value = b"x" * min(10000, MAX_REQUEST_SIZE - size - len(name))
        pads.append(name + value + b"\r\n")
        size += len(name) + len(value)
    assert size == MAX_REQUEST_SIZE
    [request] = RequestReader().feed(head + b"".join(pads) + b"\r\n")
    assert isinstance(request, Request)                                   # the proxy side accepts it
    outcome = track(dispatcher.proxy_request(request))
    dlink.dataReceived(written(link.transport))
    link.dataReceived(written(dlink.transport))
    link.clock.advance(TIMEOUT)
    assert outcome and outcome[0] != "error"
    assert link.active
