"""The pieces of an end-to-end call: Kamailio, sipp user agents, tcpdump.

Everything runs inside the namespaces of a ``tests.support.netns.Topology``
and is started through its ProcessManager (own process group, death signal,
log file; stopped at teardown).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import Topology, wait_for_udp_bound, wait_for_unix_connections
from tests.support.pcap import Sdp, UdpPacket, parse_sdp, read_udp_packets
from tests.support.processes import Process

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
    text = KAMAILIO_TEMPLATE.read_text()
    defines = "#!define WITH_MEDIAPROXY" if dispatcher_socket is not None else "# without MediaProxy"
    values = {
        "DEFINES": defines,
        "LISTEN_IP": listen_ip,
        "LISTEN_PORT": str(listen_port),
        "RUNDIR": str(rundir),
        "DISPATCHER_SOCKET": str(dispatcher_socket or ""),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"placeholders left in {KAMAILIO_TEMPLATE}: {left}")
    path.write_text(text)
    return path


def start_kamailio(
    topology: Topology,
    workdir: Path,
    host: str = "proxy",
    dispatcher_socket: Path | None = None,
    timeout: float = 15.0,
) -> Process:
    """Start Kamailio in the foreground in ``host``; return once it serves SIP.

    With ``dispatcher_socket`` (the dispatcher must already listen there) it
    also waits until every worker has connected to it: the workers connect
    only at start and then retry every ~10 s.
    """
    rundir = workdir / "kamailio"
    rundir.mkdir(parents=True, exist_ok=True)
    config = render_kamailio_cfg(rundir / "kamailio.cfg", topology.address(host), rundir, dispatcher_socket)
    process = topology.spawn(
        host,
        ["kamailio", "-DD", "-E", "-m", "64", "-M", "8", "-f", config, "-Y", rundir],
        name="kamailio",
    )
    try:
        wait_for_udp_bound(topology.ns(host), SIP_PORT, topology.address(host), timeout=timeout)
        if dispatcher_socket is not None:
            wait_for_unix_connections(topology.ns(host), dispatcher_socket, KAMAILIO_CHILDREN, timeout=timeout)
    except AssertionError:
        process.assert_running()
        raise
    process.assert_running()
    return process


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
) -> UserAgent:
    address = topology.address(host)
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


def start_uas(topology: Topology, workdir: Path, host: str = "callee", timeout: float = 30.0) -> UserAgent:
    """The answering sipp; returns once it listens for SIP."""
    agent = _sipp(topology, host, workdir, UAS_SCENARIO, [], f"sipp-uas-{host}", timeout)
    try:
        wait_for_udp_bound(topology.ns(host), SIP_PORT, agent.address, timeout=10)
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
) -> UserAgent:
    """The calling sipp: INVITE to the proxy for sip:service@<callee>, media for ``duration_ms``."""
    extra = [
        "-key", "request_uri", f"sip:service@{topology.address(callee)}:{SIP_PORT}",
        "-d", str(duration_ms),
        f"{topology.address(proxy)}:{SIP_PORT}",
    ]  # fmt: skip
    return _sipp(topology, host, workdir, UAC_SCENARIO, extra, f"sipp-uac-{host}", timeout)


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


# -- tcpdump --


class Capture:
    """tcpdump of UDP on ``eth0`` of a host, written to a pcap file."""

    def __init__(self, topology: Topology, host: str, path: Path, bpf: str = "udp") -> None:
        self.path = path
        self.host = host
        self.process = topology.spawn(
            host,
            ["tcpdump", "-i", "eth0", "-n", "-U", "-Z", "root", "-s", "0", "-w", path, bpf],
            name=f"tcpdump-{host}",
        )
        self.process.wait_for_log(r"listening on eth0", timeout=10)

    def stop(self) -> list[UdpPacket]:
        self.process.stop()
        return read_udp_packets(self.path)
