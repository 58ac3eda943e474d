"""No record is lost (SPEC §7, issue 6): PostgreSQL and FreeRADIUS are down
while 200 answered calls end through the proxy socket, the dispatcher is
restarted (SIGTERM) half way, then the servers come back: exactly 200 records
arrive in each backend, none twice, and the `accounting` queues go down to 0.

The worker retries with a backoff that doubles from 1 s (60 s at most) and
starts again at 1 s when the dispatcher restarts: the servers come back a few
seconds after the restart, so the retries reach them within about 15 s.
"""

import json
import signal
import time

import psycopg
import pytest

from tests.accounting.helpers import OUR_DICTIONARY, RELAY_A, accounting_status, answered_without_media
from tests.support.processes import WaitTimeout, wait_for

pytestmark = pytest.mark.integration

CALLS = 200
DRAIN_TIMEOUT = 30      # s after the servers came back; the retries reach them within ~15 s


def end_calls(cluster, call_ids) -> None:
    with cluster.proxy() as proxy:
        for call_id in call_ids:
            answered_without_media(proxy, call_id, RELAY_A)
            assert proxy.remove(call_id) == "removed", call_id


def queued(cluster) -> dict:
    return {name: status["queued"] for name, status in accounting_status(cluster).items()}


def drain(cluster, histories: dict, timeout: float) -> None:
    """Poll the `accounting` command until no backend has anything queued (or
    `timeout`), keeping what each one showed."""

    def empty():
        status = accounting_status(cluster)
        for name, history in histories.items():
            history.append(status[name]["queued"])
        return not any(s["queued"] for s in status.values())

    try:
        wait_for(empty, timeout=timeout, interval=0.25)
    except WaitTimeout:
        pass                  # each backend's checks below say what did not arrive


def test_records_of_calls_ended_while_the_servers_are_down_arrive_once_after_a_restart(
        cluster, postgres, radius, tmp_path):
    url = postgres.create_database("accounting")
    client_config = radius.client_config(tmp_path / "radius-client")
    cluster.start_dispatcher(accounting="database, radius", sections={
        "Database": {"dburi": url},
        "Radius": {"config_file": client_config, "additional_dictionary": OUR_DICTIONARY}})
    cluster.start_relay(RELAY_A)

    # Both servers are in use before the outage (the database's pool holds a connection).
    end_calls(cluster, ["before-outage"])
    wait_for(lambda: postgres.query("accounting", "SELECT count(*) FROM media_sessions") == [(1,)], timeout=20,
             ignore=(psycopg.errors.UndefinedTable,), message="the first record in PostgreSQL")
    postgres.stop()
    radius.stop()

    first = ["outage-%03d" % n for n in range(CALLS // 2)]
    second = ["outage-%03d" % n for n in range(CALLS // 2, CALLS)]
    end_calls(cluster, first)
    # the proxy's remove is answered before the relay's statistics come: the last record may
    # join its queue a moment after the last answer
    wait_for(lambda: queued(cluster)["database"] == CALLS // 2, timeout=10, interval=0.1,
             message="%d records queued for the database" % (CALLS // 2))
    status = accounting_status(cluster)
    assert status["database"]["last_error"], status
    cluster.restart_dispatcher(signal.SIGTERM)
    assert cluster.dispatcher.wait_for_log(r"database accounting: %d records waiting from before" % (CALLS // 2))
    cluster.wait_relays([RELAY_A])
    end_calls(cluster, second)
    wait_for(lambda: queued(cluster)["database"] == CALLS, timeout=10, interval=0.1,
             message="%d records queued for the database" % CALLS)
    after_calls = queued(cluster)
    assert accounting_status(cluster)["database"]["written"] == 0

    postgres.start()
    radius.start()
    came_back = time.monotonic()

    histories = {name: [count] for name, count in after_calls.items()}
    drain(cluster, histories, DRAIN_TIMEOUT)
    drained_in = time.monotonic() - came_back
    history = histories["database"]
    assert history[-1] == 0, "the database queue did not empty in %d s: %s" % (DRAIN_TIMEOUT, history)
    assert history == sorted(history, reverse=True), "the queue grew while draining: %s" % history
    rows = postgres.query("accounting", "SELECT call_id, from_tag, to_tag, info FROM media_sessions"
                                        " WHERE call_id LIKE 'outage-%' ORDER BY call_id")
    assert [row[0] for row in rows] == first + second
    assert all((row[1], row[2]) == ("caller-tag", "callee-tag") for row in rows)
    assert all(json.loads(row[3])["call_id"] == row[0] for row in rows)
    assert postgres.query("accounting", "SELECT count(*) FROM media_sessions") == [(CALLS + 1,)]
    status = accounting_status(cluster)["database"]
    assert status == {"backend": "database", "queued": 0, "written": CALLS, "set_aside": 0, "last_error": None}, status
    spool = cluster.runtime_root / "dispatcher" / "accounting"
    assert list((spool / "database").iterdir()) == []

    # The RADIUS half.
    history = histories["radius"]
    assert after_calls["radius"] >= CALLS, after_calls
    status = accounting_status(cluster)["radius"]
    assert history[-1] == 0, "the radius queue did not empty in %d s: %s, %s" % (DRAIN_TIMEOUT, history, status)
    assert history == sorted(history, reverse=True), "the queue grew while draining: %s" % history
    assert status["last_error"] is None, status
    assert list((spool / "radius").iterdir()) == []
    sessions = [entry["Acct-Session-Id"] for entry in wait_for(
        lambda: len(radius.entries()) >= CALLS and radius.entries(), timeout=10,
        message="FreeRADIUS to log the requests")]
    outage = sorted(call_id for call_id in sessions if call_id.startswith("outage-"))
    assert outage == first + second, "missing %s, twice %s" % (
        sorted(set(first + second) - set(outage)), sorted({c for c in outage if outage.count(c) > 1}))
    print("queues empty %.1f s after the servers came back" % drained_in)
    cluster.assert_alive()
