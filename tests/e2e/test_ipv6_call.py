"""A real IPv6 call through Kamailio and MediaProxy (issue 10, item 5).

The namespaces of test_call.py with IPv6 on: Kamailio listens on
[2001:db8:18::2]:5060, the two sipp phones (2001:db8:18::10 and ::20) call
over IPv6 with `c=IN IP6` SDP, the relay has both addresses (relay_ip =
198.18.0.5, 2001:db8:18::5). What a user sees: Kamailio writes the relay's
IPv6 address into each side's SDP (keeping `IN IP6`), the media flows both
ways through the relay, the kernel carries it with an IPv6 conntrack entry,
and the statistics at the end count the call's packets.
"""

import json

import pytest

from tests.e2e.helpers import (
    MEDIA_PORT,
    Management,
    dispatcher_socket,
    start_dispatcher,
    start_kamailio,
    start_relay,
    start_uac,
    start_uas,
)
from tests.kernel.helpers import MARK, RECORDING_DISPATCHER, Flow, conntrack_entries
from tests.support.certs import make_certs_dir
from tests.support.netns import ipv6_sysctls
from tests.support.processes import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60), pytest.mark.usefixtures("e2e_tools")]

CALL_MS = 3000
PORT_RANGE = (50000, 50100)
RTP_PAYLOAD = 252  # every packet of sipp's g711a.pcap (30 ms of A-law)
HOSTS = ("proxy", "relay1", "caller", "callee")


def test_an_ipv6_call_through_kamailio_and_mediaproxy(make_topology, tmp_path):
    topo = make_topology(HOSTS, ipv6_sysctls(HOSTS, {"relay1": {"net.ipv6.conf.all.forwarding": "1"}}))
    topo.add_ipv6()
    relay6, caller6, callee6 = topo.address6("relay1"), topo.address6("caller"), topo.address6("callee")
    certs = make_certs_dir(tmp_path / "tls", dispatcher_san_ips=(topo.address("proxy"),),
                           relay_san_ips=(topo.address("relay1"),))
    accounting = tmp_path / "accounting.jsonl"
    dispatcher = start_dispatcher(
        topo, tmp_path, certs.path, script=RECORDING_DISPATCHER, arguments=("--accounting-file", str(accounting))
    )
    start_relay(topo, tmp_path, certs.path, port_range=PORT_RANGE,
                extra={"Relay": {"relay_ip": f"{topo.address('relay1')}, {relay6}", "kernel_forwarding": "yes"}})
    start_kamailio(topo, tmp_path, dispatcher_socket=dispatcher_socket(dispatcher),
                   listen_ip=f"[{topo.address6('proxy')}]")
    management = Management(topo)

    uas = start_uas(topo, tmp_path / "sipp", address=callee6)
    uac = start_uac(topo, tmp_path / "sipp", duration_ms=CALL_MS, ipv6=True)

    # The kernel carries the call's RTP with an IPv6 entry with the relay's mark.
    def in_the_kernel():
        uac.process.assert_running()
        entries = conntrack_entries(topo, "relay1", family="ipv6")
        return entries if entries and entries[0].orig_packets and entries[0].reply_packets else None

    [entry] = wait_for(in_the_kernel, timeout=CALL_MS / 1000, interval=0.1, message="an IPv6 entry in the kernel")
    assert entry.mark == MARK and entry.orig.src == caller6 and entry.orig.dst == relay6, entry.line
    assert entry.reply == Flow(callee6, relay6, MEDIA_PORT, entry.reply.dport), entry.line
    [session] = management.sessions()
    assert session["streams"][0]["caller_local"] == f"{relay6}:{entry.orig.dport}"

    assert uac.wait(timeout=20) == 0, uac.error_log()
    assert uas.wait(timeout=10) == 0, uas.error_log()

    # Kamailio wrote the relay's IPv6 address into both SDPs, keeping IN IP6.
    offer, answer = uas.received_sdp(), uac.received_sdp()
    for sdp in (offer, answer):
        assert sdp.audio().connection == relay6
        assert PORT_RANGE[0] <= sdp.audio().port < PORT_RANGE[1]
    for agent in (uas, uac):
        sdp_text = next(text for text in agent.received() if "m=audio" in text)
        assert f"c=IN IP6 {relay6}" in sdp_text, sdp_text
    assert (offer.audio().port, answer.audio().port) == (entry.reply.dport, entry.orig.dport)

    # After the BYE: accounted, with the codec and counters of G.711 packets both ways.
    wait_for(accounting.exists, timeout=5, interval=0.1, message="the call's statistics to be accounted")
    [record] = [json.loads(line) for line in accounting.read_text().splitlines()]
    [final] = record["streams"]
    assert (final["caller_codec"], final["callee_codec"], final["status"]) == ("G711a", "G711a", "closed")
    expected = CALL_MS // 30 // 2            # 30 ms packets, for at least half of the call
    assert final["caller_packets"] >= expected and final["callee_packets"] >= expected, final
    assert final["caller_bytes"] == RTP_PAYLOAD * final["caller_packets"]
    assert final["callee_bytes"] == RTP_PAYLOAD * final["callee_packets"]
    assert conntrack_entries(topo, "relay1", family="ipv6") == []
