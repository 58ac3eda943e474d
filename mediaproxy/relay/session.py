"""A call's media session and its SDP offer/answer logic (sans-IO).

Rules kept here (everything that changes a session's streams lives here):

- The caller is the party whose tag was in From on the session's first
  message. A request is sent by the From party, a reply by the To party.
- An offer/answer exchange belongs to one transaction: (requester, CSeq).
  A newer CSeq from a party starts a new transaction; an older one is stale
  and changes nothing. Within a transaction the first SDP is the offer (in
  the request, or in the reply for a late offer) and SDP from the other party
  is the answer. Repeated SDP (retransmissions, 183 then 200) applies again
  and changes nothing more.
- An offer's streams are matched to the current ones by position and type,
  else by type and the offerer's address; unmatched current streams close,
  unmatched offered streams are opened. Port 0 disables a stream.
- An answer with fewer streams, or port 0, rejects those streams.
- A changed address or port in the SDP resets that party's latch.
"""

from sys import intern
from typing import Optional, Protocol

from mediaproxy.protocol.proxy import UpdateRequest
from mediaproxy.relay.streams import CALLEE, CALLER, CLOSED, REJECTED, MediaStream, other_party, shared_address


class StreamAllocator(Protocol):
    def open_stream(self, media_type: str, now: float) -> MediaStream: ...
    def close_stream(self, stream: MediaStream, status: str, now: float) -> None: ...


class Session:
    # a relay holds one per call: no __dict__
    __slots__ = ("call_id", "from_tag", "to_tag", "from_uri", "to_uri", "caller_ua", "callee_ua", "username",
                 "dialog_id", "owner", "ip_version", "created", "start_time", "end_time", "streams", "all_streams",
                 "_transaction", "_offerer", "_last_cseq_caller", "_last_cseq_callee")

    def __init__(self, call_id: str, from_tag: str, now: float):
        self.call_id = call_id
        self.from_tag = from_tag
        self.to_tag = None
        self.from_uri = None
        self.to_uri = None
        self.caller_ua = None
        self.callee_ua = None
        self.username = None
        self.dialog_id = None
        self.owner = None                 # the dispatcher that created the session
        self.ip_version = 4               # of its streams' addresses and the relay's (never mixed)
        self.created = now
        self.start_time = None            # when the first answer arrived
        self.end_time = None
        self.streams = []                 # the current m-lines: MediaStream, or None when disabled
        self.all_streams = []             # every stream the session had, in order of creation
        self._transaction = None          # (requester party, cseq) of the current exchange
        self._offerer = None              # who made the offer in that exchange
        self._last_cseq_caller = -1       # the last CSeq of an exchange each party requested
        self._last_cseq_callee = -1       # (two attributes: a dict costs ~180 bytes a session)

    def sender(self, request: UpdateRequest) -> str:
        caller_is_from = request.from_tag == self.from_tag
        if request.is_request:
            return CALLER if caller_is_from else CALLEE
        return CALLEE if caller_is_from else CALLER

    @property
    def started(self) -> bool:
        return self.start_time is not None

    @property
    def active_streams(self):
        return [stream for stream in self.streams if stream is not None and not stream.ended]

    def update(self, request: UpdateRequest, allocator: StreamAllocator, now: float) -> list:
        """Apply an update from the proxy; returns one relay port per stream of its `media` (0 = disabled)."""
        party = self.sender(request)
        self._note_party_details(request, party)
        if request.media is None:
            return self._ports_for(other_party(party), len(self.streams))
        requester = party if request.is_request else other_party(party)
        transaction = (requester, request.cseq)
        if transaction != self._transaction:
            if request.cseq <= self._last_cseq(requester):
                return self._ports_for(other_party(party), len(request.media))     # stale exchange
            self._transaction, self._offerer = transaction, None
            self._set_last_cseq(requester, request.cseq)
        if self._offerer in (None, party):
            self._offerer = party
            self._apply_offer(party, request.media, allocator, now)
        else:
            self._apply_answer(party, request.media, allocator, now)
        return self._ports_for(other_party(party), len(request.media))

    def _last_cseq(self, requester: str) -> int:
        return self._last_cseq_caller if requester == CALLER else self._last_cseq_callee

    def _set_last_cseq(self, requester: str, cseq: int) -> None:
        if requester == CALLER:
            self._last_cseq_caller = cseq
        else:
            self._last_cseq_callee = cseq

    def _note_party_details(self, request: UpdateRequest, party: str) -> None:
        if request.to_tag and self.to_tag is None:
            self.to_tag = request.to_tag
        self.from_uri = self.from_uri or request.from_uri
        self.to_uri = self.to_uri or request.to_uri
        self.dialog_id = self.dialog_id or request.dialog_id
        if request.signaling is not None and request.signaling.username and party == CALLER:
            self.username = self.username or request.signaling.username
        if request.user_agent:
            # few distinct user agents over many calls: one copy of each
            if party == CALLER:
                self.caller_ua = self.caller_ua or intern(request.user_agent)
            else:
                self.callee_ua = self.callee_ua or intern(request.user_agent)

    def _ports_for(self, recipient: str, count: int) -> list:
        ports = []
        for index in range(count):
            stream = self.streams[index] if index < len(self.streams) else None
            ports.append(stream.leg(recipient).port if stream is not None and not stream.ended else 0)
        return ports

    def _match(self, index, media, offerer, taken) -> Optional[MediaStream]:
        current = [(i, s) for i, s in enumerate(self.streams) if s is not None and s not in taken]
        for i, stream in current:
            if i == index and stream.media_type == media.media_type:
                return stream
        for i, stream in current:
            if stream.media_type == media.media_type and stream.leg(offerer).sdp_address == media.address:
                return stream
        return None

    def _apply_offer(self, offerer, media_list, allocator, now) -> None:
        # Phase 1: match and open what is new; on failure close what we opened and change nothing.
        matched, opened = [], []
        try:
            for index, media in enumerate(media_list):
                stream = None if media.disabled else self._match(index, media, offerer, matched)
                if stream is None and not media.disabled:
                    stream = allocator.open_stream(media.media_type, now)
                    stream.call_id = self.call_id
                    opened.append(stream)
                matched.append(stream)
        except Exception:
            for stream in opened:
                allocator.close_stream(stream, CLOSED, now)
            raise
        # Phase 2: commit.
        for stream in self.streams:
            if stream is not None and stream not in matched:
                allocator.close_stream(stream, CLOSED, now)
        for stream, media in zip(matched, media_list):
            if stream is not None:
                stream.describe(offerer, media, now)
        self.all_streams = self.all_streams + opened       # a new list of the exact size
        self.streams = matched

    def _apply_answer(self, answerer, media_list, allocator, now) -> None:
        for index, stream in enumerate(self.streams):
            if stream is None or stream.ended:
                continue
            if index >= len(media_list) or media_list[index].disabled:
                allocator.close_stream(stream, REJECTED, now)
                self.streams[index] = None
            else:
                stream.describe(answerer, media_list[index], now)
        if self.start_time is None:
            self.start_time = now

    def close(self, allocator: StreamAllocator, now: float, status: str = CLOSED) -> None:
        for stream in self.all_streams:
            if not stream.ended:
                allocator.close_stream(stream, status, now)
        self.end_time = now


# The session as plain data, for the state file that carries calls over a relay restart.

_SESSION_FIELDS = ("call_id", "from_tag", "to_tag", "from_uri", "to_uri", "caller_ua", "callee_ua", "username",
                   "dialog_id", "owner", "created", "start_time", "end_time")
_STREAM_FIELDS = ("media_type", "created", "last_activity", "first_media_time", "end_time", "status",
                  "timeout_wait")
_LEG_FIELDS = ("port", "sdp_address", "latched_rtp", "latched_rtcp", "media_seen_rtp", "media_seen_rtcp",
               "packet_count", "byte_count", "dropped", "codec", "on_hold", "ice")
_ADDRESSES = ("sdp_address", "latched_rtp", "latched_rtcp")


def session_state(session: Session) -> dict:
    """Everything statistics and offer/answer need, as JSON-ready data."""
    data = {name: getattr(session, name) for name in _SESSION_FIELDS}
    data["transaction"] = list(session._transaction) if session._transaction is not None else None
    data["offerer"] = session._offerer
    data["ip_version"] = session.ip_version
    data["last_cseq"] = [session._last_cseq_caller, session._last_cseq_callee]
    data["all_streams"] = [_stream_state(stream) for stream in session.all_streams]
    index = {id(stream): n for n, stream in enumerate(session.all_streams)}
    data["streams"] = [index[id(stream)] if stream is not None else None for stream in session.streams]
    return data


def _stream_state(stream: MediaStream) -> dict:
    data = {name: getattr(stream, name) for name in _STREAM_FIELDS}
    for party in (CALLER, CALLEE):
        leg = data[party] = {name: getattr(stream.leg(party), name) for name in _LEG_FIELDS}
        for name in _ADDRESSES:
            if leg[name] is not None:
                leg[name] = list(leg[name])
    return data


def session_from_state(data: dict, routable) -> Session:
    """The Session of session_state(); its streams have their ports but nothing opened
    (the relay binds them again). ValueError/KeyError/TypeError for data that is not one."""
    session = Session(data["call_id"], data["from_tag"], float(data["created"]))
    for name in _SESSION_FIELDS:
        setattr(session, name, data[name])
    transaction = data["transaction"]
    session._transaction = (transaction[0], int(transaction[1])) if transaction is not None else None
    session._offerer = data["offerer"]
    session.ip_version = int(data.get("ip_version", 4))         # (files of relays before IPv6: IPv4)
    if session.ip_version not in (4, 6):
        raise ValueError("IP version %r" % session.ip_version)
    session._last_cseq_caller, session._last_cseq_callee = (int(cseq) for cseq in data["last_cseq"])
    session.all_streams = [_stream_from_state(item, session.call_id, routable) for item in data["all_streams"]]
    session.streams = [session.all_streams[n] if n is not None else None for n in data["streams"]]
    return session


def _stream_from_state(data: dict, call_id: str, routable) -> MediaStream:
    stream = MediaStream(data["media_type"], data[CALLER]["port"], data[CALLEE]["port"], data["created"], routable)
    stream.call_id = call_id
    for name in _STREAM_FIELDS[1:]:
        setattr(stream, name, data[name])
    for party in (CALLER, CALLEE):
        leg, values = stream.leg(party), data[party]
        for name in _LEG_FIELDS:
            value = values[name]
            if name in _ADDRESSES and value is not None:
                value = shared_address(tuple(value))
            setattr(leg, name, value)
    return stream
