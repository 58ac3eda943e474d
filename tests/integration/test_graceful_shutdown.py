"""SIGHUP on a relay: no new sessions, exit when the last one ends (SPEC §1)."""

import signal

import pytest

from tests.integration.conftest import RELAY_A, RELAY_B
from tests.integration.daemons import Call

pytestmark = pytest.mark.integration


def test_sighup_without_sessions_exits(two_relays):
    relay = two_relays.relays[RELAY_A]
    relay.send_signal(signal.SIGHUP)
    assert relay.wait(timeout=10) == 0
    relay.wait_for_log(r"graceful shutdown: no sessions", timeout=1)
    # The dispatcher goes on with the other relay.
    two_relays.wait_relays([RELAY_B])
    with two_relays.proxy() as proxy:
        call = Call(proxy, "after-hup")
        try:
            assert call.relay_ip == RELAY_B
            call.exchange()
            assert proxy.remove("after-hup") == "removed"
        finally:
            call.close()
    assert [entry["ip"] for entry in two_relays.summary()] == [RELAY_B]
    two_relays.dispatcher.assert_running()


def test_sighup_with_a_running_call_drains_then_exits(two_relays):
    halting = two_relays.relays[RELAY_A]
    calls = []
    with two_relays.proxy() as proxy:
        try:
            running = Call(proxy, "running", media_relay=RELAY_A)
            calls.append(running)
            assert running.relay_ip == RELAY_A
            running.exchange()
            before = two_relays.session("running")["streams"][0]["caller_packets"]

            halting.send_signal(signal.SIGHUP)
            halting.wait_for_log(r"graceful shutdown: refusing new sessions", timeout=10)
            summary = {entry["ip"]: entry for entry in two_relays.summary()}
            assert summary[RELAY_A]["status"] == "halting"
            assert summary[RELAY_A]["session_count"] == 1

            # New calls: the halting relay answers `halting` and the dispatcher
            # moves on (the first one prefers it, so it is asked first).
            for n in range(5):
                call = Call(proxy, f"new-{n}", media_relay=RELAY_A if n < 2 else None)
                calls.append(call)
                assert call.relay_ip == RELAY_B, n
            calls[-1].exchange()

            # The running call is still relayed, and still updated (a re-INVITE).
            running.exchange()
            after = two_relays.session("running")["streams"][0]["caller_packets"]
            assert after > before
            reinvite = proxy.update("running", "request", running.caller.media(), cseq=2)
            assert reinvite == "%s %d" % running.callee_facing
            halting.assert_running()

            # Its end is the relay's end.
            assert proxy.remove("running") == "removed"
            assert halting.wait(timeout=10) == 0
            halting.wait_for_log(r"the last session has ended", timeout=1)
            two_relays.wait_relays([RELAY_B])
            assert [entry["ip"] for entry in two_relays.summary()] == [RELAY_B]
            for call in calls[1:]:
                assert proxy.remove(call.call_id) == "removed"
        finally:
            for call in calls:
                call.close()
    two_relays.dispatcher.assert_running()
    two_relays.relays[RELAY_B].assert_running()
