"""The real daemons on loopback, and small clients of their three sockets.

A ``Cluster`` is one test's dispatcher and relays: it writes their
config.ini files (free ports, a per-test runtime directory), shares one
throwaway PKI (``tests.support.certs``), starts every daemon through a
``tests.support.processes.ProcessManager`` (death signal, own process group,
log file, bounded stop) and waits, with bounded polling only, until the
proxy socket accepts and the management ``summary`` lists the relays.

The daemons run with ``contain=False``: with --no-fork they fork nothing,
so a PID namespace would add nothing to the death signal and the process
group, and the tests then also run without root.

Relays get their own loopback addresses (127.0.0.2, 127.0.0.3, ...): a relay
binds its TLS connection to ``relay_ip`` and the dispatcher names a relay by
the peer address of that connection.

Clients: ``ProxyClient`` (the proxy module's UNIX socket, SPEC §2),
``ManagementClient`` (plain TCP or TLS, SPEC §5) and ``Party`` (one end of a
call: a UDP socket that sends RTP to the relay and reads what comes back).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

from tests.support.certs import CertsDir, make_certs_dir
from tests.support.processes import Process, ProcessManager, wait_for, wait_for_unix_socket

REPO = Path(__file__).resolve().parents[2]
_VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable
DISPATCHER_SCRIPT = REPO / "scripts" / "media-dispatcher"
RELAY_SCRIPT = REPO / "scripts" / "media-relay"

START_TIMEOUT = 15.0     # a daemon's start (Python, Twisted, TLS) takes about a second here
REPLY_TIMEOUT = 5.0      # how long a client waits for one answer
CRLF = "\r\n"


# -- free resources --


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (bind port 0, then let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def media_port_range(pairs: int = 64) -> tuple[int, int]:
    """A random even [start, end) below the ephemeral range (32768+), so a
    relay's media ports rarely meet the test's own sockets; a port that is
    taken anyway is set aside by the relay."""
    start = random.randrange(20000, 32000 - 2 * pairs, 2)
    return start, start + 2 * pairs


def write_config(directory: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in options.items())
        lines.append("")
    path = directory / "config.ini"
    path.write_text("\n".join(lines))
    return path


# -- the proxy module's socket --


class LineClient:
    """A connected stream socket with a read buffer, usable in a `with`."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)


class ProxyClient(LineClient):
    """What Kamailio's mediaproxy module does: one connection, many requests,
    exactly one ``\\r\\n``-ended reply line per request."""

    def __init__(self, path: str | Path, timeout: float = REPLY_TIMEOUT):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        super().__init__(sock, timeout)

    def read_line(self, timeout: float | None = None) -> str:
        """The next reply line, without its ``\\r\\n``; fails if none comes in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply line (buffer {self._buffer[:200]!r})")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the dispatcher closed the proxy socket (buffer {self._buffer[:200]!r})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        assert b"\n" not in line, f"a reply line with a bare line feed: {line!r}"
        return line.decode()

    def assert_no_reply(self, wait: float = 0.2) -> None:
        """Nothing more is pending on the connection (used after a counted exchange)."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            chunk = b""
        finally:
            self.sock.settimeout(self.timeout)
        assert not chunk and not self._buffer, f"unexpected extra reply {self._buffer + chunk!r}"

    def request(self, command: str, headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
                timeout: float | None = None) -> str:
        items = headers.items() if isinstance(headers, Mapping) else headers
        text = command + CRLF + "".join(f"{name}: {value}{CRLF}" for name, value in items) + CRLF
        self.send_raw(text.encode())
        return self.read_line(timeout)

    def update(self, call_id: str, type: str, media: str | None, from_tag: str = "caller-tag",
               to_tag: str = "", cseq: int = 1, media_relay: str | None = None,
               timeout: float | None = None, **extra: str) -> str:
        headers = {"type": type, "dialog_id": "", "call_id": call_id, "cseq": f"{cseq} INVITE",
                   "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com",
                   "from_tag": from_tag, "to_tag": to_tag,
                   "user_agent": "caller-ua" if type == "request" else "callee-ua",
                   "signaling_ip": "127.0.0.1"}
        if media_relay is not None:
            headers["media_relay"] = media_relay
        if media is not None:
            headers["media"] = media
        headers.update(extra)
        return self.request("update", headers, timeout)

    def remove(self, call_id: str, from_tag: str = "caller-tag", to_tag: str = "callee-tag",
               timeout: float | None = None) -> str:
        return self.request("remove", {"call_id": call_id, "from_tag": from_tag, "to_tag": to_tag}, timeout)


def parse_address_reply(reply: str, streams: int = 1) -> tuple[str, list[int]]:
    """``IP PORT...`` -> (ip, ports); fails on ``error`` or a malformed reply."""
    parts = reply.split()
    assert len(parts) == 1 + streams and all(p.isdigit() for p in parts[1:]), f"bad update reply {reply!r}"
    return parts[0], [int(p) for p in parts[1:]]


# -- the management interface --


class ManagementClient(LineClient):
    """The telnet-style management port: a command line, answer lines, an empty line."""

    def __init__(self, address: tuple[str, int], tls_context: ssl.SSLContext | None = None,
                 timeout: float = REPLY_TIMEOUT):
        raw = socket.create_connection(address, timeout=timeout)
        super().__init__(tls_context.wrap_socket(raw) if tls_context is not None else raw, timeout)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def read_answer_raw(self, timeout: float | None = None) -> bytes:
        """One whole answer as sent: lines up to and including the empty line."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self._buffer.startswith(b"\r\n"):
                end = 2
                break
            index = self._buffer.find(b"\r\n\r\n")
            if index >= 0:
                end = index + 4
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete answer (buffer {self._buffer[:300]!r})")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"the management connection closed (buffer {self._buffer[:300]!r})")
            self._buffer += chunk
        answer, self._buffer = self._buffer[:end], self._buffer[end:]
        return answer

    def read_answer(self, timeout: float | None = None) -> list[str]:
        raw = self.read_answer_raw(timeout)
        text = raw.decode()
        assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), f"bad line ends in {raw!r}"
        return text.split("\r\n")[:-2]

    def command(self, command: str, timeout: float | None = None) -> list[str]:
        self.send_raw(command.encode() + b"\r\n")
        return self.read_answer(timeout)

    def wait_closed(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """Read until the peer closes; returns whatever came before the close."""
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the management connection stayed open (got {data!r})")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                return self._buffer + data
            data += chunk


def management_tls_context(ca_path: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context that trusts ca_path and presents cert/key if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(ca_path))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# -- the parties of a call --


def rtp_packet(payload_type: int, seq: int, ssrc: int, payload: bytes = b"\xd5" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, payload_type & 0x7F, seq & 0xFFFF, seq * 160, ssrc) + payload


class Party:
    """A phone's media socket on loopback."""

    def __init__(self, name: str, payload_type: int = 0, ip: str = "127.0.0.1"):
        self.name = name
        self.payload_type = payload_type
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.ip, self.port = self.sock.getsockname()
        self.ssrc = random.getrandbits(32)
        self.seq = 0
        self.sent = 0

    def close(self) -> None:
        self.sock.close()

    def media(self, media_type: str = "audio", direction: str = "sendrecv") -> str:
        return f"{media_type}:{self.ip}:{self.port}:{direction}"

    def send(self, destination: tuple[str, int], tag: bytes = b"") -> bytes:
        self.seq += 1
        packet = rtp_packet(self.payload_type, self.seq, self.ssrc, self.name.encode() + tag + b"\xd5" * 150)
        self.sock.sendto(packet, destination)
        self.sent += 1
        return packet

    def drain(self) -> list[tuple[bytes, tuple[str, int]]]:
        received = []
        self.sock.setblocking(False)
        try:
            while True:
                received.append(self.sock.recvfrom(65536))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return received


def exchange_media(caller: Party, callee: Party, caller_facing: tuple[str, int],
                   callee_facing: tuple[str, int], timeout: float = 5.0, rounds: int = 5) -> dict:
    """Both parties send RTP to their relay port until each has received the
    other's packets (the relay latches each party from its first packet and
    drops what it cannot forward yet). Returns what each got and from where."""
    got = {caller.name: [], callee.name: []}

    def both_received() -> bool:
        caller.send(caller_facing)
        callee.send(callee_facing)
        for party in (caller, callee):
            got[party.name].extend(party.drain())
        return len(got[caller.name]) >= rounds and len(got[callee.name]) >= rounds

    wait_for(both_received, timeout=timeout, interval=0.02,
             message=f"RTP both ways through {caller_facing} / {callee_facing}")
    return got


# -- the daemons --


class Cluster:
    """A dispatcher and its relays for one test."""

    def __init__(self, workdir: Path, manager: ProcessManager, certs: CertsDir | None = None):
        self.workdir = Path(workdir)
        self.manager = manager
        self.certs = certs or make_certs_dir(self.workdir / "tls")
        # Runtime directories under the test's directory, unless the socket
        # path would not fit in a sockaddr_un (108 bytes): then a short one.
        self.runtime_root = self.workdir / "run"
        self._own_runtime_root = len(bytes(self.socket_path)) > 100
        if self._own_runtime_root:
            self.runtime_root = Path(tempfile.mkdtemp(prefix="mp-it-"))
        self.dispatcher: Process | None = None
        self.dispatcher_config: dict = {}
        self.dispatcher_arguments: tuple = ()
        self.relays: dict[str, Process] = {}
        self.listen_port = 0
        self.management_port = 0
        self.management_tls = False

    # -- dispatcher --

    @property
    def socket_path(self) -> Path:
        return self.runtime_root / "dispatcher" / "dispatcher.sock"

    @property
    def management_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.management_port)

    def start_dispatcher(self, management_use_tls: bool = False, sections: Mapping | None = None,
                         arguments: Iterable[str] = (), wait: bool = True, **options) -> Process:
        """``arguments``: more command-line options; ``wait=False``: return at once
        (for a dispatcher that must refuse to start)."""
        self.listen_port = free_tcp_port()
        self.management_port = free_tcp_port()
        self.management_tls = management_use_tls
        config = {"socket_path": "dispatcher.sock",
                  "listen": f"127.0.0.1:{self.listen_port}",
                  "listen_management": f"127.0.0.1:{self.management_port}",
                  "management_use_tls": "yes" if management_use_tls else "no",
                  "relay_timeout": 2,
                  # these tests share this host's loopback: metrics only where a test asks for them
                  "listen_metrics": "none"}
        config.update(options)
        self.dispatcher_config = config
        config_dir = self.workdir / "dispatcher"
        write_config(config_dir, {"Dispatcher": config, "TLS": {"certs_path": self.certs.path}, **(sections or {})})
        self.dispatcher_arguments = tuple(arguments)
        return self._run_dispatcher(wait)

    def restart_dispatcher(self, signum: int = signal.SIGTERM) -> Process:
        """Stop the dispatcher (SIGTERM: it saves its sessions; SIGKILL: it cannot) and
        start it again with the same configuration, ports and runtime directory."""
        self.dispatcher.stop(signum=signum)
        return self._run_dispatcher()

    def _run_dispatcher(self, wait: bool = True) -> Process:
        config_dir = self.workdir / "dispatcher"
        runtime = self.runtime_root / "dispatcher"
        self.dispatcher = self.manager.start("dispatcher", [
            PYTHON, DISPATCHER_SCRIPT, "--config-dir", config_dir, "--runtime-dir", runtime, "--no-fork",
            *self.dispatcher_arguments], contain=False)
        if not wait:
            return self.dispatcher
        wait_for_unix_socket(self.socket_path, timeout=START_TIMEOUT)
        # The relay and management ports are opened right after the proxy socket.
        self.dispatcher.wait_for_log(r"listening for the proxy on", timeout=START_TIMEOUT)
        return self.dispatcher

    # -- relays --

    def start_relay(self, ip: str, certs_path: Path | None = None, wait: bool = True, wrapper: Iterable[str] = (),
                    pairs: int = 64, **options) -> Process:
        """``wrapper``: a command the relay runs under (e.g. prlimit); ``pairs``: port pairs in its range."""
        start, end = media_port_range(pairs)
        # On loopback in this host's own namespace: user space only (tests/kernel covers the kernel path).
        config = {"dispatchers": f"127.0.0.1:{self.listen_port}", "relay_ip": ip,
                  "port_range": f"{start}:{end}", "reconnect_delay": 1, "kernel_forwarding": "no"}
        config.update(options)
        config_dir = self.workdir / f"relay-{ip}"
        write_config(config_dir, {"Relay": config, "TLS": {"certs_path": certs_path or self.certs.path}})
        process = self.manager.start(f"relay-{ip}", [
            *wrapper, PYTHON, RELAY_SCRIPT, "--config-dir", config_dir, "--runtime-dir",
            self.runtime_root / f"relay-{ip}", "--no-fork"], contain=False)
        self.relays[ip] = process
        if wait:
            self.wait_relays([ip])
        return process

    def start_relays(self, ips: Iterable[str], **options) -> list[Process]:
        """Start several relays at once (their start-up overlaps), then wait for all."""
        ips = list(ips)
        processes = [self.start_relay(ip, wait=False, **options) for ip in ips]
        self.wait_relays(ips)
        return processes

    def wait_relays(self, ips: Iterable[str], status: str = "active", timeout: float = START_TIMEOUT) -> dict:
        """Wait until ``summary`` lists every relay of ``ips`` with ``status``."""
        wanted = set(ips)

        def listed():
            for ip in wanted:
                if ip in self.relays:
                    self.relays[ip].assert_running()
            summary = {entry["ip"]: entry for entry in self.summary()}
            if all(summary.get(ip, {}).get("status") == status for ip in wanted):
                return summary
            return None

        return wait_for(listed, timeout=timeout, interval=0.1, ignore=(OSError, TimeoutError),
                        message=f"summary to list relays {sorted(wanted)} as {status}")

    # -- clients --

    def proxy(self, timeout: float = REPLY_TIMEOUT) -> ProxyClient:
        return ProxyClient(self.socket_path, timeout)

    def management(self, tls_context: ssl.SSLContext | None = None, timeout: float = REPLY_TIMEOUT):
        return ManagementClient(self.management_address, tls_context, timeout)

    def management_command(self, command: str, timeout: float = REPLY_TIMEOUT) -> list[str]:
        context = None
        if self.management_tls:
            context = management_tls_context(self.certs.path / "ca.pem", self.certs.relay.cert_path,
                                             self.certs.relay.key_path)
        with self.management(context, timeout) as client:
            return client.command(command, timeout)

    def summary(self) -> list[dict]:
        return [json.loads(line) for line in self.management_command("summary")]

    def sessions(self) -> list[dict]:
        return [json.loads(line) for line in self.management_command("sessions")]

    def session(self, call_id: str) -> dict | None:
        for session in self.sessions():
            if session["call_id"] == call_id:
                return session
        return None

    # -- teardown --

    def assert_alive(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.assert_running()
        for process in self.relays.values():
            process.assert_running()

    def stop(self) -> None:
        """SIGCONT first (a test may have stopped a relay with SIGSTOP), then
        SIGTERM, a bounded wait and SIGKILL for every daemon."""
        try:
            for process in self.manager.processes:
                if process.running:
                    process.send_signal(signal.SIGCONT)
            self.manager.stop_all()
        finally:
            if self._own_runtime_root:
                shutil.rmtree(self.runtime_root, ignore_errors=True)


class Call:
    """A call set up through the proxy socket: its parties and the relay's ports."""

    def __init__(self, proxy: ProxyClient, call_id: str, media_relay: str | None = None,
                 caller_pt: int = 0, callee_pt: int = 8, timeout: float | None = None):
        self.call_id = call_id
        self.caller = Party("caller", caller_pt)
        self.callee = Party("callee", callee_pt)
        try:
            offer = proxy.update(call_id, "request", self.caller.media(), media_relay=media_relay, timeout=timeout)
            self.relay_ip, (self.callee_facing_port,) = parse_address_reply(offer)
            answer = proxy.update(call_id, "reply", self.callee.media(), to_tag="callee-tag", timeout=timeout)
            ip, (self.caller_facing_port,) = parse_address_reply(answer)
            assert ip == self.relay_ip, f"the answer names relay {ip}, the offer {self.relay_ip}"
        except BaseException:
            self.close()
            raise

    @property
    def caller_facing(self) -> tuple[str, int]:
        return (self.relay_ip, self.caller_facing_port)

    @property
    def callee_facing(self) -> tuple[str, int]:
        return (self.relay_ip, self.callee_facing_port)

    def exchange(self, timeout: float = 5.0, rounds: int = 5) -> dict:
        return exchange_media(self.caller, self.callee, self.caller_facing, self.callee_facing, timeout, rounds)

    def close(self) -> None:
        self.caller.close()
        self.callee.close()


def log_lines(process: Process, needle: str) -> list[str]:
    return [line for line in process.log_text().splitlines() if needle in line and not line.startswith("# ")]


def write_foreign_relay_certs(directory: Path, trusted: CertsDir, cert_ca, cn: str = "relay") -> Path:
    """A relay's certs_path that trusts the dispatcher's CA (ca.pem) but holds
    relay.crt/.key issued by ``cert_ca``: only the dispatcher's check can refuse it."""
    directory.mkdir(parents=True, exist_ok=True)
    trusted.ca.write_ca(directory)
    cert_ca.issue("relay", cn, directory=directory)
    return directory
