"""Call-flow tests (issue 5): real calls from sipp through Kamailio and
MediaProxy in network namespaces — hold, audio+video, T.38, CANCEL, dead
media ended in the proxy, daemons restarted or shut down mid-call.

They need root, kamailio, sipp and tcpdump (the kernel-path flow also
conntrack and python-iptables); without them they are skipped. ``rig(hosts,
sysctls)`` gives a ``helpers.Rig`` on new namespaces; the test starts the
daemons it needs. Flows that take the ``forwarding`` fixture run twice: with
the relay in user space and with its kernel path. Everything is removed at teardown, also after a failure,
and a failing test gets the tail of every process's log in its report.
"""

import shutil

import pytest

from tests.e2e.conftest import e2e_tools  # noqa: F401
from tests.flows.helpers import FORWARDING, Rig
from tests.support.netns import make_topology, require_root, topology  # noqa: F401
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401


@pytest.fixture
def kernel_tools():
    """Skip unless the relay's kernel path can run here (conntrack, python-iptables)."""
    require_root()
    if shutil.which("conntrack") is None:
        pytest.skip("missing tool: conntrack")
    try:
        import iptc  # noqa: F401  (the relay's python-iptables, in the interpreter that runs the daemons)
    except Exception as exc:
        pytest.skip(f"python-iptables cannot be used: {exc}")


@pytest.fixture(params=FORWARDING)
def forwarding(request):
    """``[Relay] kernel_forwarding`` of a flow run twice: ``no`` (user space), ``yes`` (the kernel path)."""
    if request.param == "yes":
        request.getfixturevalue("kernel_tools")
    return request.param


@pytest.fixture
def rig(e2e_tools, make_topology, processes, tmp_path):  # noqa: F811
    """Factory ``rig(hosts=(proxy, relay1, caller, callee), sysctls=None) -> Rig``."""
    made = []

    def factory(hosts=("proxy", "relay1", "caller", "callee"), sysctls=None) -> Rig:
        topo = make_topology(hosts, sysctls)
        built = Rig.build(topo, tmp_path)
        made.append(built)
        return built

    try:
        yield factory
    finally:
        try:
            processes.stop_all()
        finally:
            for built in made:
                built.close()
