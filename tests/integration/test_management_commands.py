"""The management commands beyond SPEC §5 (find, end, drain, undrain, relay)
through the real daemons, asked with the media-sessions command-line client."""

import json
import subprocess

import pytest

from tests.integration.conftest import RELAY_A, RELAY_B
from tests.integration.daemons import PYTHON, REPO, Call, parse_address_reply
from tests.integration.test_accounting import rows
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

MEDIA_SESSIONS = REPO / "scripts" / "media-sessions"


def media_sessions(cluster, *command, expect=0):
    """media-sessions with the dispatcher's own config.ini: (stdout, stderr)."""
    done = subprocess.run([PYTHON, MEDIA_SESSIONS, "--config-dir", cluster.workdir / "dispatcher", *command],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    return done.stdout, done.stderr


def relay_of_new_call(proxy, call_id, preferred):
    """The relay an offer of a new call, preferring `preferred`, lands on."""
    ip, _ = parse_address_reply(proxy.update(call_id, "request", "audio:127.0.0.1:9:sendrecv", media_relay=preferred))
    return ip


def test_find_and_end_a_call_which_is_accounted_and_gone_from_its_relay(cluster, tmp_path):
    url = "sqlite:///%s" % (tmp_path / "accounting.sqlite")
    cluster.start_dispatcher(accounting="database", sections={"Database": {"dburi": url}})
    cluster.start_relays([RELAY_A, RELAY_B])
    with cluster.proxy() as proxy:
        call, other = Call(proxy, "find-me@example.com"), Call(proxy, "other-call")
        try:
            call.exchange()
            table, _ = media_sessions(cluster, "find", "FIND-ME")
            header, row = table.splitlines()
            assert header.split()[:4] == ["CALL-ID", "FROM", "TO", "DURATION"]
            assert row.split()[:3] == ["find-me@example.com", "sip:alice@example.com", "sip:bob@example.com"]
            assert "audio G711u active" in row
            listed, _ = media_sessions(cluster, "--json", "find", "alice@")     # the URI matches both
            assert sorted(json.loads(line)["call_id"] for line in listed.splitlines()) == \
                ["find-me@example.com", "other-call"]
            assert media_sessions(cluster, "find", "nobody")[0] == ""

            ended, _ = media_sessions(cluster, "--json", "end", "find-me@example.com")
            [statistics] = [json.loads(line) for line in ended.splitlines()]
            assert statistics["call_id"] == "find-me@example.com"
            assert statistics["streams"][0]["caller_packets"] > 0
            assert [s["call_id"] for s in cluster.sessions()] == ["other-call"]
            wait_for(lambda: rows(url), timeout=10, message="no accounting row for the ended call")
            assert [row[0] for row in rows(url)] == ["find-me@example.com"]
            # the proxy's own remove comes later (after the dialog ended): the session is gone
            assert proxy.remove("find-me@example.com") == "error"
            _, error = media_sessions(cluster, "end", "find-me@example.com", expect=1)
            assert "answered error" in error
        finally:
            call.close()
            other.close()
    cluster.assert_alive()


def test_a_drained_relay_gets_no_new_calls_keeps_its_own_and_undrain_brings_it_back(two_relays):
    with two_relays.proxy() as proxy:
        running = Call(proxy, "running", media_relay=RELAY_A)
        try:
            assert running.relay_ip == RELAY_A
            table, _ = media_sessions(two_relays, "drain", RELAY_A)
            assert RELAY_A in table and "(draining)" in table
            # preferred, yet sent elsewhere
            assert [relay_of_new_call(proxy, f"new-{n}", RELAY_A) for n in range(4)] == [RELAY_B] * 4
            running.exchange()       # the call it carries goes on
            summary = {entry["ip"]: entry for entry in
                       map(json.loads, media_sessions(two_relays, "--json", "summary")[0].splitlines())}
            assert summary[RELAY_A]["draining"] is True and summary[RELAY_B]["draining"] is False
            media_sessions(two_relays, "undrain", RELAY_A)
            assert relay_of_new_call(proxy, "after", RELAY_A) == RELAY_A
            _, error = media_sessions(two_relays, "drain", "192.0.2.99", expect=1)     # no such relay
        finally:
            running.close()
    two_relays.assert_alive()


def test_relay_details_say_how_it_forwards_and_its_port_use(two_relays):
    with two_relays.proxy() as proxy:
        call = Call(proxy, "detailed", media_relay=RELAY_A)
        try:
            details, _ = media_sessions(two_relays, "--json", "relay", RELAY_A)
            entry = json.loads(details)
            assert entry["ip"] == RELAY_A and entry["status"] == "active" and entry["active"] is True
            assert entry["forwarding"] == "userspace" and entry["draining"] is False
            assert entry["port_pairs"]["used"] == 2 and entry["dispatcher_session_count"] == 1
            text, _ = media_sessions(two_relays, "relay", RELAY_A)
            assert "forwarding:" in text and "port_pairs:" in text
        finally:
            call.close()


def test_media_sessions_over_tls_and_its_errors(cluster):
    cluster.start_dispatcher(management_use_tls=True)
    cluster.start_relays([RELAY_A])
    table, _ = media_sessions(cluster, "summary")       # the dispatcher's own certificate, from certs_path
    assert table.splitlines()[1].split()[:2] == [RELAY_A, "active"]
    _, error = media_sessions(cluster, "--tls", "no", "summary", expect=2)     # plain TCP on a TLS port
    assert "media-sessions:" in error
    _, error = media_sessions(cluster, "--address", "127.0.0.1:9", "summary", expect=2)
    assert "cannot connect to 127.0.0.1:9" in error
    cluster.assert_alive()
