"""A relay restart that keeps its calls (issue 10, item 4; SPEC §8): the state
file, and the calls rebuilt from it by a new relay core, which go on as if
nothing had happened (offer/answer, latching, counters, `remove`)."""

import json

import pytest

from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.state import RelayState, decode_state, encode_state, load_state, save_state
from mediaproxy.relay.statistics import session_statistics

RELAY_IP = "198.51.100.1"
SETUP = {"relay_ip": RELAY_IP, "advertised_ip": RELAY_IP, "port_range": [40000, 40040], "conntrack_mark": 0x4D50}
CALLER = ("203.0.113.5", 31000)
CALLEE = ("192.0.2.77", 42000)
DAY = 86400


def rtp(payload_type=0, size=160):
    return bytes([0x80, payload_type]) + b"\x00\x01" + b"\x00" * 8 + b"\xaa" * size


def update(call_id, kind, cseq, media, to_tag=""):
    return {"type": kind, "call_id": call_id, "cseq": "%d INVITE" % cseq, "from_tag": "alice", "to_tag": to_tag,
            "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com", "user_agent": "phone/" + kind}


def offer(call_id="call-1", cseq=1):
    return dict(update(call_id, "request", cseq, None, "bob" if cseq > 1 else ""),
                media="audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv")


def answer(call_id="call-1", cseq=1, media="audio:10.0.0.9:6000:sendrecv,video:10.0.0.9:6002:sendrecv"):
    return dict(update(call_id, "reply", cseq, None, "bob"), media=media)


def ports(reply):
    return [int(port) for port in reply.split()[1:]]


def relay(forwarding, now=1000.0):
    return RelayCore(RELAY_IP, PortPool(40000, 40040), forwarding, now=now)


def running_call(core, forwarding, call_id="call-1"):
    """A call answered with audio flowing both ways (latched) and video only offered; its relay ports."""
    callee_facing = ports(core.handle("update", offer(call_id), 1000.0, owner="192.0.2.1"))
    caller_facing = ports(core.handle("update", answer(call_id), 1001.0, owner="192.0.2.1"))
    for n in range(5):
        forwarding.deliver(caller_facing[0], CALLER, rtp(8), 1002.0 + n)
        forwarding.deliver(callee_facing[0], CALLEE, rtp(0), 1002.0 + n)
    return caller_facing, callee_facing


def restarted(core, now):
    """What a new relay process has after the old one saved `core`'s calls: its core and forwarding."""
    text = encode_state(RelayState(SETUP, core.saved_sessions(), [], {}, now))
    state = decode_state(json.loads(json.dumps(text)))
    forwarding = MemoryForwarding()
    new = relay(forwarding, now)
    new.restore(state.sessions, now)
    return new, forwarding


# -- the file --


def test_the_state_round_trips_through_its_file(tmp_path):
    path = str(tmp_path / "relay-state.json")
    core = relay(MemoryForwarding())
    running_call(core, core.forwarding)
    undelivered = {"192.0.2.1": [{"call_id": "gone-meanwhile"}]}
    entries = [{"port": 40000, "component": 0, "caller": list(CALLER), "callee": list(CALLEE),
                "counted": [1, 2, 3, 4]}]
    state = RelayState(SETUP, core.saved_sessions(), entries, undelivered, 2000.0)
    assert save_state(path, state)
    assert load_state(path, SETUP, now=2010.0, max_age=90) == state
    assert load_state(path, SETUP, now=2010.0, max_age=90) is None     # restored once: the file is gone
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [
    "not json",
    '{"version": 1, "setup": {}, "saved_at": 1',
    '{"version": 2, "setup": {}, "sessions": [], "saved_at": 1}',
    '{"version": 1, "setup": {}, "sessions": [{"call_id": 7}], "saved_at": 1}',
    '{"version": 1, "setup": {}, "sessions": {}, "saved_at": 1}',
    '{"version": 1, "sessions": [], "saved_at": 1}',
    b"\xff\xfe binary",
])
def test_a_file_that_makes_no_sense_is_set_aside(tmp_path, content):
    path = tmp_path / "relay-state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert load_state(str(path), SETUP, now=2.0, max_age=90) is None
    assert not path.exists()
    assert len(list(tmp_path.glob("relay-state.json.bad-*"))) == 1


def test_calls_saved_for_another_setup_or_too_long_ago_are_not_restored(tmp_path, caplog):
    path = str(tmp_path / "relay-state.json")
    assert save_state(path, RelayState(dict(SETUP, port_range=[50000, 50100]), [], [], {}, 1000.0))
    assert load_state(path, SETUP, now=1001.0, max_age=90) is None
    assert "saved with another port_range" in caplog.text
    assert save_state(path, RelayState(SETUP, [], [], {}, 1000.0))
    assert load_state(path, SETUP, now=1000.0 + DAY, max_age=7200) is None
    assert "86400 s ago, more than the 7200 s" in caplog.text
    assert len(list(tmp_path.glob("relay-state.json.bad-*"))) >= 1


def test_a_state_that_cannot_be_written_is_reported_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "missing-dir" / "relay-state.json")
    assert not save_state(path, RelayState(SETUP))
    assert list(tmp_path.iterdir()) == []


# -- the calls rebuilt from it --


def test_a_restored_call_has_the_same_statistics_and_its_ports_again():
    old_forwarding = MemoryForwarding()
    core = relay(old_forwarding)
    caller_facing, callee_facing = running_call(core, old_forwarding)
    before = session_statistics(core.sessions["call-1"], RELAY_IP, 1010.0)

    new, forwarding = restarted(core, 1010.0)
    assert session_statistics(new.sessions["call-1"], RELAY_IP, 1010.0) == before
    assert set(forwarding.receivers) == set(caller_facing + callee_facing)
    assert new.ports.used_count == 4
    # the ports are the call's: a new call gets others
    other = ports(new.handle("update", offer("call-2"), 1011.0, owner="192.0.2.1"))
    assert not set(other) & set(caller_facing + callee_facing)
    # the sessions list for the dispatcher's reconcile names it, for its owner only
    listed = json.loads(new.handle("sessions", {"brief": "yes"}, 1011.0, owner="192.0.2.1"))
    assert {session["call_id"] for session in listed} == {"call-1", "call-2"}
    assert json.loads(new.handle("sessions", {"brief": "yes"}, 1011.0, owner="192.0.2.99")) == []


def test_a_restored_call_goes_on_relaying_counting_and_negotiating():
    old_forwarding = MemoryForwarding()
    core = relay(old_forwarding)
    caller_facing, callee_facing = running_call(core, old_forwarding)
    new, forwarding = restarted(core, 1010.0)

    # Latched: the parties' packets go to each other, a stranger's are dropped.
    assert forwarding.deliver(caller_facing[0], CALLER, rtp(8), 1011.0) == (callee_facing[0], CALLEE)
    assert forwarding.deliver(callee_facing[0], CALLEE, rtp(0), 1011.0) == (caller_facing[0], CALLER)
    assert forwarding.deliver(caller_facing[0], ("203.0.113.66", 1), rtp(8), 1011.0) is None

    # The transaction state came along: a retransmitted old offer changes nothing, a re-INVITE keeps the ports.
    assert ports(new.handle("update", offer(cseq=1), 1012.0)) == callee_facing
    assert ports(new.handle("update", offer(cseq=2), 1012.0)) == callee_facing
    assert ports(new.handle("update", answer(cseq=2, media="audio:10.0.0.9:6000:sendrecv,video:10.0.0.9:0:sendrecv"),
                            1012.0)) == [caller_facing[0], 0]

    # The BYE: the statistics of the whole call, before and after the restart.
    statistics = json.loads(new.handle("remove", {"call_id": "call-1", "from_tag": "alice", "to_tag": "bob"}, 1020.0))
    audio, video = statistics["streams"]
    assert (audio["caller_packets"], audio["callee_packets"]) == (6, 6)
    assert (audio["caller_codec"], audio["callee_codec"]) == ("G711a", "G711u")
    assert audio["caller_remote"] == "%s:%d" % CALLER and audio["status"] == "closed"
    assert video["status"] == "rejected"
    assert (statistics["caller_ua"], statistics["callee_ua"]) == ("phone/request", "phone/reply")
    assert statistics["start_time"] == 1001.0 and statistics["duration"] == 19.0
    assert forwarding.receivers == {} and new.ports.used_count == 0


def test_a_stream_whose_ports_are_taken_by_now_ends_closed_and_its_session_goes_on():
    old_forwarding = MemoryForwarding()
    core = relay(old_forwarding)
    caller_facing, callee_facing = running_call(core, old_forwarding)
    state = core.saved_sessions()
    video_port = caller_facing[1]
    forwarding = MemoryForwarding(unavailable={video_port})       # another program holds it now
    new = relay(forwarding, 1010.0)
    [session] = new.restore(state, 1010.0)
    assert [stream.media_type for stream in session.active_streams] == ["audio"]
    assert session.streams[1].status == "closed"
    assert set(forwarding.receivers) == {caller_facing[0], callee_facing[0]}
    assert new.ports.used_count == 2


def test_a_saved_session_that_makes_no_sense_is_left_out_and_the_others_restored(caplog):
    core = relay(MemoryForwarding())
    running_call(core, core.forwarding)
    broken = {"call_id": "broken", "from_tag": "x"}
    restored = relay(MemoryForwarding()).restore([broken] + core.saved_sessions(), 1010.0)
    assert [session.call_id for session in restored] == ["call-1"]
    assert "session broken could not be restored" in caplog.text
