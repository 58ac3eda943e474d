"""The conntrack CLI and iptables-legacy in the relay namespace: the
reference's hand-made NAT entries, its hooks, and reading the table."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from bench.topology import CALLEE_IP, CALLER_IP, RELAY_IP

BENCH_CHAIN = "MPBENCH"
_FIELDS = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class NatEntry:
    """caller:sport -> relay:dport, rewritten to relay:snat_port -> callee:callee_port."""
    sport: int
    dport: int
    callee_port: int
    snat_port: int


@dataclass
class ListedEntry:
    src: str
    dst: str
    sport: int
    dport: int
    packets: int        # original direction (0 without accounting)
    mark: int
    reply_src: str
    reply_sport: int
    reply_dport: int


def insert_command(entry: NatEntry, timeout: int = 600) -> str:
    """The conntrack CLI line that creates the entry.

    The reply tuple is the plain inverse of the original and the NAT comes
    separately (--dst-nat, --src-nat): the kernel then rewrites the reply
    tuple itself and applies the NAT (FIELD-NOTES 3).
    """
    return (f"conntrack -I -p udp -s {CALLER_IP} -d {RELAY_IP} --sport {entry.sport} --dport {entry.dport} "
            f"-r {RELAY_IP} -q {CALLER_IP} --reply-port-src {entry.dport} --reply-port-dst {entry.sport} "
            f"--dst-nat {CALLEE_IP}:{entry.callee_port} --src-nat {RELAY_IP}:{entry.snat_port} "
            f"-t {timeout} -u ASSURED")


def delete_command(entry: NatEntry) -> str:
    return (f"conntrack -D -p udp -s {CALLER_IP} -d {RELAY_IP} --sport {entry.sport} --dport {entry.dport}")


# One process per entry, timed inside the namespace (so `ip netns exec` is not
# counted): prints start and end times (EPOCHREALTIME) and the failures.
_LOOP = """
start=$EPOCHREALTIME
failed=0
while IFS= read -r line; do
    eval "$line" >/dev/null 2>&1 || failed=$((failed + 1))
done < "$0"
end=$EPOCHREALTIME
echo "$start $end $failed"
"""


def run_each(topo, commands: list[str], timeout: float = 300.0) -> tuple[float, int]:
    """Run the commands one after the other in the relay namespace; (seconds, failures)."""
    import tempfile
    from pathlib import Path

    with tempfile.NamedTemporaryFile("w", prefix="mpb-ct-", suffix=".sh", delete=False) as handle:
        handle.write("".join(command + "\n" for command in commands))
        path = Path(handle.name)
    try:
        out = topo.run("relay", ["bash", "-c", _LOOP, path], timeout=timeout).stdout.split()
    finally:
        path.unlink(missing_ok=True)
    start, end, failed = float(out[0]), float(out[1]), int(out[2])
    return end - start, failed


def list_entries(topo, *filters: str) -> list[ListedEntry]:
    """`conntrack -L` (UDP, with the given filters), parsed."""
    result = topo.run("relay", ["conntrack", "-L", "-p", "udp", *filters], check=False, timeout=60)
    entries = []
    for line in result.stdout.splitlines():
        fields = _FIELDS.findall(line)
        values: dict[str, list[str]] = {}
        for key, value in fields:
            values.setdefault(key, []).append(value)
        if "src" not in values or len(values["src"]) < 2:
            continue
        entries.append(ListedEntry(
            src=values["src"][0], dst=values["dst"][0], sport=int(values["sport"][0]), dport=int(values["dport"][0]),
            packets=int(values.get("packets", ["0"])[0]), mark=int(values.get("mark", ["0"])[0]),
            reply_src=values["src"][1], reply_sport=int(values["sport"][1]), reply_dport=int(values["dport"][1])))
    return entries


def count_entries(topo) -> int:
    out = topo.run("relay", ["conntrack", "-C"], check=False).stdout.strip()
    return int(out) if out.isdigit() else 0


def enable_hooks(topo) -> None:
    """What conntrack NAT needs in a namespace (FIELD-NOTES 1): a nat table, and
    a rule that uses conntrack (in a chain nothing jumps to)."""
    run = lambda argv: topo.run("relay", ["iptables-legacy", *argv])  # noqa: E731
    run(["-t", "nat", "-L", "-n"])
    if topo.run("relay", ["iptables-legacy", "-L", BENCH_CHAIN, "-n"], check=False).returncode != 0:
        run(["-N", BENCH_CHAIN])
    run(["-A", BENCH_CHAIN, "-m", "conntrack", "--ctstate", "NEW", "-j", "RETURN"])


def notrack_destination(topo, address: str) -> None:
    """Packets to ``address`` are forwarded untracked (raw PREROUTING, CT --notrack)."""
    topo.run("relay", ["iptables-legacy", "-t", "raw", "-A", "PREROUTING", "-d", f"{address}/32", "-p", "udp",
                       "-j", "CT", "--notrack"])


def rules(topo) -> str:
    return topo.run("relay", ["iptables-legacy-save"], check=False).stdout


def shell_join(argv) -> str:
    return shlex.join(str(a) for a in argv)
