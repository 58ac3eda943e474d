"""The dispatcher <-> relay line protocol (SPEC §3)."""

import json

import pytest

from mediaproxy.protocol.framing import Request, RequestReader
from mediaproxy.protocol.relaylink import (Command, Expired, LinkError, Ping, Reply, encode_command,
                                           encode_expired, encode_reply, parse_command, parse_relay_line)


def test_a_command_is_name_seq_headers_and_an_empty_line():
    data = encode_command("update", 12, {"call_id": "c1", "cseq": "1 INVITE"})
    assert data == b"update 12\r\ncall_id: c1\r\ncseq: 1 INVITE\r\n\r\n"


def test_the_relay_reads_the_command_back():
    [request] = RequestReader().feed(encode_command("remove", 3, {"call_id": "c1"}))
    assert parse_command(request) == Command("remove", 3, {"call_id": "c1"})


def test_commands_without_headers():
    [request] = RequestReader().feed(encode_command("summary", 1, {}))
    assert parse_command(request) == Command("summary", 1, {})
    assert encode_command("sessions", 2, {}) == b"sessions 2\r\n\r\n"


def test_the_command_name_is_case_insensitive():
    assert parse_command(Request("UPDATE 5", {})).name == "update"


@pytest.mark.parametrize("command", ["update", "update x", "update -1", "delete 4", "4 update", ""])
def test_bad_commands_are_link_errors(command):
    with pytest.raises(LinkError):
        parse_command(Request(command, {}))


def test_a_reply_is_seq_and_result_on_one_line():
    assert encode_reply(7, "10.0.0.1 40000 40002") == b"7 10.0.0.1 40000 40002\r\n"
    assert parse_relay_line("7 10.0.0.1 40000 40002") == Reply(7, "10.0.0.1 40000 40002")
    assert parse_relay_line("8 error") == Reply(8, "error")


def test_a_reply_cannot_carry_a_line_break():
    with pytest.raises(ValueError):
        encode_reply(1, "a\r\nb")


def test_ping():
    assert parse_relay_line("ping") == Ping()


def test_expired_carries_the_statistics():
    statistics = {"call_id": "c1", "streams": [{"status": "no-traffic timeout"}]}
    line = encode_expired(statistics)
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert parse_relay_line(line[:-2].decode()) == Expired(statistics)


@pytest.mark.parametrize("line", ["expired", "expired {", "expired []", 'expired {"streams": []}',
                                  'expired {"call_id": 5}', "7", "seven error", "pong", "", "hello world"])
def test_bad_relay_lines_are_link_errors(line):
    with pytest.raises(LinkError):
        parse_relay_line(line)


def test_expired_json_is_compact_and_valid():
    line = encode_expired({"call_id": "c", "duration": 1.5})
    assert json.loads(line[len(b"expired "):]) == {"call_id": "c", "duration": 1.5}


@pytest.mark.parametrize("parse, value", [(parse_command, Request("update ²", {})),
                                          (parse_relay_line, "² error")], ids=["command", "reply"])
def test_superscript_digits_are_link_errors(parse, value):
    with pytest.raises(LinkError):
        parse(value)
