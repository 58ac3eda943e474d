"""A relay restarted in the middle of a call relayed in user space (issue 10, item 4).

SIGTERM keeps the calls (keep_calls_on_restart = yes, the default): the
relay started again has the call, on the same ports, latched to the same
parties, with its counters; the dispatcher still routes the call's BYE to
it. (The kernel path, whose calls do not even miss a packet: tests/kernel.)
"""

import pytest

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call, media_port_range

pytestmark = pytest.mark.integration


def test_a_call_relayed_in_user_space_survives_a_relay_restart(cluster):
    cluster.start_dispatcher()
    port_range = "%d:%d" % media_port_range()       # the same again after the restart: the call's ports
    relay = cluster.start_relay(RELAY_A, port_range=port_range)
    with cluster.proxy() as proxy:
        call = Call(proxy, "user-space-restart")
        try:
            heard_before = call.exchange()
            before = cluster.session("user-space-restart")["streams"][0]
            assert relay.stop() == 0
            restarted = cluster.start_relay(RELAY_A, port_range=port_range)
            restarted.wait_for_log(r"restored 1 sessions saved", timeout=5)

            heard_after = call.exchange()       # the same ports, both ways
            assert {source for _, source in heard_after["callee"]} == {call.callee_facing}
            after = cluster.session("user-space-restart")["streams"][0]
            # the counters went on: they hold every packet a party heard, before and after the restart
            for party, sender in (("callee", "caller"), ("caller", "callee")):
                heard = {data for data, _ in heard_before[party] + heard_after[party]}
                assert after[f"{sender}_packets"] >= len(heard)
                assert after[f"{sender}_packets"] > before[f"{sender}_packets"]
            assert (after["caller_remote"], after["callee_remote"]) == (before["caller_remote"],
                                                                        before["callee_remote"])
            assert proxy.remove("user-space-restart") == "removed"
        finally:
            call.close()
    assert cluster.sessions() == []
    assert "lost" not in cluster.dispatcher.log_text()


def test_with_keep_calls_on_restart_no_a_stop_ends_the_calls(cluster):
    cluster.start_dispatcher()
    relay = cluster.start_relay(RELAY_A, keep_calls_on_restart="no")
    with cluster.proxy() as proxy:
        call = Call(proxy, "ended-by-stop")
        call.close()
        assert relay.stop() == 0
        cluster.start_relay(RELAY_A, keep_calls_on_restart="no")
        assert cluster.sessions() == []
        cluster.dispatcher.wait_for_log(r"session ended-by-stop lost: gone from relay", timeout=5)
