"""The HTTP port's pieces that need no socket: its option, what the status
page is given, the page's own files, and the sample Grafana dashboard
against the metrics that exist."""

import json
import logging
import random
import re
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mediaproxy.configuration import parse_configuration
from mediaproxy.dispatcher import web
from mediaproxy.dispatcher.core import Dispatcher, SessionRecord
from mediaproxy.dispatcher.relayanswers import RelayAnswers
from tests.support.certs import make_certs_dir
from tests.unit.test_dispatcher_metrics import SUMMARY_A, ScriptedRelay, connect, scrape
from tests.unit.test_management_access import started_dispatcher

REPO = Path(__file__).resolve().parents[2]
SESSION = {"call_id": "<script>alert(1)</script>", "from_uri": "sip:a@x", "to_uri": "sip:b@x", "start_time": 5.0,
           "duration": 12.5, "caller_ua": "ua", "callee_ua": "ua", "from_tag": "t",
           "streams": [{"media_type": "audio", "status": "active", "caller_codec": "G711u", "callee_codec": "G722",
                        "caller_packets": 10, "callee_packets": 9, "caller_bytes": 1720, "callee_bytes": 1548,
                        "caller_remote": "192.0.2.1:4000", "callee_remote": "192.0.2.2:5000",
                        "caller_local": "10.1.0.1:40000", "callee_local": "10.1.0.1:40002"}]}


def dispatcher_config(text):
    return parse_configuration(text, "/etc/mediaproxy", "/run/mediaproxy").dispatcher


def test_the_http_port_is_on_loopback_by_default_and_can_be_moved_or_turned_off():
    assert dispatcher_config("").listen_metrics == ("127.0.0.1", 9580)
    assert not dispatcher_config("").metrics_exposed
    assert dispatcher_config("[Dispatcher]\nlisten_metrics = none\n").listen_metrics is None
    assert dispatcher_config("[Dispatcher]\nlisten_metrics =\n").listen_metrics is None
    moved = dispatcher_config("[Dispatcher]\nlisten_metrics = 192.0.2.5:8080\n")
    assert moved.listen_metrics == ("192.0.2.5", 8080) and moved.metrics_exposed
    assert dispatcher_config("[Dispatcher]\nlisten_metrics = [::1]\n").listen_metrics == ("::1", 9580)


@pytest.mark.parametrize("section, listener, warned", [
    ("", ("127.0.0.1", 9580), False),
    ("listen_metrics = 127.0.0.1:9999", ("127.0.0.1", 9999), False),
    ("listen_metrics = 0.0.0.0:9580", ("0.0.0.0", 9580), True),
    ("listen_metrics = none", None, False),
])
def test_where_the_http_port_listens_and_when_the_dispatcher_warns(tmp_path, caplog, section, listener, warned):
    service, reactor = started_dispatcher(tmp_path, make_certs_dir(tmp_path / "tls"), section)
    try:
        http = [(entry[3], entry[0]) for entry in reactor.tcpServers if entry[0] in (9580, 9999)]
        assert http == ([listener] if listener else [])
        warnings = [r.getMessage() for r in caplog.records
                    if "anyone who gets to it sees every call" in r.getMessage() and r.levelno == logging.WARNING]
        assert len(warnings) == (1 if warned else 0), warnings
    finally:
        service.stopService()


def fed_dispatcher():
    dispatcher = Dispatcher(Clock(), rng=random.Random(1))
    sessions_answer = json.dumps([SESSION, {"call_id": 7}, "junk"])
    connect(dispatcher, ScriptedRelay("10.1.0.1", {"summary": json.dumps(SUMMARY_A)}))
    dispatcher.relays["10.1.0.1"].answers["sessions"] = sessions_answer
    connect(dispatcher, ScriptedRelay("10.1.0.2", {"summary": "error"}))
    dispatcher.missing_relays["10.1.0.3"] = 0.0
    dispatcher.sessions["c"] = SessionRecord("c", "10.1.0.1", 0.0)
    summaries = RelayAnswers(dispatcher, "summary", dict, dispatcher.clock)
    sessions = RelayAnswers(dispatcher, "sessions", list, dispatcher.clock)
    summaries.fresh()
    sessions.fresh()
    return dispatcher, summaries, sessions


def test_the_status_document_has_every_relay_and_the_sessions_with_their_streams():
    dispatcher, summaries, sessions = fed_dispatcher()
    document = web.status_document(dispatcher, summaries, sessions)
    relays = {relay["ip"]: relay for relay in document["relays"]}
    assert {ip: relay["state"] for ip, relay in relays.items()} == {
        "10.1.0.1": "active", "10.1.0.2": "not answering", "10.1.0.3": "disconnected"}
    relay = relays["10.1.0.1"]
    assert relay["session_count"] == 2 and relay["dispatcher_session_count"] == 1
    assert relay["port_pairs"] == {"used": 6, "free": 94, "set_aside": 1}
    assert (relay["forwarding"], relay["kernel_entries"], relay["bps_relayed"]) == ("kernel", 4, 64000)
    assert relay["stream_count"] == {"audio": 2, "video": 1}
    assert document["session_total"] == 1          # what is no session is left out
    [session] = document["sessions"]
    assert session["call_id"] == "<script>alert(1)</script>" and session["relay"] == "10.1.0.1"
    assert session["streams"][0]["caller_codec"] == "G711u" and session["streams"][0]["callee_packets"] == 9
    dispatcher.draining.add("10.1.0.1")
    assert web.relay_state(dispatcher, summaries, "10.1.0.1") == "draining"


def test_the_page_loads_nothing_from_elsewhere_and_puts_values_in_as_text():
    static = Path(web.STATIC_DIR)
    assert sorted(p.name for p in static.iterdir()) == ["index.html", "status.css", "status.js"]
    for path in static.iterdir():
        text = path.read_text()
        assert "//" not in re.sub(r"^\s*//.*$", "", text, flags=re.M).replace("/* ", ""), path    # no URL
        assert "@import" not in text
    script = (static / "status.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


def test_the_grafana_dashboard_only_uses_metrics_that_exist():
    dispatcher, summaries, _ = fed_dispatcher()
    dispatcher.counters.relay_timed_out("10.1.0.1", "update")
    dispatcher.counters.request_done("update", "malformed", dispatcher.counters.timer())

    class Accounting:
        def status(self):
            return [{"backend": "database", "queued": 0, "written": 0, "set_aside": 0}]
    dispatcher.accounting = [Accounting()]
    exported = set(scrape(dispatcher, summaries))
    dashboard = json.loads((REPO / "contrib" / "grafana-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used.update(re.findall(r"\bmediaproxy_\w+", target["expr"]))
    assert used and used - exported == set()
