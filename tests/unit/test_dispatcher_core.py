"""The dispatcher: relay selection and failover, calls kept on their relay,
remove and accounting, relays coming and going, the management commands."""

import json
import random

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mediaproxy import __version__
from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.relaylink import RelayGone, RelayTimeout
from mediaproxy.protocol.framing import Request


class Transport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeRelay:
    """A relay link: commands are recorded and answered by `answer` or later by hand."""

    def __init__(self, ip, answer=None, sessions=()):
        self.ip = ip
        self.active = True
        self.halting = False
        self.transport = Transport()
        self.commands = []                # (name, headers, deferred)
        self.answer = answer              # callable(name, headers) -> str, or raises; None: leave pending
        self.sessions = list(sessions)    # what `sessions` lists when there is no `answer`

    def send_command(self, name, headers=None):
        deferred = defer.Deferred()
        self.commands.append((name, headers, deferred))
        if name == "sessions" and self.answer is None:
            deferred.callback(json.dumps([{"call_id": call_id} for call_id in self.sessions]))
        elif self.answer is not None:
            try:
                deferred.callback(self.answer(name, headers))
            except Exception as e:
                deferred.errback(e)
        return deferred

    def send(self, name, headers, answered, raw=None):
        self.send_command(name, headers).addCallbacks(answered, lambda failure: answered(failure.value))

    def names(self, name="update"):
        return [headers["call_id"] for command, headers, _ in self.commands if command == name]

    def pending(self, name="update"):
        return [d for command, _, d in self.commands if command == name and not d.called]


def replying(result, removed=None):
    """An answer function: updates get `result`, remove gets statistics (or `removed`)."""
    def answer(name, headers):
        if name == "update":
            if isinstance(result, Exception):
                raise result
            return result
        if name == "remove":
            if removed is not None:
                return removed
            return json.dumps(statistics(headers["call_id"]))
        if name == "sessions":
            return "[]"
        if name == "summary":
            return json.dumps({"ip": "ignored", "status": "active", "session_count": 0})
        return "error"
    return answer


def statistics(call_id, start_time=1000.0, streams=None):
    return {"call_id": call_id, "from_tag": "alice", "to_tag": "bob", "start_time": start_time,
            "duration": 30, "dialog_id": None,
            "streams": streams if streams is not None else [{"media_type": "audio", "status": "closed"}]}


class Backend:
    def __init__(self, fail=False):
        self.saved = []
        self.fail = fail

    def save(self, stats):
        if self.fail:
            raise RuntimeError("database is down")
        self.saved.append(dict(stats))


def update(call_id="call-1", media_relay=None, cseq=1, kind="request", media="audio:10.0.0.5:4000:sendrecv",
           dialog_id="7:9"):
    headers = {"type": kind, "call_id": call_id, "cseq": "%d INVITE" % cseq, "from_tag": "alice",
               "to_tag": "", "dialog_id": dialog_id, "media": media}
    if media_relay:
        headers["media_relay"] = media_relay
    return Request("update", headers)


def remove(call_id="call-1"):
    return Request("remove", {"call_id": call_id, "from_tag": "alice", "to_tag": "bob"})


def track(deferred):
    """The list that gets the deferred's result once there is one."""
    outcome = []
    deferred.addBoth(lambda value: outcome.append(value) or value)
    return outcome


def result(deferred):
    results = []
    deferred.addBoth(results.append)
    assert results, "the request is still waiting"
    return results[0]


@pytest.fixture
def backend():
    return Backend()


@pytest.fixture
def dispatcher(backend):
    return Dispatcher(Clock(), rng=random.Random(4), accounting=[backend])


def connect(dispatcher, *relays):
    for relay in relays:
        dispatcher.relay_connected(relay)
    return relays


# Choosing a relay for a new call

def test_a_new_call_goes_to_one_relay_and_gets_its_answer(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    reply = result(dispatcher.proxy_request(update()))
    chosen = [r for r in (a, b) if r.names()]
    assert len(chosen) == 1
    assert reply == "%s 40000" % chosen[0].ip
    assert dispatcher.sessions["call-1"].relay_ip == chosen[0].ip


def test_the_preferred_relay_goes_first(backend):
    for seed in range(10):
        dispatcher = Dispatcher(Clock(), rng=random.Random(seed), accounting=[backend])
        relays = connect(dispatcher, *[FakeRelay("10.1.0.%d" % i, replying("10.1.0.%d 40000" % i))
                                       for i in range(1, 5)])
        assert result(dispatcher.proxy_request(update(media_relay="10.1.0.3"))) == "10.1.0.3 40000"
        assert [r.ip for r in relays if r.names()] == ["10.1.0.3"]


def test_new_calls_are_spread_over_the_relays(dispatcher):
    relays = connect(dispatcher, *[FakeRelay("10.1.0.%d" % i, replying("10.1.0.%d 40000" % i))
                                   for i in range(1, 4)])
    for n in range(30):
        result(dispatcher.proxy_request(update("call-%d" % n)))
    assert all(r.names() for r in relays)
    assert sum(len(r.names()) for r in relays) == 30


def test_a_preferred_relay_that_is_inactive_or_unknown_is_skipped(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    a.active = False
    assert result(dispatcher.proxy_request(update("call-1", media_relay="10.1.0.1"))) == "10.1.0.2 40000"
    assert result(dispatcher.proxy_request(update("call-2", media_relay="10.9.9.9"))) == "10.1.0.2 40000"
    assert a.names() == []


@pytest.mark.parametrize("failure", [RelayTimeout("no answer"), RelayGone("gone"), "error", "halting"])
def test_failover_to_the_next_relay(dispatcher, failure):
    bad = FakeRelay("10.1.0.1", replying(failure))
    good = FakeRelay("10.1.0.2", replying("10.1.0.2 40000"))
    connect(dispatcher, bad, good)
    assert result(dispatcher.proxy_request(update(media_relay="10.1.0.1"))) == "10.1.0.2 40000"
    assert bad.names() == ["call-1"] and good.names() == ["call-1"]
    assert dispatcher.sessions["call-1"].relay_ip == "10.1.0.2"


def test_a_relay_that_answers_halting_gets_no_more_new_calls(dispatcher):
    halting = FakeRelay("10.1.0.1", replying("halting"))
    good = FakeRelay("10.1.0.2", replying("10.1.0.2 40000"))
    connect(dispatcher, halting, good)
    result(dispatcher.proxy_request(update("call-1", media_relay="10.1.0.1")))
    assert halting.halting
    result(dispatcher.proxy_request(update("call-2", media_relay="10.1.0.1")))
    assert halting.names() == ["call-1"]


def test_when_every_relay_fails_the_answer_is_error(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("error")),
                   FakeRelay("10.1.0.2", replying(RelayTimeout("late"))))
    assert result(dispatcher.proxy_request(update())) == "error"
    assert a.names() == b.names() == ["call-1"]
    assert dispatcher.sessions == {}


def test_without_relays_the_answer_is_error(dispatcher):
    assert result(dispatcher.proxy_request(update())) == "error"


@pytest.mark.parametrize("request_", [Request("update", {"call_id": "c"}), Request("remove", {}),
                                      Request("restart", {"call_id": "c"}),
                                      update(media="audio:10.0.0.5:99999:sendrecv")])
def test_a_malformed_request_is_error_and_reaches_no_relay(dispatcher, request_):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    assert result(dispatcher.proxy_request(request_)) == "error"
    assert relay.names() == [] and relay.names("remove") == []


def test_concurrent_updates_of_a_new_call_go_to_one_relay(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1"), FakeRelay("10.1.0.2"))
    first = track(dispatcher.proxy_request(update(media_relay="10.1.0.1")))
    second = track(dispatcher.proxy_request(update(media_relay="10.1.0.2")))   # e.g. a retransmission
    assert first == second == []
    assert a.names() == ["call-1"] and b.names() == []
    a.pending()[0].callback("10.1.0.1 40000")
    assert first == ["10.1.0.1 40000"] and second == []
    assert a.names() == ["call-1", "call-1"] and b.names() == []
    a.pending()[0].callback("10.1.0.1 40000")
    assert second == ["10.1.0.1 40000"]
    assert dispatcher._busy_calls == {}


def test_updates_of_different_calls_do_not_wait_for_each_other(dispatcher):
    a, = connect(dispatcher, FakeRelay("10.1.0.1"))
    one = track(dispatcher.proxy_request(update("call-1")))
    two = track(dispatcher.proxy_request(update("call-2")))
    assert a.names() == ["call-1", "call-2"]
    a.pending()[1].callback("10.1.0.1 40002")
    assert two == ["10.1.0.1 40002"] and one == []


# Later requests of a call

def test_a_known_call_goes_to_its_relay(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    result(dispatcher.proxy_request(update(media_relay="10.1.0.1")))
    reply = result(dispatcher.proxy_request(update(kind="reply", media_relay="10.1.0.2")))
    assert reply == "10.1.0.1 40000"
    assert a.names() == ["call-1", "call-1"] and b.names() == []


@pytest.mark.parametrize("later", ["halting", RelayTimeout("late")])
def test_a_known_call_whose_relay_fails_gets_error_and_no_other_relay(dispatcher, later):
    answers = iter(["10.1.0.1 40000", later])

    def answer(name, headers):
        if name == "sessions":
            return "[]"
        value = next(answers)
        if isinstance(value, Exception):
            raise value
        return value
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", answer), FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    result(dispatcher.proxy_request(update(media_relay="10.1.0.1")))
    assert result(dispatcher.proxy_request(update(kind="reply"))) == "error"
    assert b.names() == []


def test_a_known_call_whose_relay_is_gone_gets_error(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    result(dispatcher.proxy_request(update(media_relay="10.1.0.1")))
    dispatcher.relay_disconnected(a, "connection lost")
    assert result(dispatcher.proxy_request(update(kind="reply"))) == "error"
    assert b.names() == []


# Remove and accounting

def test_remove_answers_removed_and_accounts_the_session(dispatcher, backend):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update(dialog_id="7:9")))
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert relay.names("remove") == ["call-1"]
    [saved] = backend.saved
    assert saved["call_id"] == "call-1" and saved["duration"] == 30
    assert saved["dialog_id"] == "7:9"
    assert saved["timed_out"] is False and saved["all_streams_ice"] is False
    assert dispatcher.sessions == {}
    assert result(dispatcher.proxy_request(remove())) == "error"       # already gone
    assert len(backend.saved) == 1


def test_the_dialog_id_of_a_later_update_is_kept(dispatcher, backend):
    connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update(dialog_id="")))
    result(dispatcher.proxy_request(update(kind="reply", dialog_id="11:12")))
    result(dispatcher.proxy_request(remove()))
    assert backend.saved[0]["dialog_id"] == "11:12"


def test_an_unanswered_session_is_removed_but_not_accounted(dispatcher, backend):
    connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000",
                                                        removed=json.dumps(statistics("call-1", None)))))
    result(dispatcher.proxy_request(update()))
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert backend.saved == []


def test_the_proxy_has_its_answer_to_remove_before_the_relay_answers(dispatcher, backend):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))
    relay.answer = lambda name, headers: None            # the relay has not answered the remove yet
    relay.send = lambda name, headers, answered, raw=None: relay.held.append((name, answered))
    relay.held = []
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert [name for name, _ in relay.held] == ["remove"] and backend.saved == []
    assert dispatcher.sessions == {}
    relay.held[0][1](json.dumps(statistics("call-1")))    # its statistics come: the call is accounted
    assert [saved["call_id"] for saved in backend.saved] == ["call-1"]


def test_a_remove_the_relay_does_not_know_is_answered_removed_and_not_accounted(dispatcher, backend, caplog):
    connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000", removed="error")))
    result(dispatcher.proxy_request(update()))
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert backend.saved == [] and dispatcher.sessions == {}
    assert "session call-1: relay 10.1.0.1 answered remove with 'error'" in caplog.text


def test_a_remove_the_relay_fails_to_answer_is_done_again_when_it_comes_back(dispatcher, backend):
    def answer(name, headers):
        if name == "remove":
            raise RelayTimeout("late")
        return "10.1.0.1 40000"
    connect(dispatcher, FakeRelay("10.1.0.1", answer))
    result(dispatcher.proxy_request(update()))
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert backend.saved == [] and "call-1" in dispatcher.sessions       # kept until the relay removed it
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    assert relay.names("remove") == ["call-1"]
    assert [saved["call_id"] for saved in backend.saved] == ["call-1"] and dispatcher.sessions == {}


def test_remove_of_an_unknown_call_is_error(dispatcher):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    assert result(dispatcher.proxy_request(remove("nobody"))) == "error"
    assert relay.names("remove") == []


def test_a_failing_backend_does_not_stop_the_others():
    good = Backend()
    dispatcher = Dispatcher(Clock(), rng=random.Random(1), accounting=[Backend(fail=True), good])
    connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))
    assert result(dispatcher.proxy_request(remove())) == "removed"
    assert [s["call_id"] for s in good.saved] == ["call-1"]


def test_an_expired_session_is_accounted_as_timed_out_and_forgotten(dispatcher, backend):
    relay, other = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                           FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    result(dispatcher.proxy_request(update(media_relay="10.1.0.1", dialog_id="3:4")))
    dispatcher.session_expired(relay, statistics("call-1", streams=[{"status": "no-traffic timeout"}]))
    [saved] = backend.saved
    assert (saved["timed_out"], saved["all_streams_ice"], saved["dialog_id"]) == (True, False, "3:4")
    assert "call-1" not in dispatcher.sessions
    # the same Call-ID is a new call now, free to go to the preferred relay
    assert result(dispatcher.proxy_request(update(media_relay="10.1.0.2"))) == "10.1.0.2 40000"


def test_a_session_whose_streams_were_all_unselected_ice_candidates_did_not_time_out(dispatcher, backend):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))
    ice = [{"status": "unselected ICE candidate"}, {"status": "unselected ICE candidate"}]
    dispatcher.session_expired(relay, statistics("call-1", streams=ice))
    [saved] = backend.saved
    assert (saved["timed_out"], saved["all_streams_ice"]) == (False, True)


def test_an_expired_session_that_never_started_is_not_accounted(dispatcher, backend):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))
    dispatcher.session_expired(relay, statistics("call-1", start_time=None))
    assert backend.saved == [] and dispatcher.sessions == {}


def test_an_expiry_reported_by_another_relay_does_not_forget_the_call(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    result(dispatcher.proxy_request(update(media_relay="10.1.0.1")))
    dispatcher.session_expired(b, statistics("call-1"))
    assert dispatcher.sessions["call-1"].relay_ip == "10.1.0.1"


# Relays coming and going

def test_a_reconnecting_relay_replaces_its_old_link(dispatcher):
    old, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))
    new = FakeRelay("10.1.0.1", sessions=["call-1"])
    dispatcher.relay_connected(new)
    assert old.transport.aborted and not new.transport.aborted
    dispatcher.relay_disconnected(old, "aborted")          # the old link's connectionLost comes later
    assert dispatcher.relays == {"10.1.0.1": new}
    dispatcher.proxy_request(update(kind="reply"))
    assert new.names() == ["call-1"]


def test_a_disconnected_relay_takes_no_new_calls(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    dispatcher.relay_disconnected(a, "lost")
    for n in range(5):
        assert result(dispatcher.proxy_request(update("call-%d" % n, media_relay="10.1.0.1"))) == "10.1.0.2 40000"
    assert a.names() == []


def test_on_connect_the_sessions_the_relay_no_longer_has_are_forgotten(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    for call_id in ("kept", "lost"):
        result(dispatcher.proxy_request(update(call_id, media_relay="10.1.0.1")))
    result(dispatcher.proxy_request(update("elsewhere", media_relay="10.1.0.2")))
    restarted = FakeRelay("10.1.0.1", sessions=["kept"])
    dispatcher.relay_connected(restarted)
    assert restarted.commands[0][0] == "sessions"
    assert sorted(dispatcher.sessions) == ["elsewhere", "kept"]


def lost_relay_dispatcher(backend):
    """A dispatcher whose relay 10.1.0.1 holds `answered` (offer at 100, answer at 110) and
    `unanswered` (offer only), and is lost at 160."""
    dialogs = Dialogs()
    clock = Clock()
    dispatcher = Dispatcher(clock, rng=random.Random(4), accounting=[backend], dialogs=dialogs)
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    clock.advance(100)
    result(dispatcher.proxy_request(update("answered", dialog_id="1:1")))
    result(dispatcher.proxy_request(update("unanswered", dialog_id="2:2")))
    clock.advance(10)
    result(dispatcher.proxy_request(update("answered", kind="reply", media="audio:10.0.0.9:6000:sendrecv")))
    clock.advance(50)
    dispatcher.relay_disconnected(relay, "killed")
    clock.advance(20)
    return dispatcher, clock, dialogs


def test_sessions_a_restarted_relay_lost_are_accounted_once_and_their_dialogs_ended(backend):
    dispatcher, clock, dialogs = lost_relay_dispatcher(backend)
    dispatcher.relay_connected(FakeRelay("10.1.0.1", sessions=[]))      # back, without them
    assert dispatcher.sessions == {}
    [record] = backend.saved                                              # the unanswered one is not billed
    assert (record["call_id"], record["start_time"], record["duration"]) == ("answered", 110.0, 50.0)
    assert record["relay_lost"] is True and record["timed_out"] is True and record["streams"] == []
    assert (record["from_uri"], record["dialog_id"]) == (None, "1:1")
    assert sorted(dialogs.ended) == [("1:1", "answered"), ("2:2", "unanswered")]
    dispatcher.clean_up(dead_relays_after=10, expired_sessions_after=3600)
    assert len(backend.saved) == 1


def test_sessions_of_a_relay_that_never_comes_back_are_accounted_when_it_is_given_up(backend):
    dispatcher, clock, dialogs = lost_relay_dispatcher(backend)
    dispatcher.clean_up(dead_relays_after=60, expired_sessions_after=3600)
    assert backend.saved == [] and len(dispatcher.sessions) == 2          # it may still come back
    clock.advance(40)
    dispatcher.clean_up(dead_relays_after=60, expired_sessions_after=3600)
    assert dispatcher.sessions == {}
    assert [(r["call_id"], r["duration"]) for r in backend.saved] == [("answered", 50.0)]
    assert len(dialogs.ended) == 2


def test_a_relay_that_comes_back_with_its_sessions_loses_none(backend):
    dispatcher, clock, dialogs = lost_relay_dispatcher(backend)
    dispatcher.relay_connected(FakeRelay("10.1.0.1", sessions=["answered", "unanswered"]))
    assert sorted(dispatcher.sessions) == ["answered", "unanswered"]
    assert backend.saved == [] and dialogs.ended == []


@pytest.mark.parametrize("answer", ["error", "not json", '{"call_id": "x"}', RelayTimeout("late")])
def test_a_relay_that_cannot_list_its_sessions_keeps_them(dispatcher, answer):
    a, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update()))

    def listing(name, headers):
        if isinstance(answer, Exception):
            raise answer
        return answer
    dispatcher.relay_connected(FakeRelay("10.1.0.1", listing))
    assert list(dispatcher.sessions) == ["call-1"]


# Management

def management(dispatcher, command):
    return result(dispatcher.management_command(command))


def test_management_sessions_lists_every_relays_sessions(dispatcher):
    def listing(sessions):
        return lambda name, headers: json.dumps(sessions) if name == "sessions" else "error"
    connect(dispatcher, FakeRelay("10.1.0.1", listing([{"call_id": "a"}, {"call_id": "b"}])),
            FakeRelay("10.1.0.2", listing([{"call_id": "c"}])),
            FakeRelay("10.1.0.3", listing("garbage")))
    lines = management(dispatcher, "sessions")
    assert sorted(json.loads(line)["call_id"] for line in lines) == ["a", "b", "c"]


def test_management_sessions_skips_a_relay_that_does_not_answer(dispatcher):
    late = FakeRelay("10.1.0.2", sessions=[])
    connect(dispatcher, FakeRelay("10.1.0.1", sessions=["a"]), late)
    late.answer = lambda name, headers: (_ for _ in ()).throw(RelayTimeout("late"))
    assert [json.loads(line)["call_id"] for line in management(dispatcher, "sessions")] == ["a"]


def test_management_summary_has_a_line_per_relay_and_an_error_line_for_a_failing_one(dispatcher):
    def summary(name, headers):
        if name == "summary":
            return json.dumps({"ip": "192.0.2.200", "version": "1.0", "status": "active", "uptime": 5,
                               "session_count": 1, "stream_count": {"audio": 1}, "bps_relayed": 64000})
        return "[]"

    def failing(name, headers):
        if name == "summary":
            raise RelayTimeout("late")
        return "[]"
    connect(dispatcher, FakeRelay("10.1.0.1", summary), FakeRelay("10.1.0.2", failing),
            FakeRelay("10.1.0.3", lambda name, headers: "error" if name == "summary" else "[]"))
    lines = [json.loads(line) for line in management(dispatcher, "summary")]
    assert lines == [
        {"ip": "10.1.0.1", "version": "1.0", "status": "active", "uptime": 5, "session_count": 1,
         "stream_count": {"audio": 1}, "bps_relayed": 64000, "draining": False},
        {"ip": "10.1.0.2", "status": "error", "draining": False},
        {"ip": "10.1.0.3", "status": "error", "draining": False},
    ]


def test_management_summary_without_relays_is_empty(dispatcher):
    assert management(dispatcher, "summary") == []


def test_management_version_and_unknown_commands(dispatcher):
    assert management(dispatcher, "version") == [__version__]
    assert management(dispatcher, "reboot") == ["error"]


# The management interface's own commands (find, end, drain, undrain, relay)

class Dialogs:
    def __init__(self):
        self.ended = []

    def end_dialog(self, dialog_id, call_id):
        self.ended.append((dialog_id, call_id))


def test_find_asks_the_relays_to_match_and_keeps_only_matching_sessions(dispatcher):
    listed = [{"call_id": "abc@host", "from_uri": "sip:Alice@example.com"}, {"call_id": "xyz", "to_tag": "t"}]
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", lambda name, headers: json.dumps(listed)))
    # a relay that does not know `match` lists everything: the dispatcher filters again
    assert [json.loads(line)["call_id"] for line in management(dispatcher, "find ALICE")] == ["abc@host"]
    assert relay.commands[-1][:2] == ("sessions", {"match": "ALICE"})
    assert management(dispatcher, "find") == ["error"]              # find needs something to look for


def test_end_removes_the_session_on_its_relay_accounts_it_and_ends_the_dialog(backend):
    dialogs = Dialogs()
    dispatcher = Dispatcher(Clock(), rng=random.Random(4), accounting=[backend], dialogs=dialogs)
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")))
    result(dispatcher.proxy_request(update(dialog_id="7:9")))
    lines = management(dispatcher, "end call-1")
    assert [json.loads(line)["call_id"] for line in lines] == ["call-1"]
    assert relay.commands[-1][:2] == ("remove", {"call_id": "call-1", "from_tag": "alice", "to_tag": ""})
    assert "call-1" not in dispatcher.sessions
    assert [record["call_id"] for record in backend.saved] == ["call-1"] and not backend.saved[0]["timed_out"]
    assert dialogs.ended == [("7:9", "call-1")]
    assert management(dispatcher, "end call-1") == ["error"]          # it is gone
    assert management(dispatcher, "end no-such-call") == ["error"]


def test_end_when_the_relay_cannot_remove_is_error_and_keeps_the_session(dispatcher, backend):
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000", removed="error")))
    result(dispatcher.proxy_request(update()))
    assert management(dispatcher, "end call-1") == ["error"]
    assert "call-1" in dispatcher.sessions and backend.saved == []


def test_a_drained_relay_gets_no_new_sessions_its_calls_go_on_and_undrain_restores_it(dispatcher):
    a, b = connect(dispatcher, FakeRelay("10.1.0.1", replying("10.1.0.1 40000")),
                   FakeRelay("10.1.0.2", replying("10.1.0.2 40000")))
    assert result(dispatcher.proxy_request(update("call-1", media_relay="10.1.0.1"))) == "10.1.0.1 40000"
    assert json.loads(management(dispatcher, "drain 10.1.0.1")[0]) == \
        {"ip": "10.1.0.1", "connected": True, "draining": True, "session_count": 1}
    # even when the proxy prefers it, a new call goes elsewhere; the running call stays
    assert result(dispatcher.proxy_request(update("call-2", media_relay="10.1.0.1"))) == "10.1.0.2 40000"
    assert result(dispatcher.proxy_request(update("call-1", kind="reply"))) == "10.1.0.1 40000"
    assert a.names() == ["call-1", "call-1"]
    assert [json.loads(line)["draining"] for line in management(dispatcher, "summary")] == [True, False]
    assert json.loads(management(dispatcher, "undrain 10.1.0.1")[0])["draining"] is False
    assert result(dispatcher.proxy_request(update("call-3", media_relay="10.1.0.1"))) == "10.1.0.1 40000"


def test_drain_of_an_unknown_relay_is_error(dispatcher):
    connect(dispatcher, FakeRelay("10.1.0.1"))
    assert management(dispatcher, "drain 10.9.9.9") == ["error"]
    assert management(dispatcher, "drain") == ["error"]


def test_relay_details_are_its_summary_and_what_the_dispatcher_knows(dispatcher):
    summary = {"ip": "10.1.0.1", "version": "1.0", "status": "active", "forwarding": "kernel",
               "port_pairs": {"used": 2, "free": 98, "set_aside": 0}}
    relay, = connect(dispatcher, FakeRelay("10.1.0.1", lambda name, headers:
                                           json.dumps(summary) if name == "summary" else "10.1.0.1 40000"))
    result(dispatcher.proxy_request(update()))
    details = json.loads(management(dispatcher, "relay 10.1.0.1")[0])
    assert details == {**summary, "draining": False, "active": True, "dispatcher_session_count": 1}
    assert management(dispatcher, "relay 10.9.9.9") == ["error"]
    assert management(dispatcher, "sessions extra") == ["error"]      # a command without argument takes none
