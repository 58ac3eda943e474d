"""Media hijack (issue 9 item 3, SPEC §4): once a party is latched, packets from
any other address are dropped and counted (per stream in the statistics,
relay-wide in the summary). With strict source (the default) only a new
offer/answer that changes the party's address lets it latch anew; with
`strict_source = no` a party silent for `relatch_after` seconds may be latched
anew by a new source, never while it keeps sending (in user space or, as its
kernel counters tell, in the kernel), and never on hold.

Driven through the sans-IO relay core and the in-memory forwarding."""

import json
import logging

import pytest

from mediaproxy.configuration import ConfigError, parse_configuration
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool

RELAY_IP = "198.51.100.1"
CALLER = ("203.0.113.5", 31000)               # where the caller's packets come from (its NAT)
CALLEE = ("192.0.2.77", 42000)
CALLER_RTCP, CALLEE_RTCP = (CALLER[0], CALLER[1] + 1), (CALLEE[0], CALLEE[1] + 1)
STRANGER = ("198.18.99.9", 5000)
MOVED = (CALLER[0], 31200)                    # the caller after its NAT rebound
RELATCH_AFTER = 2.0
RTP = b"\x80\x00" + b"\x00" * 10 + b"\xaa" * 160
RTCP = b"\x80\xc8\x00\x06" + b"\x00" * 24
INTRUDER = b"\x80\x00" + b"\x00" * 10 + b"INTRUDER" * 20


class RecordingForwarding(MemoryForwarding):
    """The in-memory forwarding, keeping the latching events it is told of."""

    def __init__(self):
        super().__init__()
        self.events = []

    def latched(self, stream, component):
        self.events.append(("latched", component))

    def unlatched(self, stream):
        self.events.append(("unlatched",))


class KernelLikeForwarding(RecordingForwarding):
    """As the kernel path: the caller's packets are relayed out of sight and only counted
    when asked (count_packets), here while `caller_sending`."""

    def __init__(self):
        super().__init__()
        self.caller_sending = True
        self.readable = True
        self.reads = 0

    def count_packets(self, stream):
        self.reads += 1
        if not self.readable:
            return False
        if self.caller_sending:
            stream.caller.packet_count += 50
        return True


def make_relay(forwarding, relatch_after=None):
    return RelayCore(RELAY_IP, PortPool(40000, 40040), forwarding, now=1000.0, relatch_after=relatch_after)


def update(relay, kind, cseq, media, now):
    headers = {"type": kind, "call_id": "call-1", "cseq": "%d INVITE" % cseq, "from_tag": "alice",
               "to_tag": "bob" if kind == "reply" or cseq > 1 else "", "media": media}
    return [int(port) for port in relay.update(headers, now).split()[1:]]


def latched_call(relay, now=1000.0):
    """Offer, answer, and a first RTP and RTCP packet of each party: (caller-facing, callee-facing) ports."""
    [callee_facing] = update(relay, "request", 1, "audio:10.0.0.5:4000:sendrecv", now)
    [caller_facing] = update(relay, "reply", 1, "audio:10.0.0.9:6000:sendrecv", now)
    talk(relay, caller_facing, callee_facing, now)
    return caller_facing, callee_facing


def talk(relay, caller_facing, callee_facing, now, caller=True, callee=True):
    """One RTP and one RTCP packet from each party (from the caller at CALLER unless told)."""
    deliver = relay.forwarding.deliver
    if caller:
        source = CALLER if caller is True else caller
        deliver(caller_facing, source, RTP, now)
        deliver(caller_facing + 1, (source[0], source[1] + 1), RTCP, now)
    if callee:
        deliver(callee_facing, CALLEE, RTP, now)
        deliver(callee_facing + 1, CALLEE_RTCP, RTCP, now)


def stream_statistics(relay, now):
    [session] = json.loads(relay.handle("sessions", {}, now))
    [stream] = session["streams"]
    return stream


def sent_by(forwarding, data):
    return [(port, destination) for port, destination, sent in forwarding.sent if sent == data]


# Strict source (the default)

def test_a_strangers_packets_are_dropped_counted_and_reach_nobody():
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding)
    caller_facing, callee_facing = latched_call(relay)
    for n in range(10):
        now = 1001.0 + n * 0.02
        for port in (caller_facing, caller_facing + 1, callee_facing, callee_facing + 1):
            assert forwarding.deliver(port, STRANGER, INTRUDER, now) is None
        # the caller's own IP from another port is a stranger too
        assert forwarding.deliver(caller_facing, (CALLER[0], CALLER[1] + 2), INTRUDER, now) is None
        talk(relay, caller_facing, callee_facing, now)
    assert sent_by(forwarding, INTRUDER) == []
    # the call goes on: every packet of the parties reached the other one
    assert sent_by(forwarding, RTP).count((caller_facing, CALLER)) == 11
    assert sent_by(forwarding, RTP).count((callee_facing, CALLEE)) == 10   # the first went to the SDP address
    stream = stream_statistics(relay, 1002.0)
    assert (stream["caller_dropped"], stream["callee_dropped"]) == (30, 20)
    assert (stream["caller_packets"], stream["callee_packets"]) == (22, 22)
    assert stream["caller_remote"] == "%s:%d" % CALLER
    assert relay.summary(1002.0)["dropped_packets"] == 50


def test_with_strict_source_a_long_silent_party_keeps_its_latch():
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding)
    caller_facing, callee_facing = latched_call(relay)
    for n in range(100):                       # the caller silent, a stranger sending for 100 s
        assert forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1001.0 + n) is None
    assert forwarding.events == [("latched", 0), ("latched", 1)]
    assert forwarding.deliver(caller_facing, CALLER, RTP, 1101.0) == (callee_facing, CALLEE)
    assert stream_statistics(relay, 1102.0)["caller_dropped"] == 100


def test_with_strict_source_a_new_offer_with_another_address_lets_the_party_latch_anew():
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding)
    caller_facing, callee_facing = latched_call(relay)
    assert forwarding.deliver(caller_facing, MOVED, RTP, 1001.0) is None
    update(relay, "request", 2, "audio:10.0.0.5:4100:sendrecv", 1002.0)      # re-INVITE: it moved
    assert forwarding.events[-1] == ("unlatched",)
    assert forwarding.deliver(caller_facing, MOVED, RTP, 1003.0) == (callee_facing, CALLEE)
    assert forwarding.deliver(callee_facing, CALLEE, RTP, 1003.0) == (caller_facing, MOVED)
    assert forwarding.deliver(caller_facing, CALLER, RTP, 1003.0) is None     # the old address is a stranger now
    stream = stream_statistics(relay, 1004.0)
    assert stream["caller_remote"] == "%s:%d" % MOVED and stream["caller_dropped"] == 2


def test_the_first_drop_of_a_leg_is_logged_once_with_the_call_id(caplog):
    relay = make_relay(RecordingForwarding())
    caller_facing, _ = latched_call(relay)
    with caplog.at_level(logging.INFO, logger="mediaproxy.relay"):
        for n in range(5):
            relay.forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1001.0 + n)
    assert [record.getMessage() for record in caplog.records] == [
        "session call-1: dropping packets from 198.18.99.9:5000 to the caller's audio RTP port, "
        "latched to 203.0.113.5:31000"]


# strict_source = no

def test_a_stranger_never_takes_the_place_of_a_party_that_keeps_sending():
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding, RELATCH_AFTER)
    caller_facing, callee_facing = latched_call(relay)
    for n in range(500):                       # 10 s of both at 50 packets/s
        now = 1001.0 + n * 0.02
        assert forwarding.deliver(caller_facing, STRANGER, INTRUDER, now) is None
        assert forwarding.deliver(caller_facing, CALLER, RTP, now) == (callee_facing, CALLEE)
    assert sent_by(forwarding, INTRUDER) == []
    assert forwarding.events == [("latched", 0), ("latched", 1)]
    assert stream_statistics(relay, 1011.0)["caller_dropped"] == 500


def test_a_party_silent_for_relatch_after_is_latched_anew_from_its_new_source(caplog):
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding, RELATCH_AFTER)
    caller_facing, callee_facing = latched_call(relay)
    talk(relay, caller_facing, callee_facing, 1005.0)
    # Its NAT rebinds: from 1006 on the caller sends from MOVED (32 packets/s); what it sends is
    # dropped until its old address has been silent for RELATCH_AFTER, as seen from the new one.
    step = 1 / 32
    with caplog.at_level(logging.INFO, logger="mediaproxy.relay"):
        for n in range(96):
            now = 1006.0 + n * step
            result = forwarding.deliver(caller_facing, MOVED, RTP, now)
            assert result == ((callee_facing, CALLEE) if n >= 64 else None), now
            forwarding.deliver(callee_facing, CALLEE, RTP, now)
    relatched = [r.getMessage() for r in caplog.records if "latched anew" in r.getMessage()]
    assert relatched == ["session call-1: the caller's audio RTP moved from 203.0.113.5:31000 to "
                         "203.0.113.5:31200 after 2.0 s of silence: latched anew"]
    # the callee's packets follow the caller; its RTCP latches anew on its next packet
    assert forwarding.deliver(callee_facing, CALLEE, RTP, 1009.0) == (caller_facing, MOVED)
    moved_rtcp = (MOVED[0], MOVED[1] + 1)
    assert forwarding.deliver(caller_facing + 1, moved_rtcp, RTCP, 1009.0) == (callee_facing + 1, CALLEE_RTCP)
    assert forwarding.deliver(callee_facing + 1, CALLEE_RTCP, RTCP, 1009.0) == (caller_facing + 1, moved_rtcp)
    # the forwarding was told: the old latch went (kernel entries out), the new one is complete
    assert forwarding.events == [("latched", 0), ("latched", 1), ("unlatched",), ("latched", 0), ("latched", 1)]
    stream = stream_statistics(relay, 1010.0)
    assert stream["caller_remote"] == "%s:%d" % MOVED
    assert stream["caller_dropped"] == 64
    assert forwarding.deliver(caller_facing, CALLER, RTP, 1010.0) is None     # the old address: a stranger now


def test_a_held_stream_never_latches_anew():
    forwarding = RecordingForwarding()
    relay = make_relay(forwarding, RELATCH_AFTER)
    caller_facing, callee_facing = latched_call(relay)
    update(relay, "request", 2, "audio:10.0.0.5:4000:sendonly", 1001.0)
    update(relay, "reply", 2, "audio:10.0.0.9:6000:recvonly", 1001.0)
    for n in range(60):
        assert forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1002.0 + n) is None
    assert stream_statistics(relay, 1100.0)["caller_dropped"] == 60
    assert ("unlatched",) not in forwarding.events


def test_in_the_kernel_a_party_that_keeps_sending_keeps_its_place():
    # The kernel relays the caller: its count only moves when the forwarding reads the kernel.
    forwarding = KernelLikeForwarding()
    relay = make_relay(forwarding, RELATCH_AFTER)
    caller_facing, callee_facing = latched_call(relay)
    for n in range(500):                       # a stranger at 50 packets/s for 10 s
        assert forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1001.0 + n * 0.02) is None
    assert ("unlatched",) not in forwarding.events
    # the kernel is read only when the count looks still for RELATCH_AFTER: every 2 s, not per packet
    assert 3 <= forwarding.reads <= 5

    forwarding.readable = False                # a kernel that cannot be read gives nobody's place away
    forwarding.caller_sending = False
    for n in range(250):
        assert forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1011.0 + n * 0.02) is None
    assert ("unlatched",) not in forwarding.events

    forwarding.readable = True                 # the caller stopped: its count stands still from now on
    results = [forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1016.0 + n * 0.02) for n in range(250)]
    assert ("unlatched",) in forwarding.events
    accepted = results.index((callee_facing, CALLEE))
    assert all(result is None for result in results[:accepted])
    assert all(result == (callee_facing, CALLEE) for result in results[accepted:])
    assert accepted * 0.02 <= 2 * RELATCH_AFTER


def test_a_packet_the_kernel_dropped_at_a_parked_port_is_counted_and_wakes_it_only_without_strict_source():
    for relatch_after, wakes in ((None, False), (RELATCH_AFTER, True)):
        relay = make_relay(RecordingForwarding(), relatch_after)
        caller_facing, callee_facing = latched_call(relay)
        [stream] = [s for session in relay.sessions.values() for s in session.active_streams]
        assert stream.caller.dropped_by_kernel(1, STRANGER, 1001.0) is wakes
        assert stream.callee.dropped_by_kernel(0, STRANGER, 1001.0) is wakes
        statistics = stream_statistics(relay, 1002.0)
        assert (statistics["caller_dropped"], statistics["callee_dropped"]) == (1, 1)
        assert relay.summary(1002.0)["dropped_packets"] == 2


def test_dropped_packets_of_ended_calls_stay_in_the_summary():
    relay = make_relay(RecordingForwarding())
    caller_facing, _ = latched_call(relay)
    relay.forwarding.deliver(caller_facing, STRANGER, INTRUDER, 1001.0)
    statistics = json.loads(relay.remove({"call_id": "call-1"}, 1002.0))
    assert statistics["streams"][0]["caller_dropped"] == 1
    assert relay.summary(1003.0)["dropped_packets"] == 1


# configuration

def test_strict_source_is_the_default_and_relatch_after_is_two_seconds():
    relay = parse_configuration("", "/etc/mediaproxy", "/run/mediaproxy").relay
    assert (relay.strict_source, relay.relatch_after) == (True, 2)
    relay = parse_configuration("[Relay]\nstrict_source = no\nrelatch_after = 0.5\n", ".", ".").relay
    assert (relay.strict_source, relay.relatch_after) == (False, 0.5)


@pytest.mark.parametrize("line", ["strict_source = maybe", "relatch_after = 0", "relatch_after = soon"])
def test_bad_relatching_options_stop_the_start(line):
    with pytest.raises(ConfigError, match=r"\[Relay\] %s" % line.split()[0]):
        parse_configuration("[Relay]\n%s\n" % line, ".", ".")
