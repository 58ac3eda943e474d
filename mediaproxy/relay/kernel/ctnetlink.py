"""Conntrack netlink (ctnetlink) messages, encoded and decoded without I/O.

Only what the relay needs: create a NAT entry, get, delete, dump by mark,
and read entries and acknowledgements back. pyroute2 names the protocol
(its constants are used here, and its nfct_msg is the reference the unit
tests decode our bytes with), but its generic encoder costs about 1 ms per
message: this module packs the few messages we send with struct, about a
hundred times faster, so thousands of entries go in one batch.

Layout reminders: every message is an nlmsghdr, an nfgenmsg, then netlink
attributes (length, type, payload padded to 4 bytes); ctnetlink nests the
tuple and NAT attributes. Ports and marks are big endian.
"""

import functools
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW

# Attribute numbers (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS = 1, 2, 3
CTA_NAT_SRC, CTA_TIMEOUT, CTA_MARK = 6, 7, 8
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID, CTA_NAT_DST = 9, 10, 12, 13
CTA_MARK_MASK = 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO, CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP = 1, 2, 3, 4, 5
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES, CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES = 1, 2, 3, 4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNLGRP_CONNTRACK_DESTROY = 3
MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

_HEADER = struct.Struct("=IHHII")       # nlmsghdr: length, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")          # nfgenmsg: family, version, res_id (big endian, 0)
_NLA = struct.Struct("=HH")

Address = Tuple[str, int]


class Tuple5(NamedTuple):
    """A UDP flow as conntrack sees it: source and destination address and port.
    (A tuple: made and hashed for every entry read, in C.)"""
    src: str
    dst: str
    sport: int
    dport: int

    def inverse(self) -> "Tuple5":
        return Tuple5(self.dst, self.src, self.dport, self.sport)


@dataclass(slots=True)
class Entry:
    """A conntrack entry read from the kernel (an event, a dump or a get)."""
    msg_type: int
    orig: Optional[Tuple5]
    reply: Optional[Tuple5]
    orig_packets: int = 0
    orig_bytes: int = 0
    reply_packets: int = 0
    reply_bytes: int = 0
    mark: int = 0
    id: int = 0
    seq: int = 0
    proto: int = 0

    @property
    def destroyed(self) -> bool:
        return self.msg_type == MSG_DELETE


@dataclass(frozen=True)
class Ack:
    """The kernel's answer to one request: errno 0 for success."""
    seq: int
    errno: int


@dataclass(frozen=True)
class Done:
    seq: int


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _ip_attrs(src: str, dst: str) -> bytes:
    family = _family(src)
    src_kind, dst_kind = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if family == socket.AF_INET6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    return _attr(src_kind, socket.inet_pton(family, src)) + _attr(dst_kind, socket.inet_pton(family, dst))


def _tuple(kind: int, flow: Tuple5) -> bytes:
    return _nested(kind,
                   _nested(CTA_TUPLE_IP, _ip_attrs(flow.src, flow.dst)),
                   _nested(CTA_TUPLE_PROTO,
                           _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP])),
                           _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", flow.sport)),
                           _attr(CTA_PROTO_DST_PORT, struct.pack(">H", flow.dport))))


def _nat(kind: int, address: Address) -> bytes:
    ip, port = address
    family = _family(ip)
    low, high = (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP) if family == socket.AF_INET6 else (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP)
    packed = socket.inet_pton(family, ip)
    return _nested(kind, _attr(low, packed), _attr(high, packed),
                   _nested(CTA_NAT_PROTO,
                           _attr(CTA_PROTONAT_PORT_MIN, struct.pack(">H", port)),
                           _attr(CTA_PROTONAT_PORT_MAX, struct.pack(">H", port))))


def _message(msg_type: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(family, 0, 0) + body
    return _HEADER.pack(_HEADER.size + len(payload), msg_type, flags, seq, 0) + payload


def encode_nat_entry(seq: int, orig: Tuple5, nat_dst: Address, nat_src: Address, timeout: int, mark: int) -> bytes:
    """A new entry: packets of `orig` go to nat_dst from nat_src, and the answers back.

    The reply tuple is the plain inverse of the original; the kernel applies
    the NAT and rewrites it itself (FIELD-NOTES 3).
    """
    body = (_tuple(CTA_TUPLE_ORIG, orig) + _tuple(CTA_TUPLE_REPLY, orig.inverse())
            + _nat(CTA_NAT_DST, nat_dst) + _nat(CTA_NAT_SRC, nat_src)
            + _attr(CTA_TIMEOUT, struct.pack(">I", timeout)) + _attr(CTA_MARK, struct.pack(">I", mark)))
    return _message(MSG_NEW, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, _family(orig.src), body)


# The same IPv4 message in one struct: the whole layout is fixed, so packing
# it at once costs a few microseconds instead of a few dozen.
_TUPLE4 = "HH" "HH" "HH4s" "HH4s" "HH" "HHB3x" "HHH2x" "HHH2x"
_NAT4 = "HH" "HH4s" "HH4s" "HH" "HHH2x" "HHH2x"
_NAT_ENTRY4 = struct.Struct("=IHHII" "BBH" + _TUPLE4 + _TUPLE4 + _NAT4 + _NAT4 + "HHI" "HHI")
_NAT_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


# The packers run for every hand-over: the same few addresses again and again
# (the relay's own in every message), and ports in network byte order from a
# table instead of a call each.
NET_PORT = tuple(socket.htons(port) for port in range(65536))
packed_ipv4 = functools.lru_cache(maxsize=65536)(socket.inet_aton)


def _tuple4_values(kind, src, dst, sport, dport):
    return (52, kind | NLA_F_NESTED, 20, CTA_TUPLE_IP | NLA_F_NESTED, 8, CTA_IP_V4_SRC, src, 8, CTA_IP_V4_DST, dst,
            28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM, socket.IPPROTO_UDP,
            6, CTA_PROTO_SRC_PORT, NET_PORT[sport], 6, CTA_PROTO_DST_PORT, NET_PORT[dport])


def _nat4_values(kind, ip, port):
    return (40, kind | NLA_F_NESTED, 8, CTA_NAT_V4_MINIP, ip, 8, CTA_NAT_V4_MAXIP, ip,
            20, CTA_NAT_PROTO | NLA_F_NESTED, 6, CTA_PROTONAT_PORT_MIN, NET_PORT[port],
            6, CTA_PROTONAT_PORT_MAX, NET_PORT[port])


def encode_nat_entry4(seq: int, orig: Tuple5, nat_dst: Address, nat_src: Address, timeout: int, mark: int) -> bytes:
    """encode_nat_entry for IPv4, packed at once."""
    src, dst = packed_ipv4(orig.src), packed_ipv4(orig.dst)
    return _NAT_ENTRY4.pack(_NAT_ENTRY4.size, MSG_NEW, _NAT_FLAGS, seq, 0, socket.AF_INET, 0, 0,
                            *_tuple4_values(CTA_TUPLE_ORIG, src, dst, orig.sport, orig.dport),
                            *_tuple4_values(CTA_TUPLE_REPLY, dst, src, orig.dport, orig.sport),
                            *_nat4_values(CTA_NAT_DST, packed_ipv4(nat_dst[0]), nat_dst[1]),
                            *_nat4_values(CTA_NAT_SRC, packed_ipv4(nat_src[0]), nat_src[1]),
                            8, CTA_TIMEOUT, socket.htonl(timeout), 8, CTA_MARK, socket.htonl(mark))


def encode_plain_entry(seq: int, orig: Tuple5, timeout: int, mark: int = 0) -> bytes:
    """An entry without NAT, like the one a first packet makes (for tests and benchmarks)."""
    body = (_tuple(CTA_TUPLE_ORIG, orig) + _tuple(CTA_TUPLE_REPLY, orig.inverse())
            + _attr(CTA_TIMEOUT, struct.pack(">I", timeout)) + _attr(CTA_MARK, struct.pack(">I", mark)))
    return _message(MSG_NEW, _NAT_FLAGS, seq, _family(orig.src), body)


_DELETE4 = struct.Struct("=IHHII" "BBH" + _TUPLE4)


def encode_delete(seq: int, flow: Tuple5) -> bytes:
    """Delete the entry that has `flow` as its original or its reply tuple."""
    if ":" not in flow.src:
        return _DELETE4.pack(_DELETE4.size, MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, 0, socket.AF_INET, 0, 0,
                             *_tuple4_values(CTA_TUPLE_ORIG, packed_ipv4(flow.src), packed_ipv4(flow.dst),
                                             flow.sport, flow.dport))
    return _message(MSG_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, _family(flow.src), _tuple(CTA_TUPLE_ORIG, flow))


def encode_get(seq: int, flow: Tuple5) -> bytes:
    return _message(MSG_GET, NLM_F_REQUEST | NLM_F_ACK, seq, _family(flow.src), _tuple(CTA_TUPLE_ORIG, flow))


def encode_dump(seq: int, mark: Optional[int], family: int = socket.AF_INET) -> bytes:
    """Every entry carrying `mark` (the kernel filters the dump by mark), or every entry for None."""
    body = b""
    if mark is not None:
        body = _attr(CTA_MARK, struct.pack(">I", mark)) + _attr(CTA_MARK_MASK, struct.pack(">I", 0xFFFFFFFF))
    return _message(MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, body)


def encode_evicting_walk(seq: int, family: int = socket.AF_INET) -> bytes:
    """A dump that lists nothing (mark & 0 == 1 holds for no entry) but walks the whole table:
    on its way the kernel destroys the entries that timed out, with their destroy events,
    which its garbage collection would send only up to a minute later."""
    body = _attr(CTA_MARK, struct.pack(">I", 1)) + _attr(CTA_MARK_MASK, struct.pack(">I", 0))
    return _message(MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, body)


# Decoding.

def _attributes(data: bytes, start: int, end: int):
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            break
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def _decode_tuple(data, start, end):
    """(Tuple5 or None, IP protocol number)."""
    src = dst = None
    sport = dport = proto = 0
    for kind, a, b in _attributes(data, start, end):
        if kind == CTA_TUPLE_IP:
            for ip_kind, c, d in _attributes(data, a, b):
                if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = socket.inet_ntop(socket.AF_INET if d - c == 4 else socket.AF_INET6, data[c:d])
                elif ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = socket.inet_ntop(socket.AF_INET if d - c == 4 else socket.AF_INET6, data[c:d])
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, c, d in _attributes(data, a, b):
                if proto_kind == CTA_PROTO_NUM:
                    proto = data[c]
                elif proto_kind == CTA_PROTO_SRC_PORT:
                    sport = struct.unpack_from(">H", data, c)[0]
                elif proto_kind == CTA_PROTO_DST_PORT:
                    dport = struct.unpack_from(">H", data, c)[0]
    if src is None or dst is None:
        return None, proto
    return Tuple5(src, dst, sport, dport), proto


def _decode_counters(data, start, end):
    packets = octets = 0
    for kind, a, b in _attributes(data, start, end):
        if kind == CTA_COUNTERS_PACKETS:
            packets = struct.unpack_from(">Q", data, a)[0]
        elif kind == CTA_COUNTERS_BYTES:
            octets = struct.unpack_from(">Q", data, a)[0]
        elif kind == CTA_COUNTERS32_PACKETS:
            packets = struct.unpack_from(">I", data, a)[0]
        elif kind == CTA_COUNTERS32_BYTES:
            octets = struct.unpack_from(">I", data, a)[0]
    return packets, octets


# Fast paths for what dumps and events are made of: an IPv4 tuple (52 bytes
# with its header) and 64-bit counters (28 bytes), read at fixed offsets.
# Anything else goes through the general attribute walk.
_TUPLE4_HEADERS = struct.Struct("=HHHHHH4xHH4xHHHH")
_TUPLE4_EXPECTED = (52, 20, 8, CTA_IP_V4_SRC, 8, CTA_IP_V4_DST, 28, 5, CTA_PROTO_NUM)
_PORTS = struct.Struct(">H6xH")
_COUNTERS64 = struct.Struct(">4xQ4xQ")
_U32 = struct.Struct(">I")
_ipv4 = functools.lru_cache(maxsize=65536)(socket.inet_ntoa)     # the same few addresses, over and over


def _decode_tuple_at(data, header: int, end: int):
    """The tuple attribute whose header starts at `header`: (Tuple5 or None, protocol)."""
    fields = _TUPLE4_HEADERS.unpack_from(data, header)
    if ((fields[0], fields[2], fields[4], fields[5] & NLA_TYPE_MASK, fields[6], fields[7] & NLA_TYPE_MASK,
         fields[8], fields[10], fields[11] & NLA_TYPE_MASK) == _TUPLE4_EXPECTED and header + 52 <= end):
        sport, dport = _PORTS.unpack_from(data, header + 40)
        return (Tuple5(_ipv4(data[header + 12:header + 16]), _ipv4(data[header + 20:header + 24]), sport, dport),
                data[header + 32])
    length = _NLA.unpack_from(data, header)[0]
    return _decode_tuple(data, header + 4, header + length)


class _Layout:
    """Where the attributes are in entries of one message length: the kernel writes the
    entries of a table the same way, so after the first one the others are read at these
    offsets, once one struct of their attribute headers proves they are the same."""

    __slots__ = ("headers", "expected", "orig", "reply", "counters_orig", "counters_reply", "mark", "id")

    def __init__(self, data, start, end):
        offsets, formats, expected, position = {}, [], [], start
        offset = start + _NFGEN.size
        while offset + 4 <= end:
            length, kind = _NLA.unpack_from(data, offset)
            if length < 4:
                break
            formats.append("%dxI" % (offset - position))
            expected.append(_U32_NATIVE.unpack_from(data, offset)[0])
            position = offset + 4
            offsets.setdefault(kind & NLA_TYPE_MASK, (offset, length))
            offset += (length + 3) & ~3
        self.headers = struct.Struct("=" + "".join(formats))
        self.expected = tuple(expected)

        def at(kind, size):
            offset, length = offsets.get(kind, (None, 0))
            return offset - start if offset is not None and length == size else None
        self.orig, self.reply = at(CTA_TUPLE_ORIG, 52), at(CTA_TUPLE_REPLY, 52)
        self.counters_orig, self.counters_reply = at(CTA_COUNTERS_ORIG, 28), at(CTA_COUNTERS_REPLY, 28)
        self.mark, self.id = at(CTA_MARK, 8), at(CTA_ID, 8)


_U32_NATIVE = struct.Struct("=I")
_layouts = {}


def _decode_entry(data, start, end, msg_type, seq) -> Entry:
    layout = _layouts.get(end - start)
    if layout is None and len(_layouts) < 64:
        layout = _layouts[end - start] = _Layout(data, start, end)
    if layout is not None and layout.orig is not None and layout.headers.unpack_from(data, start) == layout.expected:
        return _decode_laid_out(data, start, msg_type, seq, layout)
    return _decode_walking(data, start, end, msg_type, seq)


def _decode_laid_out(data, start, msg_type, seq, layout) -> Entry:
    orig, proto = _decode_tuple_at(data, start + layout.orig, start + layout.orig + 52)
    entry = Entry(msg_type, orig, None, seq=seq, proto=proto)
    if layout.reply is not None:
        entry.reply = _decode_tuple_at(data, start + layout.reply, start + layout.reply + 52)[0]
    if layout.counters_orig is not None:
        entry.orig_packets, entry.orig_bytes = _COUNTERS64.unpack_from(data, start + layout.counters_orig + 4)
    if layout.counters_reply is not None:
        entry.reply_packets, entry.reply_bytes = _COUNTERS64.unpack_from(data, start + layout.counters_reply + 4)
    if layout.mark is not None:
        entry.mark = _U32.unpack_from(data, start + layout.mark + 4)[0]
    if layout.id is not None:
        entry.id = _U32.unpack_from(data, start + layout.id + 4)[0]
    return entry


def _decode_walking(data, start, end, msg_type, seq) -> Entry:
    entry = Entry(msg_type, None, None, seq=seq)
    offset = start + _NFGEN.size
    unpack = _NLA.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        a, b = offset + 4, min(offset + length, end)
        if kind == CTA_TUPLE_ORIG and b - offset >= 52:
            entry.orig, entry.proto = _decode_tuple_at(data, offset, b)
        elif kind == CTA_TUPLE_REPLY and b - offset >= 52:
            entry.reply = _decode_tuple_at(data, offset, b)[0]
        elif kind == CTA_COUNTERS_ORIG:
            if length == 28:
                entry.orig_packets, entry.orig_bytes = _COUNTERS64.unpack_from(data, a)
            else:
                entry.orig_packets, entry.orig_bytes = _decode_counters(data, a, b)
        elif kind == CTA_COUNTERS_REPLY:
            if length == 28:
                entry.reply_packets, entry.reply_bytes = _COUNTERS64.unpack_from(data, a)
            else:
                entry.reply_packets, entry.reply_bytes = _decode_counters(data, a, b)
        elif kind == CTA_MARK and length >= 8:
            entry.mark = _U32.unpack_from(data, a)[0]
        elif kind == CTA_ID and length >= 8:
            entry.id = _U32.unpack_from(data, a)[0]
        offset += (length + 3) & ~3
    return entry


def decode_messages(data: bytes) -> list:
    """Entries, Acks and Dones in a buffer read from a ctnetlink socket."""
    messages = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            break
        start, end = offset + _HEADER.size, offset + length
        if msg_type == NLMSG_ERROR and end - start >= 4:
            errno = -struct.unpack_from("=i", data, start)[0]
            messages.append(Ack(seq, errno))
        elif msg_type == NLMSG_DONE:
            messages.append(Done(seq))
        elif msg_type in (MSG_NEW, MSG_DELETE):
            messages.append(_decode_entry(data, start, end, msg_type, seq))
        offset += (length + 3) & ~3
    return messages
