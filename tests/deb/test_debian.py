"""The Debian packages as an operator gets them.

`make deb` builds mediaproxy-common, -dispatcher and -relay from a copy of
the checkout with Debian's Python (the build runs the unit tests against
Debian 12's libraries) and runs lintian. The packages are then installed
with apt, the way an operator would, and the installed daemons, started
with their systemd units' command lines, the configuration in
/etc/mediaproxy and the runtime directory /run/mediaproxy, carry a sipp
call through Kamailio, the media in the kernel.

Installing changes the machine: the packages are purged at the end and the
files the test put in /etc/mediaproxy removed. If MediaProxy is already
configured on this machine (/etc/mediaproxy/config.ini), the tests do not
run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import Capture, Management, rtp_sources, start_kamailio, start_uac, start_uas, write_config
from tests.kernel.helpers import MARK, conntrack_entries
from tests.support.certs import make_certs_dir
from tests.support.processes import wait_for

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mediaproxy-common", "mediaproxy-dispatcher", "mediaproxy-relay")
CONFIG_DIR = Path("/etc/mediaproxy")
RUNTIME_DIR = Path("/run/mediaproxy")
UNIT_DIR = Path("/lib/systemd/system")
TOOLS = ("dpkg-buildpackage", "lintian", "apt-get", "systemd-analyze", "git")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

DISPATCHER_PORT, MANAGEMENT_PORT = 25060, 25061
PORT_RANGE = (50000, 50100)
CALL_MS = 5000


def run(argv, timeout=300, env=None, cwd=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, argv))} exited with {result.returncode}:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def installed_packages() -> list[str]:
    result = run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *PACKAGES], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.endswith(" installed")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The directory with the three .deb files, the .changes file and lintian.txt."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)} (make deps installs them)")
    if (CONFIG_DIR / "config.ini").exists():
        pytest.skip(f"{CONFIG_DIR / 'config.ini'} exists: MediaProxy is configured on this machine")
    out = tmp_path_factory.mktemp("deb")
    run(["make", "-s", "deb", f"DEB_OUT={out}"], cwd=ROOT, timeout=600)
    return out


@pytest.fixture(scope="module")
def installed(built):
    """The packages installed with apt from the built files; purged afterwards."""
    debs = sorted(built.glob("*.deb"))
    assert [deb.name.split("_")[0] for deb in debs] == sorted(PACKAGES)
    if installed_packages():
        run(["apt-get", "purge", "-y", *PACKAGES], env=APT_ENV)
    result = run(["apt-get", "install", "-y", "--no-install-recommends", *(f"./{deb.name}" for deb in debs)],
                 env=APT_ENV, cwd=built)
    try:
        yield result.stdout
    finally:
        run(["apt-get", "purge", "-y", *PACKAGES], env=APT_ENV)
        shutil.rmtree(RUNTIME_DIR, ignore_errors=True)


def test_lintian_finds_nothing_to_fix(built):
    report = (built / "lintian.txt").read_text()
    tags = [line for line in report.splitlines() if re.match(r"[EW]: ", line)]
    assert tags == [], report


def test_the_packages_install_the_layout_operators_expect(installed):
    assert sorted(installed_packages()) == sorted(PACKAGES), installed
    for path in ("/usr/bin/media-dispatcher", "/usr/bin/media-relay", "/etc/mediaproxy/config.ini.sample",
                 "/etc/mediaproxy/radius/dictionary", "/usr/share/mediaproxy/tls/make-certs",
                 "/usr/share/doc/mediaproxy-common/INSTALL.gz", "/usr/share/doc/mediaproxy-common/SECURITY.md.gz"):
        assert Path(path).is_file(), path
    assert (CONFIG_DIR / "tls").is_dir() and Path("/var/spool/mediaproxy").is_dir()
    # Debian's Python and Debian's libraries, not this checkout's virtualenv
    for daemon in ("media-dispatcher", "media-relay", "media-sessions"):
        assert Path("/usr/bin", daemon).read_text().startswith("#!/usr/bin/python3\n")
        assert run(["/usr/bin/" + daemon, "--version"]).stdout.strip().startswith(daemon + " ")
        assert run(["man", "-w", daemon]).stdout.strip() == f"/usr/share/man/man1/{daemon}.1.gz"
    where = run(["/usr/bin/python3", "-c", "import mediaproxy; print(mediaproxy.__file__)"], cwd="/").stdout
    assert where.strip() == "/usr/lib/python3/dist-packages/mediaproxy/__init__.py"
    assert not (CONFIG_DIR / "config.ini").exists()  # the units wait for the operator's configuration


def test_the_systemd_units_verify(installed):
    units = [UNIT_DIR / f"{package}.service" for package in PACKAGES[1:]]
    result = run(["systemd-analyze", "verify", *units])
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "mediaproxy" in line]
    assert complaints == []
    relay = unit_settings(units[1])
    assert relay["Type"] == ["notify"] and relay["Restart"] == ["on-failure"]
    assert set(relay["CapabilityBoundingSet"][0].split()) >= {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert "--systemd" in relay["ExecStart"][0]


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class Notifications:
    """What the daemons tell systemd (sd_notify), on a socket of our own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.received

    def close(self) -> None:
        self.sock.close()


def start_unit(topology, host: str, package: str, notify_path: Path):
    """The unit's ExecStart command in ``host``, with NOTIFY_SOCKET set as systemd would."""
    [command] = unit_settings(UNIT_DIR / f"{package}.service")["ExecStart"]
    env = {"PATH": SYSTEM_PATH, "NOTIFY_SOCKET": str(notify_path), "LANG": "C.UTF-8"}
    return topology.spawn(host, shlex.split(command), name=package, env=env, cwd="/")


@pytest.fixture
def configured(installed, tmp_path):
    """A config.ini and certificates in /etc/mediaproxy; removed afterwards."""
    written: list[Path] = []

    def configure(sections, certs_of):
        certs_of(CONFIG_DIR / "tls")
        written.extend((CONFIG_DIR / "tls").iterdir())
        written.append(write_config(CONFIG_DIR, sections))

    try:
        yield configure
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def test_a_call_through_the_installed_daemons_and_kamailio(configured, make_topology, tmp_path):
    topo = make_topology(["proxy", "relay1", "caller", "callee"])
    proxy, relay = topo.address("proxy"), topo.address("relay1")
    configured(
        {
            "Dispatcher": {"listen": f"{proxy}:{DISPATCHER_PORT}", "listen_management": f"{proxy}:{MANAGEMENT_PORT}",
                           "management_use_tls": "no"},
            "Relay": {"dispatchers": f"{proxy}:{DISPATCHER_PORT}", "relay_ip": relay,
                      "port_range": "%d:%d" % PORT_RANGE, "kernel_forwarding": "yes"},
        },
        lambda path: make_certs_dir(path, dispatcher_san_ips=(proxy,), relay_san_ips=(relay,)),
    )
    notifications = Notifications(tmp_path / "notify.sock")
    try:
        dispatcher = start_unit(topo, "proxy", "mediaproxy-dispatcher", notifications.path)
        wait_for(lambda: dispatcher.assert_running() or "READY=1" in notifications.poll(), timeout=20,
                 message="the dispatcher to tell systemd it is ready")
        relay_daemon = start_unit(topo, "relay1", "mediaproxy-relay", notifications.path)
        wait_for(lambda: relay_daemon.assert_running() or notifications.poll().count("READY=1") == 2, timeout=20,
                 message="the relay to tell systemd it is ready")
    finally:
        notifications.close()
    management = Management(topo)

    def relay_active():
        relay_daemon.assert_running()
        return [s for s in management.summary() if s.get("ip") == relay and s.get("status") == "active"]

    [summary] = wait_for(relay_active, timeout=15, interval=0.1, message="the relay to connect")
    assert summary["forwarding"] == "kernel", summary
    assert (RUNTIME_DIR / "dispatcher.sock").is_socket()
    assert {"media-dispatcher.pid", "media-relay.pid"} <= set(os.listdir(RUNTIME_DIR))

    start_kamailio(topo, tmp_path, dispatcher_socket=RUNTIME_DIR / "dispatcher.sock")
    at_callee = Capture(topo, "callee", tmp_path / "callee.pcap")
    uas = start_uas(topo, tmp_path / "sipp")
    uac = start_uac(topo, tmp_path / "sipp", duration_ms=CALL_MS)

    def in_the_kernel():
        uac.process.assert_running()
        entries = conntrack_entries(topo, "relay1")
        sessions = management.sessions()
        return entries and sessions and (entries, sessions)

    entries, [session] = wait_for(in_the_kernel, timeout=CALL_MS / 1000, interval=0.2,
                                  message="the call's media in the kernel")
    assert all(entry.mark == MARK for entry in entries)
    assert session["streams"][0]["caller_codec"] == "G711a"

    assert uac.wait(timeout=20) == 0, uac.error_log()
    assert uas.wait(timeout=10) == 0, uas.error_log()
    wait_for(lambda: management.sessions() == [], timeout=5, interval=0.1, message="the call to end")
    wait_for(lambda: conntrack_entries(topo, "relay1") == [], timeout=5, interval=0.1,
             message="the kernel entry to go")

    offer = uas.received_sdp().audio()
    assert offer.connection == relay and PORT_RANGE[0] <= offer.port < PORT_RANGE[1]
    to_callee = rtp_sources(at_callee.stop(), f"{topo.address('callee')}:6000")
    assert set(to_callee) == {(f"{relay}:{offer.port}", 8)}, to_callee
    assert to_callee[(f"{relay}:{offer.port}", 8)] >= CALL_MS // 30 // 2
