"""The relay's side: its link stays up, its ports run out gracefully (SPEC §3, §4)."""

import socket
import time

import pytest

from tests.integration.conftest import RELAY_A, RELAYS
from tests.integration.daemons import Call, Party, media_port_range, parse_address_reply

pytestmark = pytest.mark.integration


def test_keepalives_keep_the_links_up(cluster):
    cluster.start_dispatcher()
    cluster.start_relays(RELAYS, keepalive_interval=0.2)
    # Nothing to poll for: the link must simply survive many ping intervals
    # (three unanswered pings would drop it).
    time.sleep(1.5)
    with cluster.proxy() as proxy:
        call = Call(proxy, "keepalive")
        try:
            call.exchange()
            assert proxy.remove("keepalive") == "removed"
        finally:
            call.close()
    for relay in cluster.relays.values():
        assert "pings" not in relay.log_text(), relay.tail()
        assert "lost dispatcher" not in relay.log_text(), relay.tail()
    assert "disconnected" not in cluster.dispatcher.log_text()
    assert sorted(entry["ip"] for entry in cluster.summary()) == sorted(RELAYS)


def test_a_taken_port_is_set_aside_and_exhaustion_answers_error(cluster):
    cluster.start_dispatcher()
    start, _ = media_port_range()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind((RELAY_A, start))          # someone else holds the first pair
    parties = [Party(f"p{n}") for n in range(3)]
    try:
        relay = cluster.start_relay(RELAY_A, port_range=f"{start}:{start + 6}")     # three pairs
        with cluster.proxy() as proxy:
            first = Call(proxy, "fits")
            try:
                assert {first.caller_facing_port, first.callee_facing_port} == {start + 2, start + 4}
                first.exchange()
                # Two pairs per stream: no room for another call.
                assert proxy.update("no-room", "request", parties[0].media()) == "error"
                relay.wait_for_log(r"set aside", timeout=1)
                assert proxy.remove("fits") == "removed"
            finally:
                first.close()
            # The freed pairs serve the next call.
            ip, ports = parse_address_reply(proxy.update("room-again", "request", parties[1].media()))
            assert ip == RELAY_A and ports[0] in (start + 2, start + 4)
            assert proxy.remove("room-again") == "removed"
        cluster.assert_alive()
    finally:
        squatter.close()
        for party in parties:
            party.close()
