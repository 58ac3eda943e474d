"""Integration tests: the real media-dispatcher and media-relay on loopback,
over real TLS, driven through their three sockets.

Fixtures: ``cluster`` (an empty Cluster: the test starts what it
needs) and ``two_relays`` (a dispatcher with relays 127.0.0.2 and 127.0.0.3
connected and active). Every daemon is stopped at teardown; a failing test
gets the tail of every daemon's log in its report.
"""

import pytest

from tests.integration.daemons import Cluster
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401

RELAY_A = "127.0.0.2"
RELAY_B = "127.0.0.3"
RELAYS = (RELAY_A, RELAY_B)


@pytest.fixture
def cluster(processes, tmp_path):  # noqa: F811
    cluster = Cluster(tmp_path, processes)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_relays(cluster):
    """A dispatcher (relay_timeout 2 s) with two active relays."""
    cluster.start_dispatcher()
    cluster.start_relays(RELAYS)
    return cluster
