"""The dispatcher's table across restarts (SPEC §8): the state file, restoring,
and forgetting what nothing names any more."""

import json

from twisted.internet.task import Clock

from mediaproxy.dispatcher.core import Dispatcher, SessionRecord
from mediaproxy.dispatcher.state import decode_state, encode_state, load_state, save_state


def records():
    return [SessionRecord("call-1", "203.0.113.5", 100.0, "12:34", "ft", "tt", 150.0),
            SessionRecord("call-2", "203.0.113.6", 110.0, None, "ft2", None, 160.0)]


def test_the_table_round_trips_through_its_file(tmp_path):
    path = str(tmp_path / "state.json")
    assert save_state(path, records())
    assert json.loads(open(path).read())["version"] == 1
    assert load_state(path, SessionRecord) == records()
    assert load_state(path, SessionRecord) == []          # restored once: the file is gone


def test_a_file_that_makes_no_sense_is_set_aside(tmp_path):
    for content in ("not json", '{"version": 2, "sessions": []}', '{"version": 1, "sessions": [{"call_id": 7}]}'):
        path = tmp_path / "state.json"
        path.write_text(content)
        assert load_state(str(path), SessionRecord) == []
        assert not path.exists()
    assert len(list(tmp_path.glob("state.json.bad-*"))) >= 1


def test_unknown_keys_of_a_newer_version_are_ignored():
    text = encode_state(records(), 0.0).replace('"relay_ip"', '"future": 1, "relay_ip"')
    assert decode_state(text, SessionRecord) == records()


def test_restored_sessions_wait_for_their_relays_and_are_forgotten_when_they_never_come():
    clock = Clock()
    clock.advance(1000)
    dispatcher = Dispatcher(clock)
    dispatcher.restore(records())
    assert set(dispatcher.sessions) == {"call-1", "call-2"}
    assert set(dispatcher.missing_relays) == {"203.0.113.5", "203.0.113.6"}
    clock.advance(3599)
    dispatcher.clean_up(dead_relays_after=3600, expired_sessions_after=86400)
    assert set(dispatcher.sessions) == {"call-1", "call-2"}
    clock.advance(1)
    dispatcher.clean_up(dead_relays_after=3600, expired_sessions_after=86400)
    assert dispatcher.sessions == {} and dispatcher.missing_relays == {}


def test_sessions_nothing_names_for_too_long_are_forgotten():
    clock = Clock()
    dispatcher = Dispatcher(clock)
    dispatcher.sessions["old"] = SessionRecord("old", "203.0.113.5", 0.0, last_seen=0.0)
    dispatcher.sessions["fresh"] = SessionRecord("fresh", "203.0.113.5", 0.0, last_seen=500.0)
    clock.advance(1000)
    dispatcher.clean_up(dead_relays_after=43200, expired_sessions_after=1000)
    assert set(dispatcher.sessions) == {"fresh"}
