"""The dispatcher's metrics: what it counts on the proxy path (counters.py),
the relays' cached answers (relayanswers.py), and the Prometheus text a
scrape gets (metrics.py), parsed back with prometheus_client's own parser."""

import json
import random

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mediaproxy.dispatcher.core import Dispatcher
from mediaproxy.dispatcher.counters import DispatcherCounters
from mediaproxy.dispatcher.metrics import DispatcherCollector
from mediaproxy.dispatcher.relayanswers import RelayAnswers
from mediaproxy.dispatcher.relaylink import RelayGone, RelayTimeout
from mediaproxy.protocol.framing import Request

SUMMARY_A = {"ip": "10.1.0.1", "version": "3.0", "status": "active", "uptime": 120, "session_count": 2,
             "stream_count": {"audio": 2, "video": 1}, "bps_relayed": 64000,
             "port_pairs": {"used": 6, "free": 94, "set_aside": 1}, "forwarding": "kernel",
             "userspace_packets": 12, "kernel_entries": 4, "parked_ports": 0}


class ScriptedRelay:
    """A relay link whose answers are scripted per command: text, a RelayError, or None (no answer yet)."""

    def __init__(self, ip, answers=None):
        self.ip = ip
        self.active = True
        self.halting = False
        self.answers = dict(answers or {})
        self.sent = []              # (command, answered) in order
        self.transport = None

    def send(self, name, headers, answered, raw=None):
        self.sent.append((name, answered))
        answer = self.answers.get(name)
        if callable(answer):
            answer = answer(headers)
        if answer is not None:
            answered(answer)

    def send_command(self, name, headers=None):
        from twisted.internet import defer
        deferred = defer.Deferred()
        self.send(name, headers, lambda result: deferred.errback(result) if isinstance(result, Exception)
                  else deferred.callback(result))
        return deferred

    def answer_pending(self, name, result):
        for command, answered in list(self.sent):
            if command == name:
                self.sent.remove((command, answered))
                answered(result)
                return
        raise AssertionError("no %s command pending" % name)

    def count(self, name):
        return sum(1 for command, _ in self.sent if command == name)


def update(call_id, relay=None, media="audio:10.0.0.5:4000:sendrecv"):
    headers = {"type": "request", "call_id": call_id, "cseq": "1 INVITE", "from_tag": "alice", "media": media}
    if relay:
        headers["media_relay"] = relay
    return Request("update", headers)


def scrape(dispatcher, summaries):
    """The metrics text, parsed: {sample name: {frozenset of label items: value}}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DispatcherCollector(dispatcher, summaries))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get(name, {}).get(frozenset(labels.items()))


def answers(dispatcher, command="summary", kind=dict, clock=None, wait=1.0):
    return RelayAnswers(dispatcher, command, kind, clock or dispatcher.clock, max_age=1.0, wait=wait)


@pytest.fixture
def dispatcher():
    return Dispatcher(Clock(), rng=random.Random(3))


def connect(dispatcher, relay):
    relay.answers.setdefault("sessions", "[]")
    dispatcher.relay_connected(relay)
    return relay


# What the core counts

def test_requests_are_counted_by_command_and_outcome_with_their_latency(dispatcher):
    ticks = iter([0.0, 0.002, 1.0, 1.2, 2.0, 2.0004, 3.0, 3.0001])
    dispatcher.counters = DispatcherCounters(timer=lambda: next(ticks))
    connect(dispatcher, ScriptedRelay("10.1.0.1", {"update": "10.1.0.1 40000", "remove": "{}"}))
    answers_seen = []
    dispatcher.handle_proxy_request(update("c1"), answers_seen.append)                       # 2 ms
    dispatcher.handle_proxy_request(Request("remove", {"call_id": "c1", "from_tag": "a"}), answers_seen.append)
    dispatcher.handle_proxy_request(Request("remove", {"call_id": "nobody"}), answers_seen.append)
    dispatcher.handle_proxy_request(Request("update", {"type": "request"}), answers_seen.append)   # no call_id
    assert answers_seen == ["10.1.0.1 40000", "removed", "error", "error"]
    counters = dispatcher.counters
    assert counters.requests["update"].outcomes == {"ok": 1, "malformed": 1}
    assert counters.requests["remove"].outcomes == {"ok": 1, "unknown_session": 1}
    assert counters.sessions_created == 1
    assert counters.requests["update"].count == 2
    assert counters.requests["update"].total == pytest.approx(0.0021)


def test_failures_say_why(dispatcher):
    silent = connect(dispatcher, ScriptedRelay("10.1.0.1"))
    outcome = []
    dispatcher.handle_proxy_request(update("c1"), outcome.append)
    silent.answer_pending("update", RelayTimeout("relay 10.1.0.1 did not answer"))
    assert outcome == ["error"]             # no other relay to try
    assert dispatcher.counters.requests["update"].outcomes == {"no_relay": 1}

    taken = connect(dispatcher, ScriptedRelay("10.1.0.2", {"update": "10.1.0.2 40000"}))
    dispatcher.handle_proxy_request(update("c2", relay="10.1.0.2"), outcome.append)
    taken.answers["update"] = "halting"
    dispatcher.handle_proxy_request(update("c2"), outcome.append)
    taken.answers["update"] = RelayGone("relay 10.1.0.2 disconnected")
    dispatcher.handle_proxy_request(update("c2"), outcome.append)
    taken.answers["update"] = "error"
    dispatcher.handle_proxy_request(update("c2"), outcome.append)
    assert outcome[1:] == ["10.1.0.2 40000", "error", "error", "error"]
    assert dispatcher.counters.requests["update"].outcomes == {
        "ok": 1, "no_relay": 1, "relay_halting": 1, "relay_unavailable": 1, "relay_error": 1}


def test_expired_sessions_count_their_timed_out_streams_by_kind(dispatcher):
    relay = connect(dispatcher, ScriptedRelay("10.1.0.1"))
    dispatcher.session_expired(relay, {"call_id": "c1", "start_time": None, "streams": [
        {"status": "no-traffic timeout"}, {"status": "closed"}, {"status": "conntrack timeout"}]})
    dispatcher.session_expired(relay, {"call_id": "c2", "start_time": None, "streams": [
        {"status": "unselected ICE candidate"}]})
    counters = dispatcher.counters
    assert counters.sessions_expired == 2
    assert counters.stream_timeouts == {"no_traffic": 1, "conntrack": 1, "unselected_ice": 1}


def test_a_latency_goes_in_the_first_bucket_that_holds_it_and_odd_commands_under_other():
    counters = DispatcherCounters(timer=lambda: 0.0)
    for took in (0.0005, 0.0006, 20.0):
        counters.request_done("update", "ok", -took)
    counters.request_done("<junk>", "malformed", 0.0)
    counts = counters.requests["update"].counts
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1 and sum(counts) == 3
    assert counters.requests["other"].outcomes == {"malformed": 1}


# The relays' cached answers

def test_a_reader_gets_fresh_answers_and_the_relays_are_asked_at_most_once_a_second(dispatcher):
    relay = connect(dispatcher, ScriptedRelay("10.1.0.1", {"summary": json.dumps(SUMMARY_A)}))
    summaries = answers(dispatcher)
    got = []
    summaries.fresh().addCallback(got.append)
    assert got == [summaries] and summaries.answer("10.1.0.1") == SUMMARY_A
    summaries.fresh()
    dispatcher.clock.advance(0.5)
    summaries.fresh()
    assert relay.count("summary") == 1
    dispatcher.clock.advance(0.5)
    summaries.fresh()
    assert relay.count("summary") == 2


def test_a_silent_relay_holds_a_reader_up_for_the_wait_only_and_is_not_asked_twice(dispatcher):
    silent = connect(dispatcher, ScriptedRelay("10.1.0.1"))
    connect(dispatcher, ScriptedRelay("10.1.0.2", {"summary": json.dumps(SUMMARY_A)}))
    summaries = answers(dispatcher, wait=0.8)
    got = []
    summaries.fresh().addCallback(got.append)
    dispatcher.clock.advance(0.5)
    assert got == []
    dispatcher.clock.advance(0.3)
    assert got == [summaries]
    assert summaries.answer("10.1.0.2") == SUMMARY_A and summaries.answer("10.1.0.1") is None
    dispatcher.clock.advance(1)
    summaries.fresh()
    assert silent.count("summary") == 1          # its first command is still out
    silent.answer_pending("summary", RelayTimeout("relay 10.1.0.1 did not answer"))
    assert "10.1.0.1" in summaries.failing


def test_answers_of_disconnected_relays_are_forgotten(dispatcher):
    relay = connect(dispatcher, ScriptedRelay("10.1.0.1", {"summary": json.dumps(SUMMARY_A)}))
    summaries = answers(dispatcher)
    summaries.fresh()
    dispatcher.relay_disconnected(relay, "gone")
    dispatcher.clock.advance(1)
    summaries.fresh()
    assert summaries.answer("10.1.0.1") is None


# The metrics text

def test_relay_metrics_come_from_its_summary_with_the_relay_label(dispatcher):
    connect(dispatcher, ScriptedRelay("10.1.0.1", {"summary": json.dumps(SUMMARY_A)}))
    dispatcher.draining.add("10.1.0.1")
    summaries = answers(dispatcher)
    summaries.fresh()
    samples = scrape(dispatcher, summaries)
    relay = {"relay": "10.1.0.1"}
    assert value(samples, "mediaproxy_relay_up", **relay) == 1
    assert value(samples, "mediaproxy_relay_draining", **relay) == 1
    assert value(samples, "mediaproxy_relay_halting", **relay) == 0
    assert value(samples, "mediaproxy_relay_info", relay="10.1.0.1", version="3.0", forwarding="kernel") == 1
    assert value(samples, "mediaproxy_relay_sessions", **relay) == 2
    assert value(samples, "mediaproxy_relay_streams", relay="10.1.0.1", media_type="audio") == 2
    assert value(samples, "mediaproxy_relay_streams", relay="10.1.0.1", media_type="video") == 1
    assert value(samples, "mediaproxy_relay_relayed_bits_per_second", **relay) == 64000
    assert value(samples, "mediaproxy_relay_userspace_packets_total", **relay) == 12
    assert value(samples, "mediaproxy_relay_kernel_entries", **relay) == 4
    assert value(samples, "mediaproxy_relay_uptime_seconds", **relay) == 120
    assert value(samples, "mediaproxy_relay_summary_age_seconds", **relay) == 0
    for state, pairs in (("used", 6), ("free", 94), ("set_aside", 1)):
        assert value(samples, "mediaproxy_relay_port_pairs", relay="10.1.0.1", state=state) == pairs


def test_a_relay_that_does_not_answer_or_lies_is_down_without_made_up_figures(dispatcher):
    connect(dispatcher, ScriptedRelay("10.1.0.1", {"summary": "error"}))
    liar = dict(SUMMARY_A, session_count="many", bps_relayed=True, stream_count=["audio"], port_pairs=None)
    connect(dispatcher, ScriptedRelay("10.1.0.2", {"summary": json.dumps(liar)}))
    dispatcher.missing_relays["10.1.0.3"] = 0.0        # holds sessions, not connected
    summaries = answers(dispatcher)
    summaries.fresh()
    samples = scrape(dispatcher, summaries)
    assert value(samples, "mediaproxy_relay_up", relay="10.1.0.1") == 0
    assert value(samples, "mediaproxy_relay_up", relay="10.1.0.2") == 1
    assert value(samples, "mediaproxy_relay_up", relay="10.1.0.3") == 0
    assert value(samples, "mediaproxy_relay_sessions", relay="10.1.0.2") is None
    assert value(samples, "mediaproxy_relay_relayed_bits_per_second", relay="10.1.0.2") is None
    assert "mediaproxy_relay_streams" not in samples and "mediaproxy_relay_port_pairs" not in samples


def test_request_metrics_have_results_reasons_and_a_latency_histogram(dispatcher):
    ticks = iter([0.0, 0.003, 1.0, 1.0, 2.0, 2.7])
    dispatcher.counters = DispatcherCounters(timer=lambda: next(ticks))
    connect(dispatcher, ScriptedRelay("10.1.0.1", {"update": "10.1.0.1 40000"}))
    dispatcher.handle_proxy_request(update("c1"), lambda text: None)
    dispatcher.handle_proxy_request(Request("update", {}), lambda text: None)                  # malformed
    dispatcher.handle_proxy_request(Request("remove", {"call_id": "unknown"}), lambda text: None)
    samples = scrape(dispatcher, answers(dispatcher))
    assert value(samples, "mediaproxy_proxy_requests_total", command="update", result="ok") == 1
    assert value(samples, "mediaproxy_proxy_requests_total", command="update", result="error") == 1
    assert value(samples, "mediaproxy_proxy_requests_total", command="remove", result="ok") == 0
    assert value(samples, "mediaproxy_proxy_requests_total", command="remove", result="error") == 1
    assert value(samples, "mediaproxy_proxy_request_failures_total", command="update", reason="malformed") == 1
    assert value(samples, "mediaproxy_proxy_request_failures_total", command="remove",
                 reason="unknown_session") == 1
    histogram = "mediaproxy_proxy_request_duration_seconds"
    assert value(samples, histogram + "_count", command="update") == 2
    assert value(samples, histogram + "_sum", command="update") == pytest.approx(0.003)
    assert value(samples, histogram + "_bucket", command="update", le="0.0025") == 1        # the malformed one
    assert value(samples, histogram + "_bucket", command="update", le="0.005") == 2
    assert value(samples, histogram + "_bucket", command="remove", le="0.5") == 0
    assert value(samples, histogram + "_bucket", command="remove", le="1.0") == 1
    assert value(samples, histogram + "_bucket", command="remove", le="+Inf") == 1
    assert value(samples, "mediaproxy_sessions_created_total") == 1
    assert value(samples, "mediaproxy_dispatcher_sessions", relay="10.1.0.1") == 1


def test_timeouts_and_accounting_queues_are_reported(dispatcher):
    class Accounting:
        def status(self):
            return [{"backend": "database", "queued": 3, "written": 10, "set_aside": 1, "last_error": "down"}]

    dispatcher.accounting = [Accounting()]
    dispatcher.counters.relay_timed_out("10.1.0.1", "update")
    dispatcher.counters.relay_timed_out("10.1.0.1", "update")
    dispatcher.counters.stream_timeouts["on_hold"] += 1
    dispatcher.counters.sessions_expired += 1
    samples = scrape(dispatcher, answers(dispatcher))
    assert value(samples, "mediaproxy_relay_command_timeouts_total", relay="10.1.0.1", command="update") == 2
    assert value(samples, "mediaproxy_stream_timeouts_total", kind="on_hold") == 1
    assert value(samples, "mediaproxy_stream_timeouts_total", kind="no_traffic") == 0
    assert value(samples, "mediaproxy_sessions_expired_total") == 1
    assert value(samples, "mediaproxy_accounting_queued_records", backend="database") == 3
    assert value(samples, "mediaproxy_accounting_written_records_total", backend="database") == 10
    assert value(samples, "mediaproxy_accounting_set_aside_records_total", backend="database") == 1
