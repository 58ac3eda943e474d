"""Accounting against real servers (SPEC §7, issue 6): PostgreSQL and
FreeRADIUS from Debian's packages, started per test on free loopback ports
(tests/accounting/servers.py), and the real dispatcher and relays
(tests/integration/daemons.py's Cluster).

Fixtures: ``postgres`` (a running PostgreSQL; a copy of one cluster made per
session by initdb), ``radius`` (a running FreeRADIUS whose detail file
receives the accounting requests), ``mariadb`` (a running MariaDB, its own
data directory per test), ``cluster`` (an empty Cluster). They need root and
the packages postgresql, freeradius and mariadb-server (requirements-apt.txt);
the tests are skipped, saying why, where those are missing (MariaDB's on
their own: without it PostgreSQL's and FreeRADIUS' tests still run).
"""

import shutil

import pytest

from tests.accounting.servers import (MariaDBServer, PostgresServer, RadiusServer, mariadb_missing_requirements,
                                      missing_requirements)
from tests.integration.conftest import cluster  # noqa: F401  (the real dispatcher and relays)
from tests.support.processes import processes, pytest_runtest_makereport  # noqa: F401


@pytest.fixture(scope="session")
def servers_available():
    problems = missing_requirements()
    if problems:
        pytest.skip("accounting servers unavailable: " + "; ".join(problems))


@pytest.fixture(scope="session")
def postgres_template(servers_available):
    template = PostgresServer.template()
    try:
        yield template
    finally:
        shutil.rmtree(template.parent, ignore_errors=True)


@pytest.fixture
def postgres(processes, postgres_template):  # noqa: F811
    # fsync off: the tests restart it only with a clean (fast) shutdown
    server = PostgresServer(processes, template=postgres_template, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def radius(processes, servers_available):  # noqa: F811
    server = RadiusServer(processes)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mariadb_available():
    problems = mariadb_missing_requirements()
    if problems:
        pytest.skip("MariaDB unavailable: " + "; ".join(problems))


@pytest.fixture
def mariadb(processes, mariadb_available):  # noqa: F811
    # not durable: the tests never crash it
    server = MariaDBServer(processes, durable=False)
    try:
        server.start()
        yield server
    finally:
        server.close()


