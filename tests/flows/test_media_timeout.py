"""A call whose media dies is ended in the proxy.

Both phones stream for 2 s and then fall silent without hanging up (think of
two phones whose network went away). With short timeouts the relay notices,
reports the session `expired` to the dispatcher, the dispatcher asks Kamailio
over its jsonrpcs socket to end the dialog (`dlg.end_dlg`), and Kamailio
sends a BYE to both sides, which answer it: billing stops, no dialog is left.

Twice: with the kernel path (the call is carried by a conntrack entry; its
expiry, after nf_conntrack_udp_timeout_stream = 3 s in the relay's namespace
and the kernel's garbage collection, ends the stream: `conntrack timeout`)
and in user space (`stream_timeout = 3`: `no-traffic timeout`). Typically
10-20 s each; the kernel case can take over a minute when the kernel's
garbage collector is slow to reap the dead entry.
"""

import re

import pytest

from tests.e2e.helpers import kamailio_rpc, sip_header
from tests.flows.helpers import SHORT_UDP_TIMEOUTS, assert_no_traceback, audio_running
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def dead_call_is_ended(r, status: str, within: float, kernel: bool) -> dict:
    """The flow; the relay's summary at the end."""
    relay = r.topo.address("relay1")
    caller, callee = r.call("uac_silent.xml", "uas_silent.xml", timeout=within + 20)
    session = r.wait_session(audio_running, "the call's media both ways")
    call_id = session["call_id"]
    if kernel:  # while the media runs, the kernel carries it
        wait_for(lambda: r.relay_summary("relay1")["kernel_entries"] >= 1, timeout=2, message="a kernel entry")
    [dialog] = kamailio_rpc(r.kamailio_rundir, "dlg.list")
    assert dialog["call-id"] == call_id and dialog["state"] == 4, dialog  # confirmed

    # Both sides get the proxy's BYE and answer it: each sipp finishes its call successfully.
    caller.wait_success(timeout=within)
    callee.wait_success(timeout=10)
    for agent in (caller, callee):
        [bye] = agent.received_requests("BYE")
        assert sip_header(bye, "Call-ID") == call_id
        assert f"{r.topo.address('proxy')}" in sip_header(bye, "Via"), bye  # from Kamailio, not the other phone

    # The dispatcher learnt it from the relay and had the proxy end the dialog.
    log = r.dispatcher.process.log_text()
    assert f"session {call_id} expired on relay {relay}" in log, log
    ended = re.search(rf"session {re.escape(call_id)}: the proxy ended dialog (\d+:\d+)", log)
    assert ended is not None, log
    assert_no_traceback(log, "the dispatcher")

    # Its statistics say why, and nothing is left anywhere.
    record = r.wait_accounted(call_id)
    assert record["timed_out"] is True and record["dialog_id"] == ended.group(1), record
    [stream] = record["streams"]
    assert (stream["media_type"], stream["status"]) == ("audio", status), stream
    assert stream["caller_codec"] == stream["callee_codec"] == "G711a", stream
    assert min(stream["caller_packets"], stream["callee_packets"]) >= 50, stream  # about 100 each: 2 s of 20 ms
    r.wait_no_sessions()
    summary = r.relay_summary("relay1")
    assert summary["session_count"] == 0, summary
    wait_for(lambda: not kamailio_rpc(r.kamailio_rundir, "dlg.list"), timeout=10, message="Kamailio to drop the dialog")
    return summary


def test_dead_media_in_the_kernel(rig, kernel_tools):
    r = rig(sysctls={"relay1": SHORT_UDP_TIMEOUTS}).start(kernel_forwarding="yes")
    assert r.relay_summary("relay1")["forwarding"] == "kernel"
    # The relay learns that the entry died from its destroy event, which comes when the kernel's
    # conntrack garbage collector reaps it: here 1 to 40 s after its 3 s timeout, at worst 60 s
    # (GC_SCAN_INTERVAL_MAX). Nothing asks the relay for `sessions` meanwhile (a dump of its
    # entries would reap the expired one at once), so the wait allows for that.
    summary = dead_call_is_ended(r, "conntrack timeout", within=30, kernel=True)
    assert summary["kernel_entries"] == 0, summary


def test_dead_media_in_user_space(rig):
    r = rig().start(kernel_forwarding="no", stream_timeout=3)
    assert r.relay_summary("relay1")["forwarding"] != "kernel"
    dead_call_is_ended(r, "no-traffic timeout", within=30, kernel=False)
