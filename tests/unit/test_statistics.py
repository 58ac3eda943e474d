"""Session statistics and the relay summary (SPEC §5 and §6): every key, with
the value a scripted call must give."""

import json

import pytest

from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool

RELAY_IP = "198.51.100.1"
CALLER_REAL = ("203.0.113.5", 31000)
CALLEE_REAL = ("192.0.2.77", 42000)

SESSION_KEYS = {"call_id", "from_tag", "to_tag", "from_uri", "to_uri", "caller_ua", "callee_ua", "username",
                "start_time", "duration", "streams"}
STREAM_KEYS = {"media_type", "status", "timeout_wait", "caller_codec", "callee_codec", "start_time", "end_time",
               "post_dial_delay", "caller_bytes", "callee_bytes", "caller_packets", "callee_packets",
               "caller_local", "callee_local", "caller_remote", "callee_remote",
               "caller_dropped", "callee_dropped"}       # beyond SPEC §6: strangers' packets dropped
SUMMARY_KEYS = {"ip", "version", "status", "uptime", "session_count", "stream_count", "bps_relayed",
                "dropped_packets"}                     # beyond SPEC §5: the same, relay-wide since start
# Beyond SPEC §5: how the relay forwards (the in-memory forwarding of these tests says "memory").
FORWARDING = {"forwarding": "memory"}


def rtp(payload_type, payload=160):
    return bytes([0x80, payload_type]) + b"\x00" * 10 + b"\x55" * payload      # 12 + payload bytes


def rtcp():
    return bytes([0x81, 200, 0x00, 0x06]) + b"\x00" * 24                       # 28 bytes


def offer(cseq=1, media="audio:10.0.0.5:4000:sendrecv", **extra):
    headers = {"type": "request", "call_id": "call-1@pc33", "cseq": "%d INVITE" % cseq, "from_tag": "alice",
               "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com", "user_agent": "Alice/1.0",
               "dialog_id": "3204:1183", "media": media,
               "signaling_ip": '{"signaling_ip": "192.0.2.1", "username": "alice@example.com"}'}
    headers.update(extra)
    return headers


def answer(cseq=1, media="audio:10.0.0.9:6000:sendrecv"):
    return {"type": "reply", "call_id": "call-1@pc33", "cseq": "%d INVITE" % cseq, "from_tag": "alice",
            "to_tag": "bob", "user_agent": "Bob/2.0", "media": media}


@pytest.fixture
def forwarding():
    return MemoryForwarding()


@pytest.fixture
def relay(forwarding):
    return RelayCore(RELAY_IP, PortPool(40000, 40100), forwarding, now=900.0, version="9.8.7")


def sessions(relay, now):
    return json.loads(relay.handle("sessions", {}, now))


def test_the_statistics_of_a_finished_call(relay, forwarding):
    _, callee_facing = relay.update(offer(), 1000.0).split()
    _, caller_facing = relay.update(answer(), 1003.0).split()
    caller_facing, callee_facing = int(caller_facing), int(callee_facing)
    for _ in range(3):
        forwarding.deliver(caller_facing, CALLER_REAL, rtp(0), 1004.0)
    forwarding.deliver(caller_facing + 1, (CALLER_REAL[0], CALLER_REAL[1] + 1), rtcp(), 1004.5)
    for _ in range(2):
        forwarding.deliver(callee_facing, CALLEE_REAL, rtp(8), 1005.0)
    forwarding.deliver(callee_facing, ("192.0.2.66", 42000), rtp(8), 1005.0)      # a stranger's

    statistics = json.loads(relay.remove({"call_id": "call-1@pc33", "from_tag": "alice", "to_tag": "bob"},
                                         1063.0))

    assert SESSION_KEYS <= set(statistics)
    assert {key: statistics[key] for key in SESSION_KEYS - {"streams"}} == {
        "call_id": "call-1@pc33", "from_tag": "alice", "to_tag": "bob",
        "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com",
        "caller_ua": "Alice/1.0", "callee_ua": "Bob/2.0", "username": "alice@example.com",
        "start_time": 1003.0, "duration": 60.0,
    }
    assert statistics["streams"] == [{
        "media_type": "audio", "status": "closed", "timeout_wait": 0,
        "caller_codec": "G711u", "callee_codec": "G711a",
        "start_time": 0.0, "end_time": 60.0, "post_dial_delay": 4.0,
        "caller_bytes": 3 * 172 + 28, "callee_bytes": 2 * 172,
        "caller_packets": 4, "callee_packets": 2, "caller_dropped": 0, "callee_dropped": 1,
        "caller_local": "%s:%d" % (RELAY_IP, caller_facing),
        "callee_local": "%s:%d" % (RELAY_IP, callee_facing),
        "caller_remote": "%s:%d" % CALLER_REAL, "callee_remote": "%s:%d" % CALLEE_REAL,
    }]
    json.dumps(statistics)


def test_an_unanswered_call_has_no_start_and_knows_only_the_sdp(relay):
    relay.update(offer(), 1000.0)
    [statistics] = sessions(relay, 1010.0)
    assert statistics["start_time"] is None and statistics["duration"] == 0
    assert statistics["to_tag"] is None and statistics["callee_ua"] is None
    [stream] = statistics["streams"]
    assert set(stream) == STREAM_KEYS
    assert stream["status"] == "active"
    assert (stream["caller_codec"], stream["callee_codec"]) == ("Unknown", "Unknown")
    assert stream["post_dial_delay"] is None
    assert (stream["caller_remote"], stream["callee_remote"]) == ("10.0.0.5:4000", "Unknown")
    assert (stream["start_time"], stream["end_time"]) == (0.0, 10.0)
    assert stream["caller_packets"] == stream["callee_packets"] == stream["caller_bytes"] == 0


def test_a_running_call_reports_its_duration_so_far(relay):
    relay.update(offer(), 1000.0)
    relay.update(answer(), 1002.0)
    [statistics] = sessions(relay, 1032.5)
    assert statistics["duration"] == 30.5
    assert statistics["streams"][0]["end_time"] == 30.5


def test_stream_statuses_and_times_relative_to_the_session_start(relay):
    relay.update(offer(media="audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv"), 1000.0)
    relay.update(answer(media="audio:10.0.0.9:6000:sendrecv"), 1002.0)       # video rejected
    relay.update(offer(cseq=2, media="audio:10.0.0.5:4000:sendonly,image:10.0.0.5:4004:sendrecv"), 1010.0)
    [statistics] = sessions(relay, 1020.0)
    audio, video, image = statistics["streams"]
    assert (audio["media_type"], audio["status"]) == ("audio", "on hold")
    assert (video["media_type"], video["status"]) == ("video", "rejected")
    assert (image["media_type"], image["status"]) == ("image", "active")
    assert (video["start_time"], video["end_time"]) == (0.0, 0.0)
    assert (image["start_time"], image["end_time"]) == (8.0, 18.0)


def test_the_summary(relay):
    relay.update(offer(media="audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv"), 1000.0)
    other = dict(offer(), call_id="call-2")
    relay.update(other, 1001.0)
    summary = json.loads(relay.handle("summary", {}, 1234.9))
    assert summary == {"ip": RELAY_IP, "version": "9.8.7", "status": "active", "uptime": 334,
                       "session_count": 2, "stream_count": {"audio": 2, "video": 1}, "bps_relayed": 0,
                       "dropped_packets": 0,
                       "port_pairs": {"used": 6, "free": 44, "set_aside": 0}, **FORWARDING}
    assert set(summary) == SUMMARY_KEYS | {"port_pairs"} | set(FORWARDING)


def test_the_summary_of_an_idle_relay(relay):
    assert relay.summary(900.0) == {"ip": RELAY_IP, "version": "9.8.7", "status": "active", "uptime": 0,
                                    "session_count": 0, "stream_count": {}, "bps_relayed": 0, "dropped_packets": 0,
                                    "port_pairs": {"used": 0, "free": 50, "set_aside": 0}, **FORWARDING}
