"""Fuzzing the management port (SPEC §5) in plain TCP mode: ManagementProtocol
over the real Dispatcher, with relays that answer at once.

Every complete line gets its answer (result lines and an empty line), in
order: the command's, or `error` (the dispatcher's own commands beyond SPEC
answer something, their content is theirs to test); `quit`/`exit` closes the connection after
the earlier answers and nothing after it is read; nothing reaches the log as
a traceback.
"""

import json
import random

from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mediaproxy import __version__
from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.frontends import MAX_MANAGEMENT_LINE, ManagementFactory
from tests.support.fuzzing import FUZZ_SETTINGS, garbage, mutated, split, watched_for_tracebacks

SESSIONS = [{"call_id": "c1", "streams": []}, {"call_id": "c2", "caller_ua": "\u00e9\r\n"}]
SUMMARY = {"ip": "10.1.0.1", "status": "active", "session_count": 2}


class Relay:
    """A relay link that answers at once; `broken` answers with what is not JSON."""

    def __init__(self, ip, broken=False):
        self.ip, self.active, self.halting, self.broken = ip, True, False, broken
        self.transport = None

    def send_command(self, name, headers=None):
        if self.broken:
            return defer.succeed("{")
        if name == "sessions":
            return defer.succeed(json.dumps(SESSIONS))
        if name == "summary":
            return defer.succeed(json.dumps(SUMMARY))
        return defer.succeed("error")


# What SPEC §5's commands answer with the relays of `management_connection`; the other words
# the dispatcher knows (its own commands, mediaproxy/dispatcher/management.py) answer something.
EXACT_ANSWERS = {
    "sessions": [json.dumps(session) for session in SESSIONS],
    "version": [__version__],
}
EXTENSIONS = {"accounting", "find", "end", "drain", "undrain", "relay"}


def management_connection():
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    dispatcher.relays = {"10.1.0.1": Relay("10.1.0.1"), "10.1.0.2": Relay("10.1.0.2", broken=True)}
    protocol = ManagementFactory(dispatcher).buildProtocol(None)     # no credentials: plain TCP
    protocol.makeConnection(StringTransport())
    return protocol


def expected_answers(data: bytes):
    """(what each line of `data` must be answered with, whether the connection is then closed).

    A line is what ends with LF (a CR before it is part of the line end); one longer than
    MAX_MANAGEMENT_LINE bytes or not UTF-8 is an error, and so is an unfinished line that is
    already too long. Each answer is given as a list of lines, "summary", or "any"."""
    *lines, tail = data.split(b"\n")
    expected = []
    for raw in lines:
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8") if len(raw) <= MAX_MANAGEMENT_LINE else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            expected.append(["error"])
            continue
        word, _, argument = text.strip().partition(" ")
        word = word.lower()
        if word in ("quit", "exit") and not argument.strip():
            return expected, True
        if not word:
            continue
        if word in EXTENSIONS:
            expected.append("any")
        elif argument.strip():
            expected.append(["error"])
        elif word == "summary":
            expected.append("summary")
        else:
            expected.append(EXACT_ANSWERS.get(word, ["error"]))
    if len(tail) > MAX_MANAGEMENT_LINE + 1:           # + 1: its CR may have come already
        expected.append(["error"])
    return expected, False


def answers_in(output: bytes) -> list:
    """The answers written: their result lines, each answer closed by an empty line."""
    assert output == b"" or output.endswith(b"\r\n")
    answers, current = [], []
    for line in output.decode().split("\r\n")[:-1]:
        if line:
            current.append(line)
        else:
            answers.append(current)
            current = []
    assert current == []
    return answers


def summary_answer(lines) -> bool:
    """One JSON object a relay: the relay that answered with its summary, the other with an error."""
    relays = {relay["ip"]: relay for relay in map(json.loads, lines)}
    return set(relays) == {"10.1.0.1", "10.1.0.2"} and relays["10.1.0.2"]["status"] == "error" and \
        relays["10.1.0.1"]["session_count"] == SUMMARY["session_count"]


command_lines = st.lists(
    st.one_of(st.sampled_from(["sessions", "summary", "version", "accounting", "SUMMARY", " Version\t", "",
                               "reboot", "sessions now", "quit", "exit", "QUIT", "quit now", "\u0130",
                               "version\x00", "find C1", "end c1", "drain 10.1.0.1", "undrain 10.1.0.1",
                               "relay 10.1.0.2", "relay", "find"]),
              st.text(max_size=12)),
    max_size=8)


@st.composite
def management_input(draw):
    lines = draw(command_lines)
    data = b"".join(line.encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"\r\n", b"\n"]))
                    for line in lines)
    form = draw(st.sampled_from(["well-formed", "mutated", "garbage"]))
    if form == "mutated":
        data = draw(mutated(data))
    elif form == "garbage":
        data = draw(garbage)
    return form, data


@FUZZ_SETTINGS
@given(management_input(), st.data())
def test_every_management_line_gets_its_answer_in_order_and_quit_closes(case, draw):
    form, data = case
    management = management_connection()
    with watched_for_tracebacks() as tracebacks:
        for chunk in draw.draw(split(data), label="chunks"):
            management.dataReceived(chunk)
    assert not tracebacks.records, str(tracebacks)
    expected, closed = expected_answers(data)
    answers = answers_in(management.transport.value())
    event("form: %s" % form)
    event("closed: %s" % closed)
    assert len(answers) == len(expected), (answers, expected)
    for lines, wanted in zip(answers, expected):
        if wanted == "summary":
            assert summary_answer(lines), lines
        elif wanted != "any":
            assert lines == wanted
    assert management.transport.disconnecting == closed


def test_a_line_over_the_management_limit_is_an_error_once_and_the_next_command_works():
    management = management_connection()
    at_limit = b"version".ljust(MAX_MANAGEMENT_LINE)
    management.dataReceived(b"x" * (MAX_MANAGEMENT_LINE + 1) + b"\r\n" + at_limit + b"\r\n")
    management.dataReceived(b"y" * (10 * MAX_MANAGEMENT_LINE))          # trickled, never ended
    management.dataReceived(b"y" * (10 * MAX_MANAGEMENT_LINE) + b"\r\nversion\r\n")
    assert answers_in(management.transport.value()) == [["error"], [__version__], ["error"], [__version__]]
    assert not management.transport.disconnecting
