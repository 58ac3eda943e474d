"""A call's media session: the SDP offer/answer rules of relay/session.py."""

import pytest

from mediaproxy.protocol.proxy import parse_update
from mediaproxy.relay.ports import PortsExhausted
from mediaproxy.relay.session import Session
from mediaproxy.relay.streams import CALLEE, CALLER, RTP, MediaStream

CALL_ID = "call-1@pc33"
ALICE, BOB = "alice-tag", "bob-tag"      # the caller's and the callee's tags
AUDIO_A = "audio:10.0.0.5:4000:sendrecv"
VIDEO_A = "video:10.0.0.5:4002:sendrecv"
AUDIO_B = "audio:10.0.0.9:6000:sendrecv"
VIDEO_B = "video:10.0.0.9:6002:sendrecv"


class Allocator:
    """Opens streams on consecutive port pairs, records what is closed."""

    def __init__(self, fail_after=None):
        self.next_port = 50000
        self.opened = []
        self.closed = []
        self.fail_after = fail_after

    def open_stream(self, media_type, now):
        if self.fail_after is not None and len(self.opened) >= self.fail_after:
            raise PortsExhausted("no more")
        stream = MediaStream(media_type, self.next_port, self.next_port + 2, now)
        self.next_port += 4
        self.opened.append(stream)
        return stream

    def close_stream(self, stream, status, now):
        if not stream.ended:
            stream.end(status, now)
            self.closed.append(stream)


def update(kind, cseq, media=None, from_tag=ALICE, to_tag=None, **headers):
    values = {"type": kind, "call_id": CALL_ID, "cseq": "%d INVITE" % cseq, "from_tag": from_tag}
    if to_tag:
        values["to_tag"] = to_tag
    if media is not None:
        values["media"] = media
    values.update(headers)
    return parse_update(values)


def invite(cseq, media, **headers):                     # caller -> callee
    return update("request", cseq, media, **headers)


def invite_reply(cseq, media, **headers):               # callee's reply to the caller's request
    return update("reply", cseq, media, to_tag=BOB, **headers)


def reinvite_from_callee(cseq, media, **headers):
    return update("request", cseq, media, from_tag=BOB, to_tag=ALICE, **headers)


def reply_from_caller(cseq, media, **headers):
    return update("reply", cseq, media, from_tag=BOB, to_tag=ALICE, **headers)


@pytest.fixture
def allocator():
    return Allocator()


@pytest.fixture
def session():
    return Session(CALL_ID, ALICE, now=100.0)


def established(session, allocator, offer=AUDIO_A, answer=AUDIO_B):
    session.update(invite(1, offer), allocator, 100.0)
    session.update(invite_reply(1, answer), allocator, 102.0)
    return session


def test_the_sender_is_the_from_party_of_a_request_and_the_to_party_of_a_reply(session):
    assert session.sender(invite(1, AUDIO_A)) == CALLER
    assert session.sender(invite_reply(1, AUDIO_B)) == CALLEE
    assert session.sender(reinvite_from_callee(1, AUDIO_B)) == CALLEE
    assert session.sender(reply_from_caller(1, AUDIO_A)) == CALLER


def test_an_offer_opens_one_stream_per_m_line_and_answers_with_the_callee_facing_ports(session, allocator):
    ports = session.update(invite(1, AUDIO_A + "," + VIDEO_A), allocator, 100.0)
    audio, video = allocator.opened
    assert ports == [audio.leg(CALLEE).port, video.leg(CALLEE).port] == [50002, 50006]
    assert session.streams == [audio, video]
    assert audio.leg(CALLER).sdp_address == ("10.0.0.5", 4000)
    assert audio.leg(CALLEE).sdp_address is None
    assert not session.started


def test_the_answer_gets_the_caller_facing_ports_and_starts_the_session(session, allocator):
    session.update(invite(1, AUDIO_A), allocator, 100.0)
    ports = session.update(invite_reply(1, AUDIO_B), allocator, 102.5)
    [audio] = allocator.opened
    assert ports == [audio.leg(CALLER).port] == [50000]
    assert audio.leg(CALLEE).sdp_address == ("10.0.0.9", 6000)
    assert session.started and session.start_time == 102.5
    assert len(allocator.opened) == 1


def test_repeated_sdp_changes_nothing(session, allocator):
    first = session.update(invite(1, AUDIO_A), allocator, 100.0)
    assert session.update(invite(1, AUDIO_A), allocator, 100.5) == first           # retransmission
    answer = session.update(invite_reply(1, AUDIO_B), allocator, 101.0)             # 183
    assert session.update(invite_reply(1, AUDIO_B), allocator, 105.0) == answer     # 200
    assert len(allocator.opened) == 1 and allocator.closed == []
    assert session.start_time == 101.0


def test_a_reinvite_with_the_same_streams_keeps_ports_and_latches(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    audio.on_packet(CALLER, RTP, ("203.0.113.5", 4000), b"x" * 20, 103.0)
    assert session.update(invite(2, AUDIO_A), allocator, 110.0) == [50002]
    assert session.update(invite_reply(2, AUDIO_B), allocator, 110.2) == [50000]
    assert session.streams == [audio] and len(allocator.opened) == 1
    assert audio.leg(CALLER).latched[RTP] == ("203.0.113.5", 4000)


def test_a_reinvite_adding_video_opens_a_stream(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    ports = session.update(invite(2, AUDIO_A + "," + VIDEO_A), allocator, 110.0)
    video = allocator.opened[1]
    assert session.streams == [audio, video]
    assert ports == [audio.leg(CALLEE).port, video.leg(CALLEE).port]
    assert session.update(invite_reply(2, AUDIO_B + "," + VIDEO_B), allocator, 110.1) == \
        [audio.leg(CALLER).port, video.leg(CALLER).port]
    assert session.all_streams == [audio, video]


def test_a_reinvite_dropping_a_stream_closes_it(session, allocator):
    established(session, allocator, offer=AUDIO_A + "," + VIDEO_A, answer=AUDIO_B + "," + VIDEO_B)
    audio, video = session.streams
    ports = session.update(invite(2, AUDIO_A), allocator, 120.0)
    assert ports == [audio.leg(CALLEE).port]
    assert session.streams == [audio]
    assert allocator.closed == [video] and video.status == "closed" and video.end_time == 120.0
    assert session.all_streams == [audio, video]


def test_a_reinvite_from_the_callee_is_an_offer_with_its_own_cseq(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    # the callee's own CSeq counter starts low; it is not compared with the caller's
    ports = session.update(reinvite_from_callee(1, "audio:10.0.0.9:6000:sendonly"), allocator, 130.0)
    assert ports == [audio.leg(CALLER).port]
    assert audio.on_hold and audio.current_status == "on hold"
    assert session.update(reply_from_caller(1, "audio:10.0.0.5:4000:recvonly"), allocator, 130.1) == \
        [audio.leg(CALLEE).port]
    assert len(allocator.opened) == 1


def test_a_stale_cseq_changes_nothing(session, allocator):
    established(session, allocator)
    session.update(invite(5, AUDIO_A), allocator, 110.0)
    session.update(invite_reply(5, AUDIO_B), allocator, 110.1)
    [audio] = session.streams
    ports = session.update(invite(4, "audio:10.0.0.77:8000:sendrecv," + VIDEO_A), allocator, 111.0)
    assert ports == [audio.leg(CALLEE).port, 0]
    assert session.streams == [audio] and len(allocator.opened) == 1
    assert audio.leg(CALLER).sdp_address == ("10.0.0.5", 4000)


def test_an_answer_with_fewer_streams_rejects_the_tail(session, allocator):
    session.update(invite(1, AUDIO_A + "," + VIDEO_A), allocator, 100.0)
    audio, video = allocator.opened
    ports = session.update(invite_reply(1, AUDIO_B), allocator, 101.0)
    assert ports == [audio.leg(CALLER).port]
    assert video.status == "rejected" and allocator.closed == [video]
    assert session.streams == [audio, None]
    assert session.active_streams == [audio]


def test_an_answer_with_port_zero_rejects_that_stream(session, allocator):
    session.update(invite(1, AUDIO_A + "," + VIDEO_A), allocator, 100.0)
    audio, video = allocator.opened
    ports = session.update(invite_reply(1, AUDIO_B + ",video:10.0.0.9:0:sendrecv"), allocator, 101.0)
    assert ports == [audio.leg(CALLER).port, 0]
    assert video.status == "rejected"


def test_an_offered_stream_with_port_zero_gets_port_zero_and_no_ports(session, allocator):
    ports = session.update(invite(1, AUDIO_A + ",video:10.0.0.5:0:sendrecv"), allocator, 100.0)
    [audio] = allocator.opened
    assert ports == [audio.leg(CALLEE).port, 0]
    assert session.streams == [audio, None]


def test_a_reoffer_with_port_zero_closes_the_stream(session, allocator):
    established(session, allocator, offer=AUDIO_A + "," + VIDEO_A, answer=AUDIO_B + "," + VIDEO_B)
    audio, video = session.streams
    ports = session.update(invite(2, AUDIO_A + ",video:10.0.0.5:0:sendrecv"), allocator, 140.0)
    assert ports == [audio.leg(CALLEE).port, 0]
    assert video.status == "closed"
    assert session.update(invite_reply(2, AUDIO_B + ",video:10.0.0.9:0:sendrecv"), allocator, 140.1) == \
        [audio.leg(CALLER).port, 0]


def test_streams_are_matched_by_type_and_address_when_their_order_changes(session, allocator):
    established(session, allocator, offer=AUDIO_A + "," + VIDEO_A, answer=AUDIO_B + "," + VIDEO_B)
    audio, video = session.streams
    ports = session.update(invite(2, VIDEO_A + "," + AUDIO_A), allocator, 150.0)
    assert session.streams == [video, audio]
    assert ports == [video.leg(CALLEE).port, audio.leg(CALLEE).port]
    assert allocator.closed == [] and len(allocator.opened) == 2


def test_a_changed_address_resets_that_partys_latch(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    audio.on_packet(CALLER, RTP, ("203.0.113.5", 4000), b"x" * 20, 103.0)
    audio.on_packet(CALLEE, RTP, ("198.51.100.9", 6000), b"x" * 20, 103.0)
    session.update(invite(2, "audio:10.0.0.5:4010:sendrecv"), allocator, 160.0)
    assert audio.leg(CALLER).latched == [None, None]
    assert audio.leg(CALLEE).latched[RTP] == ("198.51.100.9", 6000)
    assert audio.leg(CALLER).sdp_address == ("10.0.0.5", 4010)


def test_rfc2543_hold_keeps_the_address_and_the_latch(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    audio.on_packet(CALLER, RTP, ("203.0.113.5", 4000), b"x" * 20, 103.0)
    assert session.update(invite(2, "audio:0.0.0.0:4000:sendrecv"), allocator, 170.0) == [audio.leg(CALLEE).port]
    assert audio.current_status == "on hold"
    assert audio.leg(CALLER).sdp_address == ("10.0.0.5", 4000)
    assert audio.leg(CALLER).latched[RTP] == ("203.0.113.5", 4000)
    session.update(invite(3, AUDIO_A), allocator, 180.0)
    assert audio.current_status == "active"


def test_a_late_offer_is_in_the_reply_and_the_answer_in_the_ack(session, allocator):
    assert session.update(invite(1, None), allocator, 100.0) == []
    assert allocator.opened == []
    ports = session.update(invite_reply(1, AUDIO_B), allocator, 103.0)      # 200 OK: the offer
    [audio] = allocator.opened
    assert ports == [audio.leg(CALLER).port]
    assert audio.leg(CALLEE).sdp_address == ("10.0.0.9", 6000)
    assert not session.started
    ports = session.update(invite(1, AUDIO_A), allocator, 103.2)            # ACK: the answer
    assert ports == [audio.leg(CALLEE).port]
    assert audio.leg(CALLER).sdp_address == ("10.0.0.5", 4000)
    assert session.start_time == 103.2
    assert len(allocator.opened) == 1


def test_an_update_without_sdp_changes_nothing(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    assert session.update(invite_reply(1, None), allocator, 104.0) == [audio.leg(CALLER).port]
    assert session.update(invite(9, None), allocator, 105.0) == [audio.leg(CALLEE).port]
    assert session.streams == [audio] and len(allocator.opened) == 1 and allocator.closed == []
    # and cseq 9 did not start a transaction: a real re-INVITE with cseq 2 still works
    session.update(invite(2, AUDIO_A + "," + VIDEO_A), allocator, 106.0)
    assert len(session.streams) == 2


def test_a_failed_offer_changes_nothing_and_closes_what_it_opened(session):
    allocator = Allocator(fail_after=2)
    established(session, allocator)
    [audio] = session.streams
    with pytest.raises(PortsExhausted):
        session.update(invite(2, AUDIO_A + "," + VIDEO_A + ",image:10.0.0.5:4004:sendrecv"), allocator, 110.0)
    video = allocator.opened[1]
    assert session.streams == [audio] and session.all_streams == [audio]
    assert allocator.closed == [video] and not audio.ended


def test_the_parties_details_are_recorded(session, allocator):
    session.update(invite(1, AUDIO_A, from_uri="sip:alice@example.com", to_uri="sip:bob@example.com",
                          user_agent="Alice/1.0", dialog_id="12:34",
                          signaling_ip='{"signaling_ip": "192.0.2.1", "username": "alice"}'), allocator, 100.0)
    session.update(invite_reply(1, AUDIO_B, user_agent="Bob/2.0",
                                signaling_ip='{"signaling_ip": "192.0.2.1", "username": "bob"}'), allocator, 101.0)
    assert (session.from_uri, session.to_uri) == ("sip:alice@example.com", "sip:bob@example.com")
    assert (session.from_tag, session.to_tag) == (ALICE, BOB)
    assert (session.caller_ua, session.callee_ua) == ("Alice/1.0", "Bob/2.0")
    assert session.username == "alice"
    assert session.dialog_id == "12:34"


def test_close_ends_every_stream(session, allocator):
    established(session, allocator, offer=AUDIO_A + "," + VIDEO_A, answer=AUDIO_B)
    audio, video = allocator.opened
    session.close(allocator, 200.0)
    assert audio.status == "closed" and audio.end_time == 200.0
    assert video.status == "rejected"            # already ended: keeps its status
    assert session.end_time == 200.0
    assert session.active_streams == []


def test_a_reinvite_without_sdp_gets_the_offer_in_the_reply_and_the_answer_in_the_ack(session, allocator):
    established(session, allocator)
    [audio] = session.streams
    assert session.update(invite(2, None), allocator, 200.0) == [audio.leg(CALLEE).port]
    ports = session.update(invite_reply(2, "audio:10.0.0.9:6100:sendrecv"), allocator, 200.1)
    assert ports == [audio.leg(CALLER).port]
    assert audio.leg(CALLEE).sdp_address == ("10.0.0.9", 6100)
    assert session.update(invite(2, AUDIO_A), allocator, 200.2) == [audio.leg(CALLEE).port]
    assert session.streams == [audio] and len(allocator.opened) == 1 and allocator.closed == []


def test_a_session_has_no_instance_dict():
    assert not hasattr(Session(CALL_ID, ALICE, 0.0), "__dict__")      # one per call (issue 8)
