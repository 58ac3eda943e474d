"""IPv6 (issue 10, item 5) without sockets: the relay options, the IP version of a session, the
IPv6 kernel messages (read back by pyroute2), the IPv6 bookkeeping of the kernel path."""

import json
import logging
import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from mediaproxy.configuration import ConfigError, addresses_by_version, parse_configuration
from mediaproxy.protocol.media import MediaError, parse_media, streams_ip_version
from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.forwarding import MemoryForwarding
from mediaproxy.relay.kernel import ctnetlink, ipset
from mediaproxy.relay.kernel.adoption import entries_from_state, entry_state, saved_flows
from mediaproxy.relay.kernel.conntrack import ConntrackTable, entry_for
from mediaproxy.relay.kernel.ctnetlink import Entry, Tuple5
from mediaproxy.relay.kernel.parking import port_range_filter6, udp_ports6
from mediaproxy.relay.kernel.prerequisites import missing_forwarding, missing_prerequisites
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.dispatchers import link_source
from mediaproxy.relay.session import session_from_state, session_state
from mediaproxy.relay.state import RelayState, load_state, save_state
from mediaproxy.relay.streams import CALLEE, CALLER, RTCP, RTP, MediaStream

RELAY4, RELAY6 = "203.0.113.5", "2001:db8::5"
CALLER6, CALLEE6 = ("2001:db8:1::10", 4000), ("2001:db8:2::20", 6000)
MARK = 0x4D50


def relay_config(text: str):
    return parse_configuration("[Relay]\n" + text, "/etc/mediaproxy", "/run/mediaproxy").relay


# -- configuration --


def test_relay_ip_takes_one_address_of_each_family_in_either_order():
    config = relay_config("relay_ip = 2001:DB8::0005, 203.0.113.5\nadvertised_ip = 2001:db8:ffff::1\n")
    assert config.relay_ip == "203.0.113.5, 2001:db8::5"          # canonical, IPv4 first
    assert config.relay_addresses == {4: RELAY4, 6: RELAY6}
    assert config.advertised_addresses == {6: "2001:db8:ffff::1"}
    assert relay_config("relay_ip = 203.0.113.5\n").relay_ip == "203.0.113.5"     # one reads as itself
    assert relay_config("").relay_addresses == {}
    assert addresses_by_version(None) == {}


@pytest.mark.parametrize("key, value", [
    ("relay_ip", "203.0.113.5, 203.0.113.6"),
    ("relay_ip", "2001:db8::5 2001:db8::6"),
    ("relay_ip", "203.0.113.5, relay.example.com"),
    ("advertised_ip", "2001:db8::5, 2001:db8::zz"),
])
def test_a_bad_relay_address_list_stops_start_up_naming_section_key_and_value(key, value):
    with pytest.raises(ConfigError) as error:
        relay_config(f"{key} = {value}\n")
    assert f"[Relay] {key} = {value!r}" in str(error.value)


def test_the_links_to_the_dispatchers_leave_from_the_relay_address_of_their_family():
    both = {4: RELAY4, 6: RELAY6}
    assert link_source(both, "2001:db8::1") == RELAY6
    assert link_source(both, "192.0.2.1") == RELAY4
    assert link_source({4: RELAY4}, "192.0.2.1") == RELAY4
    assert link_source({4: RELAY4}, "2001:db8::1") is None          # the routes choose
    assert link_source({}, "192.0.2.1") is None                     # relay_ip not set


# -- the IP version of a session --


@pytest.mark.parametrize("media, version", [
    ("audio:2001:db8::5:4000:sendrecv:ice=no", 6),
    ("audio:192.0.2.1:4000:sendrecv", 4),
    ("audio::::4000:sendonly", 6),                                # the IPv6 hold address
    ("audio:0.0.0.0:4000:sendonly", 4),
    ("audio:0.0.0.0:4000:sendonly,video:2001:db8::5:4002:sendrecv", 6),   # a real address decides
    ("audio:2001:db8::5:4000:sendrecv,video:192.0.2.1:0:sendrecv", 6),    # a disabled stream does not count
    ("audio:192.0.2.1:0:sendrecv", None),
])
def test_the_ip_version_of_the_streams(media, version):
    assert streams_ip_version(parse_media(media)) == version


def test_streams_of_both_families_cannot_be_answered_with_one_address():
    with pytest.raises(MediaError, match="mix IPv4 and IPv6"):
        streams_ip_version(parse_media("audio:192.0.2.1:4000:sendrecv,video:2001:db8::5:4002:sendrecv"))
    assert streams_ip_version(parse_media("audio:0.0.0.0:4000:sendonly"), count_hold=False) is None


def update(call_id, type, media, cseq=1):
    return {"type": type, "call_id": call_id, "from_tag": "alice", "to_tag": "" if type == "request" else "bob",
            "cseq": f"{cseq} INVITE", "media": media}


def dual_stack(forwarding=None, advertised=None):
    return RelayCore(advertised or {4: RELAY4, 6: RELAY6}, PortPool(40000, 40040), forwarding or MemoryForwarding(),
                     now=0.0)


def test_an_offer_is_relayed_on_the_relay_address_of_its_family():
    forwarding = MemoryForwarding()
    relay = dual_stack(forwarding)
    reply6 = relay.update(update("call-6", "request", "audio:2001:db8:1::10:4000:sendrecv"), 1.0)
    reply4 = relay.update(update("call-4", "request", "audio:198.51.100.10:4000:sendrecv"), 1.0)
    assert reply6.split()[0] == RELAY6 and reply4.split()[0] == RELAY4
    assert relay.update(update("call-6", "reply", "audio:2001:db8:2::20:6000:sendrecv"), 2.0).split()[0] == RELAY6
    # the main version's pairs open without a version (forwardings of one address need none)
    versions = {port: forwarding.versions[port] for port in forwarding.receivers}
    six = [stream.leg(party).port for stream in relay.sessions["call-6"].streams for party in (CALLER, CALLEE)]
    assert {versions[port] for port in six} == {6}
    assert set(versions.values()) == {6, None}
    # the statistics name the relay address the call was relayed on
    local = {s["call_id"]: s["streams"][0]["caller_local"] for s in json.loads(relay.handle("sessions", {}, 3.0))}
    assert local["call-6"].rpartition(":")[0] == RELAY6 and local["call-4"].rpartition(":")[0] == RELAY4


def test_the_advertised_address_of_each_family_is_announced():
    relay = dual_stack(advertised={4: "192.0.2.99", 6: "2001:db8:ffff::99"})
    assert relay.update(update("c", "request", "audio:2001:db8:1::10:4000:sendrecv"), 1.0).startswith("2001:db8:ffff::99 ")
    assert relay.summary(2.0)["ip"] == "192.0.2.99"


def test_an_offer_of_a_family_the_relay_lacks_is_refused_with_one_line_and_nothing_allocated(caplog):
    relay = RelayCore(RELAY4, PortPool(40000, 40040), MemoryForwarding(), now=0.0)
    with caplog.at_level(logging.INFO, "mediaproxy.relay"):
        assert relay.update(update("v6-call", "request", "audio:2001:db8:1::10:4000:sendrecv"), 1.0) == "error"
    assert [r.getMessage() for r in caplog.records] == [
        "session v6-call refused: its SDP is IPv6 and the relay has no IPv6 address (relay_ip)"]
    assert relay.ports.used_count == 0 and relay.sessions == {}
    # an IPv6-only relay the same for IPv4
    relay6 = RelayCore(RELAY6, PortPool(40000, 40040), MemoryForwarding(), now=0.0)
    assert relay6.update(update("v4-call", "request", "audio:198.51.100.10:4000:sendrecv"), 1.0) == "error"
    assert relay6.update(update("v6-hold", "request", "audio::::4000:inactive"), 1.0).startswith(RELAY6 + " ")


def test_an_answer_of_the_other_family_is_refused_and_the_call_keeps_its_offer(caplog):
    forwarding = MemoryForwarding()
    relay = dual_stack(forwarding)
    offer = relay.update(update("call-1", "request", "audio:2001:db8:1::10:4000:sendrecv"), 1.0)
    with caplog.at_level(logging.ERROR, "mediaproxy.relay"):
        assert relay.update(update("call-1", "reply", "audio:198.51.100.20:6000:sendrecv"), 2.0) == "error"
        assert relay.update(update("call-1", "request", "audio:198.51.100.10:4000:sendrecv", cseq=2), 3.0) == "error"
    assert [r.getMessage() for r in caplog.records] == [
        "session call-1: refused an IPv4 reply in an IPv6 session: the relay does not bridge IPv4 and IPv6",
        "session call-1: refused an IPv4 request in an IPv6 session: the relay does not bridge IPv4 and IPv6"]
    session = relay.sessions["call-1"]
    assert session.start_time is None and session.streams[0].callee.sdp_address is None
    assert relay.ports.used_count == 2
    # a hold with the IPv4 hold address in an IPv6 session names no address: it is taken
    assert relay.update(update("call-1", "reply", "audio:2001:db8:2::20:6000:sendrecv"), 4.0).split()[0] == RELAY6
    assert relay.update(update("call-1", "request", "audio:0.0.0.0:4000:sendonly", cseq=3), 5.0) == offer
    assert relay.sessions["call-1"].streams[0].on_hold
    relay.remove({"call_id": "call-1", "from_tag": "alice", "to_tag": "bob"}, 6.0)
    assert relay.ports.used_count == 0 and forwarding.receivers == {}


def test_an_ipv6_session_is_restored_on_the_ipv6_address_and_not_on_a_relay_without_one():
    relay = dual_stack()
    relay.update(update("call-1", "request", "audio:2001:db8:1::10:4000:sendrecv"), 1.0)
    saved = [session_state(session) for session in relay.sessions.values()]
    assert saved[0]["ip_version"] == 6
    assert session_from_state(json.loads(json.dumps(saved[0])), lambda ip: True).ip_version == 6
    del saved[0]["ip_version"]                    # a file of a relay before IPv6
    assert session_from_state(saved[0], lambda ip: True).ip_version == 4
    forwarding = MemoryForwarding()
    again = dual_stack(forwarding)
    state = [session_state(session) for session in relay.sessions.values()]
    [session] = again.restore(state, 2.0)
    assert set(forwarding.versions.values()) == {6}
    assert RelayCore(RELAY4, PortPool(40000, 40040), MemoryForwarding(), now=0.0).restore(state, 2.0) == []


def test_calls_saved_before_the_relay_had_ipv6_are_restored_when_it_has(tmp_path):
    path = str(tmp_path / "relay-state.json")
    old = {"relay_ip": RELAY4, "advertised_ip": RELAY4, "port_range": [40000, 40040], "conntrack_mark": MARK}
    new = dict(old, relay_ip6=RELAY6, advertised_ip6=RELAY6)
    assert save_state(path, RelayState(old, [], [], {}, 1000.0))
    assert load_state(path, new, now=1001.0, max_age=90) is not None
    assert save_state(path, RelayState(new, [], [], {}, 1000.0))
    assert load_state(path, old, now=1001.0, max_age=90) is None      # its IPv6 calls cannot be


# -- the kernel's messages --


def decoded(data: bytes):
    msg = nfct_msg(data)
    msg.decode()
    return msg


def tuple6(attr):
    ip, proto = attr.get_attr("CTA_TUPLE_IP"), attr.get_attr("CTA_TUPLE_PROTO")
    return (ip.get_attr("CTA_IP_V6_SRC"), ip.get_attr("CTA_IP_V6_DST"),
            proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT"))


def test_an_ipv6_nat_entry_as_pyroute2_reads_it():
    flow = Tuple5("2001:db8:1::10", RELAY6, 4000, 40000)
    msg = decoded(ctnetlink.encode_nat_entry(5, flow, ("2001:db8:2::20", 6000), (RELAY6, 40002), 120, MARK))
    assert msg["nfgen_family"] == socket.AF_INET6
    assert tuple6(msg.get_attr("CTA_TUPLE_ORIG")) == ("2001:db8:1::10", RELAY6, 4000, 40000)
    assert tuple6(msg.get_attr("CTA_TUPLE_REPLY")) == (RELAY6, "2001:db8:1::10", 40000, 4000)
    for kind, address in (("CTA_NAT_DST", ("2001:db8:2::20", 6000)), ("CTA_NAT_SRC", (RELAY6, 40002))):
        nat = msg.get_attr(kind)
        assert (nat.get_attr("CTA_NAT_V6_MINIP"), nat.get_attr("CTA_NAT_V6_MAXIP")) == (address[0], address[0])
        proto = nat.get_attr("CTA_NAT_PROTO")
        assert proto.get_attr("CTA_PROTONAT_PORT_MIN") == proto.get_attr("CTA_PROTONAT_PORT_MAX") == address[1]
    assert (msg.get_attr("CTA_MARK"), msg.get_attr("CTA_TIMEOUT")) == (MARK, 120)
    for encode in (ctnetlink.encode_delete, ctnetlink.encode_get):
        message = decoded(encode(6, flow))
        assert message["nfgen_family"] == socket.AF_INET6
        assert tuple6(message.get_attr("CTA_TUPLE_ORIG")) == ("2001:db8:1::10", RELAY6, 4000, 40000)


def test_an_ipv6_entry_of_a_dump_or_an_event_is_read_back():
    flow = Tuple5("2001:db8:1::10", RELAY6, 4000, 40000)
    data = bytearray(ctnetlink.encode_plain_entry(9, flow, 30, MARK))
    [entry] = ctnetlink.decode_messages(bytes(data))
    assert (entry.orig, entry.reply, entry.mark) == (flow, flow.inverse(), MARK)
    assert ctnetlink.encode_dump(1, MARK, socket.AF_UNSPEC)[16] == socket.AF_UNSPEC    # both families at once


def test_an_ipv6_inhibitor_member_uses_the_ipv6_address_attributes():
    flow = Tuple5("2001:db8:1::10", RELAY6, 4000, 40000)
    data = ipset._data(flow)
    header = struct.pack("=HH", 20, ipset.IPSET_ATTR_IPADDR_IPV6 | ipset.NLA_F_NET_BYTEORDER)
    assert data.count(header) == 2
    assert socket.inet_pton(socket.AF_INET6, flow.src) in data and socket.inet_pton(socket.AF_INET6, RELAY6) in data
    assert struct.pack(">H", 40000) in data


# -- the kernel path's bookkeeping of IPv6 entries --


class RecordingNetlink:
    """Answers every request with success; keeps them (decoded by hand where it matters)."""

    def __init__(self):
        self.requests = []
        self.dumped = []
        self._seq = 0

    def next_seq(self):
        self._seq += 1
        return self._seq

    def transact(self, requests):
        self.requests.extend(message for _, message in requests)
        return {"errors": {seq: 0 for seq, _ in requests}, "entries": {}}

    def dump(self, mark, family=socket.AF_INET):
        self.dumped.append(family)
        return []


def latched6(caller_port=40000, callee_port=40002):
    stream = MediaStream("audio", caller_port, callee_port, 0.0)
    stream.call_id = "call-6"
    for component in (RTP, RTCP):
        for party, (ip, port) in ((CALLER, CALLER6), (CALLEE, CALLEE6)):
            stream.on_packet(party, component, (ip, port + component), b"\x80\x08" + b"\0" * 10, 1.0)
    return stream


def test_ipv6_and_ipv4_hand_overs_go_to_the_set_and_encoding_of_their_family():
    netlink = RecordingNetlink()
    table = ConntrackTable(netlink, {}, {4: RELAY4, 6: RELAY6}, MARK, {4: "mediaproxy-4d50", 6: "mediaproxy6-4d50"})
    assert table.versions == {4, 6} and table.relay_ip == RELAY4
    stream6 = latched6()
    entry6 = entry_for(stream6, RTP, RELAY6)
    assert entry6.orig == Tuple5(CALLER6[0], RELAY6, 4000, 40000) and entry6.relay_b == (RELAY6, 40002)
    stream4 = MediaStream("audio", 40004, 40006, 0.0)
    for party, ip in ((CALLER, "198.51.100.10"), (CALLEE, "192.0.2.20")):
        stream4.on_packet(party, RTP, (ip, 5000), b"\x80\x08" + b"\0" * 10, 1.0)
    installed = table.install([entry6, entry_for(stream4, RTP, RELAY4)])
    assert len(installed) == 2 and stream6.in_kernel
    sets = [message[message.index(b"mediaproxy"):].split(b"\0")[0] for message in netlink.requests
            if struct.unpack_from("=H", message, 4)[0] >> 8 == ipset.NFNL_SUBSYS_IPSET]
    assert sorted(sets) == [b"mediaproxy-4d50", b"mediaproxy-4d50", b"mediaproxy6-4d50", b"mediaproxy6-4d50"]
    news = [decoded(m) for m in netlink.requests if struct.unpack_from("=H", m, 4)[0] == ctnetlink.MSG_NEW]
    assert sorted(msg["nfgen_family"] for msg in news) == [socket.AF_INET, socket.AF_INET6]

    # the kernel counts IPv6 packets with 40 + 8 header bytes; the legs count UDP payload
    caller_before = stream6.caller.byte_count
    counted = Entry(ctnetlink.MSG_NEW, entry6.orig, None, orig_packets=10, orig_bytes=10 * (48 + 172),
                    reply_packets=0, reply_bytes=0)
    table.count(entry6, counted)
    assert stream6.caller.byte_count - caller_before == 10 * 172
    assert table.find(entry6.orig) is entry6          # a destroy event of it ends its stream
    # dumps (counters, adoption, leftovers) ask for both families at once
    table.refresh_counters()
    table.remove_leftovers((40000, 40040))
    assert netlink.dumped == [socket.AF_UNSPEC, socket.AF_UNSPEC]


def test_the_saved_ipv6_entries_are_found_again_with_the_relay_address_of_their_family():
    stream = latched6()
    entry = entry_for(stream, RTCP, RELAY6)
    states = [entry_state(entry)]
    relay_ips = {4: RELAY4, 6: RELAY6}
    assert saved_flows(states, relay_ips) == {Tuple5(CALLER6[0], RELAY6, 4001, 40001)}
    [adopted], orphans = entries_from_state(states, {40000: stream}, relay_ips)
    assert (adopted.orig, adopted.relay_ip, orphans) == (entry.orig, RELAY6, [])
    # the relay has no IPv6 address any more: nothing to keep, nothing to adopt
    assert saved_flows(states, RELAY4) == frozenset()
    assert entries_from_state(states, {40000: stream}, RELAY4) == ([], [])


def test_the_raw_ipv6_socket_of_parked_ports_reads_udp_headers():
    assert udp_ports6(struct.pack(">HH", 4000, 40001) + b"rest") == (4000, 40001)
    assert udp_ports6(b"\x00\x01") is None
    program = port_range_filter6(40000, 40040)
    assert len(program) == 5 * 8
    assert struct.unpack_from("HBBI", program, 0) == (0x28, 0, 0, 2)      # ldh [2]: no IP header before it


def test_the_ipv6_prerequisite_says_what_to_set():
    files = {"/proc/sys/net/ipv6/conf/all/forwarding": "0\n", "/proc/sys/net/ipv4/ip_forward": "1\n"}
    assert "sysctl -w net.ipv6.conf.all.forwarding=1" in missing_forwarding(6, files.get)
    assert missing_forwarding(4, files.get) is None
    assert "IPv6 is off" in missing_forwarding(6, {}.get)
    problems = missing_prerequisites(uname=lambda: type("u", (), {"sysname": "Linux", "release": "6.1.0"}),
                                     read=lambda path: files.get(path, "CapEff:\t0000003fffffffff\n"),
                                     load_iptables=lambda: None, ip_versions=(4, 6))
    assert len(problems) == 1 and "net.ipv6.conf.all.forwarding is 0" in problems[0]
