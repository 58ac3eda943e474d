"""RESULTS.md and results.json from one run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# issue 4 / issue 8 targets
KERNEL_RATIO_TARGET = 0.95
RELAY_CPU_TARGET = 2.0
ENTRIES_TARGET = 20000


def _cmd(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {"nproc": os.cpu_count(), "cpu": model, "memory": memory, "kernel": platform.release(),
            "os": _cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]), "python": platform.python_version(),
            "iptables": _cmd(["iptables-legacy", "--version"]), "conntrack": _cmd(["conntrack", "--version"]),
            "commit": commit + ("+dirty" if dirty else ""),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}"
    return str(value)


# Issue 8: every key of results.json it names, with its target: (key, what it is, reference key or None,
# target as (comparison, number) on the value or on value/reference).
ISSUE8 = (
    ("control_rate_1", "control plane: sessions/s (update, update, remove) from 1 client", "control_rate_1_rtpengine",
     (">=", 0.5)),
    ("control_rate_8", "control plane: sessions/s from 8 concurrent clients", "control_rate_8_rtpengine", (">=", 0.8)),
    ("control_p99_ms", "control plane: p99 latency of a request at 80% of the peak rate (ms)", None, ("<", 5)),
    ("concurrent_calls", "concurrent calls one relay holds in the kernel (descriptor limit 20,000)", None,
     (">=", 10000)),
    ("memory_per_call_kb", "memory of relay + dispatcher per call (KB)", None, ("<", 5)),
    ("cpu_percent_at_max_calls", "CPU of both daemons while the kernel carries them (% of a core)", None, ("<", 5)),
    ("sampling_ms_5000", "one traffic sampling pass at 5,000 kernel entries (ms)", None, ("<", 5)),
    ("sampling_ms_20000", "one traffic sampling pass at 20,000 kernel entries (ms)", None, None),
    ("expiry_burst_lost", "streams lost of 5,000 expiring in the same second", None, ("<=", 0)),
    ("userspace_pps_ratio", "user-space forwarding, packets/s against a minimal Twisted forwarder", None,
     (">=", 0.8)),
    ("kernel_pps_ratio_1", "kernel path, packets/s against hand-made conntrack entries, 1 stream", None,
     (">=", KERNEL_RATIO_TARGET)),
    ("kernel_pps_ratio_1000", "the same, 1000 streams", None, (">=", KERNEL_RATIO_TARGET)),
    ("entries_installed_per_s", "kernel entries installed per second", None, (">=", ENTRIES_TARGET)),
    ("restart_restore_s_10000", "dispatcher restart with 10,000 sessions: restored and reconciled (s)", None,
     ("<", 2)),
)


def _judge(value, target) -> str:
    if target is None:
        return ""
    if value is None:
        return "not measured"
    comparison, limit = target
    ok = {">=": value >= limit, "<": value < limit, "<=": value <= limit}[comparison]
    return "met" if ok else "**missed**"


def summary_lines(results, smoke: bool = False) -> list[str]:
    n = results.numbers
    lines = ["## Issue 8: every figure and its target", ""]
    if smoke:
        lines += ["(A smoke run: no figure is judged.)", ""]
    lines += [
             "| Figure | Key | Value | Reference | Ratio | Target | |", "|---|---|---|---|---|---|---|"]
    for key, title, reference_key, target in ISSUE8:
        value = n.get(key)
        reference = n.get(reference_key) if reference_key else None
        ratio = value / reference if value is not None and reference else None
        judged = ratio if reference_key else value
        shown_target = f"{target[0]} {target[1]:g}" + (" of the reference" if reference_key else "") if target else ""
        lines.append(f"| {title} | `{key}` | {_fmt(value, 2 if isinstance(value, float) and value < 100 else 0)} | "
                     f"{_fmt(reference) if reference_key else ''}{' (`' + reference_key + '`)' if reference_key else ''} | "
                     f"{_fmt(ratio, 3) if ratio is not None else ''} | {shown_target} | "
                     f"{'' if smoke else _judge(judged, target)} |")
    lines.append("")
    return lines


def module_lines(results, name: str, title: str) -> list[str]:
    """The section of an issue-8 module: its own rows (figure, value, reference, ratio, target, status)."""
    block = results.details.get(name)
    if block is None:
        return []
    lines = [f"## {title}", ""]
    if "error" in block:
        return lines + [f"Not measured: {block['error']}", ""]
    lines += [f"(`python -m bench.{name}`, {block.get('seconds', '?')} s)", "",
              "| Figure | Value | Reference | Ratio | Target | |", "|---|---|---|---|---|---|"]
    for row in block.get("rows", []):
        cells = [row.get(k) for k in ("figure", "value", "reference", "ratio", "target", "status")]
        lines.append("| " + " | ".join("" if c is None else (_fmt(c, 3) if isinstance(c, float) else str(c))
                                       for c in cells) + " |")
    lines.append("")
    return lines


MODULE_TITLES = (("control", "Control plane (issue 8 item 1)"), ("userspace", "User-space forwarding (issue 8 item 5)"),
                 ("scale", "Scale: concurrent calls, memory, CPU, sampling, expiry, restart (issue 8 items 2-4, 7)"))


def _streams(s) -> str:
    return f"{s} stream" if int(s) == 1 else f"{s} streams"


def _met(value, target, above: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if above else value < target
    return "met" if ok else "**missed**"


def _without_cycles(value):
    if isinstance(value, dict):
        return {k: _without_cycles(v) for k, v in value.items() if k != "cycles"}
    if isinstance(value, list):
        return [_without_cycles(v) for v in value]
    return value


def _section_marks(name: str) -> tuple[str, str]:
    return f"<!-- {name}: from bench/{name}.py -->\n", f"<!-- /{name} -->\n"


def _kept_sections(output: Path) -> tuple[str, dict]:
    """What other commands put in RESULTS.md and results.json (`make soak`), to keep on rewriting them."""
    text = ""
    try:
        old = (output / "RESULTS.md").read_text()
        begin, end = _section_marks("soak")
        if begin in old and end in old:
            text = old[old.index(begin):old.index(end) + len(end)]
    except OSError:
        pass
    try:
        kept = {key: value for key, value in json.loads((output / "results.json").read_text()).items()
                if key.startswith("soak")}
    except (OSError, ValueError):
        kept = {}
    return text, kept


def replace_section(output: Path, name: str, markdown_text: str, figures: dict, details: dict) -> None:
    """Put a separate command's figures in RESULTS.md (between its marks) and results.json, keeping the rest."""
    begin, end = _section_marks(name)
    try:
        text = (output / "RESULTS.md").read_text()
    except OSError:
        text = "# Benchmark results\n"
    block = begin + markdown_text + end
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    (output / "RESULTS.md").write_text(text)
    try:
        data = json.loads((output / "results.json").read_text())
    except (OSError, ValueError):
        data = {}
    data.update(figures)
    data[f"{name}_details"] = details
    (output / "results.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write(output: Path, results, opts, elapsed: float) -> None:
    kept_text, kept_numbers = _kept_sections(output)
    numbers, details = results.numbers, results.details
    info = machine()
    data = dict(numbers)
    data["machine"] = info
    data["options"] = {"streams": list(opts.streams), "rounds": opts.rounds, "udp_rounds": opts.udp_rounds,
                       "group_seconds": opts.group_seconds, "payload_bytes": opts.size, "smoke": opts.smoke,
                       "elapsed_s": round(elapsed, 1)}
    data["available"] = results.available
    data["notes"] = results.notes
    data["details"] = _without_cycles(details)     # the per-round rates stay out: they are many
    data.update(kept_numbers)
    (output / "results.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    text = markdown(results, opts, info, elapsed)
    if kept_text:
        text = text.rstrip("\n") + "\n\n" + kept_text
    (output / "RESULTS.md").write_text(text)


def markdown(results, opts, info: dict, elapsed: float) -> str:
    n = results.numbers
    relay_reason = results.available.get("relay")
    lines = ["# Benchmark results", ""]
    if opts.smoke:
        lines += ["**Smoke run** (`python -m bench --smoke`): about a second a scenario, few streams; the "
                  "figures mean nothing, only that every scenario ran.", ""]
    lines += [f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, kernel {info['kernel']}, "
              f"{info['os']}, Python {info['python']}, {info['iptables']}, {info['conntrack']}. "
              f"Commit {info['commit']}, {info['date']}, run took {elapsed:.0f} s. Load average (1, 5, 15 min) "
              f"at the start {' '.join(results.details.get('loadavg_start', []))}, at the end "
              f"{' '.join(info['loadavg_end'])}: other work on the machine during the run shows as noise in "
              f"the absolute figures; the ratios are taken within each blast.", ""]

    lines += summary_lines(results, opts.smoke)
    for name, title in MODULE_TITLES:
        lines += module_lines(results, name, title)
    if not n.get("kernel_pps_ratio_1") and "phase_c" not in results.details:
        lines += accounting_lines(results)
        if results.notes:
            lines += ["## Notes from this run", ""] + [f"- {note}" for note in results.notes] + [""]
        return "\n".join(lines)

    lines += ["## Kernel path (issue 4; issue 8 item 6)", "",
              "Packets per second delivered at the callee (G.711-sized datagrams, 172 bytes of payload), the "
              "median over the blasts. The scenarios of a blast take turns every 10 ms; a ratio is the median, "
              "over every such round of all the blasts, of the ratio within the round (so it need not equal the "
              "quotient of the two medians, and a round where other work took the CPU is one outlier, not a "
              "bias). Every blast is listed further down.", "",
              "| Figure | Value | Reference | Ratio | Target | |",
              "|---|---|---|---|---|---|"]
    streams = sorted(opts.streams)
    for s in streams:
        lines.append(f"| plain IP forwarding, {_streams(s)} (packets/s) | "
                     f"{_fmt(n.get(f'plain_pps_{s}'))} | | | | |")
        lines.append(f"| reference: conntrack CLI DNAT+SNAT entries, {_streams(s)} | "
                     f"{_fmt(n.get(f'reference_pps_{s}'))} | plain | {_fmt(n.get(f'reference_pps_ratio_{s}'), 3)} "
                     f"| (0.6-0.65 on the notes' machine) | |")
    for s in streams:
        value = n.get(f"kernel_pps_ratio_{s}")
        lines.append(f"| **relay kernel path**, {_streams(s)} (`kernel_pps_ratio_{s}`) | "
                     f"{_fmt(n.get(f'relay_pps_{s}'))} | {_fmt(n.get(f'reference_pps_{s}_with_relay'))} (reference, "
                     f"same blasts) | {_fmt(value, 3)} | >= {KERNEL_RATIO_TARGET} | {_met(value, KERNEL_RATIO_TARGET)} |")
    cpu = n.get("relay_cpu_percent_kernel_blast")
    lines.append(f"| relay process CPU while the kernel relays {max(streams)} streams at "
                 f"{_fmt(n.get('relay_pps_cpu_blast'))} packets/s (% of one CPU) | {_fmt(cpu, 2)} | | | < "
                 f"{RELAY_CPU_TARGET} | {_met(cpu, RELAY_CPU_TARGET, above=False)} |")
    ins = n.get("entries_installed_per_s")
    cli = n.get("entries_installed_per_s_cli")
    ratio = ins / cli if ins and cli else None
    lines.append(f"| entries installed/s, relay API, batches of {n.get('entries_api_batch', 'n/a')} "
                 f"(`entries_installed_per_s`) | {_fmt(ins)} | {_fmt(cli)} (conntrack CLI, a process an entry) | "
                 f"{_fmt(ratio, 1)} | >= {ENTRIES_TARGET:,} | {_met(ins, ENTRIES_TARGET)} |")
    rem, rem_cli = n.get("entries_removed_per_s"), n.get("entries_removed_per_s_cli")
    lines.append(f"| entries removed/s, relay API (a stream at a time) | {_fmt(rem)} | {_fmt(rem_cli)} (CLI) | "
                 f"{_fmt(rem / rem_cli if rem and rem_cli else None, 1)} | | |")
    lines.append("")
    if relay_reason:
        lines += [f"(c) the relay's kernel path: **not available** — {relay_reason}", ""]

    lines += ["### More figures", "", "| Figure | Value |", "|---|---|"]
    extra = [
        *[(f"plain forwarding in the fresh namespace (no netfilter table), {_streams(s)} (packets/s; measured "
           f"alone, before the others)", f"plain_pps_pristine_{s}", 0) for s in streams],
        *[(f"conntrack + NAT cost per packet, {_streams(s)} (us; 1/reference - 1/plain, median of the rounds)",
           f"conntrack_nat_us_per_packet_{s}", 3) for s in streams],
        *[(f"relay path's extra cost over the reference per packet, {_streams(s)} (us)",
           f"relay_extra_us_per_packet_{s}", 3) for s in streams],
        *[(f"kernel_pps_ratio_{s}: quartiles of the per-round ratios", None, 0) for s in streams],
        *[(f"relay/reference from the blasts' delivered totals (median of blasts), {_streams(s)}",
           f"kernel_pps_ratio_{s}_delivered", 3) for s in streams],
        *[(f"reference/plain from the blasts' delivered totals (median of blasts), {_streams(s)}",
           f"reference_pps_ratio_{s}_delivered", 3) for s in streams],
        *[(f"relay / the reference made again while the relay runs (a conntrack event listener present, as "
           f"for the relay's own entries), {_streams(s)}", f"kernel_pps_ratio_{s}_vs_reference_ev", 3)
          for s in streams],
        *[(f"reference made while the relay runs / reference made before it (two references: how far apart "
           f"equal entries land), {_streams(s)}", f"reference_ev_pps_ratio_{s}", 3) for s in streams],
        *[(f"reference/plain with the relay running (its rules loaded), {_streams(s)}",
           f"reference_pps_ratio_{s}_with_relay", 3) for s in streams],
        *[(f"UDP-socket sender: reference/plain, {_streams(s)}", f"reference_pps_ratio_{s}_udp_sender", 3)
          for s in streams],
        *[(f"UDP-socket sender: relay/reference, {_streams(s)}", f"kernel_pps_ratio_{s}_udp_sender", 3)
          for s in streams],
        ("relay's user-space packet counter during the relay-only blast", "relay_userspace_packets_during_blast", 0),
        ("share of the relay-only blast counted by the relay's kernel entries", "relay_kernel_carried_fraction", 4),
        ("dispatcher CPU during the relay-only blast (% of one CPU)", "dispatcher_cpu_percent_kernel_blast", 2),
        ("relay's kernel entries left after it stopped", "relay_entries_left_after_stop", 0),
        ("entries installed/s, bare netlink batches (no rules, no bookkeeping)", "entries_installed_per_s_netlink", 0),
        ("entries removed/s, bare netlink batches", "entries_removed_per_s_netlink", 0),
        *[(f"entries installed/s, relay API, batches of {b}", f"entries_installed_per_s_batch_{b}", 0)
          for b in (100, 10, 1)],
        ("entries removed/s, conntrack CLI", "entries_removed_per_s_cli", 0),
        ("CPU share of the path, phase B (median of blasts; 1 = the sender's CPU was the path's alone)",
         "path_cpu_share_phase_b", 2),
        ("CPU share of the path, phase C (median of blasts)", "path_cpu_share_phase_c", 2),
        ("one ctnetlink dump finding nothing (ms; it walks the whole hash table)", "conntrack_dump_ms_empty", 2),
        *[(f"one ctnetlink dump of {c:,} entries by mark (ms)", f"conntrack_dump_ms_{c}", 2) for c in (1000, 100)],
        ("the kernel's conntrack hash buckets (nf_conntrack_buckets, shared by all namespaces)",
         "conntrack_buckets", 0),
    ]
    for title, key, digits in extra:
        if key is None:
            s = title.split(":")[0].rsplit("_", 1)[1]
            low, high = n.get(f"kernel_pps_ratio_{s}_q1"), n.get(f"kernel_pps_ratio_{s}_q3")
            if low is not None:
                lines.append(f"| {title} ({n.get(f'kernel_pps_ratio_{s}_cycles')} rounds) | "
                             f"{low:.3f} - {high:.3f} |")
            continue
        if key in n:
            lines.append(f"| {title} | {_fmt(n[key], digits)} |")
    lines.append("")

    lines += ["### Every blast", "",
              "Packets per second delivered at the callee over the time each scenario was sent; ratios: "
              "median over the blast's rounds; CPU share of the path: the sender's CPU time while sending "
              "(which includes the forwarding done in its context) over the sending time: well under 1 when "
              "other work on the machine took that CPU.", "",
              "| Phase | Sender | Streams | plain | reference | reference made while the relay runs | relay "
              "| reference/plain | relay/reference | CPU share of the path |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for phase, title in (("pristine", "0 (fresh namespace)"), ("phase_b", "B (hooks, CLI entries)"),
                         ("phase_c", "C (relay running)")):
        block = results.details.get(phase, {})
        if phase == "pristine":
            block = {"packet": {s: [run] for s, run in block.items()}}
        for mode, by_n in block.items():
            for s, runs in sorted(by_n.items(), key=lambda item: int(item[0])):
                for run in runs:
                    cells = [_fmt(run[name]["pps"]) if name in run else ""
                             for name in ("plain", "reference", "reference_ev", "relay")]
                    r1, r2 = run.get("reference/plain"), run.get("relay/reference")
                    share = run.get("path_cpu_share")
                    lines.append(f"| {title} | {mode} | {s} | {' | '.join(cells)} | "
                                 f"{_fmt(r1, 3) if r1 else ''} | {_fmt(r2, 3) if r2 else ''} | "
                                 f"{_fmt(share, 2) if share is not None else ''} |")
    lines.append("")
    lines += accounting_lines(results)
    lines += ["## How it is measured", "", HOW, ""]
    if results.notes:
        lines += ["## Notes from this run", ""] + [f"- {note}" for note in results.notes] + [""]
    return "\n".join(lines)


ACCOUNTING = (
    ("accounting_records_per_s_database_sqlite", "database backend, SQLite (a file)"),
    ("accounting_records_per_s_database_postgresql", "database backend, PostgreSQL (fsync on)"),
    ("accounting_records_per_s_database_mariadb", "database backend, MariaDB (PyMySQL, a log flush per commit)"),
    ("accounting_records_per_s_radius", "RADIUS backend, FreeRADIUS (detail file)"),
)


def accounting_lines(results) -> list[str]:
    """The accounting section: records per second each backend writes (bench/accounting.py)."""
    n = results.numbers
    details = results.details.get("accounting")
    if details is None:
        return []
    records = details.get("records")
    not_measured = details.get("not_measured") or {}
    lines = ["## Accounting (issue 6; issue 8)", "",
             "Records per second each accounting backend writes through the dispatcher's own machinery "
             "(`python -m bench.accounting`): a BackendWorker (the durable spool with its fsync per record, the "
             "backend's thread) in a Twisted reactor; %s records submitted at once, the clock runs until the last "
             "one is written. The servers are real and local (tests/accounting/servers.py), with durable "
             "settings. No reference and no target: issue 6 asks for the figures only." % (
                 f"{records:,}" if records else "N"), "",
             "| Figure | Value | Reference | Ratio | Target | |",
             "|---|---|---|---|---|---|"]
    for key, title in ACCOUNTING:
        value = n.get(key)
        if value is None:
            shown = "not measured" + (f" ({not_measured[key]})" if not_measured.get(key) else "")
        else:
            shown = f"{_fmt(value, 1)} records/s"
        lines.append(f"| {title} (`{key}`) | {shown} | none | | none | |")
    lines.append("")
    return lines


HOW = """\
`make bench` (or `python -m bench`, as root) builds `bench/tools/*.c` into
`bench/build/` and three network namespaces: caller 198.18.1.10 -- relay
(198.18.1.1 / 198.18.2.1, ip_forward on) -- callee 198.18.2.20. Every
scenario crosses the relay namespace the same way:

- **plain**: the caller sends to the callee's own address; the relay routes
  it. In phases B and C conntrack is on in the namespace, so these packets
  are exempted (raw PREROUTING `CT --notrack` for the callee's address).
- **reference**: the caller sends to 198.18.1.1:A; an entry made with
  `conntrack -I -p udp -s CALLER -d RELAY --sport X --dport A -r RELAY -q CALLER
  --reply-port-src A --reply-port-dst X --dst-nat CALLEE:Y --src-nat RELAY:B`
  (reply tuple = plain inverse, NAT given separately) rewrites it to
  198.18.1.1:B -> callee:Y. Hooks: a nat table and one `-m conntrack` rule in
  a chain nothing jumps to (iptables-legacy).
- **relay**: media-dispatcher and media-relay (`kernel_forwarding = yes`) in
  the relay namespace; the calls are set up over the dispatcher's proxy
  socket (offer, answer), both parties send RTP until each receives the
  other's, the relay's entries (its mark) are listed, a probe packet must
  raise an entry's counter; then the blasts. Next to it, the reference's
  entries and a second set made the same way once the relay runs (as the
  relay's own, while a conntrack event listener exists): how far apart two
  sets of equal entries land is the noise floor of the comparison.

The sender (`udpsend`, pinned to CPU 0) sends 172-byte RTP-looking datagrams,
one group of streams per scenario, the groups in turn 10 ms each, as fast
as it can, and reports what it sent in every slice; the receiver (`udprecv`, pinned to CPU 1, one bound socket per
port, busy polling so the delivering CPU pays no wakeups) counts per group.
On veth the whole path (the relay's forwarding, the callee's delivery) runs
on the sender's CPU, so each figure is what one CPU carries end to end, and
a ratio compares two paths through the same seconds. Default sender: an
AF_PACKET socket with frames built in advance (the sender's own UDP stack
would take CPU from the path measured); the UDP-socket sender (one bound,
connected socket per stream, sendmmsg) is the cross-check.

The relay namespace's `nf_conntrack_udp_timeout` is raised to 120 s so
that idle entries (the CLI's, the relay's) outlive the blasts of the other
groups; the CLI's entries are put back before each blast if gone anyway.
The relay's CPU is its utime+stime (/proc) over a relay-only blast of all
its streams lasting one `traffic_sampling_period` (15 s), divided by the
wall time of that blast.

Entries per second: the conntrack CLI one process per entry (timed inside
the namespace), and the relay's `ConntrackTable.install` / `remove_port`
driven directly (`bench/entries.py`) with real latched streams, starting
from the user-space entries a real hand-over replaces: one batch is one
netlink batch (the flows join the NOTRACK inhibitor set, the old entries
are deleted, the NAT entries created, the flows leave the set)."""
