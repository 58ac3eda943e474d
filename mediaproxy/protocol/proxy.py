"""The proxy module's requests to the dispatcher (SPEC §2), sans-IO.

`parse_update` / `parse_remove` turn a framed Request into typed values; the
dispatcher uses them to refuse malformed requests before they reach a relay,
and the relay uses the same functions to act on them.
"""

from dataclasses import dataclass
from typing import Mapping, Optional

from mediaproxy.protocol.framing import Request, is_number
from mediaproxy.protocol.media import MediaError, SignalingInfo, parse_ip, parse_media, parse_signaling_ip

COMMANDS = frozenset(["update", "remove"])
MAX_CSEQ = 2 ** 31 - 1


class RequestError(ValueError):
    """A proxy request that cannot be acted on; the answer is `error`."""


def present_headers(headers: Mapping[str, str]) -> dict:
    """Headers with empty values count as absent (e.g. `to_tag: ` on an initial INVITE)."""
    return {name: value for name, value in headers.items() if value != ""}


@dataclass(slots=True)
class UpdateRequest:
    type: str                 # "request" (an offer) or "reply" (an answer)
    call_id: str
    from_tag: str
    cseq: int
    to_tag: Optional[str] = None
    from_uri: Optional[str] = None
    to_uri: Optional[str] = None
    user_agent: Optional[str] = None
    dialog_id: Optional[str] = None
    media_relay: Optional[str] = None
    signaling: Optional[SignalingInfo] = None
    media: Optional[tuple] = None     # None when the message had no SDP

    @property
    def is_request(self) -> bool:
        return self.type == "request"


@dataclass(slots=True)
class RemoveRequest:
    call_id: str
    from_tag: Optional[str] = None
    to_tag: Optional[str] = None


def _required(headers, name):
    try:
        return headers[name]
    except KeyError:
        raise RequestError("missing %s header" % name) from None


def parse_update(headers: Mapping[str, str]) -> UpdateRequest:
    headers = present_headers(headers)
    kind = _required(headers, "type").lower()
    if kind not in ("request", "reply"):
        raise RequestError("bad type %r" % kind[:20])
    cseq_text = (_required(headers, "cseq").split() or [""])[0]
    if not is_number(cseq_text) or int(cseq_text) > MAX_CSEQ:
        raise RequestError("bad cseq %r" % cseq_text[:20])
    try:
        signaling = parse_signaling_ip(headers["signaling_ip"]) if "signaling_ip" in headers else None
        media_relay = parse_ip(headers["media_relay"]) if "media_relay" in headers else None
        media = parse_media(headers["media"]) if "media" in headers else None
    except MediaError as e:
        raise RequestError(str(e)) from None
    return UpdateRequest(type=kind, call_id=_required(headers, "call_id"),
                         from_tag=_required(headers, "from_tag"), cseq=int(cseq_text),
                         to_tag=headers.get("to_tag"), from_uri=headers.get("from_uri"),
                         to_uri=headers.get("to_uri"), user_agent=headers.get("user_agent"),
                         dialog_id=headers.get("dialog_id"), media_relay=media_relay,
                         signaling=signaling, media=media)


def parse_remove(headers: Mapping[str, str]) -> RemoveRequest:
    headers = present_headers(headers)
    return RemoveRequest(_required(headers, "call_id"), headers.get("from_tag"), headers.get("to_tag"))


def parse_proxy_request(request: Request):
    """Validate a request from the proxy module: UpdateRequest or RemoveRequest."""
    command = request.command.lower()
    if command == "update":
        return parse_update(request.headers)
    if command == "remove":
        return parse_remove(request.headers)
    raise RequestError("unknown command %r" % request.command[:40])
