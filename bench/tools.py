"""The packet tools (C, bench/tools/*.c), compiled into bench/build/ and run
inside the benchmark's namespaces.

``blast()`` runs one measurement: the receiver (udprecv) in the callee
namespace, then the sender (udpsend) in the caller namespace, each pinned to
its own CPU; both stop by themselves (and die with this process), and the
receiver runs on after the sender so that whatever is still queued is
counted. The result is per group: packets sent, received, the time the
sender spent on the group, and packets per second delivered at the callee.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "tools"
BUILD = HERE / "build"
TOOLS = ("udpsend", "udprecv")
CFLAGS = ("-O2", "-Wall", "-Wextra")
PDEATHSIG = ("setpriv", "--pdeathsig", "KILL")

SENDER_CPU = 0
RECEIVER_CPU = 1


def build_tools(build_dir: Path = BUILD, tools=TOOLS) -> dict[str, Path]:
    """Compile the tools whose binary is missing or older than its source or packet_tools.h."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("the benchmarks compile their packet tools: install gcc (apt-get install gcc libc6-dev)")
    build_dir.mkdir(parents=True, exist_ok=True)
    shared = (SOURCES / "packet_tools.h").stat().st_mtime
    binaries = {}
    for tool in tools:
        source, binary = SOURCES / f"{tool}.c", build_dir / tool
        if not binary.exists() or binary.stat().st_mtime < max(source.stat().st_mtime, shared):
            result = subprocess.run([compiler, *CFLAGS, "-o", str(binary), str(source)],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {source} failed:\n{result.stderr}")
        binaries[tool] = binary
    return binaries


@dataclass
class Stream:
    group: int
    destination: str      # where the caller sends (the callee, or the relay)
    source_port: int      # the caller's port
    destination_port: int
    callee_port: int      # where the packets must arrive at the callee


@dataclass
class GroupResult:
    group: int
    streams: int
    sent: int
    errors: int
    seconds: float
    received: int

    @property
    def pps(self) -> float:
        """Packets per second delivered at the callee while this group was being sent."""
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass
class BlastResult:
    mode: str
    seconds: float
    groups: dict[int, GroupResult] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)    # received per interval, all groups
    slices: list[tuple[int, int, float]] = field(default_factory=list)   # (group, sent, seconds), in order
    sender_cpu: float = 0.0                  # the sender's user + system seconds
    cpu_shares: dict = field(default_factory=dict)   # per CPU: share of the blast busy, idle, stolen

    def cycles(self) -> list[dict[int, float]]:
        """Packets per second of each group in each round of slices (A B C, A B C, ...),
        the first round (warming up) left out. Adjacent slices saw the same machine."""
        order = sorted(self.groups)
        out = []
        for k in range(1, len(self.slices) // len(order)):
            chunk = self.slices[k * len(order):(k + 1) * len(order)]
            if [g for g, _, _ in chunk] != order:
                continue
            out.append({g: sent / seconds for g, sent, seconds in chunk if seconds > 0})
        return out


def cpu_count() -> int:
    return os.cpu_count() or 1


def _taskset(cpu: int) -> list[str]:
    if cpu_count() < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu % cpu_count())]


def blast(topo, binaries: dict[str, Path], streams: Sequence[Stream], seconds: float, mode: str = "packet",
          size: int = 172, batch: int = 32, slice_ms: float = 10.0, rate: float | None = None,
          drain: float = 0.7, receiver_address: str | None = None) -> BlastResult:
    """Send ``streams`` (groups interleaved in slices) for ``seconds``; count at the callee."""
    from bench.topology import CALLER_IP, CALLEE_IP, RELAY_IN

    stat_before = _cpu_stat()
    with tempfile.TemporaryDirectory(prefix="mpb-blast-") as tmp:
        tmp = Path(tmp)
        stream_file, port_file, ready = tmp / "streams", tmp / "ports", tmp / "ready"
        stream_file.write_text("".join(f"{s.group} {s.destination} {s.source_port} {s.destination_port}\n"
                                       for s in streams))
        port_file.write_text("".join(f"{s.group} {s.callee_port}\n" for s in streams))
        receiver_seconds = seconds + drain + 30      # an upper bound: it is stopped after the drain
        receiver = subprocess.Popen(
            [*PDEATHSIG, *topo.command("callee", [*_taskset(RECEIVER_CPU), binaries["udprecv"],
                                                  "-a", receiver_address or CALLEE_IP, "-P", port_file,
                                                  "-t", f"{receiver_seconds:.2f}", "-i", "0.25", "-R", ready])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not ready.exists():
                if receiver.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"udprecv did not start: {receiver.stderr.read() if receiver.poll() is not None else 'timeout'}")
                time.sleep(0.01)
            argv = [binaries["udpsend"], "-a", CALLER_IP, "-P", stream_file, "-l", size, "-t", f"{seconds:.2f}",
                    "-b", batch, "-S", slice_ms, "-m", mode]
            if mode == "packet":
                argv += ["-i", "eth0", "-M", topo.mac("relay", RELAY_IN)]
            if rate:
                argv += ["-r", rate]
            sender = subprocess.run([*PDEATHSIG, *topo.command("caller", [*_taskset(SENDER_CPU), *argv])],
                                    capture_output=True, text=True, timeout=seconds + 20, stdin=subprocess.DEVNULL)
            if sender.returncode != 0:
                raise RuntimeError(f"udpsend failed ({sender.returncode}): {sender.stderr.strip()}")
            sent = json.loads(sender.stdout)
            stat_after = _cpu_stat()
            time.sleep(drain)          # what is still queued reaches the receiver
            receiver.send_signal(signal.SIGTERM)   # setpriv, ip netns exec and taskset exec: this is udprecv
            try:
                out, err = receiver.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                receiver.kill()
                out, err = receiver.communicate()
            if receiver.returncode != 0:
                raise RuntimeError(f"udprecv failed ({receiver.returncode}): {err.strip()}")
            received = json.loads(out)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(timeout=10)
    by_group = {g["group"]: g for g in received["groups"]}
    result = BlastResult(sent["mode"], sent["seconds"], counts=received["counts"],
                         slices=[tuple(x) for x in sent.get("slices", [])], sender_cpu=sent.get("cpu_seconds", 0.0),
                         cpu_shares=_cpu_shares(stat_before, stat_after))
    for g in sent["groups"]:
        result.groups[g["group"]] = GroupResult(g["group"], g["streams"], g["sent"], g["errors"], g["seconds"],
                                                by_group.get(g["group"], {}).get("received", 0))
    return result


def _cpu_stat() -> dict[str, list[int]]:
    """/proc/stat per CPU: user nice system idle iowait irq softirq steal ..."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            out[name] = [int(v) for v in values]
    return out


def _cpu_shares(before: dict, after: dict) -> dict:
    """Per CPU over the blast: the share idle, stolen by the hypervisor, and in softirq."""
    shares = {}
    for cpu, values in after.items():
        if cpu not in before:
            continue
        delta = [a - b for a, b in zip(values, before[cpu])]
        total = sum(delta[:8]) or 1
        shares[cpu] = {"idle": round(delta[3] / total, 3), "steal": round(delta[7] / total, 3),
                       "softirq": round(delta[6] / total, 3)}
    return shares


def groups_of(streams: Iterable[Stream]) -> list[int]:
    return sorted({s.group for s in streams})
