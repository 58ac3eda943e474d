"""End-to-end tests: Kamailio, sipp, and the daemons in network namespaces.

They need root, kamailio, sipp and tcpdump; without them they are skipped.
"""

import shutil

import pytest

from tests.support.netns import make_topology, require_root, topology  # noqa: F401
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401

TOOLS = ("kamailio", "sipp", "tcpdump")


@pytest.fixture
def e2e_tools():
    """Skip unless root and the tools of an end-to-end call are installed."""
    require_root()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
