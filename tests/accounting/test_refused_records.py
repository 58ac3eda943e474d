"""A record that a backend can never take must not hold up the records after
it (SPEC §7: records wait while a backend is *down*; issue 6: each is written
exactly once).

Two real SIP values that the backends refuse for good, while the servers are
up: a From tag of 80 characters (the database's from_tag column is
VARCHAR(64): PostgreSQL answers "value too long", every time) and two long
User-Agent headers (Sip-User-Agents over 253 octets cannot be a RADIUS
attribute: pyrad raises ValueError, every time). The next call's record must
still arrive; the refused one must not vanish either (written some other way,
or kept on disk).
"""

import pytest

from tests.accounting.helpers import OUR_DICTIONARY, RELAY_A, accounting_status, answered_without_media
from tests.support.processes import WaitTimeout, wait_for

pytestmark = pytest.mark.integration

LONG_TAG = "t" * 80
LONG_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 "
           "Safari/537.36 Edg/126.0.0.0 SIP.js/0.21.2")                  # 139 characters
CALLER_UA, CALLEE_UA = LONG_UA + " caller", LONG_UA + " callee"


def in_spool(cluster, backend: str, call_id: str) -> bool:
    directory = cluster.runtime_root / "dispatcher" / "accounting" / backend
    return any(call_id in path.read_text(errors="replace") for path in directory.iterdir() if path.is_file())


def table_call_ids(postgres) -> set:
    try:
        return {call_id for (call_id,) in postgres.query("accounting", "SELECT call_id FROM media_sessions")}
    except Exception:            # not created yet
        return set()


def test_a_record_a_backend_refuses_does_not_hold_up_the_next_ones(cluster, postgres, radius, tmp_path):
    url = postgres.create_database("accounting")
    client_config = radius.client_config(tmp_path / "radius-client")
    cluster.start_dispatcher(accounting="database, radius", sections={
        "Database": {"dburi": url},
        "Radius": {"config_file": client_config, "additional_dictionary": OUR_DICTIONARY}})
    cluster.start_relay(RELAY_A)
    with cluster.proxy() as proxy:
        offer = proxy.update("refused-call", "request", "audio:127.0.0.1:9:sendrecv", from_tag=LONG_TAG,
                             media_relay=RELAY_A, user_agent=CALLER_UA)
        assert offer.startswith(RELAY_A), offer
        answer = proxy.update("refused-call", "reply", "audio:127.0.0.1:9:sendrecv", from_tag=LONG_TAG,
                              to_tag="callee-tag", user_agent=CALLEE_UA)
        assert answer.startswith(RELAY_A), answer
        assert proxy.remove("refused-call", from_tag=LONG_TAG) == "removed"
        answered_without_media(proxy, "next-call", RELAY_A)
        assert proxy.remove("next-call") == "removed"

    def next_record_everywhere():
        radius_sessions = {entry.get("Acct-Session-Id") for entry in radius.entries()}
        return "next-call" in table_call_ids(postgres) and "next-call" in radius_sessions

    try:
        wait_for(next_record_everywhere, timeout=20, interval=0.25)
    except WaitTimeout:
        raise AssertionError("the record after the refused one did not arrive: database %s, RADIUS %s; "
                             "accounting: %s" % (sorted(table_call_ids(postgres)),
                                                 [e.get("Acct-Session-Id") for e in radius.entries()],
                                                 accounting_status(cluster))) from None
    # The refused record did not vanish: written after all, or kept on disk.
    assert "refused-call" in table_call_ids(postgres) or in_spool(cluster, "database", "refused-call")
    assert ("refused-call" in {entry.get("Acct-Session-Id") for entry in radius.entries()}
            or in_spool(cluster, "radius", "refused-call"))
    cluster.assert_alive()
