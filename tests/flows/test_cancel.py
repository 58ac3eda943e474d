"""CANCEL before answer.

The callee rings (180) and never answers; the caller cancels. What a user
sees: while it rang the call had a session on the relay (the offer the callee
got names the relay), and once it is cancelled nothing is left of it: no
session on the dispatcher or the relay, no ports held, nothing accounted
(the call never started).
"""

import pytest

from tests.flows.helpers import PORT_RANGES, assert_names_relay, assert_no_traceback

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_cancel_before_answer(rig):
    r = rig().start(kernel_forwarding="no")
    relay = r.topo.address("relay1")
    caller, callee = r.call("uac_cancel.xml", "uas_ringing.xml")

    # Ringing: the offer went through the relay, and the session is there, not started.
    caller.wait_message("received", "SIP/2.0 180")
    ringing = r.wait_session(lambda session: True, "the ringing call's session")
    assert ringing["start_time"] is None, ringing
    assert [stream["media_type"] for stream in ringing["streams"]] == ["audio"], ringing
    summary = r.relay_summary("relay1")
    assert summary["session_count"] == 1, summary

    caller.step(ringing["call_id"])  # CANCEL
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    assert caller.received()[-1].startswith("SIP/2.0 487"), caller.received()[-1]

    [offer] = callee.received_sdps()
    assert_names_relay(offer, relay, PORT_RANGES["relay1"])

    # Nothing left behind, anywhere.
    r.wait_no_sessions()
    summary = r.relay_summary("relay1")
    assert summary["session_count"] == 0 and summary["stream_count"] == {}, summary
    assert r.accounted(ringing["call_id"]) == []
    dispatcher_log = r.dispatcher_log()
    assert_no_traceback(dispatcher_log, "the dispatcher")
    assert f"remove of session {ringing['call_id']}, which is not known" not in dispatcher_log
    assert_no_traceback(r.relays["relay1"].process.log_text(), "the relay")
