"""Dispatcher <-> relay link (SPEC §3), sans-IO.

Dispatcher to relay: `COMMAND SEQ`, the headers, an empty line; the relay
answers `SEQ RESULT` on one line. Besides, the relay sends `ping` (answered
by `pong`) and unsolicited `expired JSON` lines.

One extension: `sessions` with the header `brief: yes` (what the dispatcher
asks when a relay connects) lists only each session's call_id, from_tag,
to_tag and dialog_id, without reading the kernel's counters; a relay that
does not know the header answers with the full statistics, which hold the
same keys.
"""

import json
from dataclasses import dataclass
from typing import Mapping

from mediaproxy.protocol.framing import Request, encode_line, encode_request, is_number

COMMANDS = frozenset(["update", "remove", "summary", "sessions"])
PING = "ping"
PONG = "pong"


class LinkError(ValueError):
    """A line on the relay link that does not follow the protocol."""


@dataclass(frozen=True)
class Command:
    name: str
    seq: int
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    seq: int
    result: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Expired:
    statistics: dict


def encode_command(name: str, seq: int, headers: Mapping[str, str]) -> bytes:
    return encode_request("%s %d" % (name, seq), headers)


def parse_command(request: Request) -> Command:
    """Relay side: a framed request into a Command."""
    name, _, seq = request.command.partition(" ")
    name = name.lower()
    if name not in COMMANDS:
        raise LinkError("unknown command %r" % name[:40])
    if not is_number(seq.strip()):
        raise LinkError("bad sequence number %r" % seq[:20])
    return Command(name, int(seq), request.headers)


def encode_reply(seq: int, result: str) -> bytes:
    return encode_line("%d %s" % (seq, result))


def encode_expired(statistics: dict) -> bytes:
    return encode_line("expired " + json.dumps(statistics, separators=(",", ":")))


def parse_relay_line(line: str):
    """Dispatcher side: a line from a relay into Reply, Ping or Expired."""
    if line == PING:
        return Ping()
    head, _, rest = line.partition(" ")
    if head == "expired":
        try:
            statistics = json.loads(rest)
        except ValueError:
            raise LinkError("expired with invalid JSON") from None
        if not isinstance(statistics, dict) or not isinstance(statistics.get("call_id"), str):
            raise LinkError("expired without a session")
        return Expired(statistics)
    if is_number(head) and rest:
        return Reply(int(head), rest)
    raise LinkError("unexpected line %r" % line[:80])
