"""ipset netlink messages for the inhibitor set, encoded without I/O.

The set (type hash:ip,port,ip; one of family inet for IPv4 flows, one of
family inet6 for IPv6 ones) holds (source address, destination port,
destination address) of UDP flows: while a flow is a member, one NOTRACK
rule keeps its packets out of conntrack. Adding and removing members are
netlink messages like ctnetlink's, so they go in the same batches.
"""

import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET

from mediaproxy.relay.kernel.ctnetlink import NET_PORT, packed_ipv4

IPSET_CMD_FLUSH, IPSET_CMD_ADD, IPSET_CMD_DEL = 4, 9, 10
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA, IPSET_ATTR_ADT, IPSET_ATTR_LINENO = 1, 2, 7, 8, 9
IPSET_ATTR_IP, IPSET_ATTR_PORT, IPSET_ATTR_PROTO, IPSET_ATTR_IP2 = 1, 4, 7, 20
IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6 = 1, 2
IPSET_PROTOCOL = 6          # the oldest protocol version current kernels take (they speak 6 and 7)
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000

_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(command: int, seq: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(socket.AF_INET, 0, 0) + body
    return _HEADER.pack(_HEADER.size + len(payload), (NFNL_SUBSYS_IPSET << 8) | command,
                        NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload


def _head(name: str) -> bytes:
    return _attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])) + _attr(IPSET_ATTR_SETNAME, name.encode() + b"\0")


MAX_MEMBERS = 500            # members in one message (one message must stay well inside a netlink batch)


# One member of an IPv4 set, packed at once (the layout of _data_general for IPv4).
_DATA4 = struct.Struct("=HH" "HHHH4s" "HHH2x" "HHB3x" "HHHH4s")


def _data(flow) -> bytes:
    if ":" not in flow.src:
        return _DATA4.pack(44, IPSET_ATTR_DATA | NLA_F_NESTED,
                           12, IPSET_ATTR_IP | NLA_F_NESTED, 8, IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
                           packed_ipv4(flow.src),
                           6, IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, NET_PORT[flow.dport],
                           5, IPSET_ATTR_PROTO, socket.IPPROTO_UDP,
                           12, IPSET_ATTR_IP2 | NLA_F_NESTED, 8, IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
                           packed_ipv4(flow.dst))
    return _data_general(flow)


def _data_general(flow) -> bytes:
    """A member of the set of the flow's IP version (an IPv6 flow goes to the relay's inet6 set)."""
    if ":" in flow.src:
        family, kind = socket.AF_INET6, IPSET_ATTR_IPADDR_IPV6
    else:
        family, kind = socket.AF_INET, IPSET_ATTR_IPADDR_IPV4
    return _attr(IPSET_ATTR_DATA | NLA_F_NESTED,
                 _attr(IPSET_ATTR_IP | NLA_F_NESTED,
                       _attr(kind | NLA_F_NET_BYTEORDER, socket.inet_pton(family, flow.src)))
                 + _attr(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack(">H", flow.dport))
                 + _attr(IPSET_ATTR_PROTO, bytes([socket.IPPROTO_UDP]))
                 + _attr(IPSET_ATTR_IP2 | NLA_F_NESTED,
                         _attr(kind | NLA_F_NET_BYTEORDER, socket.inet_pton(family, flow.dst))))


class Members:
    """Flows encoded once as set members, for the add and the delete of a hand-over."""

    __slots__ = ("count", "data")

    def __init__(self, flows):
        encoded = [_data(flow) for flow in flows]
        self.count = len(encoded)
        self.data = b"".join(encoded)


def _members(command: int, seq: int, name: str, members: Members) -> bytes:
    """One message for several members: the kernel takes a list of them (IPSET_ATTR_ADT), as for restore."""
    if members.count == 1:
        return _message(command, seq, _head(name) + members.data)
    # the kernel wants a line number with a list (restore reports errors by line)
    return _message(command, seq, _head(name) + _attr(IPSET_ATTR_LINENO, struct.pack("=I", 0))
                    + _attr(IPSET_ATTR_ADT | NLA_F_NESTED, members.data))


def encode_add(seq: int, name: str, flows) -> bytes:
    """Hold these flows' packets out of conntrack (a member added twice is no error).
    ``flows``: flows, or Members made of them."""
    return _members(IPSET_CMD_ADD, seq, name, flows if isinstance(flows, Members) else Members(flows))


def encode_del(seq: int, name: str, flows) -> bytes:
    return _members(IPSET_CMD_DEL, seq, name, flows if isinstance(flows, Members) else Members(flows))


def encode_flush(seq: int, name: str) -> bytes:
    return _message(IPSET_CMD_FLUSH, seq, _head(name))
