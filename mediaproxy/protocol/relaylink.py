"""Dispatcher <-> relay link (SPEC §3), sans-IO.

Dispatcher to relay: `COMMAND SEQ`, the headers, an empty line; the relay
answers `SEQ RESULT` on one line. Besides, the relay sends `ping` (answered
by `pong`) and unsolicited `expired JSON` lines.

Extensions of `sessions`, both ignored by a relay that does not know them:
the header `brief: yes` (what the dispatcher asks when a relay connects)
lists only each session's call_id, from_tag, to_tag and dialog_id, without
reading the kernel's counters (the full statistics hold the same keys);
`match: TEXT` lists only the sessions whose call id, tags or URIs contain
TEXT, case-insensitive (the management interface's `find`).

And of `remove`: the header `statistics: no` (what a dispatcher without
accounting sends: nothing would read them) has the relay answer `removed`
instead of the session's statistics; a relay that does not know it sends
them all the same.
"""

import json
from dataclasses import dataclass
from typing import Mapping, Optional

from mediaproxy.protocol.framing import Request, encode_line, encode_request, is_number

COMMANDS = frozenset(["update", "remove", "summary", "sessions"])
PING = "ping"
PONG = "pong"
NO_STATISTICS = "statistics: no\r\n"     # a header line of `remove` (see above)
REMOVED = "removed"


class LinkError(ValueError):
    """A line on the relay link that does not follow the protocol."""


@dataclass(slots=True)
class Command:
    name: str
    seq: int
    headers: Mapping[str, str]


@dataclass(slots=True)
class Reply:
    seq: int
    result: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Expired:
    statistics: dict


def encode_command(name: str, seq: int, headers: Mapping[str, str], raw: Optional[str] = None) -> bytes:
    """`raw`: the header lines of the proxy's request as they came (framing.Request.raw), if known."""
    return encode_request("%s %d" % (name, seq), headers, raw)


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


def _is_session_statistics(statistics) -> bool:
    """The parts of an `expired` report (SPEC §6) the dispatcher acts on have their types."""
    if not isinstance(statistics, dict) or not isinstance(statistics.get("call_id"), str):
        return False
    streams = statistics.get("streams")
    if streams is not None and not (isinstance(streams, list) and all(isinstance(s, dict) for s in streams)):
        return False
    return isinstance(statistics.get("dialog_id"), (str, type(None)))


def parse_relay_line(line: str):
    """Dispatcher side: a line from a relay into Reply, Ping or Expired."""
    if line == PING:
        return Ping()
    if "\r" in line:
        # a reply is passed on to the proxy as one line: a CR inside it would break that line
        raise LinkError("line with a CR inside %r" % line[:80])
    head, _, rest = line.partition(" ")
    if head == "expired":
        try:
            statistics = json.loads(rest)
        except (ValueError, RecursionError):     # RecursionError: nested deeper than Python can decode
            raise LinkError("expired with invalid JSON") from None
        if not _is_session_statistics(statistics):
            raise LinkError("expired without a session")
        return Expired(statistics)
    if is_number(head) and rest:
        return Reply(int(head), rest)
    raise LinkError("unexpected line %r" % line[:80])


def decode_answer(text: str):
    """A relay's JSON answer (`sessions`, `summary`, `remove`), or None when it is not JSON or is
    nested too deep for the decoder (which raises RecursionError, not ValueError, then)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None
