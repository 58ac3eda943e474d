"""The database backend against a real PostgreSQL (SPEC §7, issue 6): calls
through the real dispatcher and relays end (removed, expired, expired as
unselected ICE) and their rows hold exactly their statistics, in a table and
columns named by the configuration; a duplicate record is harmless."""

import json

import pytest

from tests.accounting.helpers import RELAY_A, accounting_status, answered_without_media, end_calls, start_cluster
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

NAMES = {"sessions_table": "mp_billing", "callid_column": "sip_call_id", "fromtag_column": "caller_tag",
         "totag_column": "callee_tag", "info_column": "statistics"}


def test_rows_in_a_custom_table_are_the_statistics_of_the_ended_calls(cluster, postgres):
    url = postgres.create_database("billing")
    start_cluster(cluster, "database", {"Database": {"dburi": url, **NAMES}})
    ended, submitted = end_calls(cluster)

    def rows():
        return postgres.query("billing", "SELECT sip_call_id, caller_tag, callee_tag, statistics FROM mp_billing"
                                         " ORDER BY sip_call_id")

    wait_for(lambda: accounting_status(cluster)["database"]["written"] == submitted, timeout=20, interval=0.2,
             message="the dispatcher to write its records")
    assert accounting_status(cluster) == {"database": {"backend": "database", "queued": 0, "written": submitted,
                                                       "set_aside": 0, "last_error": None}}
    # One row per accounted call: the duplicate changed nothing, the unanswered call has none.
    found = {call_id: (from_tag, to_tag, json.loads(info)) for call_id, from_tag, to_tag, info in rows()}
    assert sorted(found) == sorted(call.call_id for call in ended)
    for call in ended:
        from_tag, to_tag, info = found[call.call_id]
        assert (from_tag, to_tag) == ("caller-tag", "callee-tag")
        call.check_info(info)           # the first call-removed, with its media, not the duplicate

    # The table the dispatcher created: the configured names, unique on the three ids.
    columns = postgres.query("billing", "SELECT column_name FROM information_schema.columns"
                                        " WHERE table_name = 'mp_billing' ORDER BY ordinal_position")
    assert [c for (c,) in columns] == ["sip_call_id", "caller_tag", "callee_tag", "statistics"]
    [(definition,)] = postgres.query("billing", "SELECT indexdef FROM pg_indexes WHERE tablename = 'mp_billing'")
    assert "UNIQUE" in definition and "(sip_call_id, caller_tag, callee_tag)" in definition
    assert postgres.query("billing", "SELECT count(*) FROM pg_tables WHERE tablename = 'media_sessions'") == [(0,)]

    # The dispatcher and relays are fine, and a later record still goes in.
    cluster.assert_alive()
    with cluster.proxy() as proxy:
        answered_without_media(proxy, "call-after", RELAY_A)
        assert proxy.remove("call-after") == "removed"
    wait_for(lambda: postgres.query("billing", "SELECT count(*) FROM mp_billing WHERE sip_call_id = 'call-after'")
             == [(1,)], timeout=20, interval=0.2, message="the record after the duplicate")
    assert accounting_status(cluster)["database"] == {"backend": "database", "queued": 0,
                                                      "written": submitted + 1, "set_aside": 0, "last_error": None}
