"""The relay's bookkeeping of its conntrack entries, against a fake kernel."""


import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from mediaproxy.protocol.media import MediaDescription
from mediaproxy.relay.kernel import ctnetlink, ipset
from mediaproxy.relay.kernel.conntrack import ConntrackTable, entry_for
from mediaproxy.relay.kernel.ctnetlink import Entry, Tuple5
from mediaproxy.relay.streams import CALLEE, CALLER, RTCP, RTP, MediaStream

RELAY = "203.0.113.5"
MARK = 0x4D50
CALLER_ADDRESS = ("198.51.100.10", 4000)
CALLEE_ADDRESS = ("192.0.2.20", 6000)


def inhibitor_request(message: bytes):
    """("inhibit"/"release", [(source, destination port, destination), ...]) of an ipset request."""
    command = struct.unpack_from("=H", message, 4)[0] & 0xFF
    kind = {ipset.IPSET_CMD_ADD: "inhibit", ipset.IPSET_CMD_DEL: "release"}[command]
    address_header = (8, ipset.IPSET_ATTR_IPADDR_IPV4 | ipset.NLA_F_NET_BYTEORDER)
    port_header = (6, ipset.IPSET_ATTR_PORT | ipset.NLA_F_NET_BYTEORDER)
    addresses = [socket.inet_ntoa(message[i + 4:i + 8]) for i in range(20, len(message) - 7, 4)
                 if struct.unpack_from("=HH", message, i) == address_header]
    ports = [struct.unpack_from(">H", message, i + 4)[0] for i in range(20, len(message) - 5, 4)
             if struct.unpack_from("=HH", message, i) == port_header]
    members = [(addresses[2 * n], port, addresses[2 * n + 1]) for n, port in enumerate(ports)]
    seq = struct.unpack_from("=I", message, 8)[0]
    return kind, members, seq


def requests_of(message: bytes):
    """(kind, orig tuple, seq) of one request, read by pyroute2 (ctnetlink) or by hand (ipset)."""
    if struct.unpack_from("=H", message, 4)[0] >> 8 == NFNL_SUBSYS_IPSET:
        return inhibitor_request(message)
    msg = nfct_msg(message)
    msg.decode()
    kind = {ctnetlink.MSG_NEW: "new", ctnetlink.MSG_DELETE: "delete", ctnetlink.MSG_GET: "get"}[msg["header"]["type"]]
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
    flow = Tuple5(ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST"),
                  proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT"))
    return kind, flow, msg["header"]["sequence_number"]


class FakeNetlink:
    """Keeps entries by original tuple like the kernel; answers batches."""

    def __init__(self):
        self.entries = {}          # orig Tuple5 -> Entry
        self.inhibited = set()     # members of the inhibitor set
        self.batches = []
        self.refuse = set()        # orig tuples whose creation fails with EEXIST
        self.fail = False
        self._seq = 0

    def next_seq(self):
        self._seq += 1
        return self._seq

    def transact(self, requests):
        if self.fail:
            raise OSError(105, "No buffer space available")
        batch = [requests_of(message) for _, message in requests]
        self.batches.append(batch)
        errors, found = {}, {}
        for kind, flow, seq in batch:
            if kind == "inhibit":
                self.inhibited.update(flow)
                errors[seq] = 0
            elif kind == "release":
                self.inhibited.difference_update(flow)
                errors[seq] = 0
            elif kind == "new":
                if flow in self.refuse or flow in self.entries:
                    errors[seq] = 17
                else:
                    self.entries[flow] = Entry(ctnetlink.MSG_NEW, flow, None, mark=MARK, proto=17)
                    errors[seq] = 0
            elif kind == "delete":
                errors[seq] = 0 if self.entries.pop(flow, None) is not None else 2
            else:
                if flow in self.entries:
                    found[seq] = self.entries[flow]
                errors[seq] = 0 if flow in self.entries else 2
        return {"errors": errors, "entries": found}

    def dump(self, mark):
        return [entry for entry in self.entries.values() if mark is None or entry.mark == mark]


def latched_stream(caller_port=40000, callee_port=40002):
    stream = MediaStream("audio", caller_port, callee_port, 0.0)
    stream.call_id = "call-1"
    for component in (RTP, RTCP):
        stream.on_packet(CALLER, component, (CALLER_ADDRESS[0], CALLER_ADDRESS[1] + component), b"\x80\x08" + b"\0" * 10, 1.0)
        stream.on_packet(CALLEE, component, (CALLEE_ADDRESS[0], CALLEE_ADDRESS[1] + component), b"\x80\x08" + b"\0" * 10, 1.0)
    return stream


@pytest.fixture
def kernel():
    netlink = FakeNetlink()
    return netlink, ConntrackTable(netlink, None, RELAY, MARK, "mediaproxy-4d50")


def test_an_entry_relays_the_caller_to_the_callee_from_the_callee_leg():
    entry = entry_for(latched_stream(), RTCP, RELAY)
    assert entry.orig == Tuple5("198.51.100.10", RELAY, 4001, 40001)
    assert entry.callee == ("192.0.2.20", 6001)
    assert entry.relay_b == (RELAY, 40003)


def test_a_hand_over_inhibits_the_flows_replaces_the_old_entries_and_releases_the_flows_in_one_batch(kernel):
    netlink, table = kernel
    stream = latched_stream()
    caller_flow = Tuple5("198.51.100.10", RELAY, 4000, 40000)
    callee_flow = Tuple5("192.0.2.20", RELAY, 6000, 40002)
    netlink.entries[caller_flow] = Entry(ctnetlink.MSG_NEW, caller_flow, None, proto=17)   # made by user space
    installed = table.install([entry_for(stream, RTP, RELAY)])
    assert len(installed) == 1 and len(table) == 1
    [batch] = netlink.batches
    caller_member, callee_member = ("198.51.100.10", 40000, RELAY), ("192.0.2.20", 40002, RELAY)
    assert [request[:2] for request in batch] == [
        ("inhibit", [caller_member, callee_member]),
        ("delete", caller_flow), ("delete", callee_flow),
        ("new", caller_flow),
        ("release", [caller_member, callee_member])]
    assert netlink.inhibited == set()
    assert list(netlink.entries) == [caller_flow]
    assert set(table.kernel_ports) == {40000, 40002}


def test_hand_overs_of_one_turn_go_in_one_batch(kernel):
    netlink, table = kernel
    streams = [latched_stream(40000 + 4 * i, 40002 + 4 * i) for i in range(3)]
    for stream in streams:      # every stream from another caller port
        stream.leg(CALLER).latched = [("198.51.100.10", 5000 + stream.leg(CALLER).port),
                                      ("198.51.100.10", 5001 + stream.leg(CALLER).port)]
    table.install([entry_for(stream, component, RELAY) for stream in streams for component in (RTP, RTCP)])
    assert len(netlink.batches) == 1 and len([r for r in netlink.batches[0] if r[0] == "new"]) == 6
    [inhibit] = [r for r in netlink.batches[0] if r[0] == "inhibit"]
    assert len(inhibit[1]) == 12 and netlink.inhibited == set()


def test_a_refused_entry_stays_in_user_space(kernel):
    netlink, table = kernel
    stream = latched_stream()
    netlink.refuse.add(Tuple5("198.51.100.10", RELAY, 4000, 40000))
    assert table.install([entry_for(stream, RTP, RELAY)]) == []
    assert len(table) == 0 and not table.kernel_ports


def test_nothing_is_registered_when_netlink_fails(kernel):
    netlink, table = kernel
    netlink.fail = True
    with pytest.raises(OSError):
        table.install([entry_for(latched_stream(), RTP, RELAY)])
    assert len(table) == 0 and not table.kernel_ports


def test_counters_are_udp_payload_and_kept_when_the_entry_goes(kernel):
    netlink, table = kernel
    stream = latched_stream()
    [entry] = table.install([entry_for(stream, RTP, RELAY)])
    user_space = stream.leg(CALLER).packet_count, stream.leg(CALLEE).packet_count
    user_space_bytes = stream.leg(CALLER).byte_count, stream.leg(CALLEE).byte_count
    kernel_entry = netlink.entries[entry.orig]
    kernel_entry.orig_packets, kernel_entry.orig_bytes = 10, 10 * 200
    kernel_entry.reply_packets, kernel_entry.reply_bytes = 8, 8 * 60
    assert table.refresh_counters() == set()
    assert stream.leg(CALLER).packet_count == user_space[0] + 10
    assert stream.leg(CALLEE).packet_count == user_space[1] + 8
    assert stream.leg(CALLER).byte_count == user_space_bytes[0] + 10 * 172
    assert stream.leg(CALLEE).byte_count == user_space_bytes[1] + 8 * 32
    assert table.refresh_counters() == set()            # read again: nothing counted twice
    before = stream.leg(CALLER).byte_count, stream.leg(CALLEE).byte_count
    assert stream.leg(CALLER).packet_count == user_space[0] + 10
    kernel_entry.orig_packets, kernel_entry.orig_bytes = 12, 12 * 200    # the last ones, read on removal
    assert table.remove_port(stream.leg(CALLEE).port) == [entry]
    assert (stream.leg(CALLER).byte_count, stream.leg(CALLEE).byte_count) == (before[0] + 2 * 172, before[1])
    assert stream.leg(CALLER).packet_count == user_space[0] + 12
    assert netlink.entries == {} and len(table) == 0 and not table.kernel_ports
    assert table.remove_port(stream.leg(CALLER).port) == []


def test_an_entry_the_kernel_no_longer_has_is_reported_gone(kernel):
    netlink, table = kernel
    [entry] = table.install([entry_for(latched_stream(), RTP, RELAY)])
    netlink.entries.clear()
    assert table.refresh_counters() == {entry}


def test_leftovers_are_our_mark_and_the_udp_flows_of_our_ports_only(kernel):
    netlink, table = kernel
    flows = {
        "marked": (Tuple5("198.51.100.1", "192.0.2.99", 1, 2), MARK, 17),
        "to our port": (Tuple5("198.51.100.1", RELAY, 4000, 40010), 0, 17),
        "from our port": (Tuple5(RELAY, "198.51.100.1", 40010, 4000), 0, 17),
        "tcp on our ports": (Tuple5(RELAY, "198.51.100.1", 40010, 25060), 0, 6),
        "outside the range": (Tuple5("198.51.100.1", RELAY, 4000, 39998), 0, 17),
        "another address": (Tuple5("198.51.100.1", "203.0.113.6", 4000, 40010), 0, 17),
    }
    for flow, mark, proto in flows.values():
        netlink.entries[flow] = Entry(ctnetlink.MSG_NEW, flow, None, mark=mark, proto=proto)
    assert table.remove_leftovers((40000, 50000)) == 3
    assert set(netlink.entries) == {flows[name][0] for name in ("tcp on our ports", "outside the range",
                                                                 "another address")}


def test_a_moved_party_takes_its_stream_out_of_the_kernel():
    class Listener:
        def __init__(self):
            self.events = []

        def latched(self, stream, component):
            self.events.append(("latched", component))

        def unlatched(self, stream):
            self.events.append(("unlatched",))
    stream = MediaStream("audio", 40000, 40002, 0.0)
    stream.listener = listener = Listener()
    stream.describe(CALLER, MediaDescription("audio", "198.51.100.10", 4000), 0.5)
    stream.on_packet(CALLER, RTP, CALLER_ADDRESS, b"x", 1.0)
    stream.on_packet(CALLEE, RTP, CALLEE_ADDRESS, b"x", 1.0)
    stream.on_packet(CALLEE, RTP, CALLEE_ADDRESS, b"x", 1.0)
    stream.describe(CALLER, MediaDescription("audio", "198.51.100.10", 4000), 2.0)        # same address: nothing
    stream.describe(CALLER, MediaDescription("audio", "198.51.100.10", 4100), 3.0)
    assert listener.events == [("latched", RTP), ("unlatched",)]
    assert stream.leg(CALLER).latched == [None, None]


def test_stun_is_relayed_but_only_media_hands_a_stream_to_the_kernel():
    class Listener:
        def __init__(self):
            self.latched_components = []

        def latched(self, stream, component):
            self.latched_components.append(component)

        def unlatched(self, stream):
            pass
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x07" * 12
    stream = MediaStream("audio", 40000, 40002, 0.0)
    stream.listener = listener = Listener()
    stream.on_packet(CALLER, RTP, CALLER_ADDRESS, stun, 1.0)
    assert stream.on_packet(CALLEE, RTP, CALLEE_ADDRESS, stun, 1.0) == (40000, CALLER_ADDRESS)
    assert listener.latched_components == [] and not stream.is_latched(RTP)
    assert stream.first_media_time is None
    stream.on_packet(CALLER, RTP, CALLER_ADDRESS, b"\x80\x08" + b"\0" * 10, 2.0)
    assert listener.latched_components == []
    stream.on_packet(CALLEE, RTP, CALLEE_ADDRESS, b"\x80\x08" + b"\0" * 10, 2.5)
    assert listener.latched_components == [RTP] and stream.is_latched(RTP)
    assert stream.first_media_time == 2.0


def test_several_inhibited_flows_go_in_one_list_message_as_the_kernel_takes_it():
    flows = [Tuple5("198.51.100.10", RELAY, 4000 + n, 40000 + 2 * n) for n in range(3)]
    one, many = ipset.encode_add(1, "mediaproxy-4d50", flows[:1]), ipset.encode_add(2, "mediaproxy-4d50", flows)
    attributes = lambda message: [struct.unpack_from("=H", message, 20 + offset + 2)[0] & 0x3FFF  # noqa: E731
                                  for offset in attribute_offsets(message)]
    assert attributes(one) == [ipset.IPSET_ATTR_PROTOCOL, ipset.IPSET_ATTR_SETNAME, ipset.IPSET_ATTR_DATA]
    # a list (ADT) must come with a line number, or the kernel answers IPSET_ERR_PROTOCOL
    assert attributes(many) == [ipset.IPSET_ATTR_PROTOCOL, ipset.IPSET_ATTR_SETNAME, ipset.IPSET_ATTR_LINENO,
                                ipset.IPSET_ATTR_ADT]
    assert inhibitor_request(many)[1] == [(flow.src, flow.dport, flow.dst) for flow in flows]


def attribute_offsets(message):
    offset, end = 0, len(message) - 20
    while offset < end:
        length = struct.unpack_from("=H", message, 20 + offset)[0]
        yield offset
        offset += (length + 3) & ~3


def test_the_packed_ipv4_member_is_the_general_one():
    flow = Tuple5("198.51.100.10", RELAY, 4000, 40000)
    assert ipset._data(flow) == ipset._data_general(flow)


def test_an_entry_is_found_by_its_original_tuple_only(kernel):
    netlink, table = kernel
    stream = latched_stream()
    rtp, rtcp = table.install([entry_for(stream, RTP, RELAY), entry_for(stream, RTCP, RELAY)])
    assert len(table) == 2 and set(table.kernel_ports) == {40000, 40001, 40002, 40003}
    assert table.find(Tuple5("198.51.100.10", RELAY, 4000, 40000)) is rtp
    assert table.find(Tuple5("198.51.100.10", RELAY, 4001, 40001)) is rtcp
    assert table.find(Tuple5("198.51.100.66", RELAY, 4000, 40000)) is None     # another caller address
    assert table.find(Tuple5("192.0.2.20", RELAY, 6000, 40002)) is None        # the reply direction
    assert table.relays(stream, RTP) and table.relays(stream, RTCP)
    assert table.remove_port(40002) == [rtp, rtcp]        # either leg's pair removes the stream's entries
    assert len(table) == 0 and not table.relays(stream, RTP) and not stream.in_kernel


def test_an_ended_entry_is_counted_once_and_its_sub_stream_goes_back_to_user_space(kernel):
    netlink, table = kernel
    stream = latched_stream()
    [rtp, rtcp] = table.install([entry_for(stream, RTP, RELAY), entry_for(stream, RTCP, RELAY)])
    before = stream.leg(CALLER).packet_count
    last = netlink.entries[rtcp.orig]
    last.orig_packets, last.orig_bytes = 5, 5 * 100
    table.refresh_counters()
    table.ended(rtcp, last)
    assert stream.leg(CALLER).packet_count == before + 5
    assert stream.leg(CALLER).media_seen == [True, False] and stream.leg(CALLEE).media_seen == [True, False]
    assert set(table.kernel_ports) == {40000, 40002} and stream.in_kernel
    table.ended(rtp)
    assert not stream.in_kernel and len(table) == 0


def test_what_the_relay_holds_per_call_has_no_instance_dict():
    # tens of thousands at once (issue 8): a __dict__ each would cost more than the objects
    stream = latched_stream()
    for obj in (stream, stream.leg(CALLER), entry_for(stream, RTP, RELAY)):
        assert not hasattr(obj, "__dict__"), type(obj).__name__
