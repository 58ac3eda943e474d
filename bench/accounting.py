"""Accounting benchmark (issue 6): records per second each accounting backend
writes through the dispatcher's own machinery.

    python -m bench.accounting [--records N] [--smoke] [--json]

For each backend — the database backend on SQLite (a file in a temporary
directory), on PostgreSQL and on MariaDB, and the RADIUS backend — a
BackendWorker (the durable spool, the backend's thread, the retries:
mediaproxy/accounting) runs in a Twisted reactor as in the dispatcher. One record is written first
(the table is created, the connection opened), then N records are submitted
at once and the clock runs until the worker has written the last one:
records/s = N / that time. It includes what the dispatcher pays per record
(the spool's fsynced file, its removal, the hand-off to the thread). For
information (stderr only), the rate at which N records already in the spool
drain when a worker starts (after an outage or a restart): the backend's
speed without the spool's fsync per record.

The servers are real and local, started for the run by tests/accounting/
servers.py (needs root and the Debian packages postgresql, mariadb-server
and freeradius): PostgreSQL with its defaults (fsync on) on 127.0.0.1,
MariaDB likewise durable (a log flush per commit, utf8mb4) through PyMySQL
(``mysql+pymysql://``), FreeRADIUS logging every request to a detail file
(the detail file is checked to hold all the requests). The records are
statistics of one-stream audio sessions.

Figures: accounting_records_per_s_database_sqlite, _database_postgresql,
_database_mariadb, _radius; None for a backend that could not be measured
(the reason goes to stderr). With --json, one line: {"figures": {...},
"not_measured": {key: reason}, "records": N}.

`run()` measures in a child process (a Twisted reactor runs once per
process) and returns the figures; `run_detailed()` returns that JSON line's
dict: what the bench suite (bench/__main__.py) calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEYS = ("accounting_records_per_s_database_sqlite", "accounting_records_per_s_database_postgresql",
        "accounting_records_per_s_database_mariadb", "accounting_records_per_s_radius")
RECORDS = 1000
SMOKE_RECORDS = 100
BACKEND_TIMEOUT = 180.0          # s for one backend's N records before it counts as failed


def log(message: str) -> None:
    print("bench.accounting: " + message, file=sys.stderr, flush=True)


def session_record(n: int) -> dict:
    """The statistics of an ended one-stream audio call (SPEC §6), as the dispatcher accounts it."""
    start = 1_700_000_000.0 + n
    return {
        "call_id": "bench-%08d@example.com" % n, "from_tag": "from-%d" % n, "to_tag": "to-%d" % n,
        "from_uri": "sip:alice@example.com", "to_uri": "sip:bob@example.com",
        "caller_ua": "Bench UA 1.0", "callee_ua": "Bench UA 2.0", "username": "alice@example.com",
        "dialog_id": "%d:%d" % (n % 4096, n), "start_time": start, "duration": 61.25,
        "streams": [{
            "media_type": "audio", "status": "closed", "timeout_wait": 0,
            "caller_codec": "G711u", "callee_codec": "G711a", "start_time": 0.0, "end_time": 61.25,
            "post_dial_delay": 1.5, "caller_bytes": 1_053_360, "callee_bytes": 1_051_640,
            "caller_packets": 6125, "callee_packets": 6115,
            "caller_local": "192.0.2.1:40000", "callee_local": "192.0.2.1:40002",
            "caller_remote": "198.51.100.7:4000", "callee_remote": "203.0.113.9:5000"}],
        "timed_out": False, "all_streams_ice": False,
    }


def measure(reactor, backend, spool_dir: str, records: int):
    """A Deferred firing (records/s submitted-to-written, records/s of a backlog) of `backend`
    through BackendWorkers (or failing): first N records submitted at once, then N records
    already in the spool when the worker starts (what a restart after an outage drains: the
    backend's own speed, without the spool's fsync per record)."""
    from twisted.internet import defer, task

    from mediaproxy.accounting.spool import Spool
    from mediaproxy.accounting.worker import BackendWorker

    @defer.inlineCallbacks
    def written(worker, count, deadline):
        while worker.written < count:
            if time.monotonic() > deadline:
                raise RuntimeError("%s: %d of %d records written in %.0f s (last error: %s)" % (
                    backend.name, worker.written, count, BACKEND_TIMEOUT, worker.last_error))
            yield task.deferLater(reactor, 0.002, lambda: None)

    @defer.inlineCallbacks
    def run():
        deadline = time.monotonic() + BACKEND_TIMEOUT
        worker = BackendWorker(backend, os.path.join(spool_dir, "submitted"), reactor)
        worker.start()
        try:
            worker.submit(session_record(0))                 # opens the connection, creates the table
            yield written(worker, 1, deadline)
            started = time.perf_counter()
            for n in range(1, records + 1):
                worker.submit(session_record(n))
            yield written(worker, records + 1, deadline)
            submitted_rate = records / (time.perf_counter() - started)
            if worker.last_error is not None:
                log("%s: writes failed on the way (%s)" % (backend.name, worker.last_error))
        finally:
            worker.stop()
        backlog = os.path.join(spool_dir, "backlog")
        spool = Spool(backlog)
        for n in range(records + 1, 2 * records + 1):
            spool.put(session_record(n))
        worker = BackendWorker(backend, backlog, reactor)
        started = time.perf_counter()
        worker.start()
        try:
            yield written(worker, records, deadline)
            backlog_rate = records / (time.perf_counter() - started)
        finally:
            worker.stop()
        return submitted_rate, backlog_rate

    return run()


def measure_all(records: int, workdir: Path, reasons: dict | None = None) -> dict:
    """Start the servers, measure each backend in one reactor run, stop the servers.
    Why a figure is None goes to stderr and into `reasons` (key -> one line)."""
    from twisted.internet import defer, reactor

    from mediaproxy.accounting.database import DatabaseBackend
    from mediaproxy.accounting.radius import RadiusBackend
    from tests.accounting.servers import (OUR_DICTIONARY, MariaDBServer, PostgresServer, RadiusServer,
                                          mariadb_missing_requirements, missing_requirements)
    from tests.support.processes import ProcessManager

    figures = dict.fromkeys(KEYS)
    reasons = {} if reasons is None else reasons

    def not_measured(keys, reason):
        for key in keys:
            reasons[key] = reason
        log("%s: not measured: %s" % (", ".join(keys), reason))

    manager = ProcessManager(workdir / "logs")
    servers = []
    problems = missing_requirements()

    def database(url):
        return DatabaseBackend(SimpleNamespace(dburi=url, sessions_table="media_sessions", callid_column="call_id",
                                               fromtag_column="from_tag", totag_column="to_tag", info_column="info"))

    backends = [("accounting_records_per_s_database_sqlite",
                 lambda: database("sqlite:///%s" % (workdir / "accounting.sqlite")))]
    postgres = radius = None
    if problems:
        not_measured(["accounting_records_per_s_database_postgresql", "accounting_records_per_s_radius"],
                     "; ".join(problems))
    else:
        def start_postgres():
            nonlocal postgres
            postgres = PostgresServer(manager, fsync=True)
            servers.append(postgres)
            postgres.start()
            return database(postgres.create_database("accounting"))

        backends.append(("accounting_records_per_s_database_postgresql", start_postgres))
    mariadb_problems = mariadb_missing_requirements()
    if mariadb_problems:
        not_measured(["accounting_records_per_s_database_mariadb"], "; ".join(mariadb_problems))
    else:
        def start_mariadb():
            mariadb = MariaDBServer(manager, durable=True)
            servers.append(mariadb)
            mariadb.start()
            return database(mariadb.create_database("accounting"))

        backends.append(("accounting_records_per_s_database_mariadb", start_mariadb))
    if not problems:
        def start_radius():
            nonlocal radius
            radius = RadiusServer(manager)
            servers.append(radius)
            radius.start()
            config = radius.client_config(workdir / "radius-client")
            return RadiusBackend(SimpleNamespace(config_file=str(config), additional_dictionary=str(OUR_DICTIONARY)),
                                 str(REPO))

        backends.append(("accounting_records_per_s_radius", start_radius))

    @defer.inlineCallbacks
    def run_all():
        try:
            for key, make in backends:
                try:
                    backend = make()
                    rate, backlog_rate = yield measure(reactor, backend, str(workdir / "spool" / key), records)
                except Exception as e:          # one backend's failure leaves the others' figures
                    not_measured([key], "%s: %s" % (type(e).__name__, " ".join(str(e).split())[:300]))
                    continue
                figures[key] = round(rate, 1)
                log("%s = %.1f (%d records submitted at once; a backlog of %d in the spool drains at %.1f/s)"
                    % (key, rate, records, records, backlog_rate))
        finally:
            reactor.stop()

    try:
        reactor.callWhenRunning(run_all)
        reactor.run(installSignalHandlers=False)
        if radius is not None and figures["accounting_records_per_s_radius"] is not None:
            logged = len(radius.entries())
            if logged != 2 * records + 1:
                figures["accounting_records_per_s_radius"] = None
                not_measured(["accounting_records_per_s_radius"],
                             "FreeRADIUS logged %d requests, not %d" % (logged, 2 * records + 1))
    finally:
        for server in servers:
            server.close()
        manager.stop_all()
    return figures


def run_detailed(records: int = RECORDS, smoke: bool = False, timeout: float = 600.0) -> dict:
    """{"figures", "not_measured", "records"}, measured by `python -m bench.accounting --json`
    in a child process (its stderr goes to ours). Raises when the child printed no result."""
    command = [sys.executable, "-m", "bench.accounting", "--json", "--records",
               str(SMOKE_RECORDS if smoke else records)]
    # The child's temporary directories (its own, the servers') go under one of ours: removed
    # here even when the child is killed at the timeout (its servers die with it: death signal).
    scratch = tempfile.mkdtemp(prefix="mp-bench-accounting-")
    os.chmod(scratch, 0o755)                # the postgres and mysql users enter the servers' directories
    try:
        result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, timeout=timeout, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": scratch})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = result.stdout.decode().strip().splitlines()
    try:
        answer = json.loads(lines[-1])
        answer["figures"] = {key: answer["figures"].get(key) for key in KEYS}
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        raise RuntimeError("bench.accounting failed (exit %d, no result)" % result.returncode) from None
    return answer


def run(records: int = RECORDS, smoke: bool = False, timeout: float = 600.0) -> dict:
    """The figures (key -> records/s or None), measured in a child process."""
    return run_detailed(records, smoke, timeout)["figures"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accounting", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=RECORDS, help="records per backend (default %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="%d records per backend" % SMOKE_RECORDS)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    options = parser.parse_args(argv)
    records = SMOKE_RECORDS if options.smoke else options.records
    workdir = Path(tempfile.mkdtemp(prefix="mp-bench-accounting-"))
    reasons = {}
    try:
        figures = measure_all(records, workdir, reasons)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if options.json:
        print(json.dumps({"figures": figures, "not_measured": reasons, "records": records}))
    else:
        for key in KEYS:
            value = figures[key]
            print("%-48s %s" % (key, "n/a" if value is None else "%.1f records/s" % value))
    return 0 if figures["accounting_records_per_s_database_sqlite"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
