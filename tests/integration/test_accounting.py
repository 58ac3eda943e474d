"""Finished sessions land in the accounting database (SPEC §7), here the
embedded default: SQLite; records wait in the spool directory."""

import json
import signal

import pytest
import sqlalchemy

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def rows(url):
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(
                "SELECT call_id, from_tag, to_tag, info FROM media_sessions ORDER BY call_id")).all()
    except sqlalchemy.exc.OperationalError:
        return []
    finally:
        engine.dispose()


def test_a_removed_call_is_one_row_with_its_statistics(cluster, tmp_path):
    url = "sqlite:///%s" % (tmp_path / "accounting.sqlite")
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}})
    cluster.start_relay(RELAY_A)
    with cluster.proxy() as proxy:
        call = Call(proxy, "billed-call")
        try:
            call.exchange()
            assert proxy.remove("billed-call") == "removed"
        finally:
            call.close()
        unanswered = proxy.update("never-answered", "request", "audio:127.0.0.1:9:sendrecv")
        assert unanswered.startswith(RELAY_A)
        assert proxy.remove("never-answered") == "removed"
    wait_for(lambda: rows(url), timeout=10, message="no accounting row")
    [(call_id, from_tag, to_tag, info)] = rows(url)
    assert (call_id, from_tag, to_tag) == ("billed-call", "caller-tag", "callee-tag")
    info = json.loads(info)
    assert info["timed_out"] is False and info["start_time"] is not None
    [stream] = info["streams"]
    assert stream["caller_packets"] > 0 and stream["callee_packets"] > 0
    assert cluster.management_command("accounting") == [json.dumps(
        {"backend": "database", "queued": 0, "written": 1, "set_aside": 0, "last_error": None})]


def test_records_of_an_unusable_database_wait_in_the_spool_and_survive_a_restart(cluster, tmp_path):
    database = tmp_path / "missing-dir" / "accounting.sqlite"          # sqlite cannot create it yet
    url = "sqlite:///%s" % database
    spool = tmp_path / "spool"
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}},
                             arguments=("--spool-dir", spool))
    cluster.start_relay(RELAY_A)
    with cluster.proxy() as proxy:
        for n in range(3):
            call = Call(proxy, "call-%d" % n)
            call.close()
            assert proxy.remove("call-%d" % n) == "removed"
    wait_for(lambda: json.loads(cluster.management_command("accounting")[0])["queued"] == 3, timeout=10,
             message="the records are not queued")
    assert "unable to open database file" in json.loads(cluster.management_command("accounting")[0])["last_error"]
    assert len(list((spool / "database").glob("*.json"))) == 3
    assert not (cluster.runtime_root / "dispatcher" / "accounting").exists()
    cluster.restart_dispatcher(signum=signal.SIGKILL)
    database.parent.mkdir()
    wait_for(lambda: len(rows(url)) == 3, timeout=15, message="the queued records did not arrive")
    assert [row[0] for row in rows(url)] == ["call-0", "call-1", "call-2"]
    wait_for(lambda: not any((spool / "database").glob("*.json")), timeout=5, message="the spool to be emptied")
