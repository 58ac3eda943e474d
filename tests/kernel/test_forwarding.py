"""A running call is relayed by the kernel (issue 4, SPEC §4).

caller (198.18.0.10) and callee (198.18.0.20) send RTP and RTCP to the
relay (198.18.0.5) through the real dispatcher's proxy socket set-up. Once
both parties of a sub-stream are latched, the relay installs a conntrack
NAT entry with its mark: from then on the callee keeps hearing the caller
while the relay process forwards nothing more (its `userspace_packets`
stays flat), and the statistics still count every packet, exactly.
"""

import time

import pytest

from tests.integration.daemons import parse_address_reply
from tests.kernel.helpers import (
    kernel_call,
    wait_kernel_entries,
    CALLEE_PORT,
    CALLER_PORT,
    MARK,
    RTCP,
    inhibitor_set_rules,
    RTP,
    Call,
    Flow,
    pump,
    pump_streams,
    sent_counters,
    settle,
    stream_counters,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]


def assert_heard_only_from_the_relay(party, relay_port, relay_ip):
    """Every packet ``party`` received came from the relay port it was told (+1 for RTCP)."""
    for component in (RTP, RTCP):
        sources = party.sources(component)
        assert sources <= {(relay_ip, relay_port + component)}, (party.host, component, sources)


def test_the_kernel_relays_a_running_call_and_counts_every_packet(make_rig):
    rig = make_rig()
    rig.start_relay({"traffic_sampling_period": 1})
    assert rig.summary()["forwarding"] == "kernel"
    caller = rig.party("caller", CALLER_PORT, payload_type=0)
    callee = rig.party("callee", CALLEE_PORT, payload_type=8)
    call = Call(rig.proxy(), "kernel-call", caller, callee)

    # STUN (ICE connectivity checks) is relayed, by user space: it never hands a stream to the kernel.
    def stun_heard_both_ways():
        caller.send_stun(call.caller_facing)
        callee.send_stun(call.callee_facing)
        caller.drain()
        callee.drain()
        return caller.received_count(RTP) >= 3 and callee.received_count(RTP) >= 3

    wait_for(stun_heard_both_ways, timeout=5, interval=0.05, message="STUN both ways through the relay")
    settle(caller, callee)
    assert rig.summary()["kernel_entries"] == 0
    assert rig.entries() == []

    # Both sides send media (user space) and the relay hands RTP and RTCP to the kernel.
    pump(caller, callee, call, packets=200)
    summary = wait_kernel_entries(rig, 2)
    assert summary["forwarding"] == "kernel"
    assert caller.received_count(RTP) > 0 and callee.received_count(RTP) > 0

    # The entries, as conntrack shows them: caller -> relay:A NATed to relay:B -> callee.
    entries = {entry.orig: entry for entry in rig.entries()}
    expected = call.expected_entries()
    assert set(entries) == {orig for orig, _ in expected.values()}, [entry.line for entry in entries.values()]
    for orig, reply in expected.values():
        assert entries[orig].reply == reply, entries[orig].line
        assert entries[orig].mark == MARK

    # A second burst (2 s): carried by the kernel, the relay process forwards nothing.
    before = rig.summary()["userspace_packets"]
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)
    pump(caller, callee, call, packets=300)
    after = rig.summary()
    assert after["userspace_packets"] == before, (before, after)
    assert after["kernel_entries"] == 2
    # The relay's sockets of the call's four ports are closed while the kernel relays them.
    call_ports = {port + component for port in (call.caller_facing_port, call.callee_facing_port)
                  for component in (RTP, RTCP)}
    assert after["parked_ports"] == 4
    assert not call_ports & rig.listening_ports()
    assert callee.received_count(RTP) - heard_by_callee == 300
    assert caller.received_count(RTP) - heard_by_caller == 300
    assert rig.entries()[0].orig_packets > 0
    # bps_relayed (sampled every second) sees the kernel's traffic: 2 x 150 packets/s of 172 bytes is
    # about 410 kbit/s; the last sample may have caught only the end of the burst, never more than it.
    assert 100_000 < after["bps_relayed"] < 1_000_000, after

    # The statistics count every packet each party sent (RTP + RTCP), and their UDP payload.
    [stream] = rig.session("kernel-call")["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee), stream
    assert (stream["caller_codec"], stream["callee_codec"], stream["status"]) == ("G711u", "G711a", "active")

    # Each party heard the other only from the relay port it sends to (symmetric RTP), never another.
    assert_heard_only_from_the_relay(caller, call.caller_facing_port, call.relay_ip)
    assert_heard_only_from_the_relay(callee, call.callee_facing_port, call.relay_ip)
    assert call.remove() == "removed"
    assert rig.summary()["parked_ports"] == 0


def test_remove_leaves_no_entry_and_no_rule_and_reports_the_full_counts(make_rig):
    rig = make_rig()
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "removed-call", payload_type=8, packets=150)
    pump(caller, callee, call, packets=50)
    assert len(rig.entries()) == 2

    assert call.remove() == "removed"
    record = rig.wait_accounted("removed-call")
    [stream] = record["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee), stream
    assert stream["status"] == "closed"
    assert record["timed_out"] is False

    assert rig.entries() == []
    assert rig.inhibitor_rules() == []
    assert len(inhibitor_set_rules(rig.topo)) == 1        # the standing rule of the (empty) inhibitor set
    assert rig.summary()["kernel_entries"] == 0
    assert rig.sessions() == []

    # Nothing relays the call any more.
    for _ in range(5):
        caller.send_rtp(call.caller_facing)
        callee.send_rtp(call.callee_facing)
    heard = caller.received_count() + callee.received_count()
    time.sleep(0.3)  # a negative check: give a stray packet time to arrive
    settle(caller, callee)
    assert caller.received_count() + callee.received_count() == heard


def test_a_party_that_moves_is_relayed_again_by_a_new_entry(make_rig):
    rig = make_rig()
    rig.start_relay()
    caller = rig.party("caller", CALLER_PORT, payload_type=0)
    callee = rig.party("callee", CALLEE_PORT, payload_type=0)
    call = Call(rig.proxy(), "moving-call", caller, callee)
    pump(caller, callee, call, packets=100, rtcp_every=None)
    wait_kernel_entries(rig, 1)
    [old] = rig.entries()
    assert old.orig.sport == CALLER_PORT

    # The caller moves to another port and says so in a re-INVITE (CSeq 2).
    caller.bind(CALLER_PORT + 100)
    call.negotiate()
    wait_for(lambda: rig.entries() == [], timeout=5, interval=0.1, message="the old entry to go")

    # From the new port it is heard again, and once both are latched again, through the kernel.
    heard = callee.received_count(RTP)
    pump(caller, callee, call, packets=100, rtcp_every=None)
    assert callee.received_count(RTP) > heard
    wait_kernel_entries(rig, 1)
    [new] = rig.entries()
    assert new.orig.sport == CALLER_PORT + 100
    assert (new.orig, new.reply) == call.expected_entries()[RTP]

    before = rig.summary()["userspace_packets"]
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)
    pump(caller, callee, call, packets=100, rtcp_every=None)
    assert rig.summary()["userspace_packets"] == before
    assert callee.received_count(RTP) - heard_by_callee == 100
    assert caller.received_count(RTP) - heard_by_caller == 100
    assert caller.sources(RTP) == {call.caller_facing}
    assert callee.sources(RTP) == {call.callee_facing}

    # Nothing of what the old entry carried is lost from the statistics.
    [stream] = rig.session("moving-call")["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee), stream
    assert stream["caller_remote"] == f"{caller.ip}:{CALLER_PORT + 100}"
    assert call.remove() == "removed"
    assert rig.entries() == []


def test_two_streams_of_a_call_get_their_own_entries_and_counters(make_rig):
    rig = make_rig()
    rig.start_relay()
    audio = (rig.party("caller", CALLER_PORT, payload_type=0), rig.party("callee", CALLEE_PORT, payload_type=0))
    video = (
        rig.party("caller", CALLER_PORT + 10, payload_type=96),
        rig.party("callee", CALLEE_PORT + 10, payload_type=97),
    )
    proxy = rig.proxy()
    offer = proxy.update("two-streams", "request", f"{audio[0].media()},{video[0].media(media_type='video')}")
    relay_ip, callee_facing = parse_address_reply(offer, streams=2)
    answer = proxy.update(
        "two-streams", "reply", f"{audio[1].media()},{video[1].media(media_type='video')}", to_tag="callee-tag"
    )
    _, caller_facing = parse_address_reply(answer, streams=2)
    streams = [
        (caller, callee, (relay_ip, caller_facing[n]), (relay_ip, callee_facing[n]))
        for n, (caller, callee) in enumerate((audio, video))
    ]

    # Both streams start together: four sub-streams handed to the kernel.
    pump_streams(streams, packets=100)
    wait_kernel_entries(rig, 4)
    expected = {
        (
            Flow(caller.ip, relay_ip, caller.port + c, caller_at[1] + c),
            Flow(callee.ip, relay_ip, callee.port + c, callee_at[1] + c),
        )
        for caller, callee, caller_at, callee_at in streams
        for c in (RTP, RTCP)
    }
    assert {(entry.orig, entry.reply) for entry in rig.entries()} == expected

    before = rig.summary()["userspace_packets"]
    pump_streams(streams, packets=50)
    assert rig.summary()["userspace_packets"] == before

    # Each stream counts its own parties' packets, exactly.
    session = rig.session("two-streams")
    assert [stream["media_type"] for stream in session["streams"]] == ["audio", "video"]
    for stream, (caller, callee, _, _) in zip(session["streams"], streams):
        assert stream_counters(stream) == sent_counters(caller, callee), stream["media_type"]
    assert [stream["caller_codec"] for stream in session["streams"]] == ["G711u", "Dynamic(96)"]
    for caller, callee, caller_at, callee_at in streams:
        assert caller.sources(RTP) == {caller_at} and callee.sources(RTP) == {callee_at}

    assert proxy.remove("two-streams") == "removed"
    record = rig.wait_accounted("two-streams")
    for stream, (caller, callee, _, _) in zip(record["streams"], streams):
        assert stream_counters(stream) == sent_counters(caller, callee), stream["media_type"]
    assert rig.entries() == []
    assert rig.inhibitor_rules() == []
