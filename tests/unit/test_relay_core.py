"""The relay core: the dispatcher's commands in, reply text out, ports and
packets through the in-memory forwarding; and the packet path of a stream
(latching, forwarding, codec detection)."""

import json

import pytest

from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.rtp import codec_name, is_stun, rtp_payload_type

RELAY_IP = "198.51.100.1"
CALLER_SDP = ("10.0.0.5", 4000)
CALLEE_SDP = ("10.0.0.9", 6000)
CALLER_REAL = ("203.0.113.5", 31000)     # where the caller's packets really come from (NAT)
CALLEE_REAL = ("192.0.2.77", 42000)


def rtp(payload_type=0, size=160, marker=False):
    return bytes([0x80, (0x80 if marker else 0) | payload_type]) + b"\x00\x01" + b"\x00" * 8 + b"\xaa" * size


def rtcp():
    return bytes([0x80, 200, 0x00, 0x06]) + b"\x00" * 24


def stun():
    return b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"\x01" * 12


def headers(call_id="call-1", kind="request", cseq=1, media="audio:%s:%d:sendrecv" % CALLER_SDP,
            from_tag="alice", to_tag=None):
    values = {"type": kind, "call_id": call_id, "cseq": "%d INVITE" % cseq, "from_tag": from_tag,
              "to_tag": to_tag or "", "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com"}
    if media is not None:
        values["media"] = media
    return values


def answer(call_id="call-1", cseq=1, media="audio:%s:%d:sendrecv" % CALLEE_SDP):
    return headers(call_id, "reply", cseq, media, to_tag="bob")


def ports_of(reply):
    ip, *ports = reply.split()
    assert ip == RELAY_IP
    return [int(p) for p in ports]


@pytest.fixture
def forwarding():
    return MemoryForwarding()


@pytest.fixture
def relay(forwarding):
    return RelayCore(RELAY_IP, PortPool(40000, 40040), forwarding, now=1000.0)


def call(relay, call_id="call-1", now=1000.0, offer=None, answer_media=None):
    """Offer and answer; returns (callee-facing ports, caller-facing ports)."""
    offer_headers = headers(call_id) if offer is None else headers(call_id, media=offer)
    answer_headers = answer(call_id) if answer_media is None else answer(call_id, media=answer_media)
    callee_facing = ports_of(relay.update(offer_headers, now))
    caller_facing = ports_of(relay.update(answer_headers, now + 1))
    return callee_facing, caller_facing


# update / remove

def test_an_offer_gets_the_relay_address_and_an_even_port_per_stream(relay, forwarding):
    reply = relay.update(headers(media="audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv"), 1000.0)
    audio, video = ports_of(reply)
    assert audio % 2 == 0 and video % 2 == 0 and audio != video
    assert 40000 <= audio < 40040 and 40000 <= video < 40040
    # two port pairs per stream: one facing each party
    assert relay.ports.used_count == 4 and len(forwarding.receivers) == 4
    assert "call-1" in relay.sessions


def test_the_answer_gets_the_other_ports(relay):
    (callee_facing,), (caller_facing,) = call(relay)
    assert caller_facing != callee_facing
    assert relay.ports.used_count == 2


def test_an_update_without_media_for_an_unknown_call_is_just_the_address(relay, forwarding):
    assert relay.update(headers(media=None), 1000.0) == RELAY_IP
    assert relay.sessions == {} and forwarding.receivers == {}


def test_an_update_without_media_for_a_known_call_changes_nothing(relay):
    (callee_facing,), (caller_facing,) = call(relay)
    assert relay.update(answer(media=None), 1002.0) == "%s %d" % (RELAY_IP, caller_facing)
    assert "None" not in relay.update(headers(media=None), 1002.0)
    assert relay.ports.used_count == 2


@pytest.mark.parametrize("bad", [{}, {"call_id": "c"}, dict(headers(), cseq="x"),
                                 dict(headers(), media="audio:10.0.0.5:99999:sendrecv")])
def test_a_malformed_update_is_error(relay, bad):
    assert relay.update(bad, 1000.0) == "error"
    assert relay.sessions == {} and relay.ports.used_count == 0


def test_remove_answers_the_statistics_and_releases_the_ports(relay, forwarding):
    call(relay)
    reply = relay.remove({"call_id": "call-1", "from_tag": "alice", "to_tag": "bob"}, 1060.0)
    statistics = json.loads(reply)
    assert statistics["call_id"] == "call-1" and statistics["duration"] == 59.0
    assert [s["status"] for s in statistics["streams"]] == ["closed"]
    assert relay.sessions == {}
    assert relay.ports.used_count == 0 and forwarding.receivers == {}


def test_remove_of_an_unknown_or_malformed_call_is_error(relay):
    assert relay.remove({"call_id": "nope"}, 1000.0) == "error"
    assert relay.remove({"from_tag": "x"}, 1000.0) == "error"


def test_a_removed_calls_ports_come_back_last(relay):
    (first,), _ = call(relay, "call-1")
    relay.remove({"call_id": "call-1"}, 1010.0)
    (second,), _ = call(relay, "call-2", now=1011.0)
    assert second != first


def test_commands_by_name(relay):
    reply = relay.handle("update", headers(), 1000.0)
    assert len(ports_of(reply)) == 1
    assert json.loads(relay.handle("summary", {}, 1010.0))["session_count"] == 1
    [session] = json.loads(relay.handle("sessions", {}, 1010.0))
    assert session["call_id"] == "call-1"
    assert json.loads(relay.handle("remove", {"call_id": "call-1"}, 1020.0))["call_id"] == "call-1"
    assert relay.handle("reboot", {}, 1020.0) == "error"
    assert json.loads(relay.handle("sessions", {}, 1030.0)) == []


def test_each_dispatcher_lists_only_its_own_sessions(relay):
    relay.handle("update", headers("call-a"), 1000.0, owner="192.0.2.1")
    relay.handle("update", headers("call-b"), 1000.0, owner="192.0.2.2")
    listed = lambda owner: [s["call_id"] for s in json.loads(relay.handle("sessions", {}, 1001.0, owner=owner))]
    assert listed("192.0.2.1") == ["call-a"]
    assert listed("192.0.2.2") == ["call-b"]
    assert sorted(listed(None)) == ["call-a", "call-b"]


# running out of ports

def test_exhaustion_is_error_and_leaks_nothing():
    forwarding = MemoryForwarding()
    relay = RelayCore(RELAY_IP, PortPool(40000, 40006), forwarding, now=0.0)     # 3 pairs
    two_streams = "audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv"
    assert relay.update(headers(media=two_streams), 1.0) == "error"
    assert relay.sessions == {}
    assert relay.ports.used_count == 0 and forwarding.receivers == {}
    assert len(ports_of(relay.update(headers("call-2"), 2.0))) == 1       # one stream still fits


def test_exhaustion_on_a_reoffer_keeps_the_call_as_it_was():
    forwarding = MemoryForwarding()
    relay = RelayCore(RELAY_IP, PortPool(40000, 40006), forwarding, now=0.0)
    (audio,), _ = call(relay)
    used, receivers = relay.ports.used_count, dict(forwarding.receivers)
    reoffer = headers(cseq=2, media="audio:10.0.0.5:4000:sendrecv,video:10.0.0.5:4002:sendrecv")
    assert relay.update(reoffer, 10.0) == "error"
    assert relay.ports.used_count == used and forwarding.receivers == receivers
    assert relay.update(headers(cseq=3), 11.0) == "%s %d" % (RELAY_IP, audio)


class OutOfDescriptors(MemoryForwarding):
    """Sockets cannot be opened while `exhausted` (the process is at its descriptor limit)."""

    exhausted = True

    def open(self, port, receiver, ip_version=None):
        if self.exhausted:
            raise OSError(24, "Too many open files")
        super().open(port, receiver, ip_version)


def test_without_descriptors_an_offer_is_error_no_port_is_lost_and_it_recovers():
    forwarding = OutOfDescriptors()
    relay = RelayCore(RELAY_IP, PortPool(40000, 40006), forwarding, now=0.0)
    assert relay.update(headers(), 1.0) == "error"
    assert relay.sessions == {}
    assert relay.ports.used_count == 0 and relay.ports.free_count == 3 and relay.ports.set_aside_ports == set()
    forwarding.exhausted = False                          # descriptors are back
    assert len(ports_of(relay.update(headers(), 2.0))) == 1


def test_a_port_that_cannot_be_bound_is_set_aside_and_another_used():
    forwarding = MemoryForwarding(unavailable={40000, 40004})
    relay = RelayCore(RELAY_IP, PortPool(40000, 40020), forwarding, now=0.0)
    (callee_facing,), (caller_facing,) = call(relay)
    assert {callee_facing, caller_facing} == {40002, 40006}
    assert relay.ports.set_aside_ports == {40000, 40004}
    assert set(forwarding.receivers) == {40002, 40006}
    relay.remove({"call_id": "call-1"}, 5.0)
    assert relay.ports.used_count == 0


def test_when_no_port_can_be_bound_the_answer_is_error_and_nothing_leaks():
    forwarding = MemoryForwarding(unavailable=range(40000, 40010, 2))
    relay = RelayCore(RELAY_IP, PortPool(40000, 40010), forwarding, now=0.0)
    assert relay.update(headers(), 1.0) == "error"
    assert relay.sessions == {} and relay.ports.used_count == 0 and forwarding.receivers == {}


# graceful shutdown

def test_halting_refuses_new_sessions_but_serves_existing_ones(relay):
    (audio,), _ = call(relay)
    relay.halting = True
    assert relay.update(headers("call-2"), 1005.0) == "halting"
    assert "call-2" not in relay.sessions
    assert relay.update(headers(cseq=2), 1006.0) == "%s %d" % (RELAY_IP, audio)
    assert json.loads(relay.remove({"call_id": "call-1"}, 1007.0))["call_id"] == "call-1"
    assert relay.summary(1008.0)["status"] == "halting"


def test_close_all_releases_everything(relay, forwarding):
    call(relay, "call-1")
    call(relay, "call-2")
    relay.close_all(1100.0)
    assert relay.sessions == {} and relay.ports.used_count == 0 and forwarding.receivers == {}


# the packet path

@pytest.fixture
def latched_call(relay, forwarding):
    """A call whose parties' first packets have been seen; returns (caller-facing, callee-facing) ports."""
    (callee_facing,), (caller_facing,) = call(relay)
    forwarding.deliver(caller_facing, CALLER_REAL, rtp(0), 1002.0)
    forwarding.deliver(callee_facing, CALLEE_REAL, rtp(8), 1002.1)
    return caller_facing, callee_facing


def test_before_latching_packets_go_to_the_sdp_address(relay, forwarding):
    (callee_facing,), (caller_facing,) = call(relay)
    assert forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1002.0) == (callee_facing, CALLEE_SDP)
    assert forwarding.deliver(caller_facing + 1, CALLER_REAL[:1] + (31001,), rtcp(), 1002.0) == \
        (callee_facing + 1, (CALLEE_SDP[0], CALLEE_SDP[1] + 1))


def test_before_latching_nothing_goes_to_an_address_that_is_not_routable(forwarding):
    relay = RelayCore(RELAY_IP, PortPool(40000, 40040), forwarding, now=1000.0,
                      routable=lambda ip: not ip.startswith("10."))
    (callee_facing,), (caller_facing,) = call(relay)
    assert forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1002.0) is None
    # the callee's first packet latches it, and from then on the caller's packets reach it
    assert forwarding.deliver(callee_facing, CALLEE_REAL, rtp(), 1002.1) == (caller_facing, CALLER_REAL)
    assert forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1002.2) == (callee_facing, CALLEE_REAL)


def test_latched_parties_get_each_others_packets(latched_call, forwarding):
    caller_facing, callee_facing = latched_call
    assert forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1003.0) == (callee_facing, CALLEE_REAL)
    assert forwarding.deliver(callee_facing, CALLEE_REAL, rtp(), 1003.0) == (caller_facing, CALLER_REAL)
    assert forwarding.sent[-1] == (caller_facing, CALLER_REAL, rtp())


def test_packets_from_another_address_are_dropped_once_latched(relay, latched_call, forwarding):
    caller_facing, callee_facing = latched_call
    sent = len(forwarding.sent)
    assert forwarding.deliver(caller_facing, ("203.0.113.66", 31000), rtp(), 1003.0) is None
    assert forwarding.deliver(caller_facing, (CALLER_REAL[0], 31002), rtp(), 1003.0) is None
    assert len(forwarding.sent) == sent
    [stream] = json.loads(relay.handle("sessions", {}, 1004.0))[0]["streams"]
    assert stream["caller_packets"] == 1 and stream["caller_remote"] == "%s:%d" % CALLER_REAL


def test_rtcp_latches_separately_on_the_next_port(relay, latched_call, forwarding):
    caller_facing, callee_facing = latched_call
    caller_rtcp, callee_rtcp = (CALLER_REAL[0], 31001), (CALLEE_REAL[0], 42001)
    # the callee's RTCP is not latched yet: the caller's RTCP goes to its SDP address + 1
    assert forwarding.deliver(caller_facing + 1, caller_rtcp, rtcp(), 1003.0) == \
        (callee_facing + 1, (CALLEE_SDP[0], CALLEE_SDP[1] + 1))
    assert forwarding.deliver(callee_facing + 1, callee_rtcp, rtcp(), 1003.0) == (caller_facing + 1, caller_rtcp)
    assert forwarding.deliver(caller_facing + 1, caller_rtcp, rtcp(), 1003.0) == (callee_facing + 1, callee_rtcp)
    # RTP keeps its own latch
    assert forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1003.0) == (callee_facing, CALLEE_REAL)


def test_the_codec_is_from_each_partys_first_rtp_packet(relay, forwarding):
    (callee_facing,), (caller_facing,) = call(relay)
    forwarding.deliver(caller_facing + 1, (CALLER_REAL[0], 31001), rtcp(), 1002.0)   # RTCP: no codec
    forwarding.deliver(caller_facing, CALLER_REAL, stun(), 1002.0)                    # STUN: no codec
    forwarding.deliver(caller_facing, CALLER_REAL, rtp(18), 1002.0)
    forwarding.deliver(caller_facing, CALLER_REAL, rtp(0), 1002.1)
    forwarding.deliver(callee_facing, CALLEE_REAL, rtp(101), 1002.2)
    [stream] = json.loads(relay.handle("sessions", {}, 1003.0))[0]["streams"]
    assert (stream["caller_codec"], stream["callee_codec"]) == ("G729", "Dynamic(101)")


def test_stun_does_not_start_the_media(relay, forwarding):
    (callee_facing,), (caller_facing,) = call(relay)
    forwarding.deliver(caller_facing, CALLER_REAL, stun(), 1002.0)
    forwarding.deliver(callee_facing, CALLEE_REAL, stun(), 1002.0)
    [stream] = json.loads(relay.handle("sessions", {}, 1003.0))[0]["streams"]
    assert stream["post_dial_delay"] is None
    assert stream["caller_packets"] == 1         # relayed and counted, but no media yet
    forwarding.deliver(caller_facing, CALLER_REAL, rtp(), 1004.5)
    [stream] = json.loads(relay.handle("sessions", {}, 1005.0))[0]["streams"]
    assert stream["post_dial_delay"] == 4.5


def test_a_removed_stream_relays_nothing(relay, latched_call, forwarding):
    caller_facing, callee_facing = latched_call
    receiver = forwarding.receivers[caller_facing]
    relay.remove({"call_id": "call-1"}, 1010.0)
    assert receiver(0, CALLER_REAL, rtp(), 1011.0) is None


def test_traffic_sampling_counts_bits_per_second(relay, latched_call, forwarding):
    caller_facing, callee_facing = latched_call
    relay.sample_traffic(1010.0)
    for _ in range(10):
        forwarding.deliver(caller_facing, CALLER_REAL, rtp(size=88), 1011.0)     # 100 bytes each
    assert relay.sample_traffic(1020.0) == 1000 * 8 // 10
    relay.remove({"call_id": "call-1"}, 1021.0)       # bytes of ended calls still count once
    assert relay.sample_traffic(1030.0) == 0
    assert relay.summary(1030.0)["bps_relayed"] == 0


# rtp.py

def test_stun_is_recognised_by_its_magic_cookie():
    assert is_stun(stun())
    assert not is_stun(rtp())
    assert not is_stun(stun()[:19])
    assert not is_stun(b"\x80" + stun()[1:])


@pytest.mark.parametrize("data, payload_type", [(rtp(0), 0), (rtp(8, marker=True), 8), (rtp(96), 96),
                                                (rtcp(), None), (stun(), None), (b"\x80\x00", None),
                                                (b"\x40" + rtp(0)[1:], None)])
def test_rtp_payload_type(data, payload_type):
    assert rtp_payload_type(data) == payload_type


@pytest.mark.parametrize("payload_type, name", [(0, "G711u"), (8, "G711a"), (9, "G722"), (18, "G729"),
                                                (3, "GSM"), (96, "Dynamic(96)"), (127, "Dynamic(127)"),
                                                (50, "Unknown(50)")])
def test_codec_names(payload_type, name):
    assert codec_name(payload_type) == name


def test_a_brief_sessions_list_names_the_sessions_without_reading_the_kernel():
    class CountingForwarding(MemoryForwarding):
        refreshed = 0

        def refresh_counters(self):
            self.refreshed += 1

    forwarding = CountingForwarding()
    core = RelayCore(RELAY_IP, PortPool(40000, 40020), forwarding, now=0.0)
    core.handle("update", {"type": "request", "call_id": "c1", "cseq": "1 INVITE", "from_tag": "a",
                           "dialog_id": "7:9", "media": "audio:10.0.0.5:4000:sendrecv"}, 0.0)
    [full] = json.loads(core.handle("sessions", {}, 0.0))
    assert forwarding.refreshed == 1 and full["streams"]
    assert json.loads(core.handle("sessions", {"brief": "yes"}, 0.0)) == [
        {"call_id": "c1", "from_tag": "a", "to_tag": full["to_tag"], "dialog_id": "7:9"}]
    assert forwarding.refreshed == 1


def test_sessions_with_match_lists_only_the_sessions_whose_ids_or_uris_hold_the_text(relay):
    relay.update(headers("call-1"), 1.0)
    relay.update(dict(headers("call-2"), from_uri="sip:carol@example.org"), 2.0)
    listed = json.loads(relay.handle("sessions", {"match": "CAROL"}, 3.0))
    assert [session["call_id"] for session in listed] == ["call-2"]
    assert [s["call_id"] for s in json.loads(relay.handle("sessions", {"match": "call-"}, 3.0))] == ["call-1", "call-2"]
    assert json.loads(relay.handle("sessions", {"match": "nobody"}, 3.0)) == []


def test_100000_half_open_sessions_fill_the_range_the_rest_get_error_and_all_age_out(caplog):
    """Memory pressure from offers no answer ever follows: the relay holds what its port range
    holds and nothing of the refused ones; the half-open ones age out and every port comes back."""
    import logging

    caplog.set_level(logging.CRITICAL)          # 99,000 "no ports" lines are the daemon's, not the test's
    forwarding = MemoryForwarding()
    relay = RelayCore(RELAY_IP, PortPool(40000, 44000), forwarding, now=0.0, stream_timeout=90)   # 1,000 sessions
    refused = sum(relay.update(headers("half-open-%d" % n), 1.0) == "error" for n in range(100_000))
    assert refused == 99_000 and len(relay.sessions) == 1000
    assert relay.ports.free_count == 0 and len(forwarding.receivers) == 2000      # nothing else is kept
    assert relay.check_timeouts(1.0 + 89) == []
    assert len(relay.check_timeouts(1.0 + 90)) == 1000
    assert relay.sessions == {} and forwarding.receivers == {}
    assert relay.ports.free_count == 2000 and relay.ports.set_aside_ports == set()
    assert ports_of(relay.update(headers("after"), 200.0))
