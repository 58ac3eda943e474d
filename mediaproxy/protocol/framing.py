"""Line framing shared by the three control protocols (sans-IO).

All of them are `\\r\\n` terminated text lines; requests are a command line,
`name: value` header lines and an empty line. The reader takes bytes and
returns whole messages, so it never blocks and never touches a socket.
Limits keep a hostile peer from making us buffer without bound.
"""

from dataclasses import dataclass, field
from typing import Iterable, Mapping

MAX_LINE_LENGTH = 16384      # a `media` header with many streams fits easily
MAX_HEADERS = 64
MAX_REQUEST_SIZE = 65536


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


class FramingError(Exception):
    """A request could not be read; it is answered with an error and skipped.

    `command` is the request's command line when it was read, so that a
    protocol with sequence numbers can still say which request failed.
    """

    def __init__(self, reason: str, command: str = None):
        super().__init__(reason)
        self.command = command


@dataclass(frozen=True)
class Request:
    command: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Line:
    """A single line received outside of a request (e.g. `ping`)."""
    text: str


class LineSplitter:
    """Splits a byte stream into lines, cutting off oversized ones.

    `feed` returns the complete lines; a line longer than the limit is
    returned once as a FramingError and its remainder skipped up to the next
    line end.
    """

    def __init__(self, max_line_length: int = MAX_LINE_LENGTH):
        self.max_line_length = max_line_length
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list:
        self._buffer += data
        lines = []
        if b"\n" in data:          # the buffer holds no line end from before: only new data can end lines
            *complete, rest = bytes(self._buffer).split(b"\n")
            self._buffer = bytearray(rest)
            limit = self.max_line_length
            for raw in complete:
                if self._discarding:
                    self._discarding = False
                    continue
                if raw[-1:] == b"\r":
                    raw = raw[:-1]
                if len(raw) > limit:
                    lines.append(FramingError("line too long"))
                    continue
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    lines.append(FramingError("line is not valid UTF-8"))
        if len(self._buffer) > self.max_line_length + 1:     # +1: its \r may be there already
            del self._buffer[:]
            if not self._discarding:
                self._discarding = True
                lines.append(FramingError("line too long"))
        return lines


class RequestReader:
    """Reads `command` + headers + empty line requests from a byte stream.

    Lines in `single_lines` (e.g. {"ping", "pong"}) that arrive between
    requests are returned as `Line` events. A request with a malformed header
    line, too many headers or too many bytes is returned as one FramingError
    once its empty line arrives, so the connection keeps working.
    """

    def __init__(self, single_lines: Iterable[str] = (), max_line_length: int = MAX_LINE_LENGTH,
                 max_headers: int = MAX_HEADERS, max_request_size: int = MAX_REQUEST_SIZE):
        self._splitter = LineSplitter(max_line_length)
        self._single_lines = frozenset(single_lines)
        self._max_headers = max_headers
        self._max_request_size = max_request_size
        self._command = None
        self._headers = {}
        self._size = 0
        self._error = None

    def feed(self, data: bytes) -> list:
        events = []
        for line in self._splitter.feed(data):
            event = self._take_line(line)
            if event is not None:
                events.append(event)
        return events

    def _take_line(self, line):
        if self._command is None and self._error is None:
            if isinstance(line, FramingError):
                self._error = line
                return None
            if line == "":
                return None     # stray empty lines between requests are harmless
            if line in self._single_lines:
                return Line(line)
            self._command = line.strip()
            self._size = len(line)
            return None
        if line == "":
            return self._finish()
        if self._error is not None:
            return None
        if isinstance(line, FramingError):
            self._error = line
            return None
        self._size += len(line)
        if self._size > self._max_request_size:
            self._error = FramingError("request too large")
        elif len(self._headers) >= self._max_headers:
            self._error = FramingError("too many headers")
        else:
            name, colon, value = line.partition(":")
            name = name.strip().lower()
            if not colon or not name or " " in name:
                self._error = FramingError("malformed header line %r" % line[:80])
            else:
                self._headers[name] = value.strip()
        return None

    def _finish(self):
        error, command, headers = self._error, self._command, self._headers
        self._command, self._headers, self._size, self._error = None, {}, 0, None
        if error is not None:
            return FramingError(str(error), command)
        return Request(command, headers)


def encode_request(command: str, headers: Mapping[str, str]) -> bytes:
    lines = [command]
    lines.extend("%s: %s" % (name, value) for name, value in headers.items())
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode("utf-8")


def encode_line(text: str) -> bytes:
    if "\n" in text or "\r" in text:
        raise ValueError("a reply line cannot contain a line break")
    return text.encode("utf-8") + b"\r\n"
