"""Property tests: the codecs and the relay core take anything a peer may
send without raising anything but their own errors, without buffering past
their limits, and without leaking ports.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaproxy.protocol.framing import FramingError, Line, LineSplitter, Request, RequestReader
from mediaproxy.protocol.media import MediaError, parse_media, parse_signaling_ip
from mediaproxy.protocol.proxy import RequestError, parse_update
from mediaproxy.protocol.relaylink import LinkError, parse_relay_line
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool
from tests.support.fuzzing import (DEEP_JSON, FUZZ_EXAMPLES, FUZZ_SETTINGS, media_values, mutated,
                                   signaling_values, some_ip_addresses)

SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 16

wire_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"b", b":", b" ", b"ping", b"x" * 9,
                                       b"\xff", b"\xc3\xa9", b"update", b"call_id: c"]),
                      max_size=60).map(b"".join)


@st.composite
def chunked(draw, data_strategy=wire_bytes):
    data = draw(data_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    chunks, start = [], 0
    for cut in cuts + [len(data)]:
        chunks.append(data[start:cut])
        start = cut
    return data, chunks


# Framing

@SETTINGS
@given(chunked())
def test_line_splitter_takes_any_bytes_split_anywhere(case):
    data, chunks = case
    splitter = LineSplitter(max_line_length=LIMIT)
    lines = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
        assert len(splitter._buffer) <= LIMIT + 1     # the line and its \r
    for line in lines:
        assert isinstance(line, FramingError) or (isinstance(line, str) and "\n" not in line
                                                  and len(line) <= LIMIT)
    assert [str(line) for line in lines] == [str(line) for line in LineSplitter(LIMIT).feed(data)]


@SETTINGS
@given(chunked())
def test_request_reader_takes_any_bytes_split_anywhere(case):
    data, chunks = case
    reader = RequestReader(single_lines=["ping"], max_line_length=LIMIT, max_headers=3, max_request_size=40)
    events = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
        assert len(reader._splitter._buffer) <= LIMIT + 1     # the line and its \r
        assert len(reader._headers) <= 3
    for event in events:
        assert isinstance(event, (Request, Line, FramingError))
        if isinstance(event, Request):
            assert len(event.headers) <= 3
            assert all(name and name == name.strip().lower() for name in event.headers)
    whole = RequestReader(single_lines=["ping"], max_line_length=LIMIT, max_headers=3, max_request_size=40)
    assert [repr(e) for e in events] == [repr(e) for e in whole.feed(data)]


# The proxy module's values

IPS = ["10.0.0.5", "0.0.0.0", "2001:db8::1", "::", "::ffff:10.0.0.1", "300.1.1.1", "host", ""]
DIRECTIONS = ["sendrecv", "sendonly", "recvonly", "inactive", "SENDRECV", "sideways", ""]

stream_text = st.builds(
    lambda media_type, ip, port, direction, params: "%s:%s:%s:%s%s" % (media_type, ip, port, direction, params),
    st.sampled_from(["audio", "video", "image", "text", "x-y", "", "a b"]),
    st.sampled_from(IPS),
    st.one_of(st.integers(0, 70000).map(str), st.sampled_from(["", "-1", "x", "40 00"])),
    st.sampled_from(DIRECTIONS),
    st.sampled_from(["", ":ice=yes", ":ice=no", ":ICE=YES:x=1", ":=", ":bad key=1", ":"]))

media_text = st.one_of(
    st.lists(stream_text, min_size=1, max_size=4).map(",".join),
    st.text(max_size=80),
    st.text(alphabet=":,=.0123456789abcdefsnd ", max_size=80),
)


@SETTINGS
@given(media_text)
def test_parse_media_raises_only_media_errors(text):
    try:
        streams = parse_media(text)
    except MediaError:
        return
    for stream in streams:
        assert 0 <= stream.port <= 65535
        assert stream.direction in ("sendrecv", "sendonly", "recvonly", "inactive")


@SETTINGS
@given(st.one_of(st.text(max_size=60), st.sampled_from(IPS).flatmap(
    lambda ip: st.sampled_from([ip, ip + "_10.0.0.1", '{"signaling_ip": "%s"}' % ip, "{" + ip]))))
def test_parse_signaling_ip_raises_only_media_errors(text):
    try:
        parse_signaling_ip(text)
    except MediaError:
        pass


@FUZZ_SETTINGS
@given(media_values())
def test_a_generated_media_value_parses_to_what_was_generated(case):
    text, streams = case
    assert parse_media(text) == streams


@FUZZ_SETTINGS
@given(signaling_values())
def test_a_generated_signaling_ip_parses_to_what_was_generated(case):
    text, signaling = case
    assert parse_signaling_ip(text) == signaling


def _mutated_text(case_strategy):
    """A generated value, mutated at the byte level, back as text (what a header value can be)."""
    return case_strategy.flatmap(lambda case: mutated(case[0].encode())).map(
        lambda data: data.decode("utf-8", "replace"))


@FUZZ_SETTINGS
@given(_mutated_text(media_values(ips=some_ip_addresses)))
def test_a_mutated_media_value_parses_or_raises_media_error(text):
    try:
        streams = parse_media(text)
    except MediaError:
        return
    for stream in streams:
        assert 0 <= stream.port <= 65535 and stream.direction in ("sendrecv", "sendonly", "recvonly", "inactive")


@FUZZ_SETTINGS
@given(_mutated_text(signaling_values(some_ip_addresses)))
def test_a_mutated_signaling_ip_parses_or_raises_media_error(text):
    try:
        parse_signaling_ip(text)
    except MediaError:
        pass


@pytest.mark.parametrize("text", ['{"signaling_ip": ' + DEEP_JSON.decode(), "{" + DEEP_JSON.decode()])
def test_signaling_ip_json_nested_too_deep_is_a_media_error(text):
    with pytest.raises(MediaError):
        parse_signaling_ip(text)


# Relay lines the fuzzing of the dispatcher's end found: each used to raise out of
# RelayLink.dataReceived or hang a proxy request; now the line is refused.
@pytest.mark.parametrize("line", [
    "7 10.1.0.1\r40000",                                            # a reply is passed on as one line
    'expired {"call_id": "c1", "streams": [null]}',
    'expired {"call_id": "c1", "streams": 5}',
    'expired {"call_id": "c1", "streams": [], "dialog_id": 5}',
    'expired {"call_id": "c1", "streams": ' + DEEP_JSON.decode(),
])
def test_a_relay_line_the_dispatcher_cannot_act_on_is_a_link_error(line):
    with pytest.raises(LinkError):
        parse_relay_line(line)


HEADER_NAMES = ["type", "call_id", "cseq", "from_tag", "to_tag", "dialog_id", "media", "media_relay",
                "signaling_ip", "user_agent", "from_uri", "other"]

header_value = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["request", "reply", "1 INVITE", "2", "c1", "alice", "10.0.0.1", "", "4294967296"]),
    media_text,
)

headers_strategy = st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=len(HEADER_NAMES))


@SETTINGS
@given(headers_strategy)
def test_parse_update_raises_only_request_errors(headers):
    try:
        update = parse_update(headers)
    except RequestError:
        return
    assert update.call_id and update.from_tag and update.type in ("request", "reply")


# The relay core

CALL_IDS = ["c1", "c2", "c3"]


@st.composite
def relay_updates(draw):
    headers = {
        "type": draw(st.sampled_from(["request", "reply", "request", "reply", "bogus"])),
        "call_id": draw(st.sampled_from(CALL_IDS + [""])),
        "cseq": draw(st.one_of(st.integers(0, 4).map(lambda n: "%d INVITE" % n), st.sampled_from(["", "x"]))),
        "from_tag": draw(st.sampled_from(["alice", "bob", ""])),
        "to_tag": draw(st.sampled_from(["alice", "bob", ""])),
    }
    if draw(st.booleans()):
        headers["media"] = draw(st.one_of(st.lists(stream_text, min_size=1, max_size=4).map(",".join),
                                          st.text(max_size=20)))
    extra = draw(st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=2))
    if draw(st.booleans()):
        headers.update(extra)
    return headers


operations = st.lists(st.one_of(relay_updates().map(lambda h: ("update", h)),
                                st.sampled_from(CALL_IDS).map(lambda c: ("remove", {"call_id": c})),
                                st.just(("halt", None))),
                      max_size=25)


def held_ports(relay):
    return {leg.port for session in relay.sessions.values() for stream in session.all_streams
            if not stream.ended for leg in stream.legs}


@SETTINGS
@given(operations)
def test_the_relay_core_takes_any_update_and_never_leaks_ports(ops):
    forwarding = MemoryForwarding(unavailable={40006})
    relay = RelayCore("198.51.100.1", PortPool(40000, 40024), forwarding, now=0.0)
    for now, (kind, headers) in enumerate(ops, start=1):
        if kind == "halt":
            relay.halting = True
            continue
        reply = relay.handle(kind, headers, float(now))
        assert "\n" not in reply and "None" not in reply
        if kind == "update" and reply not in ("error", "halting"):
            ip, *ports = reply.split()
            assert ip == "198.51.100.1" and all(port.isdigit() for port in ports)
        held = held_ports(relay)
        assert set(forwarding.receivers) == held
        assert relay.ports.used_count == len(held)
        assert 40006 not in held
    for call_id in list(relay.sessions):
        relay.handle("remove", {"call_id": call_id}, 1000.0)
    assert relay.ports.used_count == 0 and forwarding.receivers == {}
