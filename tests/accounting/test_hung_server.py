"""A hung accounting server (issue 6: "when a backend is down or slow, records
wait"): PostgreSQL frozen with SIGSTOP, as behind a network path that drops
packets — TCP connections still open (the kernel answers), queries never get
an answer. A record ends up waiting for it; the dispatcher must still stop
on SIGTERM, saving its sessions, and the record arrive once the server is
back."""

import json
import signal

import psycopg
import pytest

from tests.accounting.helpers import RELAY_A, accounting_status, answered_without_media
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

STOP_TIMEOUT = 10


def rows(postgres, call_id):
    try:
        return postgres.query("accounting", "SELECT count(*) FROM media_sessions WHERE call_id = %s", call_id)
    except psycopg.errors.UndefinedTable:
        return [(0,)]


def test_the_dispatcher_stops_and_keeps_the_record_while_the_database_server_hangs(cluster, postgres):
    url = postgres.create_database("accounting")
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}})
    cluster.start_relay(RELAY_A)
    with cluster.proxy() as proxy:
        answered_without_media(proxy, "before-hang", RELAY_A)
        assert proxy.remove("before-hang") == "removed"
        wait_for(lambda: accounting_status(cluster)["database"]["written"] == 1, timeout=20,
                 message="the first record")
        postgres.freeze()
        try:
            answered_without_media(proxy, "held-call", RELAY_A)           # still going on at the restart
            answered_without_media(proxy, "during-hang", RELAY_A)
            assert proxy.remove("during-hang") == "removed"
            wait_for(lambda: accounting_status(cluster)["database"]["queued"] == 1, timeout=10,
                     message="the record to wait")
            cluster.dispatcher.send_signal(signal.SIGTERM)
            try:
                cluster.dispatcher.wait(timeout=STOP_TIMEOUT)
            except AssertionError:
                raise AssertionError("the dispatcher did not stop within %d s of SIGTERM:\n%s" % (
                    STOP_TIMEOUT, cluster.dispatcher.tail(10))) from None
        finally:
            postgres.thaw()
    state = json.loads((cluster.runtime_root / "dispatcher" / "dispatcher-state.json").read_text())
    assert "held-call" in json.dumps(state)
    cluster.restart_dispatcher()
    wait_for(lambda: rows(postgres, "during-hang") == [(1,)], timeout=30, interval=0.25,
             message="the waiting record to arrive after the restart")
    assert rows(postgres, "before-hang") == [(1,)]
    wait_for(lambda: accounting_status(cluster)["database"]["queued"] == 0, timeout=10)
