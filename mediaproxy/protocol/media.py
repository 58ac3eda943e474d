"""Values of the proxy module's `media` and `signaling_ip` headers (sans-IO)."""

import functools
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

from mediaproxy.protocol.framing import is_number

DIRECTIONS = frozenset(["sendrecv", "sendonly", "recvonly", "inactive"])
HOLD_ADDRESSES = frozenset(["0.0.0.0", "::"])
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
MAX_STREAMS = 32


class MediaError(ValueError):
    """A `media` or `signaling_ip` value that does not follow the protocol."""


@dataclass(slots=True)
class MediaDescription:
    """One stream of an SDP body, as the proxy module describes it."""
    media_type: str
    ip: str
    port: int
    direction: str = "sendrecv"
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def disabled(self) -> bool:
        return self.port == 0

    @property
    def on_hold(self) -> bool:
        return self.ip in HOLD_ADDRESSES or self.direction in ("sendonly", "inactive")

    @property
    def ip_version(self) -> int:
        return 6 if ":" in self.ip else 4

    @property
    def ice(self) -> bool:
        return self.parameters.get("ice", "no").lower() == "yes"

    @property
    def address(self):
        return (self.ip, self.port)


def parse_ip(text: str) -> str:
    try:
        return _normal_ip(text.strip())
    except ValueError:
        raise MediaError("%r is not an IP address" % text[:64]) from None


@functools.lru_cache(maxsize=4096)
def _normal_ip(text: str) -> str:
    """The canonical text of an address; every request names a few, mostly the same (the proxy's,
    the phones'): remembered, as ipaddress takes microseconds. A ValueError is not remembered."""
    return str(ipaddress.ip_address(text))


def parse_stream(text: str) -> MediaDescription:
    """Parse `TYPE:IP:PORT:DIRECTION[:key=value...]`; IP may be IPv6."""
    media_type, sep, rest = text.strip().partition(":")
    if not sep or not _TOKEN.match(media_type):
        raise MediaError("bad media stream %r" % text[:80])
    fields = rest.split(":")
    parameters = {}
    while fields and "=" in fields[-1]:
        key, _, value = fields.pop().partition("=")
        key = key.strip().lower()
        if not _TOKEN.match(key):
            raise MediaError("bad media parameter %r" % key[:40])
        parameters[key] = value.strip()
    if len(fields) < 3:
        raise MediaError("bad media stream %r" % text[:80])
    direction = fields.pop().strip().lower()
    port_text = fields.pop().strip()
    ip = parse_ip(":".join(fields))
    if direction not in DIRECTIONS:
        raise MediaError("bad media direction %r" % direction[:20])
    if not is_number(port_text) or not 0 <= int(port_text) <= 65535:
        raise MediaError("bad media port %r" % port_text[:20])
    return MediaDescription(media_type.lower(), ip, int(port_text), direction, parameters)


def streams_ip_version(streams, count_hold: bool = True) -> Optional[int]:
    """The IP version (4 or 6) of the SDP addresses of a `media` header's enabled streams: of
    their addresses, else (with count_hold) of their hold addresses (0.0.0.0 is IPv4, :: IPv6);
    None when no enabled stream names one. The relay answers all the streams with one address,
    so streams of both versions are a MediaError."""
    versions, hold_versions = set(), set()
    for media in streams:
        if not media.disabled:
            (hold_versions if media.ip in HOLD_ADDRESSES else versions).add(media.ip_version)
    if not versions and count_hold:
        versions = hold_versions
    if len(versions) > 1:
        raise MediaError("the streams mix IPv4 and IPv6 addresses (a relay does not bridge them)")
    return next(iter(versions), None)


def parse_media(value: str) -> tuple:
    """Parse a whole `media` header: comma separated streams, in SDP order."""
    parts = value.split(",")
    if len(parts) > MAX_STREAMS:
        raise MediaError("too many media streams (%d, at most %d)" % (len(parts), MAX_STREAMS))
    return tuple(parse_stream(part) for part in parts)


@dataclass(slots=True)
class SignalingInfo:
    signaling_ip: str
    destination_ip: Optional[str] = None
    username: Optional[str] = None


def parse_signaling_ip(value: str) -> SignalingInfo:
    """Plain IP, `IP_DESTINATIONIP`, or a JSON object with the three keys."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):     # RecursionError: nested deeper than Python can decode
            raise MediaError("signaling_ip is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("signaling_ip"), str):
            raise MediaError("signaling_ip JSON has no signaling_ip")
        destination = data.get("destination_ip")
        username = data.get("username")
        return SignalingInfo(parse_ip(data["signaling_ip"]),
                             parse_ip(destination) if isinstance(destination, str) and destination else None,
                             username if isinstance(username, str) and username else None)
    source, _, destination = value.partition("_")
    return SignalingInfo(parse_ip(source), parse_ip(destination) if destination else None)
