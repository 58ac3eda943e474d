"""The management interface's codec (SPEC §5): a command per line, an answer
of result lines closed by an empty line."""

import pytest

from mediaproxy.protocol.management import COMMANDS, ERROR, encode_answer, parse_command


@pytest.mark.parametrize("line, command", [("summary", "summary"), ("  Sessions \t", "sessions"),
                                           ("VERSION", "version"), ("", ""), ("   ", ""),
                                           ("FIND  Alice@Example.com ", "find Alice@Example.com"),
                                           ("end call-1@host", "end call-1@host")])
def test_command_words_are_lower_case_and_arguments_kept_as_given(line, command):
    assert parse_command(line) == command


def test_the_known_commands():
    assert COMMANDS == {"sessions", "summary", "version", "accounting", "find", "end", "drain", "undrain", "relay",
                        "quit", "exit"}


def test_an_answer_is_its_lines_then_an_empty_line():
    assert encode_answer(['{"ip": "10.0.0.1"}', '{"ip": "10.0.0.2"}']) == \
        b'{"ip": "10.0.0.1"}\r\n{"ip": "10.0.0.2"}\r\n\r\n'


def test_an_empty_answer_is_just_the_empty_line():
    assert encode_answer([]) == b"\r\n"


def test_the_error_answer():
    assert ERROR == b"error\r\n\r\n"


@pytest.mark.parametrize("line", ["a\r\nb", "a\nb", "a\r"])
def test_an_answer_line_cannot_hold_a_line_break(line):
    with pytest.raises(ValueError):
        encode_answer([line])
