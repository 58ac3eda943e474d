"""Line framing shared by the three control protocols (sans-IO).

All of them are `\\r\\n` terminated text lines; requests are a command line,
`name: value` header lines and an empty line. The reader takes bytes and
returns whole messages, so it never blocks and never touches a socket.
Limits keep a hostile peer from making us buffer without bound.

The values made per request here and in the other protocol modules are
slotted, not frozen, dataclasses: a frozen one costs microseconds more to
make, on every request, and nothing changes them once parsed.
"""

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

MAX_LINE_LENGTH = 16384      # a `media` header with many streams fits easily
MAX_HEADERS = 64             # header lines of a request, a repeated name counted each time
MAX_REQUEST_SIZE = 65536     # characters of a request's command and header lines, without line ends


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


@dataclass(slots=True)
class Request:
    command: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # The header lines as they came, each ended by CRLF, when they passed the reader's fast
    # path: the dispatcher forwards them to the relay as they are instead of encoding them again.
    raw: Optional[str] = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
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
        self.clean = True       # the last lines returned are all str (no FramingError among them)

    @property
    def idle(self) -> bool:
        """No part of a line is buffered."""
        return not self._buffer and not self._discarding

    def feed(self, data: bytes) -> list:
        self.clean = False
        self._buffer += data
        if b"\n" not in data:     # the buffer holds no line end from before: only new data can end lines
            lines = []
        else:
            buffered = bytes(self._buffer)
            cut = buffered.rfind(b"\n") + 1
            self._buffer = bytearray(buffered[cut:])
            lines = self._split(buffered[:cut])
        if len(self._buffer) > self.max_line_length + 1:     # +1: its \r may be there already
            del self._buffer[:]
            if not self._discarding:
                self._discarding = True
                self.clean = False
                lines.append(FramingError("line too long"))
        return lines

    def _split(self, chunk: bytes) -> list:
        """Complete lines (`chunk` ends with a line end) without their line ends."""
        if self._discarding:            # the rest of an oversized line is dropped
            self._discarding = False
            chunk = chunk[chunk.index(b"\n") + 1:]
            if not chunk:
                return []
        if len(chunk) <= self.max_line_length:
            # The common case, done by str methods in C: no line can be too long.
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                self.clean = True
                if chunk.count(b"\n") == chunk.count(b"\r\n"):
                    return text[:-2].split("\r\n")
                return [line[:-1] if line[-1:] == "\r" else line for line in text[:-1].split("\n")]
        lines = []
        limit = self.max_line_length
        for raw in chunk[:-1].split(b"\n"):
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            if len(raw) > limit:
                lines.append(FramingError("line too long"))
                continue
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(FramingError("line is not valid UTF-8"))
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
        self._fast_limit = min(max_line_length, max_request_size)      # see _whole_requests
        self._command = None
        self._headers = {}
        self._lines = 0             # header lines of the request so far (a repeated name counts each time)
        self._size = 0
        self._error = None

    def feed(self, data: bytes) -> list:
        if (data[-4:] == b"\r\n\r\n" and len(data) <= self._fast_limit and self._command is None
                and self._error is None and self._splitter.idle):
            requests = self._whole_requests(data)
            if requests is not None:
                return requests
        lines = self._splitter.feed(data)
        events = []
        index, count = 0, len(lines)
        while index < count:
            if self._command is None and self._error is None:
                line = lines[index]
                index += 1
                if line.__class__ is not str:
                    self._error = line
                elif line in self._single_lines:
                    events.append(Line(line))
                elif line:                  # stray empty lines between requests are harmless
                    self._command = line.strip()
                    self._size = len(line)
                continue
            try:
                end = lines.index("", index)
            except ValueError:
                end = count
            if self._error is None:
                self._take_headers(lines[index:end], self._splitter.clean)
            index = end
            if end < count:
                events.append(self._finish())
                index += 1
        return events

    def _whole_requests(self, data: bytes):
        """The requests of `data` when it holds nothing but whole, plain ones: CRLF line ends,
        UTF-8, within every limit (`_fast_limit` keeps it under the line and request limits),
        no single lines or stray empty lines. Every request of the proxy module and of the
        dispatcher reads so, in one pass; None leaves anything else to the line by line reader."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if text.count("\n") != text.count("\r\n"):
            return None
        requests = []
        for block in text[:-4].split("\r\n\r\n"):
            lines = block.split("\r\n")
            command = lines[0].strip()
            if not command or command in self._single_lines or len(lines) > self._max_headers + 1:
                return None
            parts = [line.partition(":") for line in lines[1:]]
            names = [name.strip().lower() for name, _, _ in parts]
            if "" in [colon for _, colon, _ in parts] or "" in names or " " in "".join(names):
                return None
            raw = block[len(lines[0]) + 2:] + "\r\n" if len(lines) > 1 else ""
            requests.append(Request(command, dict(zip(names, [value.strip() for _, _, value in parts])), raw))
        return requests

    def _take_headers(self, block: list, clean: bool) -> None:
        """Header lines of the request being read (more may follow)."""
        headers = self._headers
        if clean:
            # Every request of the proxy and of the dispatcher passes here: the whole block at
            # once, in comprehensions; anything unusual is left to the line by line path below.
            size = self._size + sum(map(len, block))
            lines = self._lines + len(block)
            if size <= self._max_request_size and lines <= self._max_headers:
                parts = [line.partition(":") for line in block]
                names = [name.strip().lower() for name, _, _ in parts]
                if "" not in [colon for _, colon, _ in parts] and "" not in names and " " not in "".join(names):
                    headers.update(zip(names, [value.strip() for _, _, value in parts]))
                    self._size, self._lines = size, lines
                    return
        for line in block:
            if line.__class__ is not str:
                self._error = line
                return
            self._size += len(line)
            if self._size > self._max_request_size:
                self._error = FramingError("request too large")
            elif self._lines >= self._max_headers:
                self._error = FramingError("too many headers")
            else:
                name, colon, value = line.partition(":")
                name = name.strip().lower()
                if not colon or not name or " " in name:
                    self._error = FramingError("malformed header line %r" % line[:80])
                else:
                    headers[name] = value.strip()
                    self._lines += 1
                    continue
            return

    def _finish(self):
        error, command, headers = self._error, self._command, self._headers
        self._command, self._headers, self._lines, self._size, self._error = None, {}, 0, 0, None
        if error is not None:
            return FramingError(str(error), command)
        return Request(command, headers)


def encode_request(command: str, headers: Mapping[str, str], raw: Optional[str] = None) -> bytes:
    """`raw`: the header lines as a Request read them (Request.raw), sent as they are."""
    if raw is not None:
        return ("%s\r\n%s\r\n" % (command, raw)).encode("utf-8")
    lines = [command]
    lines.extend("%s: %s" % (name, value) for name, value in headers.items())
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode("utf-8")


def encode_line(text: str) -> bytes:
    if "\n" in text or "\r" in text:
        raise ValueError("a reply line cannot contain a line break")
    return text.encode("utf-8") + b"\r\n"
