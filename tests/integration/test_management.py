"""The management interface (SPEC §5) and the relays it reports."""

import json

import pytest

from mediaproxy import __version__
from tests.integration.conftest import RELAYS

pytestmark = pytest.mark.integration

SUMMARY_KEYS = {"ip", "version", "status", "uptime", "session_count", "stream_count", "bps_relayed"}


def test_summary_lists_both_relays_active_in_the_exact_format(two_relays):
    with two_relays.management() as client:
        client.send_raw(b"summary\r\n")
        raw = client.read_answer_raw()
    # JSON lines, then an empty line, every line ended by \r\n and nothing else.
    assert raw.endswith(b"}\r\n\r\n"), raw
    lines = raw.split(b"\r\n")
    assert lines[-2:] == [b"", b""] and b"\n" not in b"".join(lines), raw
    entries = [json.loads(line) for line in lines[:-2]]
    assert sorted(entry["ip"] for entry in entries) == sorted(RELAYS)
    for entry in entries:
        # SPEC §5's keys, and ours: how the relay forwards, its port use, whether it is drained, the
        # strangers' packets it dropped
        assert set(entry) - SUMMARY_KEYS <= {"forwarding", "userspace_packets", "kernel_entries", "port_pairs",
                                             "draining", "dropped_packets"}, entry
        assert entry["draining"] is False and entry["port_pairs"]["used"] == 0
        assert entry["dropped_packets"] == 0
        assert SUMMARY_KEYS <= set(entry), entry
        assert entry["forwarding"] == "userspace"
        assert entry["status"] == "active"
        assert entry["version"] == __version__
        assert isinstance(entry["uptime"], int) and 0 <= entry["uptime"] < 60
        assert entry["session_count"] == 0
        assert entry["stream_count"] == {}
        assert entry["bps_relayed"] == 0


def test_version_unknown_command_and_quit(two_relays):
    with two_relays.management() as client:
        assert client.command("version") == [__version__]
        assert client.command("no-such-command") == ["error"]
        assert client.command("VERSION") == [__version__]      # commands are not case sensitive
        # answers come in request order, several commands in one write
        client.send_raw(b"version\r\nbogus\r\nsessions\r\n")
        assert client.read_answer() == [__version__]
        assert client.read_answer() == ["error"]
        assert client.read_answer() == []                      # no sessions: just the empty line
        client.send_raw(b"quit\r\n")
        assert client.wait_closed() == b""
    with two_relays.management() as client:
        # quit after other commands: their answers first, then the close
        client.send_raw(b"summary\r\nversion\r\nquit\r\nversion\r\n")
        assert len(client.read_answer()) == 2
        assert client.read_answer() == [__version__]
        assert client.wait_closed() == b""
    with two_relays.management() as client:
        client.send_raw(b"exit\r\n")
        assert client.wait_closed() == b""
    two_relays.assert_alive()


def test_sessions_is_an_empty_answer_without_calls(two_relays):
    with two_relays.management() as client:
        client.send_raw(b"sessions\r\n")
        assert client.read_answer_raw() == b"\r\n"


def test_remove_of_an_unknown_call_answers_error(two_relays):
    with two_relays.proxy() as proxy:
        assert proxy.remove("never-seen") == "error"
        assert proxy.request("remove", {"from_tag": "a", "to_tag": "b"}) == "error"   # no call_id
        proxy.assert_no_reply()
    two_relays.assert_alive()
