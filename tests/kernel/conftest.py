"""Kernel fast path tests (issue 4): the relay's conntrack NAT entries, seen
from outside, with the real daemons over real TLS in network namespaces.

They need root, the conntrack tool, iptables-legacy and python-iptables;
without them they are skipped. ``make_rig(sysctls)`` gives a ``Rig``
(tests/kernel/helpers.py) with the dispatcher running; the test starts the
relay with the options it needs. Everything (daemons, namespaces, sockets,
temporary directories) is removed at teardown, also after a failure; a
failing test gets the tail of every daemon's log in its report.
"""

import contextlib
import shutil

import pytest

from tests.kernel.helpers import HOSTS, build_rig
from tests.support.netns import make_topology, require_root  # noqa: F401
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401

TOOLS = ("conntrack", "iptables-legacy")


@pytest.fixture
def kernel_tools():
    require_root()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    try:
        import iptc  # noqa: F401  (the relay's python-iptables, in the interpreter that runs the daemons)
    except Exception as exc:
        pytest.skip(f"python-iptables cannot be used: {exc}")


@pytest.fixture
def make_rig(kernel_tools, make_topology, processes, tmp_path):  # noqa: F811
    """Factory ``make_rig(sysctls=None) -> Rig``: namespaces proxy, relay1,
    caller, callee (``sysctls`` per host on top of the defaults, e.g. short
    conntrack timeouts for relay1) and the recording dispatcher in proxy."""
    with rigs_made(processes) as made:
        def factory(sysctls=None):
            topo = make_topology(HOSTS, sysctls)
            rig, workdir = build_rig(topo, tmp_path)
            made.append((rig, workdir))
            return rig

        yield factory


@contextlib.contextmanager
def rigs_made(processes):
    """A list for the (rig, workdir) a factory fixture makes: closed, stopped and removed at the end."""
    made = []
    try:
        yield made
    finally:
        try:
            for rig, _ in made:
                rig.close()
            processes.stop_all()
        finally:
            for _, workdir in made:
                shutil.rmtree(workdir, ignore_errors=True)
