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


# A header with an empty value counts as absent (e.g. `to_tag: ` on an initial INVITE): values
# are read with `or None`, not from a copy of the headers without the empty ones.

def _required(headers, name):
    value = headers.get(name)
    if not value:
        raise RequestError("missing %s header" % name)
    return value


def parse_update(headers: Mapping[str, str]) -> UpdateRequest:
    get = headers.get
    kind = _required(headers, "type").lower()
    if kind not in ("request", "reply"):
        raise RequestError("bad type %r" % kind[:20])
    cseq_text = (_required(headers, "cseq").split() or [""])[0]
    if not is_number(cseq_text) or int(cseq_text) > MAX_CSEQ:
        raise RequestError("bad cseq %r" % cseq_text[:20])
    signaling, media_relay, media = get("signaling_ip"), get("media_relay"), get("media")
    try:
        signaling = parse_signaling_ip(signaling) if signaling else None
        media_relay = parse_ip(media_relay) if media_relay else None
        media = parse_media(media) if media else None
    except MediaError as e:
        raise RequestError(str(e)) from None
    return UpdateRequest(kind, _required(headers, "call_id"), _required(headers, "from_tag"), int(cseq_text),
                         get("to_tag") or None, get("from_uri") or None, get("to_uri") or None,
                         get("user_agent") or None, get("dialog_id") or None, media_relay, signaling, media)


def parse_remove(headers: Mapping[str, str]) -> RemoveRequest:
    return RemoveRequest(_required(headers, "call_id"), headers.get("from_tag") or None, headers.get("to_tag") or None)


def parse_proxy_request(request: Request):
    """Validate a request from the proxy module: UpdateRequest or RemoveRequest."""
    command = request.command.lower()
    if command == "update":
        return parse_update(request.headers)
    if command == "remove":
        return parse_remove(request.headers)
    raise RequestError("unknown command %r" % request.command[:40])
