"""Streams that fall silent end by themselves (SPEC §4 timers), in the sans-IO relay core."""

import pytest

from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool

STREAM_TIMEOUT, ON_HOLD_TIMEOUT = 90, 7200
RTP_PACKET = b"\x80\x08" + b"\0" * 170
STUN_PACKET = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x07" * 12


def offer(media="audio:198.51.100.10:4000:sendrecv", cseq=1, call_id="call-1"):
    return {"type": "request", "call_id": call_id, "from_tag": "caller-tag", "to_tag": "", "cseq": str(cseq),
            "media": media}


def answer(media="audio:192.0.2.20:6000:sendrecv", cseq=1, call_id="call-1"):
    return {"type": "reply", "call_id": call_id, "from_tag": "caller-tag", "to_tag": "callee-tag",
            "cseq": str(cseq), "media": media}


@pytest.fixture
def relay():
    return RelayCore("203.0.113.5", PortPool(40000, 40100), MemoryForwarding(), 0.0,
                     stream_timeout=STREAM_TIMEOUT, on_hold_timeout=ON_HOLD_TIMEOUT)


def call(relay, now=0.0, offered="audio:198.51.100.10:4000:sendrecv", answered="audio:192.0.2.20:6000:sendrecv"):
    callee_port = int(relay.update(offer(offered), now).split()[1])
    caller_port = int(relay.update(answer(answered), now).split()[1])
    return caller_port, callee_port


def talk(relay, caller_port, callee_port, now, packet=RTP_PACKET):
    relay.forwarding.deliver(caller_port, ("198.51.100.10", 4000), packet, now)
    relay.forwarding.deliver(callee_port, ("192.0.2.20", 6000), packet, now)


def test_a_stream_that_never_starts_expires_after_stream_timeout(relay):
    call(relay)
    assert relay.check_timeouts(STREAM_TIMEOUT - 1) == []
    [(owner, statistics)] = relay.check_timeouts(STREAM_TIMEOUT)
    [stream] = statistics["streams"]
    assert (stream["status"], stream["timeout_wait"]) == ("no-traffic timeout", STREAM_TIMEOUT)
    assert relay.sessions == {} and relay.ports.used_count == 0 and relay.forwarding.receivers == {}


def test_traffic_keeps_a_stream_alive_and_silence_ends_it(relay):
    ports = call(relay)
    for second in range(0, 300, 30):
        talk(relay, *ports, float(second))
        assert relay.check_timeouts(float(second) + 1) == []
    [(_, statistics)] = relay.check_timeouts(270.0 + STREAM_TIMEOUT)
    assert statistics["streams"][0]["status"] == "no-traffic timeout"
    assert statistics["streams"][0]["caller_packets"] == 10


def test_a_held_stream_waits_for_the_hold_timeout_and_un_hold_restarts_the_stream_timer(relay):
    ports = call(relay)
    talk(relay, *ports, 10.0)
    relay.update(offer("audio:198.51.100.10:4000:sendonly", cseq=2), 20.0)
    relay.update(answer("audio:192.0.2.20:6000:recvonly", cseq=2), 20.0)
    assert relay.check_timeouts(20.0 + STREAM_TIMEOUT * 10) == []          # silent, but on hold
    relay.update(offer("audio:198.51.100.10:4000:sendrecv", cseq=3), 1000.0)
    relay.update(answer(cseq=3), 1000.0)
    assert relay.check_timeouts(1000.0 + STREAM_TIMEOUT - 1) == []        # un-held: the stream timer again
    [(_, statistics)] = relay.check_timeouts(1000.0 + STREAM_TIMEOUT)
    assert statistics["streams"][0]["status"] == "no-traffic timeout"


def test_a_stream_held_too_long_ends_as_on_hold_timeout(relay):
    call(relay, answered="audio:0.0.0.0:6000:sendrecv")
    assert relay.check_timeouts(ON_HOLD_TIMEOUT - 1) == []
    [(_, statistics)] = relay.check_timeouts(ON_HOLD_TIMEOUT)
    assert (statistics["streams"][0]["status"], statistics["streams"][0]["timeout_wait"]) == \
        ("on hold timeout", ON_HOLD_TIMEOUT)


def test_an_ice_stream_that_only_saw_stun_ends_as_an_unselected_candidate(relay):
    ports = call(relay, offered="audio:198.51.100.10:4000:sendrecv:ice=yes",
                 answered="audio:192.0.2.20:6000:sendrecv:ice=yes")
    talk(relay, *ports, 5.0, packet=STUN_PACKET)
    [(_, statistics)] = relay.check_timeouts(5.0 + STREAM_TIMEOUT)
    assert statistics["streams"][0]["status"] == "unselected ICE candidate"


def test_a_stream_the_kernel_relays_is_left_to_its_conntrack_entry(relay):
    call(relay)
    [stream] = relay.sessions["call-1"].streams
    stream.in_kernel = True
    assert relay.check_timeouts(STREAM_TIMEOUT * 100) == []
    stream.in_kernel = False
    assert len(relay.check_timeouts(STREAM_TIMEOUT * 100)) == 1


def test_a_session_whose_streams_were_all_rejected_goes_away(relay):
    relay.update(offer(), 0.0)
    relay.update(answer("audio:192.0.2.20:0:sendrecv"), 1.0)
    [(_, statistics)] = relay.check_timeouts(STREAM_TIMEOUT)
    assert statistics["streams"][0]["status"] == "rejected" and relay.sessions == {}


def test_only_the_silent_stream_of_a_session_ends(relay):
    callee_port = int(relay.update(offer("audio:198.51.100.10:4000:sendrecv,video:198.51.100.10:4002:sendrecv"),
                                   0.0).split()[1])
    caller_port = int(relay.update(answer("audio:192.0.2.20:6000:sendrecv,video:192.0.2.20:6002:sendrecv"),
                                   0.0).split()[1])
    talk(relay, caller_port, callee_port, 80.0)
    assert relay.check_timeouts(STREAM_TIMEOUT) == []
    audio, video = relay.sessions["call-1"].all_streams
    assert (audio.current_status, video.current_status) == ("active", "no-traffic timeout")
