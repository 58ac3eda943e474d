"""The RADIUS backend against a real FreeRADIUS (SPEC §7, issue 6): for each
ended call of the field scenario the server logs one Accounting-Request whose
attributes are those of SPEC §7 with the values of the session's statistics
(the statistics themselves are read back from a SQLite database backend of
the same dispatcher); a duplicate record is one more request, nothing else.

The dispatcher reads its client side from the proxy's radiusclient-style
configuration file, whose dictionary holds the standard attributes: here
FreeRADIUS' own RFC 2865/2866 dictionaries, which name Acct-Status-Type 3
`Interim-Update` (and `Alive`), as radcli's (OpenSIPS) names it `Alive`:
nothing names it `Update`."""

import json

import pytest
import sqlalchemy

from tests.accounting.helpers import OUR_DICTIONARY, accounting_status, assert_radius_entry, end_calls, start_cluster
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

def statistics(url):
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("SELECT call_id, info FROM media_sessions")).all()
    finally:
        engine.dispose()
    return {call_id: json.loads(info) for call_id, info in rows}


def test_each_ended_call_is_an_accounting_request_with_the_attributes_of_its_statistics(cluster, radius, tmp_path):
    client_config = radius.client_config(tmp_path / "radius-client")
    url = "sqlite:///%s" % (tmp_path / "reference.sqlite")
    start_cluster(cluster, "database, radius", {
        "Database": {"dburi": url},
        "Radius": {"config_file": client_config, "additional_dictionary": OUR_DICTIONARY}})
    ended, submitted = end_calls(cluster)

    def all_written():
        status = accounting_status(cluster)
        # The servers are up: no write may fail, not even once.
        assert [s["last_error"] for s in status.values()] == [None, None], status
        return status["database"]["written"] == status["radius"]["written"] == submitted

    wait_for(all_written, timeout=20, interval=0.2, message="the records to be written")
    assert accounting_status(cluster)["radius"] == {"backend": "radius", "queued": 0, "written": submitted,
                                                    "set_aside": 0, "last_error": None}
    entries = wait_for(lambda: len(radius.entries()) == submitted and radius.entries(), timeout=10,
                       message="FreeRADIUS to log %d requests" % submitted)
    accounted = statistics(url)
    by_session = {}
    for entry in entries:
        by_session.setdefault(entry["Acct-Session-Id"], []).append(entry)
    assert sorted(by_session) == sorted(call.call_id for call in ended)
    for call in ended:
        call.check_info(accounted[call.call_id])
        first, *others = by_session[call.call_id]
        assert_radius_entry(first, accounted[call.call_id], call.relay)
    # Values the test knows by itself (beyond agreeing with the statistics).
    removed = by_session["call-removed"][0]
    assert (removed["User-Name"], removed["NAS-IP-Address"], removed["Acct-Delay-Time"]) == ("alice", "127.0.0.2", 1)
    assert (removed["Media-Codecs"], removed["Sip-Applications"]) == ("G711u/G711a", "Audio")
    assert removed["Sip-User-Agents"] == "caller-ua + callee-ua"
    assert removed["Acct-Input-Octets"] > 0 and removed["Acct-Output-Octets"] > 0
    assert by_session["call-expired"][0]["Media-Info"] == "timeout"
    assert by_session["call-expired"][0]["User-Name"] == "mediaproxy@default"
    assert by_session["call-expired"][0]["NAS-IP-Address"] == "127.0.0.3"
    assert by_session["call-ice"][0]["Media-Info"] == "ICE session"
    # The duplicate (same call id and tags, no media) is one more request and harmed nothing.
    [duplicate] = by_session["call-removed"][1:]
    assert (duplicate["Sip-From-Tag"], duplicate["Sip-To-Tag"]) == ("caller-tag", "callee-tag")
    assert (duplicate["Acct-Input-Octets"], duplicate["Media-Codecs"]) == (0, "Unknown/Unknown")
    assert [len(by_session[call.call_id]) for call in ended if call.call_id != "call-removed"] == [1, 1]
    cluster.assert_alive()
