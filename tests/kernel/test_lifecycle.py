"""The life of the relay's kernel entries around the calls (issue 4, SPEC §4, §8).

- A stream whose entry the kernel lets die (no traffic for its UDP stream
  timeout, shortened here in the relay's namespace) ends as `conntrack
  timeout` and the dispatcher is told `expired`; a held stream does not end
  with its entry, and a sub-stream whose entry died goes back to the kernel
  when its media comes back.
- A relay killed with SIGKILL leaves its entries (and, killed in the middle
  of a hand-over, its inhibitor rules); the next start removes them. A relay
  stopped with SIGTERM and keep_calls_on_restart = no removes them itself
  (with yes, the default, it leaves them to its next start: test_restart).
- Without what the kernel path needs (here net.ipv4.ip_forward = 0) the relay
  says so in one line and relays in user space, or, with
  kernel_forwarding = yes, refuses to start.
"""

import re
import signal
import time

import pytest

from tests.kernel.helpers import (
    kernel_call,
    wait_kernel_entries,
    CALLEE_PORT,
    CALLER_PORT,
    MARK,
    RELAY_HOST,
    RTP,
    SHORT_UDP_TIMEOUTS,
    Call,
    pump,
    sent_counters,
    stream_counters,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]

# An entry dies when its timeout passes without traffic; the kernel removes it (and tells the relay)
# when its garbage collection passes by, from some seconds to a minute later, or when a table dump
# meets it. The relay reads its table a few times per UDP timeout (every second with the 3 s used
# here), so a dead call is noticed within seconds without the tests touching the table.
EXPIRY_WAIT = 20


def test_a_stream_without_traffic_ends_as_conntrack_timeout(make_rig):
    rig = make_rig(sysctls={RELAY_HOST: SHORT_UDP_TIMEOUTS})
    timeout = rig.topo.run(RELAY_HOST, ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout_stream"]).stdout
    assert timeout.strip() == "3"
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "silent-call")

    # The parties stop sending: the entries die, the stream and the session end.
    expired = re.compile(rf"session silent-call expired on relay {re.escape(rig.relay_ip)}")

    def reported_expired():
        rig.dispatcher.process.assert_running()
        return expired.search(rig.dispatcher.process.log_text())

    wait_for(reported_expired, timeout=EXPIRY_WAIT, interval=0.5, message="the dispatcher to log `expired`")
    rig.relay.process.wait_for_log(r"session silent-call: audio stream ended: conntrack timeout", timeout=5)
    record = rig.wait_accounted("silent-call")
    assert record["timed_out"] is True
    [stream] = record["streams"]
    assert stream["status"] == "conntrack timeout"
    assert stream["timeout_wait"] == 3
    assert stream_counters(stream) == sent_counters(caller, callee)

    assert rig.sessions() == []
    assert rig.entries() == []
    assert rig.inhibitor_rules() == []
    summary = rig.summary()
    assert (summary["session_count"], summary["kernel_entries"]) == (0, 0)


def test_a_call_on_hold_outlives_its_entry(make_rig):
    rig = make_rig(sysctls={RELAY_HOST: SHORT_UDP_TIMEOUTS})
    rig.start_relay()
    caller = rig.party("caller", CALLER_PORT, payload_type=0)
    callee = rig.party("callee", CALLEE_PORT, payload_type=0)
    call = Call(rig.proxy(), "held-call", caller, callee)
    pump(caller, callee, call, packets=100, rtcp_every=None)
    wait_kernel_entries(rig, 1)

    # Both sides put the call on hold and stop sending: the kernel's entry dies, the call does not.
    call.direction = "inactive"
    call.negotiate()
    assert rig.session("held-call")["streams"][0]["status"] == "on hold"
    wait_for(lambda: rig.entries() == [], timeout=EXPIRY_WAIT, interval=0.5, message="the kernel to drop the entry")
    wait_for(lambda: rig.summary()["kernel_entries"] == 0, timeout=5, interval=0.1, message="the relay to notice")
    assert "expired" not in rig.dispatcher.process.log_text()
    [stream] = rig.session("held-call")["streams"]
    assert stream["status"] == "on hold"
    assert stream_counters(stream) == sent_counters(caller, callee)

    # Taken off hold, the call is relayed again (by the kernel once its media is back: see the next test).
    call.direction = "sendrecv"
    call.negotiate()
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)
    pump(caller, callee, call, packets=50, rtcp_every=None)
    assert callee.received_count(RTP) - heard_by_callee >= 45
    assert caller.received_count(RTP) - heard_by_caller >= 45
    [stream] = rig.session("held-call")["streams"]
    assert stream["status"] == "active"
    assert stream_counters(stream) == sent_counters(caller, callee)
    assert call.remove() == "removed"


def test_rtcp_that_pauses_longer_than_the_timeout_returns_to_the_kernel(make_rig):
    rig = make_rig(sysctls={RELAY_HOST: SHORT_UDP_TIMEOUTS})
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "quiet-rtcp", packets=50)

    # RTP goes on; RTCP stops for longer than the UDP timeout (3 s): its entry dies, the stream lives.
    pump(caller, callee, call, packets=400, rate=100, rtcp_every=None)
    assert rig.session("quiet-rtcp")["streams"][0]["status"] == "active"

    # RTCP comes back: both its parties are latched, so the kernel should carry it again.
    def rtcp_in_the_kernel():
        caller.send_rtcp(call.caller_facing)
        callee.send_rtcp(call.callee_facing)
        return rig.summary()["kernel_entries"] == 2

    wait_for(rtcp_in_the_kernel, timeout=3, interval=0.1, message="RTCP to be handed to the kernel again")
    assert call.remove() == "removed"


def add_stale_inhibitor(rig) -> str:
    """A NOTRACK rule with the relay's comment, as a relay killed in the middle of a hand-over leaves it."""
    rule = [
        "-p", "udp", "-s", rig.topo.address("caller"), "-d", rig.relay_ip, "-m", "udp", "--sport", "9", "--dport", "9",
        "-m", "comment", "--comment", f"mediaproxy {MARK:#x}", "-j", "CT", "--notrack",
    ]  # fmt: skip
    rig.topo.run(RELAY_HOST, ["iptables-legacy", "-t", "raw", "-I", "PREROUTING", *rule])
    [listed] = rig.inhibitor_rules()
    return listed


def test_a_relay_killed_mid_call_leaves_nothing_after_its_restart(make_rig):
    rig = make_rig()
    rig.start_relay()
    caller, callee, call = kernel_call(rig, "orphaned-call")
    add_stale_inhibitor(rig)

    rig.relay.process.stop(signum=signal.SIGKILL)
    assert rig.relay.process.returncode != 0
    # The entries outlive the process (the kernel even goes on relaying the call).
    assert len(rig.entries()) == 2
    heard = callee.received_count(RTP)
    pump(caller, callee, call, packets=20, rtcp_every=None)
    assert callee.received_count(RTP) - heard == 20

    # Started again with the same configuration, it removes what the killed run left.
    relay = rig.start_relay()
    match = relay.process.wait_for_log(
        r"removed what an earlier run left: (\d+) conntrack entries, (\d+) iptables rules", timeout=5
    )
    assert int(match[1]) >= 2 and int(match[2]) == 1, match[0]
    assert rig.entries() == []
    assert rig.inhibitor_rules() == []
    assert rig.summary()["forwarding"] == "kernel"
    assert all(session["call_id"] != "orphaned-call" for session in rig.sessions())

    # A new call is relayed by the kernel again.
    caller, callee, call = kernel_call(rig, "next-call", payload_type=8, port_offset=10)
    assert {entry.orig for entry in rig.entries()} == {orig for orig, _ in call.expected_entries().values()}
    before = rig.summary()["userspace_packets"]
    heard = callee.received_count(RTP)
    pump(caller, callee, call, packets=50)
    assert rig.summary()["userspace_packets"] == before
    assert callee.received_count(RTP) - heard == 50
    assert stream_counters(rig.session("next-call")["streams"][0]) == sent_counters(caller, callee)
    assert call.remove() == "removed"
    assert rig.entries() == []


def test_a_relay_stopped_mid_call_removes_its_entries(make_rig):
    rig = make_rig()
    rig.start_relay({"keep_calls_on_restart": "no"})      # (the default keeps them: see test_restart)
    caller, callee, call = kernel_call(rig, "interrupted-call")

    assert rig.relay.process.stop() == 0  # SIGTERM
    assert "media-relay stopped" in rig.relay.process.log_text()
    assert rig.entries() == []
    assert rig.inhibitor_rules() == []
    # Nothing relays the call any more, not even the kernel.
    heard = callee.received_count()
    for _ in range(5):
        caller.send_rtp(call.caller_facing)
    time.sleep(0.3)  # a negative check: give a stray packet time to arrive
    callee.drain()
    assert callee.received_count() == heard


def test_without_ip_forward_media_is_relayed_in_user_space_or_the_relay_refuses(make_rig):
    rig = make_rig(sysctls={RELAY_HOST: {"net.ipv4.ip_forward": "0"}})
    relay = rig.start_relay({"kernel_forwarding": "auto"})
    relay.process.wait_for_log(r"kernel forwarding unavailable, media is relayed in user space: ", timeout=5)
    lines = [line for line in relay.process.log_text().splitlines() if "kernel forwarding unavailable" in line]
    assert len(lines) == 1 and "ip_forward" in lines[0], lines
    summary = rig.summary()
    assert summary["forwarding"] == "userspace"

    # A call is still relayed, by the relay process, and counted.
    caller = rig.party("caller", CALLER_PORT, payload_type=0)
    callee = rig.party("callee", CALLEE_PORT, payload_type=0)
    call = Call(rig.proxy(), "userspace-call", caller, callee)
    pump(caller, callee, call, packets=100)
    assert callee.sources(RTP) == {call.callee_facing}
    assert caller.sources(RTP) == {call.caller_facing}
    assert callee.received_count(RTP) >= 90 and caller.received_count(RTP) >= 90
    forwarded = rig.summary()["userspace_packets"] - summary["userspace_packets"]
    assert forwarded >= caller.received_count() + callee.received_count()
    assert stream_counters(rig.session("userspace-call")["streams"][0]) == sent_counters(caller, callee)
    assert rig.entries() == []
    assert call.remove() == "removed"

    # With kernel_forwarding = yes the same relay refuses to start, and says why.
    relay.process.stop()
    refusing = rig.start_relay({"kernel_forwarding": "yes"}, wait=False)
    assert refusing.process.wait(timeout=15) != 0
    log = refusing.process.log_text()
    assert re.search(r"cannot start: .*kernel_forwarding = yes.*ip_forward", log), log


def test_without_its_capabilities_the_relay_says_which_and_relays_in_user_space_or_refuses(make_rig):
    rig = make_rig()
    # root, but without CAP_NET_ADMIN and CAP_NET_RAW (as under a unit that forgot them)
    unprivileged = ("setpriv", "--bounding-set", "-net_admin,-net_raw", "--")
    relay = rig.start_relay({"kernel_forwarding": "auto"}, wrapper=unprivileged)
    line = relay.process.wait_for_log(r"kernel forwarding unavailable, media is relayed in user space: .*", timeout=5)
    assert "the kernel path needs CAP_NET_ADMIN and CAP_NET_RAW" in line.group(0), line.group(0)
    assert rig.summary()["forwarding"] == "userspace"
    relay.process.stop()

    refusing = rig.start_relay({"kernel_forwarding": "yes"}, wait=False, wrapper=unprivileged)
    assert refusing.process.wait(timeout=15) != 0
    log = refusing.process.log_text()
    assert re.search(r"cannot start: .*kernel_forwarding = yes.*CAP_NET_ADMIN and CAP_NET_RAW", log), log
