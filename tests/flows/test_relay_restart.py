"""A relay restarted in the middle of a real call (issue 10, item 4).

sipp calls through Kamailio; both phones stream G.711 at 50 packets a
second, the kernel relays it. The relay is stopped (SIGTERM: it keeps its
calls) and started again: the callee hears the caller all along (the
longest silence it hears is under 100 ms, unless the caller itself paused
longer; and every packet the caller sent meanwhile arrives), the dispatcher
still has the call, and the BYE that comes later gets statistics that count
every packet each phone sent.
"""

import re
import time

import pytest

from tests.e2e.helpers import MEDIA_PORT, Capture
from tests.flows.helpers import assert_no_traceback, audio_running, packets, stream_of
from tests.support.pcap import parse_rtp
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.kernel, pytest.mark.timeout(90)]

MAX_SILENCE = 0.100


def longest_silence(times) -> float:
    times = sorted(times)
    return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def test_relay_restarted_mid_call(rig, kernel_tools):
    r = rig().start(kernel_forwarding="yes")
    relay, caller_ip, callee_ip = (r.topo.address(host) for host in ("relay1", "caller", "callee"))
    at_caller = Capture(r.topo, "caller", r.tmp_path / "caller.pcap")
    at_callee = Capture(r.topo, "callee", r.tmp_path / "callee.pcap")
    caller, callee = r.call("uac_paused.xml", "uas_paused.xml", caller_keys={"preferred_relay": relay})
    session = r.wait_session(audio_running, "the call's media both ways")
    call_id = session["call_id"]
    r.wait_kernel_entries()

    stopped_at = time.time()
    old = r.relays["relay1"]
    assert old.process.stop() == 0
    assert "stopping with 1 sessions kept for the next start" in old.process.log_text()
    new = r.start_relay("relay1", kernel_forwarding="yes")
    back_at = time.time()
    assert re.search(r"kernel entries of the restored calls: [12] adopted, 0 ended", new.process.log_text())

    # The dispatcher still has the call, and its media goes on.
    before = packets(stream_of(session, "audio"))
    r.wait_session(
        lambda s: s["call_id"] == call_id and audio_running(s, packets=min(before) + 25),
        "more media on the call after the restart",
    )
    summary = r.wait_kernel_entries()
    assert summary["session_count"] == 1 and summary["userspace_packets"] == 0, summary

    # Both phones fall silent (so that every packet they sent is known), then the caller hangs up.
    caller.step(call_id)
    callee.step(call_id)
    last = {}

    def quiet():
        now = packets(stream_of(r.session(call_id), "audio"))
        unchanged, last["packets"] = last.get("packets") == now, now
        return unchanged

    wait_for(quiet, timeout=10, interval=0.5, message="the phones to fall silent")
    caller.step(call_id)
    caller.wait_success(timeout=15)
    callee.wait_success(timeout=15)
    record = r.wait_accounted(call_id)
    r.wait_no_sessions()

    sent = {"caller": [], "callee": []}
    for packet in at_caller.stop():
        if packet.source.startswith(f"{caller_ip}:") and packet.destination.startswith(f"{relay}:"):
            sent["caller"].append(packet)
    heard = []
    for packet in at_callee.stop():
        if packet.source.startswith(f"{callee_ip}:") and packet.destination.startswith(f"{relay}:"):
            sent["callee"].append(packet)
        elif packet.source.startswith(f"{relay}:") and packet.destination == f"{callee_ip}:{MEDIA_PORT}":
            heard.append(packet)

    # The statistics of the whole call: every packet each phone sent, before, during and after the restart.
    [stream] = record["streams"]
    assert stream["status"] == "closed" and record["timed_out"] is False, record
    counted = (stream["caller_packets"], stream["callee_packets"], stream["caller_bytes"], stream["callee_bytes"])
    assert counted == (len(sent["caller"]), len(sent["callee"]),
                       sum(len(p.payload) for p in sent["caller"]), sum(len(p.payload) for p in sent["callee"]))

    # Around the restart the callee heard the caller all along.
    window = (stopped_at - 0.5, back_at + 0.5)
    sent_meanwhile = [p for p in sent["caller"] if window[0] <= p.time <= window[1]]
    heard_meanwhile = [p for p in heard if window[0] <= p.time <= window[1]]
    silence, pause = longest_silence(p.time for p in heard_meanwhile), longest_silence(p.time for p in sent_meanwhile)
    print(f"restart {back_at - stopped_at:.1f} s: longest silence heard by the callee {silence * 1000:.1f} ms "
          f"(caller's longest pause {pause * 1000:.1f} ms); caller sent {len(sent['caller'])}, callee "
          f"{len(sent['callee'])} packets; counted {counted[:2]}")
    assert silence < max(MAX_SILENCE, pause + 0.020), (silence, pause)
    sequence = {parse_rtp(p.payload).sequence for p in heard}
    lost = [p for p in sent_meanwhile if parse_rtp(p.payload).sequence not in sequence]
    assert lost == [], f"{len(lost)} of {len(sent_meanwhile)} packets sent during the restart never arrived"
    assert_no_traceback(r.dispatcher_log(), "the dispatcher")
    for process in (old.process, new.process):
        assert_no_traceback(process.log_text(), "relay1")
