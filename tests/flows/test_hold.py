"""Hold and un-hold by re-INVITE.

The caller puts the call on hold (re-INVITE with a=sendonly; the callee
answers a=recvonly and both stop sending), then takes it off hold (a=sendrecv)
and both stream again, then hangs up. What a user sees: every offer and
answer each side gets names the relay, on the same ports all along; the
dispatcher shows the stream `on hold` while held and `active` after; media
flows both ways again after the un-hold; the session is gone after the BYE
and its statistics count the media of the whole call.

And a call left on hold: the hold timer, not the no-traffic one, ends it.
Both with the relay in user space and with its kernel path.
"""

import re
import time

import pytest

from tests.e2e.helpers import MEDIA_PORT, Capture, rtp_sources
from tests.flows.helpers import PORT_RANGES, SHORT_UDP_TIMEOUTS, assert_names_relay, audio_running, packets

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def test_hold_and_unhold(rig, forwarding):
    r = rig().start(kernel_forwarding=forwarding)
    relay = r.topo.address("relay1")
    caller_ip, callee_ip = r.topo.address("caller"), r.topo.address("callee")
    at_caller = Capture(r.topo, "caller", r.tmp_path / "caller.pcap")
    at_callee = Capture(r.topo, "callee", r.tmp_path / "callee.pcap")
    caller, callee = r.call("uac_hold.xml", "uas_hold.xml")

    session = r.wait_session(audio_running, "the call's media both ways")
    call_id = session["call_id"]
    if forwarding == "yes":
        r.wait_kernel_entries()  # the call is carried by the kernel

    # Hold: the stream is reported on hold (not ended, not timed out).
    caller.step(call_id)
    caller.wait_message("sent", "ACK", cseq="2 ACK")  # the hold offer answered
    held = r.wait_session(
        lambda s: s["call_id"] == call_id and s["streams"][0]["status"] == "on hold", "the stream to be on hold"
    )
    assert len(held["streams"]) == 1, held
    held_caller, held_callee = packets(held["streams"][0])

    # Un-hold: active again, and media flows both ways again.
    resumed_at = time.time()
    caller.step(call_id)
    caller.wait_message("sent", "ACK", cseq="3 ACK")  # the un-hold offer answered

    def flowing_again(session):
        if session["call_id"] != call_id or session["streams"][0]["status"] != "active":
            return False
        now_caller, now_callee = packets(session["streams"][0])
        return now_caller >= held_caller + 25 and now_callee >= held_callee + 25

    resumed = r.wait_session(flowing_again, "media both ways after the un-hold")
    assert len(resumed["streams"]) == 1, resumed  # the same stream all along
    assert resumed["streams"][0]["caller_local"] == session["streams"][0]["caller_local"]

    caller.step(call_id)  # hang up
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    r.wait_no_sessions()
    summary = r.relay_summary("relay1")
    assert summary["session_count"] == 0 and summary.get("kernel_entries", 0) == 0, summary

    # Each offer the callee got and each answer the caller got named the relay, on the same ports.
    offers, answers = callee.received_sdps(), caller.received_sdps()
    assert [sdp.audio().direction for sdp in offers] == ["sendrecv", "sendonly", "sendrecv"]
    assert [sdp.audio().direction for sdp in answers] == ["sendrecv", "recvonly", "sendrecv"]
    offer_ports = {assert_names_relay(sdp, relay, PORT_RANGES["relay1"]) for sdp in offers}
    answer_ports = {assert_names_relay(sdp, relay, PORT_RANGES["relay1"]) for sdp in answers}
    assert len(offer_ports) == len(answer_ports) == 1, (offer_ports, answer_ports)
    [offer_port], [answer_port] = offer_ports, answer_ports

    # Each side got media from the relay after the un-hold, as before the hold.
    to_callee = rtp_sources([p for p in at_callee.stop() if p.time > resumed_at], f"{callee_ip}:{MEDIA_PORT}")
    to_caller = rtp_sources([p for p in at_caller.stop() if p.time > resumed_at], f"{caller_ip}:{MEDIA_PORT}")
    assert set(to_callee) == {(f"{relay}:{offer_port}", 8)}, to_callee
    assert set(to_caller) == {(f"{relay}:{answer_port}", 8)}, to_caller
    assert to_callee[(f"{relay}:{offer_port}", 8)] >= 20
    assert to_caller[(f"{relay}:{answer_port}", 8)] >= 20

    # The statistics at the end: one audio stream, closed by the BYE, with all its media.
    record = r.wait_accounted(call_id)
    [stream] = record["streams"]
    assert (stream["media_type"], stream["status"]) == ("audio", "closed"), stream
    assert (stream["caller_codec"], stream["callee_codec"]) == ("G711a", "G711a"), stream
    assert stream["caller_packets"] >= held_caller + 25 and stream["callee_packets"] >= held_callee + 25, stream
    assert record["timed_out"] is False


def test_left_on_hold(rig, forwarding):
    """A call put on hold and never taken off: the held stream outlives stream_timeout (2 s),
    expires after on_hold_timeout (10 s, counted from the hold, or in the kernel case from the
    death of its conntrack entry), and the dispatcher has the proxy end the call."""
    sysctls = {"relay1": SHORT_UDP_TIMEOUTS} if forwarding == "yes" else None
    r = rig(sysctls=sysctls).start(kernel_forwarding=forwarding, stream_timeout=2, on_hold_timeout=10)
    caller, callee = r.call("uac_hold_forever.xml", "uas_held.xml")
    call_id = r.wait_session(audio_running, "the call's media both ways")["call_id"]
    if forwarding == "yes":
        r.wait_kernel_entries()  # the call is carried by the kernel, until its entry dies on hold

    caller.step(call_id)  # hold, for good
    caller.wait_message("sent", "ACK", cseq="2 ACK")
    held_at = time.time()
    r.wait_session(lambda s: s["call_id"] == call_id and s["streams"][0]["status"] == "on hold", "the call on hold")

    # Silent for twice stream_timeout and more: still there, on hold.
    time.sleep(max(held_at + 4.5 - time.time(), 0))
    assert [s["status"] for s in r.session(call_id)["streams"]] == ["on hold"]

    # Then the hold timer ends it, and the proxy hangs up both sides. (In the kernel case the timer
    # starts when the relay learns that the entry died; the `sessions` query above has the relay dump
    # its entries, which makes the kernel reap the expired one then, if its GC has not yet.)
    caller.wait_success(timeout=75)
    callee.wait_success(timeout=10)
    assert len(caller.received_requests("BYE")) == len(callee.received_requests("BYE")) == 1
    r.wait_no_sessions()
    record = r.wait_accounted(call_id)
    [stream] = record["streams"]
    assert (stream["status"], stream["timeout_wait"]) == ("on hold timeout", 10), stream
    assert record["timed_out"] is True, record
    expired_at = record["start_time"] + stream["end_time"]
    assert expired_at - held_at >= 10 - 1, (held_at, expired_at)  # the 1 s of the relay's timer checks
    if forwarding == "no":
        assert expired_at - held_at <= 10 + 5, (held_at, expired_at)
    log = r.dispatcher.process.log_text()
    assert re.search(rf"session {re.escape(call_id)}: the proxy ended dialog \d+:\d+", log), log
