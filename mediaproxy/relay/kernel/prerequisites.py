"""What the kernel path needs from the host, checked before touching it.

Each check returns what is missing in words an operator can act on, or
None. `missing_prerequisites()` runs them all, so one log line names every
problem at once instead of one per restart. The readers are parameters so
that the checks can be tested without the host having the problem.
"""

import os
import re
from typing import Callable, List, Optional

MINIMUM_KERNEL = (4, 19)
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
IPV6_FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"


def read_file(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def check_kernel(system: str, release: str) -> Optional[str]:
    if system != "Linux":
        return "the kernel path needs Linux (this is %s)" % system
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None or (int(match[1]), int(match[2])) < MINIMUM_KERNEL:
        return "the kernel path needs Linux %d.%d or newer (this is %s)" % (*MINIMUM_KERNEL, release)
    return None


def effective_capabilities(status: Optional[str]) -> int:
    """The CapEff mask of a /proc/<pid>/status text (0 when unknown)."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status or "", re.MULTILINE)
    return int(match[1], 16) if match else 0


def check_privileges(status: Optional[str]) -> Optional[str]:
    capabilities = effective_capabilities(status)
    missing = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW))
               if not capabilities & (1 << bit)]
    if missing:
        return ("the kernel path needs %s (run media-relay as root, or as its systemd unit does)"
                % " and ".join(missing))
    return None


def check_iptables_libraries(load: Callable[[], object]) -> Optional[str]:
    try:
        load()
    except Exception as e:      # python-iptables loads libxtables and libiptc when imported
        return "the iptables libraries cannot be loaded (install iptables and python3-iptables): %s" % e
    return None


def check_ip_forward(value: Optional[str]) -> Optional[str]:
    if value is None:
        return "%s cannot be read (no IPv4 forwarding in this kernel?)" % IP_FORWARD
    if value.strip() != "1":
        return ("net.ipv4.ip_forward is %s, the kernel must forward the relayed packets "
                "(sysctl -w net.ipv4.ip_forward=1)" % value.strip())
    return None


def check_ipv6_forwarding(value: Optional[str]) -> Optional[str]:
    if value is None:
        return "%s cannot be read (IPv6 is off in this kernel or network namespace?)" % IPV6_FORWARDING
    if value.strip() != "1":
        return ("net.ipv6.conf.all.forwarding is %s, the kernel must forward the relayed IPv6 packets "
                "(sysctl -w net.ipv6.conf.all.forwarding=1; a forwarding host ignores router "
                "advertisements unless accept_ra = 2)" % value.strip())
    return None


def missing_forwarding(ip_version: int, read=read_file) -> Optional[str]:
    """What the kernel lacks to forward the relayed packets of that IP version, or None."""
    if ip_version == 6:
        return check_ipv6_forwarding(read(IPV6_FORWARDING))
    return check_ip_forward(read(IP_FORWARD))


def _load_iptc():
    import iptc  # noqa: F401


def missing_prerequisites(uname=os.uname, read=read_file, load_iptables=_load_iptc, ip_versions=(4,)) -> List[str]:
    """Every prerequisite the host lacks, in words; empty when all are there. `ip_versions`:
    whose forwarding is checked (see missing_forwarding; () for the common ones only)."""
    system = uname()
    problems = [check_kernel(system.sysname, system.release)]
    if problems[0] is None:
        problems += [check_privileges(read("/proc/self/status")),
                     check_iptables_libraries(load_iptables)]
        problems += [missing_forwarding(version, read) for version in ip_versions]
    return [problem for problem in problems if problem]
