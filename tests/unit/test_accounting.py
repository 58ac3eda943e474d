"""Accounting: the durable spool, the worker's retries, the database rows and
the RADIUS attributes (SPEC §7), without servers (tests/integration and
tests/accounting run the real ones)."""

import json
import os

import pytest
import sqlalchemy
from twisted.internet import defer
from twisted.internet.task import Clock

from mediaproxy.accounting.database import DatabaseBackend
from mediaproxy.accounting.radius import parse_client_config, parse_servers, radius_attributes
from mediaproxy.accounting.spool import Spool
from mediaproxy.accounting.worker import BackendWorker
from mediaproxy.configuration import DatabaseConfig


def statistics(call_id="call-1", **extra):
    stats = {"call_id": call_id, "from_tag": "ft", "to_tag": "tt", "from_uri": "sip:a@x", "to_uri": "sip:b@x",
             "caller_ua": "PhoneA/1.0", "callee_ua": "PhoneB/2.0", "username": "alice@example.com",
             "dialog_id": "12:34", "start_time": 1000.0, "duration": 61.6, "timed_out": False,
             "all_streams_ice": False,
             "streams": [
                 {"media_type": "audio", "status": "closed", "caller_codec": "G711a", "callee_codec": "G711u",
                  "post_dial_delay": 2.4, "caller_bytes": 1000, "callee_bytes": 2000,
                  "caller_local": "203.0.113.5:40000", "callee_local": "203.0.113.5:40002"},
                 {"media_type": "video", "status": "closed", "caller_codec": "H263", "callee_codec": "H263",
                  "post_dial_delay": 3.0, "caller_bytes": 10, "callee_bytes": 20,
                  "caller_local": "203.0.113.5:40004", "callee_local": "203.0.113.5:40006"}]}
    stats.update(extra)
    return stats


# The spool

def test_the_spool_keeps_records_in_order_across_a_restart(tmp_path):
    spool = Spool(str(tmp_path))
    for n in range(3):
        spool.put({"n": n})
    name, record = spool.first()
    assert record == {"n": 0}
    spool.remove(name)
    again = Spool(str(tmp_path))
    assert len(again) == 2
    assert again.first()[1] == {"n": 1}


def test_a_write_cut_short_is_dropped_and_a_corrupt_record_set_aside(tmp_path):
    (tmp_path / "00000000000000000001-000000.json.tmp").write_text('{"half')
    (tmp_path / "00000000000000000002-000000.json").write_text('{"broken')
    (tmp_path / "00000000000000000003-000000.json").write_text('{"n": 3}')
    spool = Spool(str(tmp_path))
    assert spool.first()[1] == {"n": 3}
    assert sorted(os.listdir(tmp_path)) == ["00000000000000000002-000000.json.bad",
                                            "00000000000000000003-000000.json"]


# The worker

class FlakyBackend:
    name = "flaky"

    def __init__(self, failures=0):
        self.failures = failures
        self.written = []

    def write(self, record):
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("backend down")
        self.written.append(record)

    def close(self):
        pass


def worker_for(backend, directory, clock):
    return BackendWorker(backend, str(directory), clock, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))


def test_records_wait_while_the_backend_is_down_and_go_once_in_order(tmp_path):
    clock, backend = Clock(), FlakyBackend(failures=3)
    worker = worker_for(backend, tmp_path, clock)
    worker.submit({"n": 1})
    worker.submit({"n": 2})
    assert backend.written == [] and worker.queued == 2
    assert worker.status()["last_error"] == "ConnectionRefusedError: backend down"
    clock.advance(1)       # second failure
    clock.advance(2)       # third failure: the delays double
    assert backend.written == []
    clock.advance(3.9)
    assert backend.written == []
    clock.advance(0.1)
    assert backend.written == [{"n": 1}, {"n": 2}]
    assert worker.status() == {"backend": "flaky", "queued": 0, "written": 2, "set_aside": 0, "last_error": None}
    assert os.listdir(tmp_path) == []


def test_records_spooled_before_a_restart_are_written_after_it(tmp_path):
    clock = Clock()
    down = worker_for(FlakyBackend(failures=100), tmp_path, clock)
    for n in range(5):
        down.submit({"n": n})
    up = FlakyBackend()
    restarted = worker_for(up, tmp_path, clock)
    restarted.start()
    restarted.stop()
    assert up.written == [{"n": n} for n in range(5)]


def test_a_full_disk_keeps_the_record_in_memory_until_it_can_be_spooled(tmp_path, monkeypatch):
    clock, backend = Clock(), FlakyBackend(failures=1)
    worker = worker_for(backend, tmp_path, clock)
    real_put = Spool.put

    def full(self, record):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Spool, "put", full)
    worker.submit({"n": 1})
    assert worker.queued == 1 and backend.written == []
    monkeypatch.setattr(Spool, "put", real_put)
    worker.submit({"n": 2})
    clock.advance(1)
    assert backend.written == [{"n": 1}, {"n": 2}]


# The database backend

def test_a_session_is_one_row_even_when_written_twice(tmp_path):
    url = "sqlite:///%s" % (tmp_path / "accounting.sqlite")
    config = DatabaseConfig(dburi=url, sessions_table="calls", callid_column="cid", fromtag_column="ftag",
                            totag_column="ttag", info_column="media")
    backend = DatabaseBackend(config)
    backend.write(statistics())
    backend.write(statistics())
    backend.write(statistics("call-2"))
    backend.close()
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text("SELECT cid, ftag, ttag, media FROM calls ORDER BY cid")).all()
    assert [row[:3] for row in rows] == [("call-1", "ft", "tt"), ("call-2", "ft", "tt")]
    assert json.loads(rows[0][3]) == statistics()


def test_a_database_url_without_its_driver_is_refused_at_once():
    with pytest.raises(ValueError, match="dburi"):
        DatabaseBackend(DatabaseConfig(dburi="nosuchdb://x/y"))


# RADIUS

def test_the_radius_attributes_of_a_session():
    assert radius_attributes(statistics()) == {
        "Acct-Status-Type": 3,
        "User-Name": "alice@example.com",
        "Acct-Session-Id": "call-1",
        "Acct-Session-Time": 62,
        "Acct-Input-Octets": 1010,
        "Acct-Output-Octets": 2020,
        "Sip-From-Tag": "ft",
        "Sip-To-Tag": "tt",
        "NAS-IP-Address": "203.0.113.5",
        "Acct-Delay-Time": 2,
        "Sip-User-Agents": "PhoneA/1.0 + PhoneB/2.0",
        "Sip-Applications": "Audio, Video",
        "Media-Codecs": "G711a/G711u, H263/H263",
    }                                   # an empty Media-Info is left out (RFC 2865)


@pytest.mark.parametrize("extra, user, info", [
    ({"username": None}, "mediaproxy@default", None),
    ({"timed_out": True}, "alice@example.com", "timeout"),
    ({"all_streams_ice": True}, "alice@example.com", "ICE session"),
])
def test_the_default_user_and_the_media_info(extra, user, info):
    attributes = radius_attributes(statistics(**extra))
    assert (attributes["User-Name"], attributes.get("Media-Info")) == (user, info)


def test_long_strings_are_cut_to_what_an_attribute_holds():
    attributes = radius_attributes(statistics(caller_ua="A" * 200, callee_ua="B" * 200, from_tag="t" * 300))
    assert len(attributes["Sip-User-Agents"].encode()) == 253
    assert attributes["Sip-From-Tag"] == "t" * 253


class PickyBackend(FlakyBackend):
    permanent_errors = (ValueError,)

    def write(self, record):
        if record.get("bad"):
            raise ValueError("value too long for type character varying(64)\n[SQL: INSERT ...]")
        super().write(record)


def test_a_record_the_backend_can_never_take_is_set_aside_and_the_others_go_on(tmp_path):
    clock, backend = Clock(), PickyBackend()
    worker = worker_for(backend, tmp_path, clock)
    worker.submit({"n": 1, "bad": True})
    worker.submit({"n": 2})
    assert backend.written == [{"n": 2}]
    assert worker.status()["set_aside"] == 1 and worker.queued == 0
    [aside] = os.listdir(tmp_path)
    assert aside.endswith(".json.bad") and json.loads((tmp_path / aside).read_text())["n"] == 1


def test_the_last_error_is_one_short_line(tmp_path):
    class Verbose(FlakyBackend):
        def write(self, record):
            raise ConnectionError("could not connect\n" + "detail " * 100)
    worker = worker_for(Verbose(), tmp_path, Clock())
    worker.submit({"n": 1})
    assert worker.status()["last_error"] == "ConnectionError: could not connect"


def test_the_radiusclient_files_are_read():
    config = parse_client_config("# comment\nacctserver  127.0.0.1:1813\nservers /etc/radiusclient/servers\n"
                                 "dictionary\t/etc/radiusclient/dictionary\nradius_timeout 10\n")
    assert config == {"acctserver": "127.0.0.1:1813", "servers": "/etc/radiusclient/servers",
                      "dictionary": "/etc/radiusclient/dictionary", "radius_timeout": "10"}
    assert parse_servers("127.0.0.1  s3cret\n# other\nradius.example.com\tother\n") == {
        "127.0.0.1": "s3cret", "radius.example.com": "other"}
