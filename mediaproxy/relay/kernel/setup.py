"""Bringing up the kernel path at start, or saying clearly why it cannot be.

The relay arranges what it needs in its network namespace (conntrack
accounting, conntrack and NAT hooks), removes what an earlier run left
(entries with its mark that no restored call claims, inhibitor rules), and then proves that conntrack NAT
applies with a probe packet (FIELD-NOTES 1: listing tables proves nothing).

Each IP version of the relay's addresses comes up on its own (its
forwarding sysctl, its iptables or ip6tables rules, its inhibitor set, its
probe): a version that cannot is relayed in user space, the others by the
kernel. Only when none can is the kernel path unavailable.
"""

import errno
import logging
import os
import socket

from mediaproxy.relay.forwarding import addresses_by_version
from mediaproxy.relay.kernel import ctnetlink
from mediaproxy.relay.kernel.conntrack import ConntrackTable
from mediaproxy.relay.kernel.iptables import Iptables, IptablesError
from mediaproxy.relay.kernel.netlink import ConntrackSocket, EventSocket, NetlinkError
from mediaproxy.relay.kernel.prerequisites import missing_forwarding, missing_prerequisites

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
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    encode = ctnetlink.encode_nat_entry if family == socket.AF_INET6 else ctnetlink.encode_nat_entry4
    sockets = []
    try:
        for _ in range(3):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((ip, 0))
            sockets.append(sock)
        sender, target, diverted = sockets
        sport, dport, nat_port = (s.getsockname()[1] for s in sockets)
        flow = ctnetlink.Tuple5(ip, ip, sport, dport)
        seq = netlink.next_seq()
        errors = netlink.transact([(seq, encode(seq, flow, (ip, nat_port), (ip, sport), 5, mark))])["errors"]
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


def inhibitor_set_name(mark: int, ip_version: int = 4) -> str:
    return ("mediaproxy-%x" if ip_version == 4 else "mediaproxy6-%x") % mark


def make_inhibitor_set(name: str, ip_version: int = 4) -> None:
    """The ipset of the NOTRACK inhibitor, created (pyroute2) or emptied of an earlier run's members."""
    from pyroute2 import IPSet
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        sets = IPSet()
        try:
            try:
                sets.create(name, stype="hash:ip,port,ip",
                            family=socket.AF_INET6 if ip_version == 6 else socket.AF_INET)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
                sets.flush(name)
        finally:
            sets.close()
    except (NetlinkError, OSError) as e:
        raise KernelUnavailable("cannot make the ipset %s for the NOTRACK inhibitor: %s" % (name, e)) from None


def _start_version(netlink: ConntrackSocket, ip_version: int, ip: str, mark: int):
    """One IP version's part of the kernel path: (its Iptables, its inhibitor set, stale rules removed)."""
    problem = missing_forwarding(ip_version)
    if problem:
        raise KernelUnavailable(problem)
    try:
        iptables = Iptables(mark, ip_version)
        iptables.enable_conntrack_hooks()
        iptables.ensure_traffic_counter()
        stale_rules = iptables.remove_stale_inhibitors()
        inhibitor_set = inhibitor_set_name(mark, ip_version)
        make_inhibitor_set(inhibitor_set, ip_version)
        iptables.ensure_inhibitor_rule(inhibitor_set)
        probe_nat(netlink, ip, mark)
    except IptablesError as e:
        raise KernelUnavailable(str(e)) from None
    except (NetlinkError, OSError) as e:
        if isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EPERM:
            raise KernelUnavailable("no permission to use conntrack (needs root or CAP_NET_ADMIN)") from None
        raise KernelUnavailable(str(e)) from None
    return iptables, inhibitor_set, stale_rules


def start_kernel_path(relay_ip, mark: int, port_range, keep=frozenset()):
    """(ConntrackTable, EventSocket) ready for use, or KernelUnavailable. `relay_ip`: the relay's
    address or its addresses by IP version. The table's `versions` are the IP versions the kernel
    relays, its `unavailable` says why each other one is not (when none is: KernelUnavailable).
    `keep`: original tuples of entries an earlier run left for the calls this run restores (not leftovers)."""
    addresses = addresses_by_version(relay_ip)
    problems = missing_prerequisites(ip_versions=())
    if problems:
        raise KernelUnavailable("; ".join(problems))
    try:
        netlink = ConntrackSocket()
    except PermissionError:
        raise KernelUnavailable("no permission to use conntrack (needs root or CAP_NET_ADMIN)") from None
    except OSError as e:
        raise KernelUnavailable("no conntrack netlink: %s" % e.strerror) from None
    try:
        if not os.path.exists(CONNTRACK_ACCT):
            raise KernelUnavailable("the kernel has no connection tracking (nf_conntrack) in this network namespace")
        _write(CONNTRACK_ACCT, "1")
        iptables, inhibitor_sets, unavailable, stale_rules = {}, {}, {}, 0
        for version, ip in sorted(addresses.items()):
            try:
                iptables[version], inhibitor_sets[version], stale = _start_version(netlink, version, ip, mark)
            except KernelUnavailable as e:
                unavailable[version] = str(e)
                continue
            stale_rules += stale
        if not iptables:
            if len(unavailable) == 1:
                raise KernelUnavailable(next(iter(unavailable.values())))
            raise KernelUnavailable("; ".join("IPv%d: %s" % item for item in sorted(unavailable.items())))
        table = ConntrackTable(netlink, iptables, addresses, mark, inhibitor_sets)
        table.unavailable = unavailable
        stale_entries = table.remove_leftovers(port_range, keep)
        if stale_entries or stale_rules:
            log.warning("removed what an earlier run left: %d conntrack entries, %d iptables rules",
                        stale_entries, stale_rules)
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
