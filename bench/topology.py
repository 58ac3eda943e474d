"""The benchmark's network: three namespaces, the relay routing between them.

    caller 198.18.1.10/24 --eth0 == to-caller-- relay --to-callee== eth0-- callee 198.18.2.20/24
                                   198.18.1.1/24      198.18.2.1/24

Every path the benchmarks compare crosses the relay namespace the same way
(in on ``to-caller``, out on ``to-callee``):
- plain forwarding: caller -> callee's own address, routed by the relay;
- a conntrack NAT entry: caller -> 198.18.1.1:A, rewritten by the relay's
  kernel into 198.18.1.1:B -> callee:Y (the relay's address is that of its
  caller-facing interface; the callee reaches it through its default route).

Namespaces are named ``mpb<pid>-<host>`` after the benchmark process, so a
new run removes those of dead runs (and what still runs in them) first;
``destroy()`` removes this run's, also after a failure. The scheme differs
from the tests' (``mp<pid>-<n>-<host>``), so neither removes the other's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

NETNS_DIR = Path("/run/netns")
NAME_RE = re.compile(r"^mpb(?P<pid>\d+)-(?P<host>[a-z]+)$")

CALLER_IP = "198.18.1.10"
CALLEE_IP = "198.18.2.20"
RELAY_CALLER_SIDE = "198.18.1.1"
RELAY_CALLEE_SIDE = "198.18.2.1"
RELAY_IP = RELAY_CALLER_SIDE          # the relay's address in every scenario
RELAY_IN = "to-caller"                # the relay's interfaces
RELAY_OUT = "to-callee"
HOSTS = ("caller", "relay", "callee")

QUIET_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}


class CommandError(RuntimeError):
    pass


def host_run(argv: Sequence[str], check: bool = True, timeout: float = 30.0, input: str | None = None):
    argv = [str(arg) for arg in argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise CommandError(f"{' '.join(argv)} exited with {result.returncode}: "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _delete_netns(name: str) -> None:
    """Kill what runs inside (only this benchmark's children ever do), then delete it."""
    pids = [int(p) for p in host_run(["ip", "netns", "pids", name], check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
        time.sleep(0.02)
    host_run(["ip", "netns", "delete", name], check=False)


def remove_stale_namespaces() -> list[str]:
    removed = []
    try:
        names = sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for name in names:
        match = NAME_RE.match(name)
        if match and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"])):
            _delete_netns(name)
            removed.append(name)
    return removed


class RoutedTopology:
    """caller -- relay -- callee; a context manager that always cleans up."""

    def __init__(self) -> None:
        self.prefix = f"mpb{os.getpid()}-"
        self.created: list[str] = []
        self.addresses = {"caller": CALLER_IP, "callee": CALLEE_IP, "relay": RELAY_IP}

    def ns(self, host: str) -> str:
        return self.prefix + host

    def __enter__(self) -> "RoutedTopology":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        remove_stale_namespaces()
        try:
            for host in HOSTS:
                host_run(["ip", "netns", "add", self.ns(host)])
                self.created.append(self.ns(host))
                host_run(["ip", "-n", self.ns(host), "link", "set", "lo", "up"])
                for key, value in QUIET_SYSCTLS.items():
                    self.sysctl(host, key, value)
            relay = self.ns("relay")
            host_run(["ip", "link", "add", "mpb-c", "netns", self.ns("caller"), "type", "veth",
                      "peer", "name", RELAY_IN, "netns", relay])
            host_run(["ip", "link", "add", "mpb-d", "netns", self.ns("callee"), "type", "veth",
                      "peer", "name", RELAY_OUT, "netns", relay])
            for host, link, address, gateway in (("caller", "mpb-c", CALLER_IP, RELAY_CALLER_SIDE),
                                                 ("callee", "mpb-d", CALLEE_IP, RELAY_CALLEE_SIDE)):
                ns = self.ns(host)
                host_run(["ip", "-n", ns, "link", "set", link, "name", "eth0"])
                host_run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
                host_run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                host_run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
            for link, address in ((RELAY_IN, RELAY_CALLER_SIDE), (RELAY_OUT, RELAY_CALLEE_SIDE)):
                host_run(["ip", "-n", relay, "addr", "add", f"{address}/24", "dev", link])
                host_run(["ip", "-n", relay, "link", "set", link, "up"])
            self.sysctl("relay", "net.ipv4.ip_forward", "1")
            # the relay's own outgoing connections (TLS to the dispatcher) stay
            # out of the media port ranges the benchmarks use
            self.sysctl("relay", "net.ipv4.ip_local_port_range", "60000 64999")
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        for name in reversed(self.created):
            _delete_netns(name)
        self.created = [name for name in self.created if (NETNS_DIR / name).exists()]

    # -- inside --

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *[str(arg) for arg in argv]]

    def run(self, host: str, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        return host_run(self.command(host, argv), check=check, timeout=timeout, input=input)

    def sysctl(self, host: str, key: str, value: str) -> None:
        path = Path("/proc/sys") / key.replace(".", "/")
        self.run(host, ["sh", "-c", 'echo "$1" > "$0"', path, value])

    def read_sysctl(self, host: str, key: str) -> str:
        return self.run(host, ["cat", Path("/proc/sys") / key.replace(".", "/")]).stdout.strip()

    def mac(self, host: str, link: str) -> str:
        info = json.loads(host_run(["ip", "-n", self.ns(host), "-j", "link", "show", link]).stdout)
        return info[0]["address"]

    def link_stats(self, host: str, link: str) -> dict:
        info = json.loads(host_run(["ip", "-n", self.ns(host), "-j", "-s", "link", "show", link]).stdout)
        return info[0]["stats64"]

    def ping(self, timeout: float = 5.0) -> None:
        """A UDP datagram each way between caller and callee through the relay
        (which also resolves every neighbour on the path)."""
        import socket

        from tests.support.netns import socket_in_netns

        for source, destination, address in (("caller", "callee", CALLEE_IP), ("callee", "caller", CALLER_IP)):
            with socket_in_netns(self.ns(destination), type=socket.SOCK_DGRAM) as receiver, \
                    socket_in_netns(self.ns(source), type=socket.SOCK_DGRAM) as sender:
                receiver.bind((address, 0))
                receiver.settimeout(0.2)
                deadline = time.monotonic() + timeout
                while True:
                    sender.sendto(b"mpb probe", receiver.getsockname())
                    try:
                        if receiver.recv(64) == b"mpb probe":
                            break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise CommandError(f"{source} cannot reach {destination} through the relay")
