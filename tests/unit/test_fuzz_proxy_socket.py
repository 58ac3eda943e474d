"""Fuzzing the proxy module's socket (SPEC §2): ProxyProtocol over the real
Dispatcher, with two relays in memory (RelayCore behind DispatcherLink,
joined by RelayLink) that answer when the test lets their bytes through.

Whatever the proxy sends, each complete request gets exactly one reply line
SPEC allows, in request order; nothing reaches the log as a traceback; and
the sessions the input did not name are left as they were, in the
dispatcher's table and on the relays.
"""

import dataclasses
import random

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.frontends import ProxyFactory
from mediaproxy.dispatcher.relaylink import RelayLink
from mediaproxy.protocol.framing import MAX_HEADERS, MAX_LINE_LENGTH, MAX_REQUEST_SIZE, FramingError, RequestReader
from mediaproxy.protocol.proxy import RequestError, parse_remove, parse_update
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.dispatchers import DispatcherLink
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.statistics import session_statistics
from tests.support.fuzzing import (FUZZ_SETTINGS, HOSTILE_PIECES, RESYNC, in_some_form, request_at_limits,
                                   request_bytes, split, updates, watched_for_tracebacks)

RELAY_IPS = ["10.1.0.1", "10.1.0.2"]
DISPATCHER_IP = "10.2.0.1"
PORT_RANGE = (40000, 50000)
TIMEOUT = 5
# Longer than any test runs on its Clock: the relays' keepalive and the dispatcher's
# disconnect of a silent relay are not what these tests are about.
KEEPALIVE = RECOVER = 100000
KEPT_CALLS = ["kept-1", "kept-2", "kept-3"]      # set up first, never named by the fuzzed input
CALL_IDS = ["c1", "c2", "c3"]                    # what the fuzzed input names
FINAL_UPDATE = (b"update\r\ntype: request\r\ncall_id: final\r\ncseq: 1 INVITE\r\nfrom_tag: alice\r\n"
                b"media: audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv\r\n\r\n")


class MemoryRelay:
    """A relay in memory: RelayCore behind DispatcherLink, joined to the dispatcher by a
    RelayLink. Bytes cross only when `carry` is called, so the test decides who answers when."""

    def __init__(self, ip, dispatcher, clock):
        self.ip = ip
        self.clock = clock
        self.core = RelayCore(ip, PortPool(*PORT_RANGE), MemoryForwarding(), now=0.0)
        self.told = []      # every command the relay received: (name, headers)
        self.relay_end = DispatcherLink(self, KEEPALIVE)
        self.relay_end.clock = clock
        self.relay_end.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", DISPATCHER_IP, 25060)))
        self.relay_end.verified = True
        self.relay_end.peer_verified()
        self.dispatcher_end = RelayLink(dispatcher, TIMEOUT, RECOVER)
        self.dispatcher_end.clock = clock
        self.dispatcher_end.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", ip, 40123)))
        self.dispatcher_end.verified = True
        self.dispatcher_end.peer_verified()

    # What DispatcherLink needs of the relay service.

    def dispatcher_connected(self, link):
        pass

    def dispatcher_disconnected(self, link):
        pass

    def handle_command(self, link, command):
        self.told.append((command.name, dict(command.headers)))
        return self.core.handle(command.name, command.headers, self.clock.seconds(), owner=link.peer_ip)

    def carry(self):
        """Deliver what each end wrote to the other, until both are quiet."""
        for _ in range(100):
            to_relay = self.dispatcher_end.transport.value()
            to_dispatcher = self.relay_end.transport.value()
            if not to_relay and not to_dispatcher:
                return
            self.dispatcher_end.transport.clear()
            self.relay_end.transport.clear()
            self.relay_end.dataReceived(to_relay)
            self.dispatcher_end.dataReceived(to_dispatcher)
        raise AssertionError("the relay link never went quiet")

    def statistics(self, call_id):
        session = self.core.sessions.get(call_id)
        return None if session is None else session_statistics(session, self.ip, 0.0)


class World:
    """The dispatcher, its relays, and a proxy connection."""

    def __init__(self):
        self.clock = Clock()
        self.dispatcher = Dispatcher(self.clock, rng=random.Random(1))
        self.relays = [MemoryRelay(ip, self.dispatcher, self.clock) for ip in RELAY_IPS]
        self.carry_all()                   # the dispatcher's `sessions` on connect
        self.proxy = ProxyFactory(self.dispatcher).buildProtocol(None)
        self.proxy.makeConnection(StringTransport())

    def carry_all(self):
        for relay in self.relays:
            relay.carry()

    def settle(self, requests: int, silent=None):
        """Let the relays answer (all but `silent`) and time out what they do not: a bounded
        number of relay timeouts, enough for `requests` requests queued on one call."""
        for _ in range(requests + 2):
            for relay in self.relays:
                if relay is not silent:
                    relay.carry()
            self.clock.advance(TIMEOUT)
        self.carry_all()                   # the silent relay's late answers, and what they cause
        self.clock.advance(TIMEOUT)
        self.carry_all()

    def replies(self) -> list:
        data = self.proxy.transport.value()
        self.proxy.transport.clear()
        assert data == b"" or data.endswith(b"\r\n")
        lines = data.split(b"\r\n")[:-1]
        assert all(b"\n" not in line and b"\r" not in line for line in lines)
        return [line.decode() for line in lines]

    def state_of(self, call_id):
        """What the dispatcher and the relays hold of a call."""
        record = self.dispatcher.sessions.get(call_id)
        return (dataclasses.asdict(record) if record is not None else None,
                [relay.statistics(call_id) for relay in self.relays])


@st.composite
def removes(draw, call_ids=CALL_IDS):
    headers = [("call_id", draw(st.sampled_from(call_ids))), ("from_tag", "alice"), ("to_tag", "bob")]
    return request_bytes("remove", draw(st.permutations(headers))), "remove"


def well_formed(call_ids=CALL_IDS, max_size=6):
    update = updates(call_ids, RELAY_IPS)
    return st.lists(st.one_of(update, update, removes(call_ids)), min_size=1, max_size=max_size)


def allowed_reply(line: str, expected) -> bool:
    """Whether `line` is a reply SPEC §2 allows to a request of the kind `expected`: "error"
    (malformed), "remove", or the number of streams of an update (None without `media`)."""
    if line == "error":
        return True
    if expected == "error":
        return False
    if expected == "remove":
        return line == "removed"
    ip, *ports = line.split(" ")
    return (ip in RELAY_IPS and all(port.isascii() and port.isdigit() for port in ports)
            and all(int(port) == 0 or PORT_RANGE[0] <= int(port) < PORT_RANGE[1] for port in ports)
            and (expected is None or len(ports) == expected))


def expected_kinds(data: bytes) -> list:
    """The kind of each complete request in `data`, as SPEC reads it: "error" for what is
    malformed, "remove", or an update's number of streams."""
    kinds = []
    for request in RequestReader().feed(data):
        if isinstance(request, FramingError):
            kinds.append("error")
            continue
        command = request.command.lower()
        try:
            if command == "update":
                update = parse_update(request.headers)
                kinds.append(None if update.media is None else len(update.media))
            elif command == "remove":
                parse_remove(request.headers)
                kinds.append("remove")
            else:
                kinds.append("error")
        except RequestError:
            kinds.append("error")
    return kinds


def kept_sessions(world) -> dict:
    """Set up the calls the fuzzed input will not name: an offer and its answer each."""
    for call_id in KEPT_CALLS:
        for kind, tag in (("request", "alice"), ("reply", "bob")):
            world.proxy.dataReceived(request_bytes("update", [
                ("type", kind), ("call_id", call_id), ("cseq", "1 INVITE"), ("from_tag", "alice"),
                ("to_tag", tag if kind == "reply" else ""), ("media", "audio:10.0.0.5:4000:sendrecv")]))
    world.settle(2)
    replies = world.replies()
    assert len(replies) == 2 * len(KEPT_CALLS) and all(allowed_reply(line, 1) for line in replies)
    return {call_id: world.state_of(call_id) for call_id in KEPT_CALLS}


def assert_no_relay_heard_of_kept_calls(world, data: bytes, told_before: list):
    """No relay was told anything of the kept calls `data` did not name."""
    for relay, count in zip(world.relays, told_before):
        for name, headers in relay.told[count:]:
            call_id = headers.get("call_id")
            assert call_id not in KEPT_CALLS or call_id.encode() in data, (name, headers)


@st.composite
def proxy_input(draw):
    """What a proxy may send: well-formed requests, the same mutated, or garbage, and after it
    the bytes that end any open request and a well-formed request that must work."""
    requests = draw(well_formed())
    form, data = draw(in_some_form(b"".join(request for request, _ in requests)))
    return form, requests, data + RESYNC + FINAL_UPDATE


@FUZZ_SETTINGS
@given(proxy_input(), st.data())
def test_every_request_gets_one_reply_of_spec_in_order_and_other_sessions_stay(case, draw):
    form, requests, data = case
    world = World()
    kept = kept_sessions(world)
    told_before = [len(relay.told) for relay in world.relays]
    silent = draw.draw(st.sampled_from([None] + world.relays), label="silent relay")
    with watched_for_tracebacks() as tracebacks:
        for chunk in draw.draw(split(data), label="chunks"):
            world.proxy.dataReceived(chunk)
            for relay in world.relays:
                if relay is not silent and draw.draw(st.booleans(), label="carry"):
                    relay.carry()
        kinds = expected_kinds(data)
        world.settle(len(kinds), silent)
    assert not tracebacks.records, str(tracebacks)
    replies = world.replies()
    event("form: %s" % form)
    event("relay answers among the replies: %s" % min(sum(line[:1].isdigit() for line in replies), 4))
    assert len(replies) == len(kinds)
    for line, kind in zip(replies, kinds):
        assert allowed_reply(line, kind), (line, kind)
    if form == "well-formed":
        assert kinds[:-1] == [kind for _, kind in requests]
    assert replies[-1] != "error" and allowed_reply(replies[-1], 2)     # FINAL_UPDATE: the connection still works
    assert_no_relay_heard_of_kept_calls(world, data, told_before)
    for call_id, state in kept.items():
        if call_id.encode() not in data:
            assert world.state_of(call_id) == state
    assert not world.proxy.transport.disconnecting


@FUZZ_SETTINGS
@given(st.lists(st.sampled_from(HOSTILE_PIECES + [b"update\r\n", b"remove\r\n", b"call_id: c1\r\n"]),
                max_size=20).map(b"".join))
def test_hostile_pieces_alone_get_error_or_nothing(data):
    world = World()
    with watched_for_tracebacks() as tracebacks:
        world.proxy.dataReceived(data + RESYNC)
        kinds = expected_kinds(data + RESYNC)
        world.settle(len(kinds))
    assert not tracebacks.records, str(tracebacks)
    replies = world.replies()
    assert len(replies) == len(kinds)
    assert all(allowed_reply(line, kind) for line, kind in zip(replies, kinds))


# The limits (README, "Protocol limits"): what is over one is answered `error`, once, and the
# connection keeps working; what is at it is taken.

LIMITS_UPDATE = [("type", "request"), ("call_id", "limits"), ("cseq", "1 INVITE"), ("from_tag", "alice"),
                 ("media", "audio:10.0.0.5:4000:sendrecv")]


def update_of_size(**limits) -> bytes:
    return request_at_limits("update", LIMITS_UPDATE, **limits)


def replies_to(world, *requests) -> list:
    for request in requests:
        world.proxy.dataReceived(request)
    world.settle(len(requests))
    return world.replies()


def is_relay_answer(line: str) -> bool:
    return allowed_reply(line, 1) and line != "error"


@pytest.mark.parametrize("at_limit, over_limit", [
    (update_of_size(line=MAX_LINE_LENGTH), update_of_size(line=MAX_LINE_LENGTH + 1)),
    (update_of_size(header_count=MAX_HEADERS), update_of_size(header_count=MAX_HEADERS + 1)),
    (update_of_size(size=MAX_REQUEST_SIZE), update_of_size(size=MAX_REQUEST_SIZE + 1)),
], ids=["line length", "header count", "request size"])
def test_a_request_over_a_limit_gets_one_error_and_the_connection_keeps_working(at_limit, over_limit):
    world = World()
    [over, after] = replies_to(world, over_limit, at_limit)
    assert over == "error" and is_relay_answer(after)
    assert not world.proxy.transport.disconnecting


def test_an_endless_line_is_cut_off_at_the_limit_and_answered_once_when_its_request_ends():
    world = World()
    world.proxy.dataReceived(b"update\r\ntype: request\r\nuser_agent: ")
    for _ in range(20):                                    # 20 times the limit, never buffered whole
        world.proxy.dataReceived(b"x" * MAX_LINE_LENGTH)
    assert world.replies() == []
    [over, after] = replies_to(world, b"\r\n\r\n", update_of_size())
    assert over == "error" and is_relay_answer(after)
