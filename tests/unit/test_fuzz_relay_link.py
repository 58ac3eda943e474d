"""Fuzzing both ends of the dispatcher <-> relay link (SPEC §3).

The relay's end (DispatcherLink over a real RelayCore) answers every command
that has a sequence number with one `SEQ result` line, in order, whatever
came before it; the sessions a command did not name keep their statistics.
The dispatcher's end (RelayLink with the real Dispatcher) takes any line a
relay may send: nothing escapes, every pending command is answered or times
out, every proxy request waiting on the relay gets its one reply line.
"""

import dataclasses
import json
import random

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mediaproxy.dispatcher.core import Dispatcher, SessionRecord
from mediaproxy.dispatcher.dialogs import AUTO, DialogError, end_dialog_request
from mediaproxy.dispatcher.frontends import ProxyFactory
from mediaproxy.dispatcher.relaylink import MAX_RELAY_LINE, RelayError, RelayLink
from mediaproxy.protocol.framing import (MAX_HEADERS, MAX_LINE_LENGTH, MAX_REQUEST_SIZE, FramingError, Line,
                                         LineSplitter, RequestReader)
from mediaproxy.protocol.proxy import RequestError, parse_update
from mediaproxy.protocol.relaylink import PONG, LinkError, parse_command
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.dispatchers import DispatcherLink
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.statistics import session_statistics
from tests.support.fuzzing import (DEEP_JSON, FUZZ_SETTINGS, RESYNC, STREAMS, garbage, in_some_form, mutated,
                                   request_at_limits, request_bytes, split, updates, watched_for_tracebacks)

RELAY_IP = "10.1.0.1"
DISPATCHER_IP = "10.2.0.1"
TIMEOUT = 5
KEEPALIVE = RECOVER = 100000        # neither is what these tests are about
KEPT_CALLS = ["kept-1", "kept-2", "kept-3"]
CALL_IDS = ["c1", "c2", "c3"]


def written(transport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def track(deferred) -> list:
    outcome = []
    deferred.addBoth(outcome.append)
    return outcome


# The relay's end: DispatcherLink

class Relay:
    """What DispatcherLink needs of the relay service, over a RelayCore."""

    def __init__(self):
        self.clock = Clock()
        self.core = RelayCore("198.51.100.1", PortPool(40000, 50000), MemoryForwarding(), now=0.0)
        self.link = DispatcherLink(self, KEEPALIVE)
        self.link.clock = self.clock
        self.link.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", DISPATCHER_IP, 25060)))
        self.link.verified = True
        self.link.peer_verified()

    def dispatcher_connected(self, link):
        pass

    def dispatcher_disconnected(self, link):
        pass

    def handle_command(self, link, command):
        return self.core.handle(command.name, command.headers, self.clock.seconds(), owner=link.peer_ip)

    def statistics(self, call_id):
        session = self.core.sessions.get(call_id)
        return None if session is None else session_statistics(session, "198.51.100.1", 0.0)

    def answers(self) -> list:
        data = written(self.link.transport)
        assert data == b"" or data.endswith(b"\r\n")
        return [line.decode() for line in data.split(b"\r\n")[:-1]]


def command_bytes(request: bytes, seq: int) -> bytes:
    """A proxy request as the dispatcher passes it on: its command line gets a sequence number."""
    command, rest = request.split(b"\r\n", 1)
    return b"%s %d\r\n%s" % (command.lower(), seq, rest)


@st.composite
def commands(draw):
    """Well-formed commands of the dispatcher with increasing sequence numbers:
    [(bytes, kind)], kind being the update's number of streams (or None), or the command name."""
    result, seq = [], draw(st.integers(0, 2 ** 40))
    for _ in range(draw(st.integers(1, 6))):
        seq += draw(st.integers(1, 3))
        name = draw(st.sampled_from(["update", "update", "remove", "summary", "sessions"]))
        if name == "update":
            request, streams = draw(updates(CALL_IDS))
            result.append((command_bytes(request, seq), streams))
        elif name == "remove":
            call_id = draw(st.sampled_from(CALL_IDS))
            result.append((request_bytes("remove %d" % seq, [("call_id", call_id), ("from_tag", "alice")]), name))
        else:
            headers = [("brief", "yes")] if name == "sessions" and draw(st.booleans()) else []
            result.append((request_bytes("%s %d" % (name, seq), headers), name))
    return result


def expected_answers(data: bytes) -> list:
    """(sequence number, kind) of each command in `data` that has a sequence number, in order;
    kind is "error" for a malformed command, else as in `commands`."""
    reader = RequestReader(single_lines=[PONG], max_line_length=2 * MAX_LINE_LENGTH,
                           max_request_size=2 * MAX_REQUEST_SIZE)
    expected = []
    for request in reader.feed(data):
        if isinstance(request, Line):
            continue                                   # a pong
        name, space, seq = (request.command or "").partition(" ")
        if not (space and seq.strip().isascii() and seq.strip().isdigit()):
            continue
        seq = int(seq)
        if isinstance(request, FramingError):
            expected.append((seq, "error"))
            continue
        try:
            command = parse_command(request)
        except LinkError:
            expected.append((seq, "error"))
            continue
        if command.name == "update":
            try:
                update = parse_update(command.headers)
            except RequestError:
                expected.append((seq, "error"))
                continue
            expected.append((seq, None if update.media is None else len(update.media)))
        else:
            expected.append((seq, command.name))
    return expected


def allowed_answer(result: str, kind) -> bool:
    """Whether SPEC §3 allows `result` for a command of `kind` (see `commands`)."""
    if result == "error":
        return kind in ("error", "remove") or not isinstance(kind, str)
    if kind == "error":
        return False
    if kind in ("summary", "sessions", "remove"):
        value = json.loads(result)
        return {"summary": dict, "sessions": list, "remove": dict}[kind] is type(value) and \
            (kind != "remove" or isinstance(value.get("call_id"), str))
    if result == "halting":
        return True
    ip, *ports = result.split(" ")
    return ip == "198.51.100.1" and all(port.isdigit() for port in ports) and (kind is None or len(ports) == kind)


def set_up_kept_sessions(relay) -> dict:
    seq = 0
    for call_id in KEPT_CALLS:
        for kind, tag in (("request", ""), ("reply", "bob")):
            seq += 1
            relay.link.dataReceived(request_bytes("update %d" % seq, [
                ("type", kind), ("call_id", call_id), ("cseq", "1 INVITE"), ("from_tag", "alice"),
                ("to_tag", tag), ("media", "audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv")]))
    assert all(allowed_answer(line.split(" ", 1)[1], 2) for line in relay.answers())
    return {call_id: relay.statistics(call_id) for call_id in KEPT_CALLS}


FINAL = b"summary 4294967296\r\n\r\n"


@st.composite
def dispatcher_input(draw):
    requests = draw(commands())
    form, data = draw(in_some_form(b"".join(request for request, _ in requests)))
    return form, requests, data + RESYNC + FINAL


@FUZZ_SETTINGS
@given(dispatcher_input(), st.data())
def test_the_relay_answers_every_numbered_command_once_in_order(case, draw):
    form, requests, data = case
    relay = Relay()
    kept = set_up_kept_sessions(relay)
    with watched_for_tracebacks() as tracebacks:
        for chunk in draw.draw(split(data), label="chunks"):
            relay.link.dataReceived(chunk)
    assert not tracebacks.records, str(tracebacks)
    expected = expected_answers(data)
    answers = relay.answers()
    event("form: %s" % form)
    event("answers: %d" % min(len(answers), 4))
    assert [int(line.split(" ", 1)[0]) for line in answers] == [seq for seq, _ in expected]
    for line, (_, kind) in zip(answers, expected):
        assert allowed_answer(line.split(" ", 1)[1], kind), (line, kind)
    if form == "well-formed":
        assert [kind for _, kind in expected[:-1]] == [kind for _, kind in requests]
    assert answers[-1].startswith("4294967296 {")             # garbage did not break what follows
    for call_id, statistics in kept.items():
        if call_id.encode() not in data:
            assert relay.statistics(call_id) == statistics
    assert not relay.link.transport.disconnecting


# The dispatcher's end: RelayLink

class Accounting:
    """An accounting back-end that keeps what it is given (and makes the dispatcher decode it)."""

    def __init__(self):
        self.saved = []

    def save(self, statistics):
        self.saved.append(statistics)


class Dialogs:
    """Ends dialogs the way DialogTerminator does, up to the datagram it would send."""

    def __init__(self):
        self.ended = []

    def end_dialog(self, dialog_id, call_id):
        try:
            self.ended.append(end_dialog_request(dialog_id, AUTO, len(self.ended)))
        except DialogError:
            pass


class DispatcherSide:
    """The real Dispatcher with one relay link, a proxy connection, and sessions it keeps on
    another relay (restored, that relay not connected) that no relay line may touch."""

    def __init__(self, accounting=()):
        self.clock = Clock()
        self.dispatcher = Dispatcher(self.clock, rng=random.Random(1), accounting=accounting, dialogs=Dialogs())
        self.dispatcher.restore([SessionRecord(call_id, "10.1.0.9", 0.0, "17:42", "alice", "bob")
                                 for call_id in KEPT_CALLS])
        self.link = RelayLink(self.dispatcher, TIMEOUT, RECOVER)
        self.link.clock = self.clock
        self.link.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", RELAY_IP, 40123)))
        self.link.verified = True
        self.link.peer_verified()          # the dispatcher asks `sessions 1`
        self.proxy = ProxyFactory(self.dispatcher).buildProtocol(None)
        self.proxy.makeConnection(StringTransport())

    def kept(self):
        return {call_id: dataclasses.asdict(self.dispatcher.sessions[call_id]) for call_id in KEPT_CALLS
                if call_id in self.dispatcher.sessions}

    def proxy_replies(self) -> list:
        data = written(self.proxy.transport)
        assert data == b"" or data.endswith(b"\r\n")
        return data.split(b"\r\n")[:-1]


# What a relay may answer a command with, right or wrong for the command (the first command is
# the `sessions` the dispatcher asks when the relay connects).
RESULTS = ["10.1.0.1 40000", "10.1.0.1 40000 40002", "10.1.0.1", "error", "halting", "removed", "{}", "[]",
           '{"call_id": "c1", "start_time": 1.0, "streams": []}', "null", "{", DEEP_JSON.decode(),
           "10.1.0.1\r40000", "\x00", "ping", '[{"call_id": "c1", "from_tag": "alice"}]',
           '[{"call_id": "c2", "dialog_id": "1:2"}]', '[{"call_id": "c2"}, 5, "x"]', '[{"no_call_id": 1}]',
           '[{"call_id": "c1", "dialog_id": 5}]', '[{"call_id": ["c3"]}]']

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=6)),
                           lambda children: st.one_of(st.lists(children, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), children, max_size=3)),
                           max_leaves=6)

stream_statistics = st.fixed_dictionaries({"media_type": st.sampled_from(["audio", "video"]),
                                           "status": st.sampled_from(["closed", "unselected ICE candidate",
                                                                      "no-traffic timeout"])})


@st.composite
def expired_lines(draw):
    statistics = {"call_id": draw(st.sampled_from(CALL_IDS)),
                  "start_time": draw(st.one_of(st.none(), st.floats(0, 100), json_values)),
                  "streams": draw(st.one_of(st.lists(stream_statistics, max_size=3), json_values))}
    if draw(st.booleans()):
        statistics["dialog_id"] = draw(st.one_of(st.sampled_from(["17:42", ""]), json_values))
    return b"expired " + json.dumps(statistics).encode() + b"\r\n"


def relay_lines(seqs):
    reply = st.builds(lambda seq, result: b"%d %s\r\n" % (seq, result.encode()),
                      st.one_of(st.sampled_from(seqs), st.integers(0, 99)), st.sampled_from(RESULTS))
    return st.lists(st.one_of(reply, reply, expired_lines(), st.just(b"ping\r\n"), st.just(b"\r\n")),
                    max_size=8).map(b"".join)


PROXY_REQUESTS = b"".join(
    request_bytes("update", [("type", "request"), ("call_id", call_id), ("cseq", "1 INVITE"),
                             ("from_tag", "alice"), ("media", STREAMS[0])])
    for call_id in CALL_IDS) + request_bytes("remove", [("call_id", "c1")])


@FUZZ_SETTINGS
@given(st.data())
def test_the_dispatcher_takes_any_relay_line_and_every_command_is_answered_or_times_out(draw):
    side = DispatcherSide()
    if draw.draw(st.booleans(), label="sessions answered first"):
        side.link.dataReceived(b"1 %s\r\n" % draw.draw(st.sampled_from(RESULTS), label="sessions").encode())
    side.proxy.dataReceived(PROXY_REQUESTS)           # three updates to the relay, a remove waiting for c1
    summary = track(side.link.send_command("summary"))
    kept = side.kept()
    seqs = list(side.link.pending)
    written(side.link.transport)
    lines = draw.draw(relay_lines(seqs), label="relay lines")
    form = draw.draw(st.sampled_from(["well-formed", "mutated", "garbage"]), label="form")
    data = {"well-formed": lines, "mutated": draw.draw(mutated(lines), label="mutated"),
            "garbage": draw.draw(garbage, label="garbage")}[form]
    with watched_for_tracebacks(collect_garbage=True) as tracebacks:
        for chunk in draw.draw(split(data), label="chunks"):
            side.link.dataReceived(chunk)
        pings = sum(line == "ping" for line in LineSplitter(MAX_RELAY_LINE).feed(data))
        assert written(side.link.transport).count(b"pong\r\n") == pings
        for _ in range(6):                                # each queued request of a call may time out
            side.clock.advance(TIMEOUT)
            written(side.link.transport)
    assert not tracebacks.records, str(tracebacks)
    event("form: %s" % form)
    assert len(summary) == 1 and (isinstance(summary[0], str) or summary[0].check(RelayError))
    assert side.link.pending == {}
    assert len(side.proxy_replies()) == 4             # each proxy request, one line: no hang
    assert side.dispatcher._busy_calls == {}
    kept_after = side.kept()
    for call_id, record in kept.items():
        if call_id.encode() not in data:
            assert kept_after.get(call_id) == record


def test_an_answer_with_a_cr_inside_is_skipped_and_the_proxy_gets_error_when_it_times_out():
    """Found by fuzzing: the proxy's reply line could not be written, and every later reply on
    that connection waited for ever."""
    side = DispatcherSide()
    side.proxy.dataReceived(PROXY_REQUESTS)
    first_update = min(seq for seq in side.link.pending if seq != 1)
    with watched_for_tracebacks() as tracebacks:
        side.link.dataReceived(b"%d 10.1.0.1\r40000\r\n" % first_update)
        side.clock.advance(TIMEOUT)
    assert not tracebacks.records, str(tracebacks)
    assert side.proxy_replies() == [b"error"] * 4


def test_a_remove_answered_with_json_too_deep_still_gets_a_reply():
    """Found by fuzzing: the remove's statistics were decoded catching only ValueError; JSON
    nested too deep raised RecursionError, and the proxy's connection then waited for ever.
    (The proxy now has its answer before the relay's: the bad answer is one log line.)"""
    side = DispatcherSide(accounting=[Accounting()])
    side.link.dataReceived(b'1 [{"call_id": "c1", "from_tag": "alice"}]\r\n')     # reconcile: c1 adopted
    side.proxy.dataReceived(request_bytes("remove", [("call_id", "c1")]))
    remove_seq = max(side.link.pending)
    with watched_for_tracebacks() as tracebacks:
        side.link.dataReceived(b"%d {\"a\": %s\r\n" % (remove_seq, DEEP_JSON))
        side.clock.advance(TIMEOUT)
    assert side.proxy_replies() == [b"removed"]
    assert not tracebacks.records, str(tracebacks)


def test_a_sessions_answer_nested_too_deep_is_a_warning_not_a_traceback():
    """Found by fuzzing: Dispatcher._reconcile caught ValueError, not RecursionError, and its
    Deferred failed unhandled (a traceback in the log)."""
    side = DispatcherSide()
    with watched_for_tracebacks(collect_garbage=True) as tracebacks:
        side.link.dataReceived(b"1 " + DEEP_JSON + b"\r\n")
    assert not tracebacks.records, str(tracebacks)


def test_a_session_listed_with_a_dialog_id_that_is_not_text_expires_without_an_exception():
    """Found by fuzzing: a session adopted with the dialog_id a relay listed (here a number) made
    ending its dialog raise AttributeError out of RelayLink.dataReceived when it expired."""
    side = DispatcherSide()
    side.link.dataReceived(b'1 [{"call_id": "c1", "dialog_id": 5}]\r\n')
    with watched_for_tracebacks() as tracebacks:
        side.link.dataReceived(b'expired {"call_id": "c1", "start_time": 0.0, "streams": []}\r\n')
    assert not tracebacks.records, str(tracebacks)
    assert "c1" not in side.dispatcher.sessions


# The limits (README, "Protocol limits"). The relay takes twice the proxy's limits on line length
# and request size (whatever the dispatcher accepted from the proxy fits), and the same header count.

LIMITS_UPDATE = [("type", "request"), ("call_id", "limits"), ("cseq", "1 INVITE"), ("from_tag", "alice"),
                 ("media", STREAMS[0])]


def command_of_size(seq, **limits) -> bytes:
    return request_at_limits("update %d" % seq, LIMITS_UPDATE, **limits)


@pytest.mark.parametrize("at_limit, over_limit", [
    (command_of_size(2, line=2 * MAX_LINE_LENGTH), command_of_size(1, line=2 * MAX_LINE_LENGTH + 1)),
    (command_of_size(2, header_count=MAX_HEADERS), command_of_size(1, header_count=MAX_HEADERS + 1)),
    (command_of_size(2, size=2 * MAX_REQUEST_SIZE), command_of_size(1, size=2 * MAX_REQUEST_SIZE + 1)),
], ids=["line length", "header count", "request size"])
def test_a_command_over_a_limit_is_answered_error_and_the_link_keeps_working(at_limit, over_limit):
    relay = Relay()
    relay.link.dataReceived(over_limit + at_limit)
    over, after = relay.answers()
    assert over == "1 error"
    assert after.startswith("2 ") and allowed_answer(after[2:], 1) and after != "2 error"
    assert not relay.link.transport.disconnecting


def test_a_relay_line_over_the_limit_is_skipped_and_the_next_one_is_read():
    side = DispatcherSide()
    written(side.link.transport)
    answer = b"1 [" + b" " * (MAX_RELAY_LINE - 4) + b"]"             # at the limit: read
    assert len(answer) == MAX_RELAY_LINE
    side.link.dataReceived(b"1 [" + b" " * MAX_RELAY_LINE + b"]\r\n")    # over it: skipped
    assert 1 in side.link.pending
    side.link.dataReceived(answer + b"\r\n")
    assert side.link.pending == {}
    assert not side.link.transport.disconnecting
