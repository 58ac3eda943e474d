"""A relay that goes away or stops answering: new calls go to the other one (SPEC §2, §3)."""

import signal
import time

import pytest

from tests.integration.conftest import RELAY_A, RELAY_B, RELAYS
from tests.integration.daemons import Call

pytestmark = pytest.mark.integration

PROXY_BUDGET = 0.5      # the proxy module's default wait for an answer (mediaproxy_timeout)


def summary_by_ip(cluster):
    return {entry["ip"]: entry for entry in cluster.summary()}


def test_new_calls_go_to_the_other_relay_when_one_is_stopped(two_relays):
    assert two_relays.relays[RELAY_A].stop() == 0      # SIGTERM: a clean exit
    calls = []
    with two_relays.proxy() as proxy:
        try:
            # No wait for the dispatcher to notice: it must cope either way.
            calls.append(Call(proxy, "after-stop-preferred", media_relay=RELAY_A))
            for n in range(5):
                calls.append(Call(proxy, f"after-stop-{n}"))
            assert {call.relay_ip for call in calls} == {RELAY_B}
            calls[0].exchange()
            calls[-1].exchange()
            assert list(summary_by_ip(two_relays)) == [RELAY_B]
            for call in calls:
                assert proxy.remove(call.call_id) == "removed"
        finally:
            for call in calls:
                call.close()
    two_relays.dispatcher.assert_running()
    two_relays.relays[RELAY_B].assert_running()


def test_a_relay_that_stops_answering_is_bypassed(cluster):
    cluster.start_dispatcher(relay_timeout=1)
    cluster.start_relays(RELAYS)
    stopped = cluster.relays[RELAY_A]
    calls = []
    stopped.send_signal(signal.SIGSTOP)
    try:
        with cluster.proxy() as proxy:
            # The first call is offered to the silent relay first (it is preferred):
            # after relay_timeout the other relay answers.
            started = time.monotonic()
            calls.append(Call(proxy, "silent-first", media_relay=RELAY_A, timeout=5))
            first = time.monotonic() - started
            assert calls[0].relay_ip == RELAY_B
            assert first < 3.0, f"the first call took {first:.2f} s"
            # Later calls do not wait for the silent relay, even when they prefer it.
            for n in range(6):
                started = time.monotonic()
                calls.append(Call(proxy, f"silent-later-{n}", media_relay=RELAY_A if n % 2 else None))
                elapsed = time.monotonic() - started
                assert calls[-1].relay_ip == RELAY_B
                assert elapsed < PROXY_BUDGET, f"call {n} took {elapsed:.2f} s"
            calls[-1].exchange()
            # The silent relay is reported as failing, the other as active.
            summary = summary_by_ip(cluster)
            assert summary[RELAY_A] == {"ip": RELAY_A, "status": "error", "draining": False}
            assert summary[RELAY_B]["status"] == "active"
            assert summary[RELAY_B]["session_count"] == len(calls)
            assert sorted(s["call_id"] for s in cluster.sessions()) == sorted(call.call_id for call in calls)
            assert cluster.dispatcher.log_text().count(f"relay {RELAY_A} did not answer within") == 1

            # Once it answers again it is active again.
            stopped.send_signal(signal.SIGCONT)
            cluster.wait_relays([RELAY_A])
            for call in calls:
                assert proxy.remove(call.call_id) == "removed"
    finally:
        stopped.send_signal(signal.SIGCONT)
        for call in calls:
            call.close()
    cluster.assert_alive()


def test_a_late_answer_leaves_no_orphan_session(cluster):
    cluster.start_dispatcher(relay_timeout=1)
    cluster.start_relays(RELAYS)
    silent = cluster.relays[RELAY_A]
    silent.send_signal(signal.SIGSTOP)
    try:
        with cluster.proxy() as proxy:
            call = Call(proxy, "late-answer", media_relay=RELAY_A, timeout=5)
            call.close()
            assert call.relay_ip == RELAY_B
            silent.send_signal(signal.SIGCONT)
            # `summary` goes after the stale `update` on the same link: once the
            # relay is listed active again, it has handled that update too.
            cluster.wait_relays([RELAY_A])
            assert [session["call_id"] for session in cluster.sessions()] == ["late-answer"]
            assert proxy.remove("late-answer") == "removed"
            assert cluster.sessions() == []
            assert {entry["ip"]: entry["session_count"] for entry in cluster.summary()} == {RELAY_A: 0, RELAY_B: 0}
    finally:
        silent.send_signal(signal.SIGCONT)
