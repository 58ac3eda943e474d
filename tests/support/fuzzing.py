"""Hypothesis strategies and checks shared by the protocol fuzzing tests
(tests/unit/test_fuzz_*.py): byte-level mutations of well-formed input,
arbitrary splits into chunks, and a log watcher that fails on tracebacks."""

import contextlib
import gc
import json
import logging
import operator
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from mediaproxy.protocol.media import MediaDescription, SignalingInfo

# Each fuzz test runs a few hundred examples; the whole set stays well under 30 s. The Debian
# package's build, which checks the code against Debian's libraries rather than hunts for bugs,
# asks for fewer (debian/rules: MEDIAPROXY_FUZZ_EXAMPLES).
FUZZ_EXAMPLES = int(os.environ.get("MEDIAPROXY_FUZZ_EXAMPLES", "200"))
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON nested deeper than Python's recursion limit: json.loads raises RecursionError, not ValueError.
DEEP_JSON = b"[" * 5000

# Pieces a mutation inserts: line ends of every kind, separators, bytes that are not UTF-8, lines
# longer than any limit, a flood of header lines, and JSON too deep to decode.
HOSTILE_PIECES = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b":", b": ", b" ", b",", b"=", b"_", b"{", b"}",
    b"\x00", b"\xff", b"\xc3", b"\xc3\xa9", b"\xed\xa0\x80", "\u00b2\u0663\u2028".encode(),
    b"0", b"-1", b"99999999999999999999", b"::", b"0.0.0.0", b"ping", b"pong", b"expired ",
    b"x" * 17000, b"x" * 70000,
    b"".join(b"h%d: v\r\n" % i for i in range(70)),
    DEEP_JSON,
]

_piece = st.one_of(st.sampled_from(HOSTILE_PIECES), st.binary(min_size=1, max_size=8))


@st.composite
def mutated(draw, data: bytes, max_mutations: int = 4) -> bytes:
    """`data` with a few bytes inserted, deleted, flipped or duplicated, or its CRLFs made LFs."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(["insert", "delete", "flip", "duplicate", "lf", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[at:at] = draw(_piece)
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
        elif kind == "lf":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", draw(st.integers(1, 4))))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=200),
    st.lists(_piece, max_size=12).map(b"".join),
)


RESYNC = b"\r\n\r\n"              # ends whatever line and request a fuzzed input left open


@st.composite
def in_some_form(draw, data: bytes):
    """(form, bytes): well-formed `data` as it is, mutated, replaced by garbage, or after garbage."""
    form = draw(st.sampled_from(["well-formed", "mutated", "mutated", "garbage", "garbage-between"]))
    if form == "mutated":
        data = draw(mutated(data))
    elif form == "garbage":
        data = draw(garbage)
    elif form == "garbage-between":
        data = draw(garbage) + RESYNC + data
    return form, data


@st.composite
def split(draw, data: bytes, max_cuts: int = 8) -> list:
    """`data` cut at arbitrary points into chunks (as TCP may deliver it)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_cuts)))
    chunks, start = [], 0
    for cut in cuts + [len(data)]:
        chunks.append(data[start:cut])
        start = cut
    return chunks


class Tracebacks:
    """Log records that carry an exception, from Python logging and from Twisted's log
    (e.g. "Unhandled error in Deferred", or an exception escaping dataReceived)."""

    def __init__(self):
        self.records = []

    def __str__(self):
        return "\n".join(self.records)


class _Handler(logging.Handler):
    def __init__(self, found):
        super().__init__(logging.DEBUG)
        self.found = found

    def emit(self, record):
        if record.exc_info:
            self.found.records.append("%s: %s" % (record.name, record.getMessage()))


@contextlib.contextmanager
def watched_for_tracebacks(collect_garbage: bool = False):
    """Yields a Tracebacks; `collect_garbage` flushes Deferreds failed and dropped (Twisted logs
    their failure only when they are collected)."""
    found = Tracebacks()
    handler = _Handler(found)
    logger = logging.getLogger("mediaproxy")
    logger.addHandler(handler)

    def twisted_observer(event):
        if event.get("log_failure") is not None:
            found.records.append("twisted: %s" % event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(twisted_observer)
    try:
        yield found
        if collect_garbage:
            gc.collect(1)       # the young generations: where the Deferreds of this example are
    finally:
        globalLogPublisher.removeObserver(twisted_observer)
        logger.removeHandler(handler)


# Values of the proxy module's headers (SPEC §2), well-formed, with what they parse to.

MEDIA_TYPES = ["audio", "video", "image", "text", "application", "message"]
DIRECTIONS = ["sendrecv", "sendonly", "recvonly", "inactive"]

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_token = st.builds(operator.add, st.sampled_from(_ALNUM), st.text(alphabet=_ALNUM + "_.+-", max_size=7))
_parameter_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789._-+/=", max_size=12)
ip_addresses = st.one_of(st.ip_addresses().map(str), st.sampled_from(["0.0.0.0", "::", "10.0.0.5"]))
# Cheaper to draw, for tests that draw many streams: a few addresses of every kind.
some_ip_addresses = st.sampled_from(["10.0.0.5", "192.0.2.1", "0.0.0.0", "255.255.255.255", "::", "::1",
                                     "2001:db8::1", "fe80::1:2:3:4", "::ffff:10.0.0.1", "2001:db8::"])


@st.composite
def media_streams(draw, ips=ip_addresses, max_parameters=3):
    """(`TYPE:IP:PORT:DIRECTION[:key=value...]` text, the MediaDescription it stands for)."""
    media_type = draw(st.one_of(st.sampled_from(MEDIA_TYPES), _token))
    ip = draw(ips)
    port = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 4000, 65535])))
    direction = draw(st.sampled_from(DIRECTIONS))
    parameters = draw(st.dictionaries(_token, _parameter_value, max_size=max_parameters))
    text = "%s:%s:%d:%s" % (media_type, ip, port, direction) + "".join(
        ":%s=%s" % item for item in parameters.items())
    return text, MediaDescription(media_type, ip, port, direction, parameters)


def media_values(max_streams: int = 4, **stream_options):
    """(a whole `media` header value, its tuple of MediaDescriptions)."""
    return st.lists(media_streams(**stream_options), min_size=1, max_size=max_streams).map(
        lambda streams: (",".join(text for text, _ in streams), tuple(media for _, media in streams)))


@st.composite
def signaling_values(draw, ips=ip_addresses):
    """(a `signaling_ip` value in one of its three forms, the SignalingInfo it stands for)."""
    source = draw(ips)
    destination = draw(st.one_of(st.none(), ips))
    form = draw(st.sampled_from(["plain", "json"] if destination is None else ["pair", "json"]))
    if form == "plain":
        return source, SignalingInfo(source)
    if form == "pair":
        return "%s_%s" % (source, destination), SignalingInfo(source, destination)
    username = draw(st.one_of(st.none(), st.text(min_size=1, max_size=12)))
    value = {"signaling_ip": source}
    if destination is not None:
        value["destination_ip"] = destination
    if username is not None:
        value["username"] = username
    return json.dumps(value), SignalingInfo(source, destination, username)


# Requests of the proxy module (SPEC §2).

def request_bytes(command: str, headers) -> bytes:
    """`command`, `name: value` lines for the (name, value) pairs, an empty line."""
    return "".join(["%s\r\n" % command] + ["%s: %s\r\n" % header for header in headers] + ["\r\n"]).encode()


# A cheap variety of streams (what parses to what is tested by test_fuzz_codecs with
# media_values): every kind of address, hold, disabled, ICE, parameters.
STREAMS = ["audio:10.0.0.5:4000:sendrecv", "audio:10.0.0.5:4000:sendrecv:ice=yes", "audio:0.0.0.0:4000:sendonly",
           "video:10.0.0.5:4002:recvonly:ice=no:x-rtcp=4003", "image:192.0.2.7:0:sendrecv",
           "audio:2001:db8::1:5000:inactive", "message:::1:5002:sendrecv", "x-new.type+1::::0:SENDRECV:ICE=YES",
           "video:10.0.0.6:65535:sendrecv"]
try:
    _printable = st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"))
except TypeError:               # hypothesis before 6.84 (Debian 12 has 6.36) calls it blacklist_categories
    _printable = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
_header_text = st.text(alphabet=_printable, max_size=16)


@st.composite
def updates(draw, call_ids, relay_ips=("10.1.0.1",)):
    """A well-formed `update`: (its bytes, its number of streams or None without `media`)."""
    headers = [("type", draw(st.sampled_from(["request", "reply"]))),
               ("call_id", draw(st.sampled_from(call_ids))),
               ("cseq", "%d INVITE" % draw(st.integers(1, 4))),
               ("from_tag", draw(st.sampled_from(["alice", "bob"]))),
               ("to_tag", draw(st.sampled_from(["", "alice", "bob"])))]
    streams = None
    if draw(st.booleans()):
        streams = draw(st.lists(st.sampled_from(STREAMS), min_size=1, max_size=4))
        headers.append(("media", ",".join(streams)))
        streams = len(streams)
    optional = [("signaling_ip", signaling_values(some_ip_addresses).map(lambda case: case[0])),
                ("media_relay", st.sampled_from(list(relay_ips) + ["10.9.9.9"])),
                ("dialog_id", st.sampled_from(["1234", "17:42", ""])),
                ("user_agent", _header_text), ("from_uri", _header_text), ("to_uri", _header_text)]
    for name, values in optional:
        if draw(st.booleans()):
            headers.append((name, draw(values)))
    headers = draw(st.permutations(headers))
    return request_bytes(draw(st.sampled_from(["update", "UPDATE"])), headers), streams


def request_at_limits(command: str, headers, size: int = None, header_count: int = None,
                      line: int = None, max_line_length: int = 16384) -> bytes:
    """A request of `command` and `headers`, padded with more header lines: to `size` characters
    in its lines (line ends not counted), to `header_count` header lines, or with a `user_agent`
    line `line` characters long. Padding lines are at most `max_line_length - 20` long."""
    headers = list(headers)
    if line is not None:
        headers.append(("user_agent", "x" * (line - len("user_agent: "))))
    if header_count is not None:
        headers.extend(("x%d" % i, "v") for i in range(header_count - len(headers)))
    if size is not None:
        missing = size - len(command) - sum(len("%s: %s" % header) for header in headers)
        while missing > 0:
            name = "pad%d" % len(headers)
            length = min(missing, max_line_length - 20)          # of the whole line
            if 0 < missing - length < 20:
                length -= 20                                       # room for the last line
            headers.append((name, "y" * (length - len(name + ": "))))
            missing -= length
    data = request_bytes(command, headers)
    assert size is None or len(data.decode()) - 2 * (len(headers) + 2) == size
    return data
