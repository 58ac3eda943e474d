"""Line framing shared by the three control protocols: whole lines and whole
requests out, limits enforced, a bad request answered once and skipped."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaproxy.protocol.framing import (FramingError, Line, LineSplitter, Request, RequestReader,
                                         encode_line, encode_request)


def feed_bytewise(reader, data):
    events = []
    for i in range(len(data)):
        events.extend(reader.feed(data[i:i + 1]))
    return events


# LineSplitter

def test_lines_are_split_on_crlf_and_bare_lf():
    splitter = LineSplitter()
    assert splitter.feed(b"one\r\ntwo\nthree\r\n") == ["one", "two", "three"]


def test_a_partial_line_waits_for_its_end():
    splitter = LineSplitter()
    assert splitter.feed(b"upd") == []
    assert splitter.feed(b"ate\r") == []
    assert splitter.feed(b"\nnext") == ["update"]
    assert splitter.feed(b"\r\n") == ["next"]


def test_empty_lines_are_returned():
    assert LineSplitter().feed(b"\r\n\r\n") == ["", ""]


def test_a_line_of_exactly_the_limit_is_accepted():
    splitter = LineSplitter(max_line_length=10)
    assert splitter.feed(b"x" * 10 + b"\r\n") == ["x" * 10]


def test_a_complete_oversized_line_is_one_error_and_the_next_line_works():
    splitter = LineSplitter(max_line_length=10)
    lines = splitter.feed(b"x" * 11 + b"\r\nok\r\n")
    assert len(lines) == 2
    assert isinstance(lines[0], FramingError) and "too long" in str(lines[0])
    assert lines[1] == "ok"


def test_an_endless_line_is_reported_once_skipped_and_never_buffered():
    splitter = LineSplitter(max_line_length=10)
    errors = []
    for _ in range(100):
        errors.extend(splitter.feed(b"y" * 7))
        assert len(splitter._buffer) <= 10
    assert len(errors) == 1 and isinstance(errors[0], FramingError)
    # the rest of the oversized line is skipped up to its end, then lines work again
    assert splitter.feed(b"yyy\r\nping\r\n") == ["ping"]


def test_a_line_that_is_not_utf8_is_an_error_and_the_next_line_works():
    lines = LineSplitter().feed(b"caf\xe9\r\ncaf\xc3\xa9\r\n")
    assert isinstance(lines[0], FramingError) and "UTF-8" in str(lines[0])
    assert lines[1] == "café"


def test_a_line_of_exactly_the_limit_is_accepted_however_it_is_split():
    splitter = LineSplitter(max_line_length=10)
    assert splitter.feed(b"x" * 10 + b"\r") == []
    assert splitter.feed(b"\n") == ["x" * 10]


# RequestReader

UPDATE = (b"update\r\n"
          b"call_id: abc@host\r\n"
          b"Media: audio:10.0.0.5:4000:sendrecv:ice=no\r\n"
          b"to_tag: \r\n"
          b"\r\n")


def test_a_request_is_its_command_and_headers():
    events = RequestReader().feed(UPDATE)
    assert events == [Request("update", {"call_id": "abc@host",
                                         "media": "audio:10.0.0.5:4000:sendrecv:ice=no",
                                         "to_tag": ""})]


def test_header_names_are_lower_case_and_values_stripped_colons_kept():
    [request] = RequestReader().feed(b"update\r\nSignaling_IP:   2001:db8::1  \r\n\r\n")
    assert request.headers == {"signaling_ip": "2001:db8::1"}


def test_a_request_fed_byte_by_byte_is_the_same():
    assert feed_bytewise(RequestReader(), UPDATE) == RequestReader().feed(UPDATE)


def test_several_requests_in_one_chunk_come_out_in_order():
    data = (b"remove\r\ncall_id: 1\r\n\r\n" b"remove\r\ncall_id: 2\r\n\r\n")
    events = RequestReader().feed(data)
    assert [e.headers["call_id"] for e in events] == ["1", "2"]


def test_stray_empty_lines_between_requests_are_ignored():
    events = RequestReader().feed(b"\r\n\r\nremove\r\ncall_id: 1\r\n\r\n\r\n")
    assert events == [Request("remove", {"call_id": "1"})]


def test_single_lines_between_requests_are_line_events():
    reader = RequestReader(single_lines=["ping", "pong"])
    events = reader.feed(b"pong\r\nsummary 1\r\n\r\nping\r\n")
    assert events == [Line("pong"), Request("summary 1", {}), Line("ping")]


def test_a_single_line_word_is_not_special_for_a_reader_that_does_not_know_it():
    events = RequestReader().feed(b"ping\r\n\r\n")
    assert events == [Request("ping", {})]


def test_a_single_line_inside_a_request_is_a_malformed_header():
    reader = RequestReader(single_lines=["pong"])
    events = reader.feed(b"update 1\r\npong\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], FramingError)


@pytest.mark.parametrize("line", [b"no colon here", b": value without a name", b"two words: value"])
def test_a_malformed_header_line_is_one_error_and_the_next_request_works(line):
    reader = RequestReader()
    events = reader.feed(b"update\r\ncall_id: 1\r\n" + line + b"\r\ncseq: 2\r\n\r\n")
    assert len(events) == 1
    assert isinstance(events[0], FramingError) and "malformed" in str(events[0])
    assert reader.feed(b"remove\r\ncall_id: 2\r\n\r\n") == [Request("remove", {"call_id": "2"})]


def test_too_many_headers_is_one_error_and_the_next_request_works():
    reader = RequestReader(max_headers=3)
    headers = b"".join(b"h%d: v\r\n" % i for i in range(4))
    events = reader.feed(b"update\r\n" + headers + b"\r\n")
    assert len(events) == 1 and "too many headers" in str(events[0])
    assert reader.feed(b"update\r\nh0: v\r\nh1: v\r\nh2: v\r\n\r\n") == [
        Request("update", {"h0": "v", "h1": "v", "h2": "v"})]


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_repeated_header_counts_each_time_it_comes(bytewise):
    reader = RequestReader(max_headers=3)
    data = b"update\r\n" + b"h: v\r\n" * 4 + b"\r\n"
    events = feed_bytewise(reader, data) if bytewise else reader.feed(data)
    assert len(events) == 1 and "too many headers" in str(events[0])
    assert reader.feed(b"update\r\nh: 1\r\nh: 2\r\nh: 3\r\n\r\n") == [Request("update", {"h": "3"})]


def test_a_request_larger_than_the_limit_is_one_error_and_the_next_request_works():
    reader = RequestReader(max_request_size=100)
    events = reader.feed(b"update\r\n" + b"".join(b"header%d: %s\r\n" % (i, b"v" * 20) for i in range(5)) + b"\r\n")
    assert len(events) == 1 and "too large" in str(events[0])
    assert reader.feed(b"remove\r\ncall_id: x\r\n\r\n") == [Request("remove", {"call_id": "x"})]


def test_an_oversized_header_line_is_one_error_when_the_request_ends():
    reader = RequestReader(max_line_length=50)
    assert reader.feed(b"update\r\nmedia: " + b"a" * 100) == []
    assert reader.feed(b"a" * 100 + b"\r\ncall_id: 1\r\n") == []
    events = reader.feed(b"\r\n")
    assert len(events) == 1 and isinstance(events[0], FramingError)
    assert reader.feed(b"remove\r\ncall_id: 1\r\n\r\n") == [Request("remove", {"call_id": "1"})]


def test_an_oversized_command_line_is_one_error_when_the_request_ends():
    reader = RequestReader(max_line_length=20)
    events = reader.feed(b"u" * 30 + b"\r\ncall_id: 1\r\n\r\nremove\r\ncall_id: 2\r\n\r\n")
    assert len(events) == 2
    assert isinstance(events[0], FramingError)
    assert events[1] == Request("remove", {"call_id": "2"})


def test_a_header_that_is_not_utf8_is_one_error_and_the_next_request_works():
    reader = RequestReader()
    events = reader.feed(b"update\r\nfrom_uri: sip:\xff@x\r\n\r\nremove\r\ncall_id: 2\r\n\r\n")
    assert isinstance(events[0], FramingError)
    assert events[1] == Request("remove", {"call_id": "2"})


def test_nothing_comes_out_before_the_empty_line():
    assert RequestReader().feed(b"update\r\ncall_id: 1\r\n") == []


# Encoding

def test_encode_request_reads_back_as_the_same_request():
    data = encode_request("update 7", {"call_id": "a@b", "media": "audio:1.2.3.4:5:sendrecv"})
    assert data == b"update 7\r\ncall_id: a@b\r\nmedia: audio:1.2.3.4:5:sendrecv\r\n\r\n"
    assert RequestReader().feed(data) == [Request("update 7", {"call_id": "a@b",
                                                               "media": "audio:1.2.3.4:5:sendrecv"})]


def test_the_header_lines_of_a_request_read_whole_are_forwarded_as_they_came():
    # what the dispatcher sends the relay: the proxy's header lines untouched, command line changed
    data = b"update\r\nCall_ID:  a@b \r\nmedia: audio:1.2.3.4:5:sendrecv\r\n\r\n"
    request, = RequestReader().feed(data)
    assert request.raw == "Call_ID:  a@b \r\nmedia: audio:1.2.3.4:5:sendrecv\r\n"
    forwarded = encode_request("update 7", {}, request.raw)
    assert forwarded == b"update 7\r\nCall_ID:  a@b \r\nmedia: audio:1.2.3.4:5:sendrecv\r\n\r\n"
    assert RequestReader().feed(forwarded) == [Request("update 7", request.headers)]


def test_a_request_without_headers_is_forwarded_without_headers():
    request, = RequestReader().feed(b"remove\r\n\r\n")
    assert request.raw == "" and encode_request("remove 3", {}, request.raw) == b"remove 3\r\n\r\n"


header_names = st.sampled_from(["call_id", "Media", " to_tag ", "from_tag", "x", "two words", "", "café"])
header_values = st.sampled_from(["", "a@b", " v ", "audio:1.2.3.4:5:sendrecv", "a:b:c", "é", "\r", "x" * 40])
header_lines = st.one_of(st.builds("{}:{}".format, header_names, header_values),
                         st.sampled_from(["no colon", "", "ping", "\n"]))
commands = st.sampled_from(["update", "remove 5", " update ", "ping", "", "x" * 60])
request_texts = st.builds(lambda command, lines: "\r\n".join([command] + lines) + "\r\n\r\n",
                          commands, st.lists(header_lines, max_size=6))


@settings(max_examples=300, deadline=None)
@given(st.lists(request_texts, min_size=1, max_size=3).map("".join))
def test_requests_read_whole_are_what_the_line_by_line_reader_makes_of_them(text):
    # the fast path (whole requests in one read) and the line by line path agree on everything,
    # and a request's raw header lines, forwarded, read back as the same request
    data = text.encode("utf-8")

    def reader():
        return RequestReader(single_lines=["ping"], max_line_length=100, max_headers=4, max_request_size=120)
    whole = reader().feed(data)
    assert [repr(event) for event in whole] == [repr(event) for event in feed_bytewise(reader(), data)]
    for event in whole:
        if isinstance(event, Request) and event.raw is not None:
            assert reader().feed(encode_request(event.command, {}, event.raw)) == [event]


def test_encode_line_ends_with_crlf_and_refuses_line_breaks():
    assert encode_line("10.0.0.1 40000") == b"10.0.0.1 40000\r\n"
    with pytest.raises(ValueError):
        encode_line("error\r\ninjected")
    with pytest.raises(ValueError):
        encode_line("error\n")
