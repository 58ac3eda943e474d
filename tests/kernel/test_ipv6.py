"""IPv6 calls through the relay (issue 10, item 5), with the real daemons over real TLS.

The namespaces of the kernel rig (tests/kernel/helpers.py) with IPv6 on:
proxy 2001:db8:18::2, relay1 2001:db8:18::5, caller ::10, callee ::20 (and
their IPv4 addresses). The relay has both addresses (`relay_ip = 198.18.0.5,
2001:db8:18::5`) and talks to the dispatcher, which listens on [::], over
IPv6. Phones send IPv6 SDP; the relay answers with its IPv6 address, relays in
user space until both parties are latched, then by IPv6 conntrack NAT entries
with its mark.
"""

import re
import shutil

import pytest

from tests.kernel.conftest import TOOLS, rigs_made
from tests.kernel.helpers import (
    CALLEE_PORT,
    CALLER_PORT,
    MARK,
    RTCP,
    RTP,
    Call,
    build_rig,
    conntrack_entries,
    ipset_members,
    pump,
    raw_rules,
    sent_counters,
    stream_counters,
    wait_kernel_entries,
)
from tests.integration.daemons import parse_address_reply
from tests.support.netns import ipv6_sysctls, require_root

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]

HOSTS = ("proxy", "relay1", "caller", "callee")
RELAY6 = "2001:db8:18::5"
INHIBITOR_SET6 = "mediaproxy6-%x" % MARK
# 2001:db8::/32 is documentation space, not global: without this the relay would not send to an
# SDP address before its party is latched.
ROUTABLE = "198.18.0.0/15, 2001:db8::/32"


@pytest.fixture
def make_rig6(make_topology, processes, tmp_path):    # (fixtures of tests/kernel/conftest.py)
    """Factory ``make_rig6(relay_sysctls=None) -> Rig``: the kernel rig's namespaces with IPv6 on
    (relay1 forwarding IPv6 unless ``relay_sysctls`` says otherwise), the recording dispatcher
    listening for relays on [::]:25060."""
    require_root()
    missing = [tool for tool in (*TOOLS, "ip6tables-legacy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    with rigs_made(processes) as made:
        def factory(relay_sysctls=None):
            sysctls = ipv6_sysctls(HOSTS, {"relay1": {"net.ipv6.conf.all.forwarding": "1", **(relay_sysctls or {})}})
            topo = make_topology(HOSTS, sysctls)
            topo.add_ipv6()
            rig, workdir = build_rig(topo, tmp_path, dispatcher_extra={"Dispatcher": {"listen": "[::]:25060"}},
                                     san_ips=(topo.address6("proxy"), RELAY6))
            made.append((rig, workdir))
            return rig

        yield factory


def start_relay6(rig, options=None):
    """relay1 (with both addresses unless ``options`` says otherwise), linked to the dispatcher
    over IPv6: the dispatcher knows it by its IPv6 address."""
    rig.link_ip = RELAY6
    relay = rig.start_relay({
        "relay_ip": f"{rig.relay_ip}, {RELAY6}",
        "dispatchers": f"[{rig.topo.address6('proxy')}]:25060",
        "routable_private_ranges": ROUTABLE,
        **(options or {}),
    }, wait=False)
    rig.wait_relay_listed()
    return relay


def ipv6_parties(rig, payload_type=0):
    caller = rig.party("caller", CALLER_PORT, payload_type, ip=rig.topo.address6("caller"))
    callee = rig.party("callee", CALLEE_PORT, payload_type, ip=rig.topo.address6("callee"))
    return caller, callee


def test_an_ipv6_call_is_relayed_by_ipv6_conntrack_entries_and_counted_exactly(make_rig6):
    rig = make_rig6()
    relay = start_relay6(rig, {"kernel_forwarding": "yes"})
    # the dispatcher knows the relay by the address of its IPv6 link
    relay.process.wait_for_log(r"connected to dispatcher 2001:db8:18::2", timeout=5)
    assert re.search(r"relay 2001:db8:18::5 connected", rig.dispatcher.process.log_text())
    caller, callee = ipv6_parties(rig)
    call = Call(rig.proxy(), "ipv6-call", caller, callee)
    assert call.relay_ip == RELAY6            # the reply's address is of the SDP's family

    # user space until both are latched, then the kernel: IPv6 entries with the relay's mark
    pump(caller, callee, call, packets=100)
    wait_kernel_entries(rig, 2)
    entries = {entry.orig: entry for entry in conntrack_entries(rig.topo, family="ipv6")}
    expected = call.expected_entries()
    assert set(entries) == {orig for orig, _ in expected.values()}, [e.line for e in entries.values()]
    for orig, reply in expected.values():
        assert entries[orig].reply == reply and entries[orig].mark == MARK, entries[orig].line
    assert conntrack_entries(rig.topo) == []            # nothing of it in the IPv4 table

    # carried by the kernel: the relay process forwards nothing more, every packet arrives
    before = rig.summary()
    heard_by_callee, heard_by_caller = callee.received_count(RTP), caller.received_count(RTP)
    pump(caller, callee, call, packets=150)
    after = rig.summary()
    assert after["userspace_packets"] == before["userspace_packets"], (before, after)
    assert after["parked_ports"] == 4
    assert callee.received_count(RTP) - heard_by_callee == 150
    assert caller.received_count(RTP) - heard_by_caller == 150
    assert caller.sources(RTP) | caller.sources(RTCP) <= {(RELAY6, call.caller_facing_port + c) for c in (RTP, RTCP)}
    assert callee.sources(RTP) | callee.sources(RTCP) <= {(RELAY6, call.callee_facing_port + c) for c in (RTP, RTCP)}
    [entry] = [e for e in conntrack_entries(rig.topo, family="ipv6") if e.orig == expected[RTP][0]]
    assert entry.orig_packets >= 150 and entry.reply_packets >= 150, entry.line

    # the final statistics count every packet and payload byte each party sent
    assert call.remove() == "removed"
    record = rig.wait_accounted("ipv6-call")
    [stream] = record["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee), stream
    assert stream["caller_local"] == f"{RELAY6}:{call.caller_facing_port}"
    # nothing left: entries, inhibitor set members, single-flow rules (the set's standing rule stays)
    assert conntrack_entries(rig.topo, family="ipv6") == []
    assert ipset_members(rig.topo, INHIBITOR_SET6) == []
    rules6 = [rule for rule in raw_rules(rig.topo, command="ip6tables-legacy") if "mediaproxy" in rule]
    assert len(rules6) == 1 and "--match-set " + INHIBITOR_SET6 in rules6[0], rules6
    assert rig.summary()["kernel_entries"] == 0 and rig.summary()["parked_ports"] == 0


def test_without_ipv6_forwarding_ipv6_calls_are_relayed_in_user_space_and_families_never_mix(make_rig6):
    rig = make_rig6({"net.ipv6.conf.all.forwarding": "0"})
    relay = start_relay6(rig, {"kernel_forwarding": "auto"})
    relay.process.wait_for_log(r"kernel forwarding unavailable for IPv6, its media is relayed in user space: "
                               r"net\.ipv6\.conf\.all\.forwarding is 0", timeout=5)
    summary = rig.summary()
    assert (summary["forwarding"], summary["kernel_ip_versions"], summary["userspace_ip_versions"]) == (
        "kernel", [4], [6])
    caller, callee = ipv6_parties(rig, payload_type=8)
    call = Call(rig.proxy(), "ipv6-userspace", caller, callee)
    assert call.relay_ip == RELAY6
    pump(caller, callee, call, packets=100)
    assert (caller.received_count(RTP), callee.received_count(RTP)) == (100, 100)
    assert (caller.received_count(RTCP), callee.received_count(RTCP)) == (10, 10)
    summary = rig.summary()
    assert summary["kernel_entries"] == 0 and summary["userspace_packets"] == 220
    [stream] = rig.session("ipv6-userspace")["streams"]
    assert stream_counters(stream) == sent_counters(caller, callee)
    assert stream["caller_codec"] == "G711a"

    # An answer of the other family cannot be relayed (no bridging): error, the call is untouched
    proxy = rig.proxy()
    offer = proxy.update("mixed", "request", f"audio:{rig.topo.address6('caller')}:6100:sendrecv")
    ip, _ = parse_address_reply(offer)
    assert ip == RELAY6
    assert proxy.update("mixed", "reply", "audio:198.18.0.20:7100:sendrecv", to_tag="callee-tag") == "error"
    relay.process.wait_for_log(r"session mixed: refused an IPv4 reply in an IPv6 session", timeout=5)
    assert rig.summary()["port_pairs"]["used"] == 4           # ipv6-userspace and mixed, two pairs each
    assert proxy.remove("mixed") == "removed"
    assert call.remove() == "removed"
    assert rig.summary()["port_pairs"]["used"] == 0


def test_a_relay_without_an_ipv6_address_refuses_an_ipv6_offer(make_rig6):
    rig = make_rig6()
    relay = start_relay6(rig, {"relay_ip": rig.relay_ip})      # 198.18.0.5 only (its link goes over IPv6)
    proxy = rig.proxy()
    assert proxy.update("v6-offer", "request", f"audio:{rig.topo.address6('caller')}:6000:sendrecv") == "error"
    relay.process.wait_for_log(r"session v6-offer refused: its SDP is IPv6 and the relay has no IPv6 address",
                               timeout=5)
    assert rig.summary()["port_pairs"]["used"] == 0 and rig.sessions() == []
    # IPv4 goes on as before
    reply = proxy.update("v4-offer", "request", "audio:198.18.0.10:6000:sendrecv")
    assert parse_address_reply(reply)[0] == rig.relay_ip
    assert proxy.remove("v4-offer") == "removed"


def test_an_ipv6_call_in_the_kernel_goes_on_through_a_relay_restart(make_rig6):
    rig = make_rig6()
    start_relay6(rig, {"kernel_forwarding": "yes"})
    caller, callee = ipv6_parties(rig)
    call = Call(rig.proxy(), "ipv6-restart", caller, callee)
    pump(caller, callee, call, packets=60)
    wait_kernel_entries(rig, 2)
    entries = {entry.orig for entry in conntrack_entries(rig.topo, family="ipv6")}

    old = rig.relay
    assert old.process.stop() == 0
    assert "stopping with 1 sessions kept for the next start" in old.process.log_text()
    pump(caller, callee, call, packets=30)            # no relay process: the kernel relays on
    assert (caller.received_count(RTP), callee.received_count(RTP)) == (90, 90)

    relay = start_relay6(rig, {"kernel_forwarding": "yes"})
    relay.process.wait_for_log(r"kernel entries of the restored calls: 2 adopted, 0 ended", timeout=5)
    assert {entry.orig for entry in conntrack_entries(rig.topo, family="ipv6")} == entries
    pump(caller, callee, call, packets=30)
    assert (caller.received_count(RTP), callee.received_count(RTP)) == (120, 120)
    assert rig.summary()["userspace_packets"] == 0         # the new process relayed none of them
    assert call.remove() == "removed"
    record = rig.wait_accounted("ipv6-restart")
    assert stream_counters(record["streams"][0]) == sent_counters(caller, callee)
    assert conntrack_entries(rig.topo, family="ipv6") == [] and ipset_members(rig.topo, INHIBITOR_SET6) == []
