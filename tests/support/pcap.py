"""Reading what tests capture: classic pcap files, RTP headers, SIP and SDP.

``udp_packets(path)`` yields the UDP/IPv4 datagrams of a classic pcap file as
written by ``tcpdump -w`` (link types EN10MB, LINUX_SLL, LINUX_SLL2, RAW;
either byte order; micro- or nanosecond timestamps). Fragments and other
protocols are skipped. A file cut short by a stopped tcpdump ends cleanly.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = [
    "UdpPacket",
    "RtpHeader",
    "Sdp",
    "SdpMedia",
    "udp_packets",
    "read_udp_packets",
    "parse_rtp",
    "sip_body",
    "parse_sdp",
]

LINKTYPE_EN10MB = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = (0x8100, 0x88A8)
IPPROTO_UDP = 17

_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


@dataclass(frozen=True)
class UdpPacket:
    time: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes

    @property
    def source(self) -> str:
        return f"{self.src}:{self.sport}"

    @property
    def destination(self) -> str:
        return f"{self.dst}:{self.dport}"


def udp_packets(path: str | Path) -> Iterator[UdpPacket]:
    with open(path, "rb") as stream:
        yield from _read(stream)


def read_udp_packets(path: str | Path) -> list[UdpPacket]:
    return list(udp_packets(path))


def _read(stream: BinaryIO) -> Iterator[UdpPacket]:
    header = stream.read(24)
    if len(header) < 24:
        return  # tcpdump stopped before writing its header
    try:
        order, unit = _MAGIC[header[:4]]
    except KeyError:
        raise ValueError(f"not a classic pcap file (magic {header[:4].hex()}; pcapng is not supported)") from None
    linktype = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF
    if linktype not in (LINKTYPE_EN10MB, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW):
        raise ValueError(f"unsupported pcap link type {linktype}")
    record = struct.Struct(order + "IIII")
    while True:
        raw = stream.read(record.size)
        if len(raw) < record.size:
            return
        seconds, fraction, captured, _original = record.unpack(raw)
        frame = stream.read(captured)
        if len(frame) < captured:
            return  # last record cut short
        ip = _network_layer(linktype, frame)
        if ip is None:
            continue
        packet = _udp(seconds + fraction * unit, ip)
        if packet is not None:
            yield packet


def _network_layer(linktype: int, frame: bytes) -> bytes | None:
    """The IPv4 packet inside a frame, or None."""
    if linktype == LINKTYPE_RAW:
        return frame if frame[:1] and frame[0] >> 4 == 4 else None
    if linktype == LINKTYPE_EN10MB:
        offset, ethertype = 14, int.from_bytes(frame[12:14], "big")
        while ethertype in ETHERTYPE_VLAN and len(frame) >= offset + 4:
            ethertype = int.from_bytes(frame[offset + 2 : offset + 4], "big")
            offset += 4
    elif linktype == LINKTYPE_LINUX_SLL:
        offset, ethertype = 16, int.from_bytes(frame[14:16], "big")
    else:  # LINUX_SLL2
        offset, ethertype = 20, int.from_bytes(frame[0:2], "big")
    if ethertype != ETHERTYPE_IPV4 or len(frame) < offset + 20:
        return None
    return frame[offset:]


def _udp(timestamp: float, ip: bytes) -> UdpPacket | None:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    header_length = (ip[0] & 0x0F) * 4
    total_length = int.from_bytes(ip[2:4], "big")
    flags_fragment = int.from_bytes(ip[6:8], "big")
    if ip[9] != IPPROTO_UDP or flags_fragment & 0x3FFF:  # not UDP, or a fragment (MF or offset)
        return None
    udp = ip[header_length : max(total_length, header_length)]
    if len(udp) < 8:
        return None
    sport, dport, udp_length = struct.unpack("!HHH", udp[:6])
    payload = udp[8 : max(udp_length, 8)]
    return UdpPacket(
        time=timestamp,
        src=str(ipaddress.IPv4Address(ip[12:16])),
        sport=sport,
        dst=str(ipaddress.IPv4Address(ip[16:20])),
        dport=dport,
        payload=payload,
    )


# -- RTP --


@dataclass(frozen=True)
class RtpHeader:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload_length: int


def parse_rtp(payload: bytes) -> RtpHeader | None:
    """The RTP header of a UDP payload, or None if it is not RTP version 2.

    RTCP (payload types 200-204 in the second byte) is not RTP and gives None.
    """
    if len(payload) < 12 or payload[0] >> 6 != 2:
        return None
    if 200 <= payload[1] <= 204:
        return None
    csrc_count = payload[0] & 0x0F
    header_length = 12 + 4 * csrc_count
    if payload[0] & 0x10 and len(payload) >= header_length + 4:  # extension
        header_length += 4 + 4 * int.from_bytes(payload[header_length + 2 : header_length + 4], "big")
    sequence, timestamp, ssrc = struct.unpack("!HII", payload[2:12])
    return RtpHeader(
        payload_type=payload[1] & 0x7F,
        marker=bool(payload[1] & 0x80),
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload_length=max(len(payload) - header_length, 0),
    )


# -- SIP and SDP --


def sip_body(message: str | bytes) -> str:
    """The body of a SIP message (after the first empty line), as text."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    message = message.replace("\r\n", "\n")
    _, _, body = message.partition("\n\n")
    return body


@dataclass(frozen=True)
class SdpMedia:
    media: str
    port: int
    protocol: str
    formats: tuple[str, ...]
    connection: str | None  # the media-level c= address, else the session's
    attributes: tuple[str, ...] = ()

    @property
    def direction(self) -> str:
        for value in ("sendrecv", "sendonly", "recvonly", "inactive"):
            if value in self.attributes:
                return value
        return "sendrecv"

    def rtpmap(self) -> dict[int, str]:
        """Payload type → encoding name from a=rtpmap lines."""
        mapping = {}
        for attribute in self.attributes:
            if attribute.startswith("rtpmap:"):
                number, _, encoding = attribute[len("rtpmap:") :].partition(" ")
                if number.isdigit():
                    mapping[int(number)] = encoding
        return mapping


@dataclass(frozen=True)
class Sdp:
    connection: str | None  # session-level c= address
    origin: str | None
    media: tuple[SdpMedia, ...] = field(default_factory=tuple)
    attributes: tuple[str, ...] = ()

    def audio(self) -> SdpMedia:
        for media in self.media:
            if media.media == "audio":
                return media
        raise LookupError("no audio stream in the SDP")


def parse_sdp(text: str | bytes) -> Sdp:
    """Parse an SDP body (or a whole SIP message: its body is used)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text.lstrip().startswith("v="):
        text = sip_body(text)
    session_connection = origin = None
    session_attributes: list[str] = []
    streams: list[dict] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 3:
                raise ValueError(f"bad m= line {line!r}")
            streams.append(
                {
                    "media": parts[0],
                    "port": int(parts[1].split("/")[0]),
                    "protocol": parts[2],
                    "formats": tuple(parts[3:]),
                    "connection": None,
                    "attributes": [],
                }
            )
        elif kind == "c":
            address = _connection_address(value)
            if streams:
                streams[-1]["connection"] = address
            else:
                session_connection = address
        elif kind == "o" and not streams:
            origin = value
        elif kind == "a":
            (streams[-1]["attributes"] if streams else session_attributes).append(value)
    media = tuple(
        SdpMedia(
            media=stream["media"],
            port=stream["port"],
            protocol=stream["protocol"],
            formats=stream["formats"],
            connection=stream["connection"] or session_connection,
            attributes=tuple(stream["attributes"]),
        )
        for stream in streams
    )
    return Sdp(connection=session_connection, origin=origin, media=media, attributes=tuple(session_attributes))


def _connection_address(value: str) -> str:
    parts = value.split()
    if len(parts) < 3:
        raise ValueError(f"bad c= line {value!r}")
    return parts[2].split("/")[0]
