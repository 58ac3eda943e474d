"""The pieces of an end-to-end call: Kamailio, sipp user agents, tcpdump.

Everything runs inside the namespaces of a ``tests.support.netns.Topology``
and is started through its ProcessManager (own process group, death signal,
log file; stopped at teardown).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Topology, wait_for_udp_bound, wait_for_unix_connections
from tests.support.pcap import Sdp, UdpPacket, parse_rtp, parse_sdp, read_udp_packets
from tests.support.processes import Process, wait_for

HERE = Path(__file__).resolve().parent
KAMAILIO_TEMPLATE = HERE / "kamailio.cfg"
SCENARIOS = HERE / "scenarios"
UAC_SCENARIO = SCENARIOS / "uac.xml"
UAS_SCENARIO = SCENARIOS / "uas.xml"

SIP_PORT = 5060
MEDIA_PORT = 6000  # sipp binds MEDIA_PORT and MEDIA_PORT + 2
KAMAILIO_CHILDREN = 2  # children= in kamailio.cfg: the workers that connect to the dispatcher


# -- Kamailio --


def render_kamailio_cfg(
    path: Path,
    listen_ip: str,
    rundir: Path,
    dispatcher_socket: Path | None = None,
    listen_port: int = SIP_PORT,
) -> Path:
    """Write the config from the template; MediaProxy is engaged iff ``dispatcher_socket``."""
    defines = "#!define WITH_MEDIAPROXY" if dispatcher_socket is not None else "# without MediaProxy"
    return fill_template(KAMAILIO_TEMPLATE, path, {
        "DEFINES": defines,
        "LISTEN_IP": listen_ip,
        "LISTEN_PORT": str(listen_port),
        "RUNDIR": str(rundir),
        "DISPATCHER_SOCKET": str(dispatcher_socket or ""),
    })


def fill_template(template: Path, path: Path, values: dict[str, str]) -> Path:
    """``path``: the text of ``template`` with every ``@KEY@`` replaced; a key left is an error."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"placeholders left in {template}: {left}")
    path.write_text(text)
    return path


def start_kamailio(
    topology: Topology,
    workdir: Path,
    host: str = "proxy",
    dispatcher_socket: Path | None = None,
    timeout: float = 15.0,
    listen_ip: str | None = None,
) -> Process:
    """Start Kamailio in the foreground in ``host``; return once it serves SIP.

    With ``dispatcher_socket`` (the dispatcher must already listen there) it
    also waits until every worker has connected to it: the workers connect
    only at start and then retry every ~10 s.
    """
    rundir = kamailio_rundir(workdir)
    rundir.mkdir(parents=True, exist_ok=True)
    listen_ip = listen_ip or topology.address(host)       # an IPv6 one in brackets: [2001:db8:18::2]
    config = render_kamailio_cfg(rundir / "kamailio.cfg", listen_ip, rundir, dispatcher_socket)
    process = topology.spawn(
        host,
        ["kamailio", "-DD", "-E", "-m", "64", "-M", "8", "-f", config, "-Y", rundir],
        name="kamailio",
    )
    try:
        wait_for_udp_bound(topology.ns(host), SIP_PORT, listen_ip, timeout=timeout)
        if dispatcher_socket is not None:
            wait_for_unix_connections(
                topology.ns(host), dispatcher_socket, KAMAILIO_CHILDREN, peer_command="kamailio", timeout=timeout
            )
    except AssertionError:
        process.assert_running()
        raise
    process.assert_running()
    return process


_rpc_requests = itertools.count(1)


def kamailio_rpc(rundir: Path, method: str, *params: object, timeout: float = 3.0) -> object:
    """Call a Kamailio RPC (e.g. ``dlg.list``, ``dlg.end_dlg``) over the jsonrpcs
    datagram socket in ``rundir``; its result, or RuntimeError with the error."""
    number = next(_rpc_requests)
    request = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": number}
    client_path = Path(rundir) / f"rpc-{os.getpid()}-{number}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(client_path))
        try:
            sock.settimeout(timeout)
            sock.sendto(json.dumps(request).encode(), str(Path(rundir) / "kamailio_rpc.sock"))
            reply = json.loads(sock.recv(65536))
        finally:
            client_path.unlink(missing_ok=True)
    if "error" in reply:
        raise RuntimeError(f"{method}{list(params)}: {reply['error']}")
    return reply.get("result")


def kamailio_rundir(workdir: Path) -> Path:
    return workdir / "kamailio"


# -- sipp --


@dataclass
class UserAgent:
    """A sipp user agent and the files it writes."""

    process: Process
    messages: Path
    errors: Path
    host: str
    address: str

    def received(self) -> list[str]:
        return [text for direction, text in sipp_messages(self.messages) if direction == "received"]

    def received_sdp(self) -> Sdp:
        """The SDP of the first received message that has one."""
        for text in self.received():
            if re.search(r"^\s*m=", text, re.MULTILINE):
                return parse_sdp(text)
        raise AssertionError(f"{self.host} received no SDP; messages:\n{self.messages.read_text(errors='replace')}")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def error_log(self) -> str:
        try:
            return self.errors.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def assert_succeeded(self) -> None:
        status = self.process.poll()
        if status != 0:
            raise AssertionError(
                f"sipp on {self.host} exited with {status}\n"
                f"errors:\n{self.error_log()}\nlog:\n{self.process.tail()}"
            )


def _sipp(
    topology: Topology,
    host: str,
    workdir: Path,
    scenario: Path,
    extra: list[str],
    name: str,
    timeout: float,
    address: str | None = None,
) -> UserAgent:
    address = address or topology.address(host)
    workdir.mkdir(parents=True, exist_ok=True)
    messages = workdir / f"{name}-messages.log"
    errors = workdir / f"{name}-errors.log"
    argv = [
        "sipp",
        "-sf", scenario,
        "-i", address,
        "-p", str(SIP_PORT),
        "-mi", address,
        "-mp", str(MEDIA_PORT),
        "-m", "1",
        "-timeout", f"{int(timeout)}s",
        "-timeout_error",
        "-nostdin",
        "-trace_msg", "-message_file", messages,
        "-trace_err", "-error_file", errors,
        *extra,
    ]  # fmt: skip
    process = topology.spawn(host, argv, name=name, cwd=workdir)
    return UserAgent(process, messages, errors, host, address)


def start_uas(
    topology: Topology, workdir: Path, host: str = "callee", timeout: float = 30.0, address: str | None = None
) -> UserAgent:
    """The answering sipp (on ``address``, default the host's IPv4 one); returns once it listens for SIP."""
    agent = _sipp(topology, host, workdir, UAS_SCENARIO, [], f"sipp-uas-{host}", timeout, address)
    try:
        bound = f"[{agent.address}]" if ":" in agent.address else agent.address
        wait_for_udp_bound(topology.ns(host), SIP_PORT, bound, timeout=10)
    except AssertionError:
        agent.process.assert_running()
        raise
    return agent


def start_uac(
    topology: Topology,
    workdir: Path,
    host: str = "caller",
    proxy: str = "proxy",
    callee: str = "callee",
    duration_ms: int = 4000,
    timeout: float = 30.0,
    ipv6: bool = False,
) -> UserAgent:
    """The calling sipp: INVITE to the proxy for sip:service@<callee>, media for ``duration_ms``;
    with ``ipv6``, SIP and media on the hosts' IPv6 addresses (Topology.add_ipv6)."""
    if ipv6:
        address, callee_host, proxy_host = (topology.address6(host), f"[{topology.address6(callee)}]",
                                            f"[{topology.address6(proxy)}]")
    else:
        address, callee_host, proxy_host = None, topology.address(callee), topology.address(proxy)
    extra = [
        "-key", "request_uri", f"sip:service@{callee_host}:{SIP_PORT}",
        "-d", str(duration_ms),
        f"{proxy_host}:{SIP_PORT}",
    ]  # fmt: skip
    return _sipp(topology, host, workdir, UAC_SCENARIO, extra, f"sipp-uac-{host}", timeout, address)


_TRACE_HEADER = re.compile(
    r"^-{20,} [^\n]*\n(?P<transport>\w+) message (?P<direction>sent|received)[^\n]*:\n\n",
    re.MULTILINE,
)


def sipp_messages(path: Path) -> list[tuple[str, str]]:
    """(``sent``|``received``, message text) from a sipp ``-trace_msg`` file."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    headers = list(_TRACE_HEADER.finditer(text))
    messages = []
    for header, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(text)
        messages.append((header["direction"], text[header.end() : end].strip("\n") + "\n"))
    return messages


def sip_header(message: str, name: str) -> str:
    """The value of the first header ``name`` of a SIP message (full names only)."""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*?)\s*$", message, re.MULTILINE | re.IGNORECASE)
    if match is None:
        raise LookupError(f"no {name} header in:\n{message}")
    return match.group(1)


# -- tcpdump --


class Capture:
    """tcpdump of UDP on ``eth0`` of a host, written to a pcap file.

    In immediate mode: otherwise the kernel hands packets over in blocks and
    the last fraction of a second before ``stop()`` may never reach the file.
    """

    def __init__(self, topology: Topology, host: str, path: Path, bpf: str = "udp") -> None:
        self.path = path
        self.host = host
        self.process = topology.spawn(
            host,
            ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-Z", "root", "-s", "0", "-w", path, bpf],
            name=f"tcpdump-{host}",
        )
        self.process.wait_for_log(r"listening on eth0", timeout=10)

    def stop(self) -> list[UdpPacket]:
        self.process.stop()
        return read_udp_packets(self.path)


def rtp_sources(packets: list[UdpPacket], destination: str) -> Counter:
    """(source ``ip:port``, payload type) → number of RTP packets sent to ``destination``."""
    sources: Counter = Counter()
    for packet in packets:
        rtp = parse_rtp(packet.payload)
        if packet.destination == destination and rtp is not None:
            sources[(packet.source, rtp.payload_type)] += 1
    return sources


# -- MediaProxy daemons --

ROOT = HERE.parents[1]
DISPATCHER_SCRIPT = ROOT / "scripts" / "media-dispatcher"
RELAY_SCRIPT = ROOT / "scripts" / "media-relay"
DISPATCHER_PORT = 25060
MANAGEMENT_PORT = 25061


def write_config(directory: Path, sections: dict[str, dict[str, object]]) -> Path:
    """``directory/config.ini`` with the given sections and keys."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    path = directory / "config.ini"
    path.write_text("\n".join(lines))
    return path


@dataclass
class Daemon:
    process: Process
    config_dir: Path
    runtime_dir: Path


def _daemon(
    topology: Topology, host: str, script: Path, name: str, workdir: Path, sections, arguments=(), wrapper=()
) -> Daemon:
    # Short paths: a UNIX socket path has at most 107 bytes.
    config_dir = workdir / name.removeprefix("media-")
    runtime_dir = config_dir / "run"
    write_config(config_dir, sections)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    argv = [*wrapper, sys.executable, script, *arguments, "--config-dir", config_dir, "--runtime-dir", runtime_dir,
            "--no-fork"]
    return Daemon(topology.spawn(host, argv, name=name), config_dir, runtime_dir)


def start_dispatcher(
    topology: Topology,
    workdir: Path,
    certs_path: Path,
    host: str = "proxy",
    extra: dict[str, dict[str, object]] | None = None,
    script: Path = DISPATCHER_SCRIPT,
    arguments: tuple[str, ...] = (),
) -> Daemon:
    """media-dispatcher in ``host``: proxy socket ``<runtime>/dispatcher.sock``,
    relays on ``ADDRESS:25060``, plain-TCP management on ``ADDRESS:25061``.
    Returns once all three listen. ``script`` (with ``arguments`` before the
    usual options) may be a wrapper that runs the dispatcher with additions."""
    address = topology.address(host)
    sections: dict[str, dict[str, object]] = {
        "Dispatcher": {
            "socket_path": "dispatcher.sock",
            "listen": f"{address}:{DISPATCHER_PORT}",
            "listen_management": f"{address}:{MANAGEMENT_PORT}",
            "management_use_tls": "no",
            "log_level": "debug",
        },
        "TLS": {"certs_path": certs_path},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    daemon = _daemon(topology, host, script, "media-dispatcher", workdir, sections, arguments)
    daemon.process.wait_for_log(r"listening for the proxy on ", timeout=15)
    return daemon


def dispatcher_socket(daemon: Daemon) -> Path:
    return daemon.runtime_dir / "dispatcher.sock"


def start_relay(
    topology: Topology,
    workdir: Path,
    certs_path: Path,
    host: str = "relay1",
    dispatcher_host: str = "proxy",
    port_range: tuple[int, int] = (50000, 50100),
    extra: dict[str, dict[str, object]] | None = None,
    wait: bool = True,
    wrapper: tuple[str, ...] = (),
) -> Daemon:
    """media-relay in ``host`` on its address, connecting to the dispatcher of
    ``dispatcher_host``. Returns once the dispatcher lists it as active
    (``wait=False``: at once, e.g. for a relay that must refuse to start).
    ``wrapper``: a command that runs the relay (e.g. setpriv dropping capabilities)."""
    address = topology.address(host)
    sections: dict[str, dict[str, object]] = {
        "Relay": {
            "dispatchers": f"{topology.address(dispatcher_host)}:{DISPATCHER_PORT}",
            "relay_ip": address,
            "port_range": f"{port_range[0]}:{port_range[1]}",
            "log_level": "debug",
        },
        "TLS": {"certs_path": certs_path},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    daemon = _daemon(topology, host, RELAY_SCRIPT, f"media-relay-{host}", workdir, sections, wrapper=wrapper)
    if not wait:
        return daemon
    management = Management(topology, dispatcher_host)

    def listed_active() -> bool:
        daemon.process.assert_running()
        return any(relay.get("ip") == address and relay.get("status") == "active" for relay in management.summary())

    wait_for(listed_active, timeout=15, interval=0.1, message=f"the dispatcher to list relay {address} as active")
    return daemon


class Management:
    """Client of the dispatcher's plain-TCP management interface (SPEC §5)."""

    def __init__(self, topology: Topology, host: str = "proxy", port: int = MANAGEMENT_PORT) -> None:
        self.topology = topology
        self.host = host
        self.address = (topology.address(host), port)

    def command(self, command: str, timeout: float = 5.0) -> list[str]:
        """The result lines of one command (the closing empty line removed)."""
        with self.topology.socket(self.host) as sock:
            sock.settimeout(timeout)
            sock.connect(self.address)
            sock.sendall(command.encode() + b"\r\n")
            lines = []
            with sock.makefile("rb") as stream:
                while True:
                    line = stream.readline()
                    if not line:
                        raise AssertionError(f"management connection closed after {lines!r}")
                    if line in (b"\r\n", b"\n"):
                        return lines
                    lines.append(line.decode().rstrip("\r\n"))

    def sessions(self) -> list[dict]:
        return [json.loads(line) for line in self.command("sessions")]

    def summary(self) -> list[dict]:
        return [json.loads(line) for line in self.command("summary")]
