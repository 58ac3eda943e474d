"""Real network topologies for tests, built from Linux network namespaces.

Layout: a "lan" namespace holds a bridge; every host is a namespace whose
``eth0`` (a veth pair, the other end a port of the bridge) has an address in
198.18.0.0/24 (RFC 2544 benchmarking space), and ``lo`` is up::

    proxy 198.18.0.2    relay1 198.18.0.5    relay2 198.18.0.6
    caller 198.18.0.10  callee 198.18.0.20

Namespaces are named ``mp<pid>-<n>-<host>`` (pid of the test process, n a
counter per process). Creating a topology first removes namespaces of that
scheme whose test process is gone (killing what still runs inside them);
``destroy()`` stops the topology's processes and removes its namespaces, and
runs from ``__exit__`` and the fixtures' teardown, so also after a failure.

Use as a context manager::

    with Topology(["caller", "callee"]) as topo:
        topo.run("caller", ["ping", "-c1", topo.address("callee")])

or through the pytest fixtures (import them into a conftest.py together with
``processes`` and ``pytest_runtest_makereport`` from tests.support.processes):
``make_topology(hosts, sysctls)`` builds topologies torn down after the test,
``topology`` is the full default one.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

from tests.support.processes import Process, ProcessManager, wait_for

__all__ = [
    "ADDRESSES",
    "DEFAULT_HOSTS",
    "DEFAULT_SYSCTLS",
    "NETMASK",
    "CommandError",
    "Topology",
    "run",
    "spawn",
    "socket_in_netns",
    "netns_names",
    "remove_stale_namespaces",
    "unix_connections",
    "wait_for_unix_connections",
    "udp_bound",
    "wait_for_udp_bound",
    "require_root",
    "make_topology",
    "topology",
    "IPV6_ADDRESSES",
    "IPV6_PREFIX",
    "ipv6_sysctls",
]

ADDRESSES: dict[str, str] = {
    "proxy": "198.18.0.2",
    "relay1": "198.18.0.5",
    "relay2": "198.18.0.6",
    "caller": "198.18.0.10",
    "callee": "198.18.0.20",
}
DEFAULT_HOSTS: tuple[str, ...] = tuple(ADDRESSES)
NETMASK = 24
DEFAULT_SYSCTLS: dict[str, dict[str, str]] = {
    "relay1": {"net.ipv4.ip_forward": "1"},
    "relay2": {"net.ipv4.ip_forward": "1"},
}
# Quiet links: no IPv6 router solicitations or MLD reports in the captures.
COMMON_SYSCTLS: dict[str, str] = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}

# IPv6 (documentation prefix), for the topologies that turn it on (see ipv6_sysctls, add_ipv6):
IPV6_ADDRESSES: dict[str, str] = {
    "proxy": "2001:db8:18::2",
    "relay1": "2001:db8:18::5",
    "relay2": "2001:db8:18::6",
    "caller": "2001:db8:18::10",
    "callee": "2001:db8:18::20",
}
IPV6_PREFIX = 64
# IPv6 on, its addresses usable at once (no duplicate address detection), no router solicitations.
IPV6_SYSCTLS: dict[str, str] = {
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}


def ipv6_sysctls(hosts: Iterable[str], extra: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Per host, the sysctls that turn IPv6 on (plus ``extra`` per host), for Topology(sysctls=...)."""
    result = {host: dict(IPV6_SYSCTLS) for host in hosts}
    for host, values in (extra or {}).items():
        result[host].update(values)
    return result


NETNS_DIR = Path("/run/netns")
NAME_RE = re.compile(r"^mp(?P<pid>\d+)-(?P<n>\d+)-(?P<host>[A-Za-z0-9_.-]+)$")
BRIDGE = "br0"
LAN = "lan"

_counter = 0
_counter_lock = threading.Lock()


class CommandError(RuntimeError):
    """A command failed; the message has its argv, status and output."""


def _check(argv: Sequence[str], result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise CommandError(
            f"{' '.join(argv)} exited with {result.returncode}\n"
            f"stdout: {(result.stdout or '').strip()}\nstderr: {(result.stderr or '').strip()}"
        )
    return result


def _host(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a short command in the current (root) namespace."""
    argv = [str(arg) for arg in argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return _check(argv, result) if check else result


def run(
    ns: str, argv: Sequence[str], check: bool = True, timeout: float = 30.0, **kwargs
) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a short command inside namespace ``ns``.

    Output is captured as text unless given otherwise; a failure raises
    CommandError with the output (``check=False`` to inspect it yourself).
    """
    command = ["ip", "netns", "exec", ns, *[str(arg) for arg in argv]]
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run(command, timeout=timeout, **kwargs)
    return _check(command, result) if check else result


def spawn(
    ns: str,
    argv: Sequence[str],
    name: str,
    manager: ProcessManager | None = None,
    log_dir: Path | None = None,
    **kwargs,
) -> Process:
    """Start a long-running process inside ``ns`` (see tests.support.processes).

    With a ``manager`` it is registered there (stopped at teardown, log tail
    on failure); otherwise ``log_dir`` is required and the caller stops it.
    """
    if manager is not None:
        return manager.start(name, argv, netns=ns, **kwargs)
    if log_dir is None:
        raise ValueError("spawn() needs a manager or a log_dir")
    return Process(argv, name, log_dir, netns=ns, **kwargs)


# -- sockets created inside a namespace, from this process --

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def socket_in_netns(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in namespace ``ns``, usable from this process.

    A helper thread joins the namespace (setns affects only that thread) and
    creates the socket; the socket stays in that namespace after the thread
    ends. Lets a test talk to a daemon's TCP or UDP port directly.
    """
    result: dict[str, object] = {}

    def target() -> None:
        try:
            with open(NETNS_DIR / ns) as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({ns}): {os.strerror(errno)}")
            result["socket"] = socket.socket(family, type, proto)
        except BaseException as exc:  # handed to the calling thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]


# -- socket state inside a namespace (ss) --


def unix_connections(ns: str, path: str | Path, peer_command: str | None = None) -> int:
    """Number of accepted connections on the UNIX stream socket ``path`` in ``ns``.

    Counted from ``ss -x``: established sockets whose local address is ``path``
    are the server ends the listener accepted. With ``peer_command``, only
    those whose client end belongs to a process of that name (e.g. "kamailio")
    count.
    """
    output = run(ns, ["ss", "-xHnp", "state", "established"]).stdout
    path = str(path)
    accepted: list[str] = []  # peer inodes of the server ends
    owners: dict[str, set[str]] = {}  # socket inode -> names of processes holding it
    for line in output.splitlines():
        # Netid Recv-Q Send-Q Local-Address Inode Peer-Address Peer-Inode [users:(("name",pid=..,fd=..),...)]
        fields = line.split(None, 7)
        if len(fields) < 7 or fields[0] != "u_str":
            continue
        owners[fields[4]] = set(re.findall(r'\("([^"]+)",pid=', fields[7] if len(fields) > 7 else ""))
        if fields[3] == path:
            accepted.append(fields[6])
    if peer_command is None:
        return len(accepted)
    return sum(1 for peer in accepted if peer_command in owners.get(peer, ()))


def wait_for_unix_connections(
    ns: str, path: str | Path, count: int, peer_command: str | None = None, timeout: float = 15.0
) -> int:
    """Wait until at least ``count`` clients (named ``peer_command``) are connected to ``path``."""

    def enough() -> int:
        connected = unix_connections(ns, path, peer_command)
        return connected if connected >= count else 0

    who = f"{peer_command} " if peer_command else ""
    return wait_for(enough, timeout=timeout, interval=0.1, message=f"{count} {who}connections to {path} in {ns}")


def udp_bound(ns: str, port: int, address: str | None = None) -> bool:
    """Whether a UDP socket is bound to ``port`` (and ``address``) in ``ns``."""
    output = run(ns, ["ss", "-uanH", "sport", "=", f":{port}"]).stdout
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            local_address = fields[3].rsplit(":", 1)[0]
            if address is None or local_address in (address, "0.0.0.0", "*"):
                return True
    return False


def wait_for_udp_bound(ns: str, port: int, address: str | None = None, timeout: float = 10.0) -> None:
    where = f"{address}:{port}" if address else f"port {port}"
    wait_for(lambda: udp_bound(ns, port, address), timeout=timeout, interval=0.05, message=f"UDP {where} bound in {ns}")


# -- namespaces --


def netns_names() -> list[str]:
    try:
        return sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(ns: str) -> list[int]:
    result = _host(["ip", "netns", "pids", ns], check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _kill_netns_processes(ns: str, timeout: float = 5.0) -> None:
    """SIGKILL the processes left inside ``ns`` (our own children or their forks)."""
    pids = _netns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        wait_for(
            lambda: not any(_pid_alive(pid) and not _is_zombie(pid) for pid in pids),
            timeout=timeout,
            interval=0.02,
            message=f"processes {pids} in {ns} to die",
        )


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _delete_netns(ns: str) -> None:
    _kill_netns_processes(ns)
    result = _host(["ip", "netns", "delete", ns], check=False)
    if result.returncode != 0 and (NETNS_DIR / ns).exists():
        raise CommandError(f"ip netns delete {ns} failed: {result.stderr.strip()}")


def remove_stale_namespaces() -> list[str]:
    """Remove namespaces of our naming scheme whose test process is gone."""
    removed = []
    for name in netns_names():
        match = NAME_RE.match(name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or (_pid_alive(pid) and not _is_zombie(pid)):
            continue
        _delete_netns(name)
        removed.append(name)
    return removed


def require_root() -> None:
    """Skip the calling test unless it can build namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    missing = [tool for tool in ("ip", "ss", "setpriv") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


class Topology:
    """Namespaces on one bridged LAN; a context manager.

    ``hosts``: names from ADDRESSES, or a mapping name → IPv4 address.
    ``sysctls``: per host, extra sysctls (``{"relay1": {"net.ipv4.ip_forward": "1"}}``),
    applied over DEFAULT_SYSCTLS.
    ``processes``: the ProcessManager for ``spawn`` (default: one logging to
    ``log_dir``, or a temporary directory).
    """

    def __init__(
        self,
        hosts: Iterable[str] | Mapping[str, str] = DEFAULT_HOSTS,
        sysctls: Mapping[str, Mapping[str, str]] | None = None,
        processes: ProcessManager | None = None,
        log_dir: Path | None = None,
    ) -> None:
        if isinstance(hosts, Mapping):
            self.addresses = dict(hosts)
        else:
            unknown = [host for host in hosts if host not in ADDRESSES]
            if unknown:
                raise ValueError(f"unknown hosts {unknown}; give a mapping name -> address")
            self.addresses = {host: ADDRESSES[host] for host in hosts}
        for host in self.addresses:
            if host == LAN or not re.fullmatch(r"[A-Za-z0-9_.-]{1,13}", host):
                raise ValueError(f"bad host name {host!r}")
        self.sysctls: dict[str, dict[str, str]] = {}
        for host in self.addresses:
            self.sysctls[host] = {**COMMON_SYSCTLS, **DEFAULT_SYSCTLS.get(host, {})}
        for host, values in (sysctls or {}).items():
            if host not in self.addresses:
                raise ValueError(f"sysctls for unknown host {host!r}")
            self.sysctls[host].update({key: str(value) for key, value in values.items()})
        if processes is None:
            if log_dir is None:
                import tempfile

                log_dir = Path(tempfile.mkdtemp(prefix="mp-topology-"))
            processes = ProcessManager(log_dir)
        self.processes = processes
        global _counter
        with _counter_lock:
            _counter += 1
            self.prefix = f"mp{os.getpid()}-{_counter}-"
        self._created: list[str] = []

    # -- names --

    @property
    def hosts(self) -> list[str]:
        return list(self.addresses)

    @property
    def lan(self) -> str:
        return self.prefix + LAN

    def ns(self, host: str) -> str:
        if host != LAN and host not in self.addresses:
            raise KeyError(f"no host {host!r} in this topology ({', '.join(self.addresses)})")
        return self.prefix + host

    def address(self, host: str) -> str:
        return self.addresses[host]

    def address6(self, host: str) -> str:
        """``host``'s IPv6 address (after add_ipv6)."""
        return IPV6_ADDRESSES[host]

    def add_ipv6(self) -> None:
        """Give every host its IPv6 address on eth0 (IPv6 must be on: see ipv6_sysctls), usable at once."""
        for host in self.addresses:
            _host(["ip", "-n", self.ns(host), "addr", "add", f"{IPV6_ADDRESSES[host]}/{IPV6_PREFIX}", "dev", "eth0",
                   "nodad"])

    # -- life cycle --

    def __enter__(self) -> "Topology":
        self.create()
        return self

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    def create(self) -> "Topology":
        remove_stale_namespaces()
        try:
            self._add_netns(self.lan)
            lan = self.lan
            _host(["ip", "-n", lan, "link", "set", "lo", "up"])
            _host(["ip", "-n", lan, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            _host(["ip", "-n", lan, "link", "set", BRIDGE, "up"])
            for host, address in self.addresses.items():
                ns = self.ns(host)
                self._add_netns(ns)
                for key, value in self.sysctls[host].items():
                    self.sysctl(host, key, value)
                port = f"v-{host}"
                _host(["ip", "-n", lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
                _host(["ip", "-n", lan, "link", "set", port, "master", BRIDGE, "up"])
                _host(["ip", "-n", ns, "addr", "add", f"{address}/{NETMASK}", "dev", "eth0"])
                _host(["ip", "-n", ns, "link", "set", "eth0", "up"])
                _host(["ip", "-n", ns, "link", "set", "lo", "up"])
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_netns(self, ns: str) -> None:
        _host(["ip", "netns", "add", ns])
        self._created.append(ns)

    def destroy(self) -> None:
        """Stop this topology's processes and delete its namespaces (idempotent)."""
        errors: list[BaseException] = []
        try:
            self.processes.stop_all(netns=self._created)
        except Exception as exc:  # go on removing namespaces
            errors.append(exc)
        for ns in reversed(self._created):
            try:
                _delete_netns(ns)
            except Exception as exc:
                errors.append(exc)
        self._created = [ns for ns in self._created if (NETNS_DIR / ns).exists()]
        if errors:
            raise errors[0]

    # -- working inside --

    def sysctl(self, host: str, key: str, value: str | int) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(host, ["sh", "-c", f'echo {value} > "$0"', path])

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return run(self.ns(host), argv, **kwargs)

    def spawn(self, host: str, argv: Sequence[str], name: str | None = None, **kwargs) -> Process:
        return spawn(self.ns(host), argv, name or f"{host}-{Path(str(argv[0])).name}", manager=self.processes, **kwargs)

    def socket(self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket_in_netns(self.ns(host), family, type)

    def ping(self, source: str, destination: str, timeout: float = 5.0) -> None:
        """Wait until a UDP datagram from ``source`` reaches host ``destination``."""
        target = self.address(destination)
        with self.socket(destination, type=socket.SOCK_DGRAM) as receiver, self.socket(
            source, type=socket.SOCK_DGRAM
        ) as sender:
            receiver.bind((target, 0))
            receiver.settimeout(0.2)
            probe = f"probe {self.prefix}{source}".encode()

            def reached() -> bool:
                sender.sendto(probe, receiver.getsockname())
                data, _ = receiver.recvfrom(2048)
                return data == probe

            message = f"{source} to reach {destination} ({target})"
            wait_for(reached, timeout=timeout, interval=0.0, ignore=(OSError,), message=message)


# -- pytest fixtures --


@pytest.fixture
def make_topology(processes: ProcessManager):
    """Factory ``make_topology(hosts=DEFAULT_HOSTS, sysctls=None) -> Topology``.

    Every topology it made is destroyed at teardown, even if the test failed.
    """
    require_root()
    made: list[Topology] = []

    def factory(
        hosts: Iterable[str] | Mapping[str, str] = DEFAULT_HOSTS,
        sysctls: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Topology:
        topology = Topology(hosts, sysctls, processes=processes)
        made.append(topology)
        return topology.create()

    try:
        yield factory
    finally:
        errors = []
        for topology in reversed(made):
            try:
                topology.destroy()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def topology(make_topology) -> Topology:
    """The full default topology (proxy, relay1, relay2, caller, callee)."""
    return make_topology()
