"""media-dispatcher and media-relay inside the benchmark's relay namespace,
and small clients of their sockets (the proxy module's UNIX socket, the
management port).

The dispatcher listens on the relay's address; the relay connects to it over
TLS (certificates from tls/make-certs) and runs with ``kernel_forwarding =
yes``, so it refuses to start rather than fall back to user space.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import socket_in_netns
from tests.support.processes import Process, ProcessManager, wait_for

REPO = Path(__file__).resolve().parents[1]
DISPATCHER = REPO / "scripts" / "media-dispatcher"
RELAY = REPO / "scripts" / "media-relay"
MAKE_CERTS = REPO / "tls" / "make-certs"
DISPATCHER_PORT = 25060
MANAGEMENT_PORT = 25061
CRLF = "\r\n"


def write_config(directory: Path, sections: dict[str, dict[str, object]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    (directory / "config.ini").write_text("\n".join(lines))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class ProxyClient:
    """The proxy module's side of the dispatcher's UNIX socket: request, one reply line."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, command: str, headers: dict[str, str]) -> str:
        text = command + CRLF + "".join(f"{name}: {value}{CRLF}" for name, value in headers.items()) + CRLF
        self.sock.sendall(text.encode())
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the dispatcher closed the proxy socket")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode()

    def update(self, call_id: str, kind: str, media: str, signaling_ip: str, to_tag: str = "") -> str:
        return self.request("update", {
            "type": kind, "dialog_id": "", "call_id": call_id, "cseq": "1 INVITE",
            "from_uri": "sip:bench@example.com", "to_uri": "sip:relay@example.com",
            "from_tag": "caller-tag", "to_tag": to_tag,
            "user_agent": "mediaproxy-bench", "signaling_ip": signaling_ip, "media": media})

    def remove(self, call_id: str) -> str:
        return self.request("remove", {"call_id": call_id, "from_tag": "caller-tag", "to_tag": "callee-tag"})


def parse_reply(reply: str) -> tuple[str, int]:
    parts = reply.split()
    if len(parts) != 2 or not parts[1].isdigit():
        raise RuntimeError(f"bad update reply {reply!r}")
    return parts[0], int(parts[1])


@dataclass
class Call:
    call_id: str
    caller_port: int         # the caller's own port (its SDP and latched address)
    callee_port: int
    caller_facing: int       # relay port the caller sends to (from the answer)
    callee_facing: int       # relay port the callee sends to; the kernel's SNAT source port


class Daemons:
    """The dispatcher and the relay in the relay namespace of ``topo``."""

    def __init__(self, topo, workdir: Path, manager: ProcessManager, port_range: tuple[int, int],
                 python: str = sys.executable) -> None:
        self.topo = topo
        self.workdir = workdir
        self.manager = manager
        self.port_range = port_range
        self.python = python
        self.ip = topo.addresses["relay"]
        self.dispatcher: Process | None = None
        self.relay: Process | None = None
        # short runtime paths: a UNIX socket path has at most 107 bytes
        self.runtime = Path(tempfile.mkdtemp(prefix="mpb-run-"))

    @property
    def socket_path(self) -> Path:
        return self.runtime / "dispatcher" / "dispatcher.sock"

    def start(self, relay_options: dict[str, object] | None = None, timeout: float = 30.0,
              dispatcher_sections: dict[str, dict] | None = None) -> None:
        """``dispatcher_sections``: more of the dispatcher's config.ini, by section (e.g. accounting)."""
        certs = self.workdir / "tls"
        subprocess.run([str(MAKE_CERTS), "--force", "--dispatcher-san", f"IP:{self.ip}", str(certs)],
                       check=True, capture_output=True, timeout=60)
        write_config(self.workdir / "dispatcher", {
            "Dispatcher": {"socket_path": "dispatcher.sock", "listen": f"{self.ip}:{DISPATCHER_PORT}",
                           "listen_management": f"{self.ip}:{MANAGEMENT_PORT}", "management_use_tls": "no",
                           "log_level": "info", **(dispatcher_sections or {}).get("Dispatcher", {})},
            "TLS": {"certs_path": certs},
            **{name: values for name, values in (dispatcher_sections or {}).items() if name != "Dispatcher"}})
        relay = {"dispatchers": f"{self.ip}:{DISPATCHER_PORT}", "relay_ip": self.ip,
                 "port_range": f"{self.port_range[0]}:{self.port_range[1]}", "kernel_forwarding": "yes",
                 "reconnect_delay": 1, "log_level": "info"}
        relay.update(relay_options or {})
        write_config(self.workdir / "relay", {"Relay": relay, "TLS": {"certs_path": certs}})
        ns = self.topo.ns("relay")
        self.dispatcher = self.manager.start("media-dispatcher", [
            self.python, DISPATCHER, "--config-dir", self.workdir / "dispatcher",
            "--runtime-dir", self.runtime / "dispatcher", "--no-fork"], netns=ns)
        self.dispatcher.wait_for_log(r"listening for the proxy on ", timeout=timeout)
        self.relay = self.manager.start("media-relay", [
            self.python, RELAY, "--config-dir", self.workdir / "relay",
            "--runtime-dir", self.runtime / "relay", "--no-fork"], netns=ns)

        def active():
            self.relay.assert_running()
            return any(entry.get("ip") == self.ip and entry.get("status") == "active" for entry in self.summary())

        wait_for(active, timeout=timeout, interval=0.2, ignore=(OSError, ValueError),
                 message="the dispatcher to list the relay as active")

    def management(self, command: str, timeout: float = 10.0) -> list[str]:
        sock = socket_in_netns(self.topo.ns("relay"))
        with sock:
            sock.settimeout(timeout)
            sock.connect((self.ip, MANAGEMENT_PORT))
            sock.sendall(command.encode() + b"\r\n")
            data = b""
            while not (data.startswith(b"\r\n") or b"\r\n\r\n" in data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return [line for line in data.decode().split("\r\n") if line]

    def summary(self) -> list[dict]:
        return [json.loads(line) for line in self.management("summary")]

    def relay_summary(self) -> dict:
        for entry in self.summary():
            if entry.get("ip") == self.ip:
                return entry
        return {}

    def setup_calls(self, count, caller_ip: str, callee_ip: str, caller_port0: int, callee_port0: int,
                    clients: int = 4, timeout: float = 120.0, prefix: str = "bench") -> list[Call]:
        """Calls 0..``count``-1 (or the indices ``count`` lists), one audio stream each, as the proxy
        module sets them up (offer, answer), ``clients`` connections at once; in the order asked."""
        import threading

        indices = list(range(count)) if isinstance(count, int) else list(count)
        calls: dict[int, Call] = {}
        errors: list[BaseException] = []
        deadline = time.monotonic() + timeout

        def worker(indices):
            try:
                client = ProxyClient(self.socket_path)
                try:
                    for i in indices:
                        if time.monotonic() > deadline:
                            raise TimeoutError("setting up the calls took too long")
                        call_id = f"{prefix}-{i}@{caller_ip}"
                        caller_port, callee_port = caller_port0 + 2 * i, callee_port0 + 2 * i
                        _, callee_facing = parse_reply(client.update(
                            call_id, "request", f"audio:{caller_ip}:{caller_port}:sendrecv", caller_ip))
                        _, caller_facing = parse_reply(client.update(
                            call_id, "reply", f"audio:{callee_ip}:{callee_port}:sendrecv", callee_ip,
                            to_tag="callee-tag"))
                        calls[i] = Call(call_id, caller_port, callee_port, caller_facing, callee_facing)
                finally:
                    client.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(indices[k::clients],)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return [calls[i] for i in indices]

    def pids(self) -> dict[str, int]:
        return {"relay": self.relay.command_pid, "dispatcher": self.dispatcher.command_pid}

    def stop(self) -> None:
        for process in (self.relay, self.dispatcher):
            if process is not None:
                process.stop(timeout=10)

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.runtime, ignore_errors=True)


def shut_down(daemons: "Daemons | None", manager: ProcessManager) -> None:
    """Stop the daemons (when they were started) and every other process of `manager`, and remove
    the daemons' runtime directory: what each benchmark does on its way out, also after a failure."""
    try:
        if daemons is not None:
            try:
                daemons.stop()
            finally:
                daemons.cleanup()
    finally:
        manager.stop_all()
