"""Long-running children of the tests (daemons, sipp, tcpdump).

Every child
- runs under ``setpriv --pdeathsig KILL``, so it dies with the test process
  even when that one is killed;
- by default (``contain=True``) runs in its own PID namespace under a tiny
  init, so that when it dies, or the test process is killed, the kernel also
  kills everything it forked (Kamailio's workers survive their main process
  otherwise). The command itself is not PID 1 there, so it gets its signals
  as usual; a command killed by signal N shows as exit status 128+N;
- leads its own session and process group (``start_new_session``): stopping
  it signals that group, and nothing else (never a process found by name);
- writes stdout and stderr to ``<log_dir>/<name>.log``.

``wait_for`` is the one bounded polling loop the tests use instead of sleeps.

Pytest: the ``processes`` fixture gives a ``ProcessManager`` that stops all
its children at teardown; when a test fails, ``pytest_runtest_makereport``
(import it into a conftest) adds the tail of every child's log to the report.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import pytest

__all__ = [
    "WaitTimeout",
    "wait_for",
    "Process",
    "ProcessManager",
    "wait_for_unix_socket",
    "wait_for_tcp_port",
    "processes",
    "pytest_runtest_makereport",
]

T = TypeVar("T")

PDEATHSIG = ("setpriv", "--pdeathsig", "KILL")
# unshare forks the init into a new PID namespace and kills it if unshare dies
# (--kill-child); when the init (PID 1) exits, the kernel kills the namespace.
CONTAIN = ("unshare", "--pid", "--fork", "--kill-child")
# PID 1 of that namespace: runs the command, reaps orphans, exits with the
# command's status. Having no signal handlers, it ignores SIGTERM and the like
# sent to the process group; the command receives them directly.
_INIT = """\
import os, sys
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as exc:
        sys.stderr.write(f"cannot run {sys.argv[1]}: {exc}\\n")
    os._exit(127)
while True:
    pid, status = os.wait()
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
"""
LOG_TAIL_LINES = 60


class WaitTimeout(AssertionError):
    """A condition awaited by ``wait_for`` did not become true in time."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a true value and return that value.

    Raises ``WaitTimeout`` after ``timeout`` seconds, naming ``message`` (or
    the predicate) and the last result or ignored exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # an expected failure until the condition holds
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what} (last result: {last!r})")
        time.sleep(interval)


class Process:
    """A child process started in its own process group with a log file."""

    def __init__(
        self,
        argv: Iterable[str],
        name: str,
        log_dir: Path,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
        contain: bool = True,
    ) -> None:
        self.name = name
        self.contained = contain
        self.argv = [str(arg) for arg in argv]
        self.netns = netns
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        command = list(PDEATHSIG)
        if netns is not None:
            command += ["ip", "netns", "exec", netns]
        if contain:
            command += [*CONTAIN, sys.executable, "-I", "-S", "-c", _INIT]
        command += self.argv
        with open(self.log_path, "ab") as log:
            log.write(f"# {'[' + netns + '] ' if netns else ''}{shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        self.pid = self._popen.pid
        self._returncode: int | None = None

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} returncode={self.poll()}>"

    # -- state, without reaping: the pid stays ours until stop() reaps it --

    def poll(self) -> int | None:
        """Exit status (negative signal number when killed), or None while running."""
        if self._returncode is not None:
            return self._returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped
            self._returncode = self._popen.returncode if self._popen.returncode is not None else -1
            return self._returncode
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    @property
    def running(self) -> bool:
        return self.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit status."""
        wait_for(
            lambda: self.poll() is not None,
            timeout=timeout,
            interval=0.02,
            message=f"{self.name} (pid {self.pid}) to exit",
        )
        return self.poll()

    @property
    def command_pid(self) -> int:
        """The pid of the command itself (not of unshare and the init when contained)."""
        if not self.contained:
            return self.pid
        if getattr(self, "_command_pid", None) is None:

            def grandchild() -> int | None:
                for init in _children(self.pid):  # unshare -> init -> command
                    for command in _children(init):
                        return command
                return None

            self._command_pid = wait_for(grandchild, timeout=5, interval=0.01, message=f"{self.name} to start")
        return self._command_pid

    def send_signal(self, signum: int) -> None:
        """Signal the command itself (e.g. SIGHUP, SIGUSR1), not its group."""
        if self.poll() is None:
            os.kill(self.command_pid, signum)

    def stop(self, timeout: float = 5.0, signum: int = signal.SIGTERM) -> int:
        """Stop the process group: ``signum``, up to ``timeout`` s, then SIGKILL.

        The leader is reaped only after its group got the final SIGKILL, so the
        group id cannot have been reused by an unrelated process meanwhile.
        """
        if self._returncode is None:
            if self.poll() is None:
                self._killpg(signum)
                deadline = time.monotonic() + timeout
                while self.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            self._killpg(signal.SIGKILL)  # stragglers of the group, or a hung leader
            self._popen.wait(timeout=10)
            self._returncode = self._popen.returncode
        return self._returncode

    def _killpg(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    # -- log --

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``.

        Fails early, with the log's tail, if the process exits first.
        """
        regex = re.compile(pattern, re.MULTILINE)

        def check() -> re.Match[str] | None:
            match = regex.search(self.log_text())
            if match is None and self.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.poll()}) before logging {pattern!r}:\n{self.tail()}"
                )
            return match

        return wait_for(check, timeout=timeout, message=f"{self.name} to log {pattern!r}")

    def assert_running(self) -> None:
        if self.poll() is not None:
            raise AssertionError(f"{self.name} exited with status {self.poll()}:\n{self.tail()}")


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class ProcessManager:
    """The children of one test: started with one log directory, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.processes: list[Process] = []

    def start(
        self,
        name: str,
        argv: Iterable[str],
        netns: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
        contain: bool = True,
    ) -> Process:
        used = {process.name for process in self.processes}
        unique, n = name, 1
        while unique in used:
            n += 1
            unique = f"{name}-{n}"
        process = Process(argv, unique, self.log_dir, netns=netns, env=env, cwd=cwd, contain=contain)
        self.processes.append(process)
        return process

    def stop_all(self, netns: str | Iterable[str] | None = None) -> None:
        """Stop the children (those in ``netns`` only, if given), newest first."""
        if isinstance(netns, str):
            netns = {netns}
        elif netns is not None:
            netns = set(netns)
        for process in reversed(self.processes):
            if netns is None or process.netns in netns:
                process.stop()

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> list[tuple[str, str]]:
        return [
            (f"{process.name} (pid {process.pid}, exit {process.poll()}) {process.log_path}", process.tail(lines))
            for process in self.processes
        ]


def wait_for_unix_socket(path: str | Path, timeout: float = 10.0) -> None:
    """Wait until a UNIX stream socket at ``path`` accepts a connection."""

    def connect() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
        return True

    wait_for(connect, timeout=timeout, ignore=(OSError,), message=f"UNIX socket {path} to accept")


def wait_for_tcp_port(host: str, port: int, netns: str | None = None, timeout: float = 10.0) -> None:
    """Wait until ``host:port`` accepts a TCP connection (from inside ``netns``)."""
    from tests.support.netns import socket_in_netns

    def connect() -> bool:
        sock = socket_in_netns(netns) if netns else socket.socket()
        with sock:
            sock.settimeout(1.0)
            sock.connect((host, port))
        return True

    where = f" in {netns}" if netns else ""
    wait_for(connect, timeout=timeout, ignore=(OSError,), message=f"TCP {host}:{port}{where} to accept")


# -- pytest integration (import both names into a conftest.py) --

_MANAGER_KEY = pytest.StashKey[ProcessManager]()


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path):
    """A ProcessManager logging to ``tmp_path/logs``; stops its children at teardown."""
    manager = ProcessManager(tmp_path / "logs")
    request.node.stash[_MANAGER_KEY] = manager
    try:
        yield manager
    finally:
        manager.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failure, attach the tail of each child's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    manager = item.stash.get(_MANAGER_KEY, None)
    if manager is None:
        return
    for title, text in manager.log_tails():
        report.sections.append((f"log tail: {title}", text or "(empty)"))
