"""The database backend against a real MariaDB (SPEC §7, issue 6: "MySQL/MariaDB
work by URL alone"): the dispatcher is given a ``mysql+pymysql://`` URL and
nothing else; the calls of test_postgresql end through the real dispatcher
and relays (removed, expired, expired as unselected ICE, a duplicate) and
their rows, in a table and columns named by the configuration, hold exactly
their statistics. MariaDB as Debian configures it: utf8mb4, so the unique key
on three 255-character columns must fit InnoDB's 3072 bytes."""

import json

import pytest

from tests.accounting.helpers import accounting_status, end_calls, start_cluster
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

NAMES = {"sessions_table": "mp_billing", "callid_column": "sip_call_id", "fromtag_column": "caller_tag",
         "totag_column": "callee_tag", "info_column": "statistics"}


def test_rows_in_a_custom_table_are_the_statistics_of_the_ended_calls(cluster, mariadb):
    url = mariadb.create_database("billing")
    assert url.startswith("mysql+pymysql://")
    url = url.replace("mysql+pymysql://", "mysql://")         # by URL alone: the dispatcher picks the driver
    start_cluster(cluster, "database", {"Database": {"dburi": url, **NAMES}})
    ended, submitted = end_calls(cluster)

    wait_for(lambda: accounting_status(cluster)["database"]["written"] == submitted, timeout=20, interval=0.2,
             message="the dispatcher to write its records")
    assert accounting_status(cluster) == {"database": {"backend": "database", "queued": 0, "written": submitted,
                                                       "set_aside": 0, "last_error": None}}
    # One row per accounted call: the duplicate changed nothing, the unanswered call has none.
    rows = mariadb.query("billing", "SELECT sip_call_id, caller_tag, callee_tag, statistics FROM mp_billing")
    found = {call_id: (from_tag, to_tag, json.loads(info)) for call_id, from_tag, to_tag, info in rows}
    assert len(rows) == len(found)
    assert sorted(found) == sorted(call.call_id for call in ended)
    for call in ended:
        from_tag, to_tag, info = found[call.call_id]
        assert (from_tag, to_tag) == ("caller-tag", "callee-tag")
        assert (info["call_id"], info["timed_out"]) == (call.call_id, call.timed_out)
        call.check_info(info)           # every field; the first call-removed, not the duplicate
    assert {call_id: info["timed_out"] for call_id, (_, _, info) in found.items()} == {
        "call-removed": False, "call-expired": True, "call-ice": False}

    # The table the dispatcher created: the configured names, unique on the three ids, utf8mb4.
    columns = mariadb.query("billing", "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                                       " 'billing' AND table_name = 'mp_billing' ORDER BY ordinal_position")
    assert [c for (c,) in columns] == ["sip_call_id", "caller_tag", "callee_tag", "statistics"]
    keys = mariadb.query("billing", "SELECT index_name, non_unique, column_name FROM information_schema.statistics"
                                    " WHERE table_schema = 'billing' AND table_name = 'mp_billing'"
                                    " ORDER BY index_name, seq_in_index")
    assert [(non_unique, column) for _, non_unique, column in keys] == [
        (0, "sip_call_id"), (0, "caller_tag"), (0, "callee_tag")]
    [(collation,)] = mariadb.query("billing", "SELECT table_collation FROM information_schema.tables"
                                              " WHERE table_schema = 'billing' AND table_name = 'mp_billing'")
    assert collation.startswith("utf8mb4")
    assert mariadb.query("billing", "SHOW TABLES LIKE 'media_sessions'") == []
    cluster.assert_alive()
