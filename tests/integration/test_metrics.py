"""The dispatcher's HTTP port with the real daemons: Prometheus metrics after
real calls, scraped over HTTP and read with prometheus_client's parser, and
the status page's files and data."""

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import RELAY_A, RELAY_B, RELAYS
from tests.integration.daemons import Call, free_tcp_port, log_lines
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

HTTP_TIMEOUT = 5.0


def start_with_metrics(cluster, relays=RELAYS, **options) -> str:
    """A dispatcher with its HTTP port on a free loopback port, and relays: the base URL."""
    port = free_tcp_port()
    cluster.start_dispatcher(listen_metrics=f"127.0.0.1:{port}", **options)
    cluster.start_relays(relays)
    return f"http://127.0.0.1:{port}"


def get(url: str):
    """(status, headers, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class Scrape:
    """One scrape of /metrics, parsed: value(name, **labels) is a sample's value or None."""

    def __init__(self, base: str):
        started = time.monotonic()
        status, headers, body = get(base + "/metrics")
        self.seconds = time.monotonic() - started
        assert status == 200, (status, body[:200])
        self.content_type = headers["Content-Type"]
        self.samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value

    def value(self, name, **labels):
        return self.samples.get(name, {}).get(frozenset(labels.items()))


def test_metrics_and_status_data_show_the_relays_the_calls_and_the_requests_of_the_proxy(cluster):
    base = start_with_metrics(cluster)
    with cluster.proxy() as proxy:
        # a call id as SIP allows it, with markup in it: data to the page, never markup
        call, ended = Call(proxy, "<b>counted</b>@example.com", media_relay=RELAY_A), Call(proxy, "ended-call")
        try:
            call.exchange()
            assert proxy.request("update", {"type": "request", "cseq": "1 INVITE"}) == "error"     # no call_id
            assert proxy.remove(ended.call_id) == "removed"
            assert proxy.remove("never-heard-of") == "error"

            version = cluster.management_command("version")[0]
            scrape = Scrape(base)
            assert scrape.content_type.startswith("text/plain; version=0.0.4")
            for ip in RELAYS:
                assert scrape.value("mediaproxy_relay_up", relay=ip) == 1
                assert scrape.value("mediaproxy_relay_draining", relay=ip) == 0
                assert scrape.value("mediaproxy_relay_info", relay=ip, version=version,
                                    forwarding="userspace") == 1
            assert scrape.value("mediaproxy_relay_sessions", relay=RELAY_A) == 1
            assert scrape.value("mediaproxy_relay_sessions", relay=RELAY_B) == 0
            assert scrape.value("mediaproxy_relay_streams", relay=RELAY_A, media_type="audio") == 1
            assert scrape.value("mediaproxy_relay_port_pairs", relay=RELAY_A, state="used") == 2
            assert scrape.value("mediaproxy_relay_port_pairs", relay=RELAY_A, state="free") > 0
            assert scrape.value("mediaproxy_relay_userspace_packets_total", relay=RELAY_A) > 0
            assert scrape.value("mediaproxy_dispatcher_sessions", relay=RELAY_A) == 1
            assert scrape.value("mediaproxy_sessions_created_total") == 2

            # two calls of an offer and an answer each, one malformed update; two removes, one unknown
            assert scrape.value("mediaproxy_proxy_requests_total", command="update", result="ok") == 4
            assert scrape.value("mediaproxy_proxy_requests_total", command="update", result="error") == 1
            assert scrape.value("mediaproxy_proxy_requests_total", command="remove", result="ok") == 1
            assert scrape.value("mediaproxy_proxy_requests_total", command="remove", result="error") == 1
            assert scrape.value("mediaproxy_proxy_request_failures_total", command="update", reason="malformed") == 1
            assert scrape.value("mediaproxy_proxy_request_failures_total", command="remove",
                                reason="unknown_session") == 1
            latency = "mediaproxy_proxy_request_duration_seconds"
            assert scrape.value(latency + "_count", command="update") == 5
            assert scrape.value(latency + "_bucket", command="update", le="+Inf") == 5
            assert scrape.value(latency + "_count", command="remove") == 2
            assert 0 < scrape.value(latency + "_sum", command="update") < 5 * 0.5
            assert scrape.value("process_resident_memory_bytes") > 0

            document = json.loads(get(base + "/status.json")[2])
            relays = {relay["ip"]: relay for relay in document["relays"]}
            assert relays[RELAY_A]["state"] == relays[RELAY_B]["state"] == "active"
            assert relays[RELAY_A]["session_count"] == 1 and relays[RELAY_A]["port_pairs"]["used"] == 2
            assert relays[RELAY_A]["forwarding"] == "userspace"
            [session] = document["sessions"]
            assert session["call_id"] == "<b>counted</b>@example.com" and session["relay"] == RELAY_A
            assert (session["from_uri"], session["to_uri"]) == ("sip:alice@example.com", "sip:bob@example.com")
            [stream] = session["streams"]
            assert (stream["media_type"], stream["status"]) == ("audio", "active")
            assert (stream["caller_codec"], stream["callee_codec"]) == ("G711u", "G711a")
            assert stream["caller_packets"] > 0 and stream["callee_bytes"] > 0

            # The dispatcher's own counts are live; the relays' figures are asked again at most
            # once a second.
            assert proxy.remove(call.call_id) == "removed"
            assert Scrape(base).value("mediaproxy_proxy_requests_total", command="remove", result="ok") == 2
            wait_for(lambda: Scrape(base).value("mediaproxy_relay_sessions", relay=RELAY_A) == 0, timeout=5,
                     interval=0.2, message="relay_sessions to drop to 0 after the remove")
        finally:
            call.close()
            ended.close()
    status, headers, page = get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b'src="status.js"' in page and b"//" not in page         # nothing loaded from elsewhere
    for name in ("status.js", "status.css"):
        assert get(f"{base}/{name}")[0] == 200
    assert get(base + "/no-such-page")[0] == 404
    cluster.assert_alive()


def test_a_relay_that_stops_answering_is_down_and_does_not_hold_up_the_scrape(cluster):
    base = start_with_metrics(cluster, relay_timeout=1)
    stopped = cluster.relays[RELAY_A]
    stopped.send_signal(signal.SIGSTOP)
    try:
        with cluster.proxy() as proxy:
            call = Call(proxy, "around-the-silent-one", media_relay=RELAY_A, timeout=5)
            call.close()
            assert call.relay_ip == RELAY_B
        scrape = Scrape(base)
        assert scrape.seconds < 2.0, f"the scrape took {scrape.seconds:.2f} s"
        assert scrape.value("mediaproxy_relay_up", relay=RELAY_A) == 0
        assert scrape.value("mediaproxy_relay_up", relay=RELAY_B) == 1
        assert scrape.value("mediaproxy_relay_command_timeouts_total", relay=RELAY_A, command="update") == 1
        assert scrape.value("mediaproxy_proxy_requests_total", command="update", result="ok") == 2
    finally:
        stopped.send_signal(signal.SIGCONT)
    cluster.assert_alive()


def test_a_metrics_port_in_use_costs_the_metrics_not_the_calls(cluster):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster.start_dispatcher(listen_metrics=f"127.0.0.1:{port}")
        cluster.start_relays([RELAY_A])
        [line] = log_lines(cluster.dispatcher, "no metrics or status page")
        assert " ERROR: " in line and f"127.0.0.1:{port}" in line
        with cluster.proxy() as proxy:
            call = Call(proxy, "still-served")
            call.close()
            assert proxy.remove(call.call_id) == "removed"
    cluster.assert_alive()
