"""Calls set up through the proxy socket and relayed over UDP (SPEC §2, §4, §6)."""

import json
import time

import pytest

from tests.integration.conftest import RELAY_A, RELAY_B, RELAYS
from tests.integration.daemons import Call, Party, parse_address_reply

pytestmark = pytest.mark.integration


def test_a_call_is_relayed_both_ways_and_reported(two_relays):
    with two_relays.proxy() as proxy:
        call = Call(proxy, "call-1", caller_pt=0, callee_pt=8)
        try:
            assert call.relay_ip in RELAYS
            assert call.caller_facing_port != call.callee_facing_port
            got = call.exchange()
            # Each party hears the other, from the relay port it sends to (symmetric RTP).
            for data, source in got["caller"]:
                assert source == call.caller_facing
                assert data[12:18] == b"callee"
            for data, source in got["callee"]:
                assert source == call.callee_facing
                assert data[12:18] == b"caller"

            session = two_relays.session("call-1")
            assert session is not None, two_relays.sessions()
            assert (session["from_tag"], session["to_tag"]) == ("caller-tag", "callee-tag")
            assert (session["caller_ua"], session["callee_ua"]) == ("caller-ua", "callee-ua")
            assert session["start_time"] is not None
            [stream] = session["streams"]
            assert stream["media_type"] == "audio" and stream["status"] == "active"
            assert stream["caller_codec"] == "G711u"
            assert stream["callee_codec"] == "G711a"
            assert 0 < stream["caller_packets"] <= call.caller.sent
            assert 0 < stream["callee_packets"] <= call.callee.sent
            assert stream["caller_bytes"] > 0 and stream["callee_bytes"] > 0
            assert stream["caller_local"] == "%s:%d" % call.caller_facing
            assert stream["callee_local"] == "%s:%d" % call.callee_facing
            assert stream["caller_remote"] == "127.0.0.1:%d" % call.caller.port
            assert stream["callee_remote"] == "127.0.0.1:%d" % call.callee.port

            summary = {entry["ip"]: entry for entry in two_relays.summary()}
            assert summary[call.relay_ip]["session_count"] == 1
            assert summary[call.relay_ip]["stream_count"] == {"audio": 1}
            other = RELAY_B if call.relay_ip == RELAY_A else RELAY_A
            assert summary[other]["session_count"] == 0

            assert proxy.remove("call-1") == "removed"
            assert two_relays.sessions() == []
            # The relay's ports are closed: nothing is relayed any more.
            call.caller.drain()
            call.callee.send(call.callee_facing)
            time.sleep(0.2)     # a negative check: give a stray packet time to arrive
            assert call.caller.drain() == []
        finally:
            call.close()
    two_relays.assert_alive()


def test_the_sessions_answer_is_one_json_line_per_session(two_relays):
    with two_relays.proxy() as proxy:
        calls = [Call(proxy, f"listed-{n}") for n in range(3)]
        try:
            with two_relays.management() as client:
                client.send_raw(b"sessions\r\n")
                raw = client.read_answer_raw()
            assert raw.endswith(b"}\r\n\r\n")
            lines = raw.split(b"\r\n")[:-2]
            assert b"\n" not in b"".join(lines)
            assert sorted(json.loads(line)["call_id"] for line in lines) == ["listed-0", "listed-1", "listed-2"]
            for call in calls:
                assert proxy.remove(call.call_id) == "removed"
        finally:
            for call in calls:
                call.close()


@pytest.mark.parametrize("preferred", RELAYS)
def test_the_preferred_relay_gets_the_session(two_relays, preferred):
    with two_relays.proxy() as proxy:
        calls = []
        try:
            for n in range(4):
                calls.append(Call(proxy, f"pref-{n}", media_relay=preferred))
            assert [call.relay_ip for call in calls] == [preferred] * 4
            calls[0].exchange()
            holders = {session["call_id"]: session["streams"][0]["caller_local"].split(":")[0]
                       for session in two_relays.sessions()}
            assert holders == {call.call_id: preferred for call in calls}
            # A preferred address that is no relay of ours: any relay takes the call.
            unknown = Call(proxy, "pref-unknown", media_relay="127.0.0.99")
            calls.append(unknown)
            assert unknown.relay_ip in RELAYS
            for call in calls:
                assert proxy.remove(call.call_id) == "removed"
        finally:
            for call in calls:
                call.close()


def test_calls_without_preference_spread_over_both_relays(two_relays):
    parties = [Party(f"p{n}") for n in range(20)]
    try:
        with two_relays.proxy() as proxy:
            relays = []
            for n, party in enumerate(parties):
                ip, _ = parse_address_reply(proxy.update(f"spread-{n}", "request", party.media()))
                relays.append(ip)
            assert set(relays) == set(RELAYS), relays
            counts = {entry["ip"]: entry["session_count"] for entry in two_relays.summary()}
            assert counts == {ip: relays.count(ip) for ip in RELAYS}
            for n in range(len(parties)):
                assert proxy.remove(f"spread-{n}") == "removed"
    finally:
        for party in parties:
            party.close()
