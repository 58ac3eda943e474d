"""Our ctnetlink messages, read back by pyroute2's own decoder (the reference)."""

import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from mediaproxy.relay.kernel import ctnetlink
from mediaproxy.relay.kernel.ctnetlink import Ack, Done, Entry, Tuple5

CALLER = Tuple5("198.51.100.10", "203.0.113.5", 4000, 40000)


def decoded(data: bytes):
    msg = nfct_msg(data)
    msg.decode()
    return msg


def tuple_of(attr):
    ip = attr.get_attr("CTA_TUPLE_IP")
    proto = attr.get_attr("CTA_TUPLE_PROTO")
    return (ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC"),
            ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST"),
            proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT"))


def nat_of(attr):
    proto = attr.get_attr("CTA_NAT_PROTO")
    return (attr.get_attr("CTA_NAT_V4_MINIP"), attr.get_attr("CTA_NAT_V4_MAXIP"),
            proto.get_attr("CTA_PROTONAT_PORT_MIN"), proto.get_attr("CTA_PROTONAT_PORT_MAX"))


@pytest.mark.parametrize("encode", [ctnetlink.encode_nat_entry, ctnetlink.encode_nat_entry4])
def test_a_nat_entry_as_pyroute2_reads_it(encode):
    data = encode(77, CALLER, ("192.0.2.20", 6000), ("203.0.113.5", 40002), 120, 0x4D50)
    msg = decoded(data)
    assert msg["header"]["type"] == ctnetlink.MSG_NEW
    assert msg["header"]["sequence_number"] == 77
    assert msg["header"]["length"] == len(data)
    assert msg["nfgen_family"] == socket.AF_INET
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ("198.51.100.10", "203.0.113.5", 17, 4000, 40000)
    # the reply is the plain inverse: the kernel applies the NAT to it itself
    assert tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ("203.0.113.5", "198.51.100.10", 17, 40000, 4000)
    assert nat_of(msg.get_attr("CTA_NAT_DST")) == ("192.0.2.20", "192.0.2.20", 6000, 6000)
    assert nat_of(msg.get_attr("CTA_NAT_SRC")) == ("203.0.113.5", "203.0.113.5", 40002, 40002)
    assert msg.get_attr("CTA_TIMEOUT") == 120
    assert msg.get_attr("CTA_MARK") == 0x4D50


def test_the_packed_ipv4_encoder_writes_the_same_bytes_as_the_general_one():
    args = (9, CALLER, ("192.0.2.20", 6001), ("203.0.113.5", 40003), 30, 0xFFFFFFFF)
    assert ctnetlink.encode_nat_entry4(*args) == ctnetlink.encode_nat_entry(*args)


def test_ipv6_entries_use_the_v6_attributes():
    flow = Tuple5("2001:db8::10", "2001:db8::5", 4000, 40000)
    msg = decoded(ctnetlink.encode_nat_entry(1, flow, ("2001:db8::20", 6000), ("2001:db8::5", 40002), 60, 1))
    assert msg["nfgen_family"] == socket.AF_INET6
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG"))[:2] == ("2001:db8::10", "2001:db8::5")


def test_delete_and_get_name_the_original_tuple():
    for encode, msg_type in ((ctnetlink.encode_delete, ctnetlink.MSG_DELETE), (ctnetlink.encode_get, ctnetlink.MSG_GET)):
        msg = decoded(encode(5, CALLER))
        assert msg["header"]["type"] == msg_type
        assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ("198.51.100.10", "203.0.113.5", 17, 4000, 40000)


def test_a_dump_filters_by_mark_or_takes_everything():
    msg = decoded(ctnetlink.encode_dump(3, 0x4D50))
    assert msg.get_attr("CTA_MARK") == 0x4D50 and msg.get_attr("CTA_MARK_MASK") == 0xFFFFFFFF
    assert decoded(ctnetlink.encode_dump(3, None)).get_attr("CTA_MARK") is None


def kernel_entry(msg_type, orig, reply, counters=((0, 0), (0, 0)), mark=0, seq=0, proto=17):
    """A message as the kernel sends it, built with pyroute2."""
    def tup(flow):
        return {"attrs": [["CTA_TUPLE_IP", {"attrs": [["CTA_IP_V4_SRC", flow.src], ["CTA_IP_V4_DST", flow.dst]]}],
                          ["CTA_TUPLE_PROTO", {"attrs": [["CTA_PROTO_NUM", proto], ["CTA_PROTO_SRC_PORT", flow.sport],
                                                         ["CTA_PROTO_DST_PORT", flow.dport]]}]]}

    def counter(packets, octets):
        return {"attrs": [["CTA_COUNTERS_PACKETS", packets], ["CTA_COUNTERS_BYTES", octets]]}
    msg = nfct_msg()
    msg["header"]["type"] = msg_type
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = socket.AF_INET
    msg["attrs"] = [["CTA_TUPLE_ORIG", tup(orig)], ["CTA_TUPLE_REPLY", tup(reply)],
                    ["CTA_COUNTERS_ORIG", counter(*counters[0])], ["CTA_COUNTERS_REPLY", counter(*counters[1])],
                    ["CTA_MARK", mark], ["CTA_ID", 1234]]
    msg.encode()
    return bytes(msg.data)


def ack(seq, errno):
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -errno) + struct.pack("=IHHII", 0, 0, 0, seq, 0)


def test_entries_acks_and_dones_are_read_from_one_buffer():
    reply = Tuple5("192.0.2.20", "203.0.113.5", 6000, 40002)
    data = (kernel_entry(ctnetlink.MSG_DELETE, CALLER, reply, ((10, 2000), (12, 2400)), mark=0x4D50, seq=4)
            + ack(5, 0) + ack(6, 17) + struct.pack("=IHHII", 20, 3, 2, 7, 0) + b"\0\0\0\0")
    entry, ok, exists, done = ctnetlink.decode_messages(data)
    assert isinstance(entry, Entry) and entry.destroyed
    assert (entry.orig, entry.reply) == (CALLER, reply)
    assert (entry.orig_packets, entry.orig_bytes, entry.reply_packets, entry.reply_bytes) == (10, 2000, 12, 2400)
    assert (entry.mark, entry.id, entry.seq, entry.proto) == (0x4D50, 1234, 4, 17)
    assert ok == Ack(5, 0) and exists == Ack(6, 17) and done == Done(7)


def test_a_truncated_buffer_gives_what_is_whole_and_no_exception():
    data = kernel_entry(ctnetlink.MSG_NEW, CALLER, CALLER.inverse()) + ack(5, 0)
    for cut in range(len(data)):
        ctnetlink.decode_messages(data[:cut])


def test_the_packed_ipv4_delete_is_the_general_one():
    general = ctnetlink._message(ctnetlink.MSG_DELETE, 0x1 | 0x4, 5, socket.AF_INET,
                                 ctnetlink._tuple(ctnetlink.CTA_TUPLE_ORIG, CALLER))
    assert ctnetlink.encode_delete(5, CALLER) == general


def test_a_plain_entry_has_no_nat():
    msg = decoded(ctnetlink.encode_plain_entry(4, CALLER, 30, 0))
    assert msg["header"]["type"] == ctnetlink.MSG_NEW
    assert msg.get_attr("CTA_NAT_DST") is None and msg.get_attr("CTA_NAT_SRC") is None
    assert tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ("203.0.113.5", "198.51.100.10", 17, 40000, 4000)
