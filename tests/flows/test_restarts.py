"""Daemons restarted or shut down in the middle of calls.

- The dispatcher is stopped (SIGTERM: it saves its session table) and
  started again (it restores it; the relay reconnects after
  reconnect_delay = 1 s) while a call runs. The call's media never stops,
  and the BYE that comes later is matched to the relay that holds the call:
  its statistics are recorded and the session is gone.
- Relay SIGHUP with two relays: relay1 keeps its running call and refuses
  new ones (`halting`); a new call that prefers relay1 is failed over to
  relay2; relay1 exits by itself once its last call is hung up.
- A BYE that comes while the call's relay is not back yet is carried out
  when the relay reconnects.
- Media that dies while the dispatcher is down: the call is ended in the
  proxy once a dispatcher is back.
"""

import re
import shutil
import signal
import time

import pytest

from tests.e2e.helpers import DISPATCHER_PORT, MEDIA_PORT, Capture, kamailio_rpc, rtp_sources
from tests.flows.helpers import (
    PORT_RANGES,
    assert_names_relay,
    assert_no_traceback,
    audio_running,
    packets,
    stream_of,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def test_dispatcher_restarted_mid_call(rig, forwarding):
    r = rig().start(kernel_forwarding=forwarding)
    relay, callee_ip = r.topo.address("relay1"), r.topo.address("callee")
    at_callee = Capture(r.topo, "callee", r.tmp_path / "callee.pcap")
    caller, callee = r.call("uac_stepped.xml", "uas_basic.xml", caller_keys={"preferred_relay": relay})
    session = r.wait_session(audio_running, "the call's media both ways")
    call_id = session["call_id"]

    stopped_at = time.time()
    r.restart_dispatcher()
    r.wait_relay("relay1")  # reconnected
    back_at = time.time()
    log = r.dispatcher.process.log_text()
    assert "restored 1 sessions on 1 relays" in log, log

    # The new dispatcher knows the call, and its media went on meanwhile.
    before = packets(stream_of(session, "audio"))
    session = r.wait_session(
        lambda s: s["call_id"] == call_id and audio_running(s, packets=min(before) + 25),
        "more media on the call after the restart",
        timeout=10,
    )
    if forwarding == "yes":
        r.wait_kernel_entries()  # still carried by the kernel

    caller.step(call_id)  # hang up
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    r.wait_no_sessions()
    summary = r.relay_summary("relay1")
    assert summary["session_count"] == 0, summary

    # The BYE reached the relay through the new dispatcher: the statistics of the whole call.
    record = r.wait_accounted(call_id)
    [stream] = record["streams"]
    assert stream["status"] == "closed" and min(packets(stream)) >= min(before) + 25, stream
    assert record["timed_out"] is False and record["dialog_id"], record
    dispatcher_log = r.dispatcher_log()
    assert_no_traceback(dispatcher_log, "the dispatchers")
    assert f"remove of session {call_id}, which is not known" not in dispatcher_log
    assert "not connected" not in r.dispatcher.process.log_text()

    # The callee got media from the relay all through the restart, not just before and after.
    offer_port = assert_names_relay(callee.received_sdps()[0], relay, PORT_RANGES["relay1"])
    during = [p for p in at_callee.stop() if stopped_at <= p.time <= back_at]
    relayed = rtp_sources(during, f"{callee_ip}:{MEDIA_PORT}")
    assert set(relayed) == {(f"{relay}:{offer_port}", 8)}, relayed
    gap = back_at - stopped_at  # 50 packets a second were sent meanwhile; a loaded machine may delay some
    assert relayed[(f"{relay}:{offer_port}", 8)] >= max(10, 0.25 * gap * 50), (relayed, gap)


def test_relay_sighup_mid_call(rig, forwarding):
    hosts = ("proxy", "relay1", "relay2", "caller", "callee")
    r = rig(hosts).start(relays=("relay1", "relay2"), kernel_forwarding=forwarding)
    relay1, relay2 = r.topo.address("relay1"), r.topo.address("relay2")
    first_caller, first_callee = r.call(
        "uac_stepped.xml", "uas_basic.xml", name="first", caller_keys={"preferred_relay": relay1}
    )
    first = r.wait_session(audio_running, "the first call's media both ways")
    assert stream_of(first, "audio")["caller_local"].startswith(f"{relay1}:"), first

    # SIGHUP: relay1 is halting, with its call still running.
    r.relays["relay1"].process.send_signal(signal.SIGHUP)
    assert r.wait_relay("relay1", "halting", timeout=10)["session_count"] == 1

    # A new call that prefers relay1 is relayed by relay2.
    second_caller, second_callee = r.call(
        "uac_stepped.xml",
        "uas_basic.xml",
        name="second",
        port=5062,
        media_port=6100,
        caller_keys={"preferred_relay": relay1},
    )
    second = r.wait_session(
        lambda s: s["call_id"] != first["call_id"] and audio_running(s), "the second call's media both ways"
    )
    assert stream_of(second, "audio")["caller_local"].startswith(f"{relay2}:"), second
    assert f"relay {relay1} is shutting down: no new sessions there" in r.dispatcher.process.log_text()
    for sdp in (second_callee.received_sdps()[0], second_caller.received_sdps()[0]):
        assert_names_relay(sdp, relay2, PORT_RANGES["relay2"])

    # The first call goes on on relay1 until its BYE.
    before = packets(stream_of(first, "audio"))
    r.wait_session(
        lambda s: s["call_id"] == first["call_id"] and audio_running(s, packets=min(before) + 25),
        "more media on the first call after the SIGHUP",
    )
    first_caller.step(first["call_id"])  # hang up
    first_caller.wait_success(timeout=15)
    first_callee.wait_success(timeout=15)
    assert r.wait_accounted(first["call_id"])["streams"][0]["status"] == "closed"

    # relay1 exits by itself; relay2 and its call are not disturbed.
    assert r.relays["relay1"].process.wait(timeout=15) == 0, r.relays["relay1"].process.tail()
    assert "the last session has ended: stopping" in r.relays["relay1"].process.log_text()
    wait_for(lambda: [s["ip"] for s in r.summary()] == [relay2], timeout=10, message="only relay2 in the summary")
    before = packets(stream_of(r.session(second["call_id"]), "audio"))
    r.wait_session(
        lambda s: s["call_id"] == second["call_id"] and audio_running(s, packets=min(before) + 10),
        "media on the second call after relay1 left",
    )

    second_caller.step(second["call_id"])
    second_caller.wait_success(timeout=15)
    second_callee.wait_success(timeout=15)
    r.wait_no_sessions()
    assert r.relay_summary("relay2")["session_count"] == 0
    assert r.wait_accounted(second["call_id"])["streams"][0]["status"] == "closed"
    assert_no_traceback(r.dispatcher.process.log_text(), "the dispatcher")
    for host in ("relay1", "relay2"):
        assert_no_traceback(r.relays[host].process.log_text(), host)


def test_bye_while_the_relay_is_away(rig):
    """The dispatcher restarts while relay1 cannot reach it (its connections to port 25060 are
    rejected in its namespace) and the call is hung up meanwhile: the dispatcher takes the BYE,
    keeps the remove for the relay, and carries it out when the relay is back."""
    if shutil.which("iptables-legacy") is None:
        pytest.skip("missing tool: iptables-legacy")
    r = rig().start(kernel_forwarding="no")
    relay = r.topo.address("relay1")
    caller, callee = r.call("uac_stepped.xml", "uas_basic.xml", caller_keys={"preferred_relay": relay})
    call_id = r.wait_session(audio_running, "the call's media both ways")["call_id"]

    rule = ["OUTPUT", "-p", "tcp", "--dport", str(DISPATCHER_PORT), "-j", "REJECT", "--reject-with", "tcp-reset"]
    r.stop_dispatcher()
    r.topo.run("relay1", ["iptables-legacy", "-I", *rule])
    r.start_dispatcher()
    assert "restored 1 sessions on 1 relays" in r.dispatcher.process.log_text()
    assert r.summary() == []  # relay1 is away

    caller.step(call_id)  # hang up: the BYE goes through, the remove waits for the relay
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    r.dispatcher.process.wait_for_log(rf"session {re.escape(call_id)}: its relay {re.escape(relay)} is not connected")
    assert r.accounted(call_id) == []

    r.topo.run("relay1", ["iptables-legacy", "-D", *rule])
    r.wait_relay("relay1")
    record = r.wait_accounted(call_id)  # the relay's statistics of the whole call
    [stream] = record["streams"]
    assert stream["status"] == "closed" and min(packets(stream)) >= 10, stream
    r.wait_no_sessions()
    assert r.relay_summary("relay1")["session_count"] == 0
    r.relays["relay1"].process.wait_for_log(rf"session {re.escape(call_id)} removed")
    assert_no_traceback(r.dispatcher_log(), "the dispatchers")


def test_media_dies_while_the_dispatcher_is_away(rig):
    """The dispatcher is stopped mid-call and the call's media dies meanwhile: the relay keeps
    the `expired` report for it, and once a new dispatcher is up (with the session table the old
    one saved) the call is ended in the proxy: both sides get a BYE."""
    r = rig().start(kernel_forwarding="no", stream_timeout=3)
    relay = r.topo.address("relay1")
    caller, callee = r.call("uac_silent.xml", "uas_silent.xml")
    call_id = r.wait_session(audio_running, "the call's media both ways")["call_id"]
    [dialog] = kamailio_rpc(r.kamailio_rundir, "dlg.list")
    dialog_id = f"{dialog['h_entry']}:{dialog['h_id']}"

    r.stop_dispatcher()
    r.relays["relay1"].process.wait_for_log(
        rf"session {re.escape(call_id)} expired while its dispatcher \S+ is not connected", timeout=20
    )
    assert caller.process.running and callee.process.running  # nobody could end the call yet

    r.start_dispatcher()
    caller.wait_success(timeout=20)
    callee.wait_success(timeout=10)
    assert len(caller.received_requests("BYE")) == len(callee.received_requests("BYE")) == 1

    log = r.dispatcher.process.log_text()
    assert f"session {call_id} expired on relay {relay}" in log, log
    assert f"session {call_id}: the proxy ended dialog {dialog_id}" in log, log
    record = r.wait_accounted(call_id)
    assert record["timed_out"] is True and record["dialog_id"] == dialog_id, record
    assert [s["status"] for s in record["streams"]] == ["no-traffic timeout"], record
    r.wait_no_sessions()
    wait_for(lambda: not kamailio_rpc(r.kamailio_rundir, "dlg.list"), timeout=10, message="Kamailio to drop the dialog")
    assert_no_traceback(r.dispatcher_log(), "the dispatchers")
