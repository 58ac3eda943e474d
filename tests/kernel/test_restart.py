"""A relay restarted in the middle of calls keeps them (issue 10, item 4; SPEC §8).

SIGTERM with keep_calls_on_restart = yes (the default): the relay saves its
sessions and leaves the kernel entries of their running streams relaying;
started again, it restores the sessions, adopts the entries, and the
dispatcher finds the calls where they were.

- A call the kernel relays: media both ways at 50 packets a second never
  stops (the longest silence either party hears is under 100 ms, and not a
  packet is lost), the dispatcher lists the same session afterwards, and the
  BYE's statistics count every packet sent, before, during and after the
  restart.
- A call whose media had not started yet: its ports are bound again, and
  when its media comes the kernel takes it over as for any call.
- A call whose media stopped while the relay was away: its entries die, and
  the restarted relay reports it `expired` (conntrack timeout) with what
  was counted.
- keep_calls_on_restart = no: a stop ends the calls and removes their entries
  (the behaviour before), see test_lifecycle.
"""

import re

import pytest

from tests.kernel.helpers import (
    CALLEE_PORT,
    CALLER_PORT,
    RELAY_HOST,
    RTP,
    SHORT_UDP_TIMEOUTS,
    Call,
    kernel_call,
    pump,
    sent_counters,
    stream_counters,
    wait_kernel_entries,
)
from tests.kernel.talk import Talk
from tests.support.processes import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

MAX_SILENCE = 0.100            # s: what a listener may notice of the restart at most


def restart_relay(rig, sessions: int):
    """SIGTERM, then the same relay started again; returns the new one once it is back."""
    old = rig.relay
    assert old.process.stop() == 0
    assert f"stopping with {sessions} sessions kept for the next start" in old.process.log_text()
    relay = rig.start_relay()
    relay.process.wait_for_log(rf"restored {sessions} sessions saved [\d.]+ s ago", timeout=5)
    return relay


def test_a_call_relayed_by_the_kernel_goes_on_through_a_restart(make_rig):
    rig = make_rig()
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "restarted-call")
    before = rig.session("restarted-call")
    entries = {entry.orig for entry in rig.entries()}

    with Talk(caller, callee, call.caller_facing, call.callee_facing, rate=50) as talk:
        wait_for(lambda: min(talk.heard("caller"), talk.heard("callee")) >= 25, timeout=5, interval=0.02,
                 message="the parties to hear each other")
        relay = restart_relay(rig, sessions=1)
        assert {entry.orig for entry in rig.entries()} == entries          # the same entries, never removed
        assert re.search(r"kernel entries of the restored calls: 2 adopted, 0 ended", relay.process.log_text())
        heard = talk.heard("callee")
        wait_for(lambda: talk.heard("callee") >= heard + 25, timeout=5, interval=0.02,
                 message="media after the restart")

    silences = {party: talk.longest_silence(party) for party in ("caller", "callee")}
    print("longest silence heard (ms):", {party: round(s * 1000, 1) for party, s in silences.items()},
          "RTP sent by each / heard by caller, callee:", talk.sent, talk.heard("caller"), talk.heard("callee"))
    assert max(silences.values()) < MAX_SILENCE, silences
    assert talk.heard("caller") == talk.heard("callee") == talk.sent        # the kernel carried every packet

    # The dispatcher knows the call as before; the new relay process relayed none of its packets.
    after = rig.session("restarted-call")
    assert {key: after[key] for key in ("from_tag", "to_tag", "from_uri", "to_uri", "start_time")} == \
        {key: before[key] for key in ("from_tag", "to_tag", "from_uri", "to_uri", "start_time")}
    [stream] = after["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee)
    assert (stream["caller_codec"], stream["status"]) == ("G711u", "active")
    summary = wait_kernel_entries(rig, 2)
    assert (summary["session_count"], summary["userspace_packets"]) == (1, 0)

    # The BYE: the statistics of the whole call.
    assert call.remove() == "removed"
    record = rig.wait_accounted("restarted-call")
    [stream] = record["streams"]
    assert stream["status"] == "closed"
    assert stream_counters(stream) == sent_counters(caller, callee)
    print("packets sent:", caller.sent_packets + callee.sent_packets,
          "counted by the relay:", stream["caller_packets"] + stream["callee_packets"])
    assert rig.entries() == [] and rig.inhibitor_rules() == []
    assert "lost" not in rig.dispatcher.process.log_text()


def test_a_call_without_media_yet_is_restored_and_handed_to_the_kernel_later(make_rig):
    rig = make_rig()
    rig.start_relay()
    caller = rig.party("caller", CALLER_PORT, payload_type=8)
    callee = rig.party("callee", CALLEE_PORT, payload_type=8)
    call = Call(rig.proxy(), "ringing-call", caller, callee)
    assert rig.entries() == []

    restart_relay(rig, sessions=1)
    assert rig.summary()["kernel_entries"] == 0
    pump(caller, callee, call, packets=50)
    wait_kernel_entries(rig, 2)
    assert callee.sources(RTP) == {call.callee_facing} and callee.received_count(RTP) >= 45
    assert call.remove() == "removed"
    [stream] = rig.wait_accounted("ringing-call")["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee)
    assert rig.entries() == []


def test_a_call_whose_media_stopped_while_the_relay_was_away_is_reported_expired(make_rig):
    rig = make_rig(sysctls={RELAY_HOST: SHORT_UDP_TIMEOUTS})
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "silent-meanwhile")
    assert rig.relay.process.stop() == 0
    # No relay runs: the entries time out (3 s here); listing the table makes the kernel drop them.
    wait_for(lambda: rig.entries() == [], timeout=15, interval=0.5, message="the entries to time out")

    relay = rig.start_relay()
    relay.process.wait_for_log(r"kernel entries of the restored calls: 0 adopted, 2 ended", timeout=5)
    record = rig.wait_accounted("silent-meanwhile")
    assert record["timed_out"] is True
    [stream] = record["streams"]
    assert stream["status"] == "conntrack timeout"
    assert stream_counters(stream) == sent_counters(caller, callee)
    assert rig.sessions() == []
