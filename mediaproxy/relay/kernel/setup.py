"""Bringing up the kernel path at start, or saying clearly why it cannot be.

The relay arranges what it needs in its network namespace (conntrack
accounting, conntrack and NAT hooks), removes what an earlier run left
(entries with its mark that no restored call claims, inhibitor rules), and then proves that conntrack NAT
applies with a probe packet (FIELD-NOTES 1: listing tables proves nothing).
"""

import errno
import logging
import os
import socket

from mediaproxy.relay.kernel import ctnetlink
from mediaproxy.relay.kernel.conntrack import ConntrackTable
from mediaproxy.relay.kernel.iptables import Iptables, IptablesError
from mediaproxy.relay.kernel.netlink import ConntrackSocket, EventSocket, NetlinkError
from mediaproxy.relay.kernel.prerequisites import missing_prerequisites

log = logging.getLogger("mediaproxy.relay")

CONNTRACK_ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"
PROBE_TIMEOUT = 0.5


class KernelUnavailable(Exception):
    """The kernel path cannot work here; the message says what is missing."""


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise KernelUnavailable("cannot set %s: %s" % (path.replace("/proc/sys/", "").replace("/", "."),
                                                       e.strerror)) from None


def probe_nat(netlink: ConntrackSocket, ip: str, mark: int) -> None:
    """Send a packet to ourselves that only a NAT entry can divert; raise if it is not diverted."""
    sockets = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, 0))
            sockets.append(sock)
        sender, target, diverted = sockets
        sport, dport, nat_port = (s.getsockname()[1] for s in sockets)
        flow = ctnetlink.Tuple5(ip, ip, sport, dport)
        seq = netlink.next_seq()
        errors = netlink.transact([(seq, ctnetlink.encode_nat_entry4(seq, flow, (ip, nat_port), (ip, sport), 5,
                                                                     mark))])["errors"]
        if errors.get(seq):
            raise KernelUnavailable("the kernel refused a conntrack NAT entry: %s" % errno.errorcode.get(
                errors[seq], errors[seq]))
        try:
            sender.sendto(b"mediaproxy probe", (ip, dport))
            diverted.settimeout(PROBE_TIMEOUT)
            try:
                diverted.recv(64)
            except socket.timeout:
                raise KernelUnavailable("conntrack NAT does not apply in this network namespace") from None
        finally:
            seq = netlink.next_seq()
            netlink.transact([(seq, ctnetlink.encode_delete(seq, flow))])
    finally:
        for sock in sockets:
            sock.close()


def make_inhibitor_set(name: str) -> None:
    """The ipset of the NOTRACK inhibitor, created (pyroute2) or emptied of an earlier run's members."""
    from pyroute2 import IPSet
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        sets = IPSet()
        try:
            try:
                sets.create(name, stype="hash:ip,port,ip")
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                sets.flush(name)
        finally:
            sets.close()
    except (NetlinkError, OSError) as e:
        raise KernelUnavailable("cannot make the ipset %s for the NOTRACK inhibitor: %s" % (name, e)) from None


def start_kernel_path(relay_ip: str, mark: int, port_range, keep=frozenset()):
    """(ConntrackTable, EventSocket) ready for use, or KernelUnavailable. `keep`: original
    tuples of entries an earlier run left for the calls this run restores (not leftovers)."""
    if ":" in relay_ip:
        raise KernelUnavailable("the kernel path is for IPv4 relay addresses")
    problems = missing_prerequisites()
    if problems:
        raise KernelUnavailable("; ".join(problems))
    try:
        iptables = Iptables(mark)
        iptables.enable_conntrack_hooks()
        iptables.ensure_traffic_counter()
        stale_rules = iptables.remove_stale_inhibitors()
        inhibitor_set = "mediaproxy-%x" % mark
        make_inhibitor_set(inhibitor_set)
        iptables.ensure_inhibitor_rule(inhibitor_set)
        netlink = ConntrackSocket()
    except IptablesError as e:
        raise KernelUnavailable(str(e)) from None
    except PermissionError:
        raise KernelUnavailable("no permission to use conntrack (needs root or CAP_NET_ADMIN)") from None
    except OSError as e:
        raise KernelUnavailable("no conntrack netlink: %s" % e.strerror) from None
    try:
        if not os.path.exists(CONNTRACK_ACCT):
            raise KernelUnavailable("the kernel has no connection tracking (nf_conntrack) in this network namespace")
        _write(CONNTRACK_ACCT, "1")
        table = ConntrackTable(netlink, iptables, relay_ip, mark, inhibitor_set)
        stale_entries = table.remove_leftovers(port_range, keep)
        if stale_entries or stale_rules:
            log.warning("removed what an earlier run left: %d conntrack entries, %d iptables rules",
                        stale_entries, stale_rules)
        probe_nat(netlink, relay_ip, mark)
        events = EventSocket()
    except (NetlinkError, IptablesError, OSError) as e:
        netlink.close()
        if isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EPERM:
            raise KernelUnavailable("no permission to use conntrack (needs root or CAP_NET_ADMIN)") from None
        raise KernelUnavailable(str(e)) from None
    except KernelUnavailable:
        netlink.close()
        raise
    return table, events
