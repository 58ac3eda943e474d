"""The dispatcher's HTTP port (`[Dispatcher] listen_metrics`): Prometheus
metrics and a live status page.

  /metrics        Prometheus text format (mediaproxy/dispatcher/metrics.py)
  /               the status page: relays and live sessions, updated every
                  second by status.js, which reads
  /status.json    relays, and sessions with their streams, codecs and traffic

The page's files are in static/ beside this module: no framework, nothing
loaded from elsewhere (the Content-Security-Policy forbids it), and every
value put in the page as text, never as markup (call ids and URIs come from
SIP messages).
"""

import json
import logging
import os
import time

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.web import resource, server

from mediaproxy import __version__
from mediaproxy.dispatcher.metrics import CONTENT_TYPE, DispatcherCollector
from mediaproxy.dispatcher.relayanswers import RelayAnswers

log = logging.getLogger("mediaproxy.dispatcher")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
STATIC_FILES = {b"": ("index.html", "text/html; charset=utf-8"),
                b"status.css": ("status.css", "text/css; charset=utf-8"),
                b"status.js": ("status.js", "text/javascript; charset=utf-8")}
MAX_LISTED_SESSIONS = 500       # the page lists this many sessions at most (and says how many there are)
IDLE_TIMEOUT = 60               # an HTTP connection with no request for this long is closed
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


def _text(value):
    return value if isinstance(value, str) else None


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def relay_state(dispatcher, summaries, ip: str) -> str:
    """What the page says of a relay: disconnected, not answering, halting, draining or active."""
    relay = dispatcher.relays.get(ip)
    if relay is None:
        return "disconnected"
    summary = summaries.answer(ip)
    if not relay.active or summary is None or ip in summaries.failing:
        return "not answering"
    if relay.halting or summary.get("status") == "halting":
        return "halting"
    if ip in dispatcher.draining:
        return "draining"
    return "active"


def relay_entry(dispatcher, summaries, ip: str) -> dict:
    summary = summaries.answer(ip) or {}
    ports = summary.get("port_pairs") if isinstance(summary.get("port_pairs"), dict) else {}
    streams = summary.get("stream_count") if isinstance(summary.get("stream_count"), dict) else {}
    return {
        "ip": ip,
        "state": relay_state(dispatcher, summaries, ip),
        "draining": ip in dispatcher.draining,
        "version": _text(summary.get("version")),
        "uptime": _number(summary.get("uptime")),
        "session_count": _number(summary.get("session_count")),
        "dispatcher_session_count": sum(1 for r in list(dispatcher.sessions.values()) if r.relay_ip == ip),
        "stream_count": {str(k): v for k, v in streams.items() if _number(v) is not None},
        "bps_relayed": _number(summary.get("bps_relayed")),
        "forwarding": _text(summary.get("forwarding")),
        "kernel_entries": _number(summary.get("kernel_entries")),
        "userspace_packets": _number(summary.get("userspace_packets")),
        "port_pairs": {state: _number(ports.get(state)) for state in ("used", "free", "set_aside")},
        "summary_age": summaries.age(ip),
    }


STREAM_FIELDS = ("media_type", "status", "caller_codec", "callee_codec", "caller_packets", "callee_packets",
                 "caller_bytes", "callee_bytes", "caller_remote", "callee_remote", "caller_local", "callee_local")
SESSION_FIELDS = ("call_id", "from_uri", "to_uri", "caller_ua", "callee_ua", "start_time", "duration")


def session_entry(relay_ip: str, statistics: dict) -> dict:
    entry = {name: statistics.get(name) for name in SESSION_FIELDS}
    entry["relay"] = relay_ip
    streams = statistics.get("streams")
    entry["streams"] = [{name: stream.get(name) for name in STREAM_FIELDS}
                        for stream in (streams if isinstance(streams, list) else []) if isinstance(stream, dict)]
    return entry


def status_document(dispatcher, summaries, sessions) -> dict:
    """What /status.json answers, from the relays' last `summary` and `sessions` answers."""
    ips = sorted(set(dispatcher.relays) | set(dispatcher.missing_relays))
    listed = []
    for ip in sorted(dispatcher.relays):
        for statistics in sessions.answer(ip) or ():
            if isinstance(statistics, dict) and isinstance(statistics.get("call_id"), str):
                listed.append((ip, statistics))
    listed.sort(key=lambda item: item[1]["call_id"])
    return {
        "version": __version__,
        "time": time.time(),
        "relays": [relay_entry(dispatcher, summaries, ip) for ip in ips],
        "session_total": len(listed),
        "sessions": [session_entry(ip, statistics) for ip, statistics in listed[:MAX_LISTED_SESSIONS]],
    }


class StaticFile(resource.Resource):
    isLeaf = True

    def __init__(self, name: str, content_type: str):
        super().__init__()
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            self.body = f.read()
        self.content_type = content_type.encode()

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        return self.body


class FreshAnswer(resource.Resource):
    """An answer made once the relays' answers it needs are fresh (or after their `wait`)."""

    isLeaf = True

    def __init__(self, content_type: bytes, waits, make_body):
        super().__init__()
        self.content_type = content_type
        self.waits = waits                  # RelayAnswers to refresh first
        self.make_body = make_body          # () -> bytes

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(gone.append)      # the client went away: nothing to write

        def write(_):
            if gone:
                return
            request.setHeader(b"content-type", self.content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(self.make_body())
            request.finish()

        def failed(failure):
            log.error("HTTP %s failed: %s: %s", request.path.decode(errors="replace")[:40], failure.type.__name__,
                      failure.getErrorMessage())
            if not gone:
                request.setResponseCode(500)
                request.finish()
        deferred = defer.gatherResults([answers.fresh() for answers in self.waits])
        deferred.addCallback(write).addErrback(failed)
        return server.NOT_DONE_YET


class QuietSite(server.Site):
    """Scrapes and page updates come every second: they are not logged. Every answer, 404s
    included, carries the security headers."""

    noisy = False
    displayTracebacks = False

    def log(self, request):
        pass

    def getResourceFor(self, request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().getResourceFor(request)


def make_site(dispatcher, clock) -> server.Site:
    """The HTTP port's site, reading `dispatcher`; relays are asked at most once a second."""
    summaries = RelayAnswers(dispatcher, "summary", dict, clock)
    sessions = RelayAnswers(dispatcher, "sessions", list, clock)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DispatcherCollector(dispatcher, summaries))
    ProcessCollector(registry=registry)        # the dispatcher's memory, CPU and open files

    root = resource.Resource()         # unknown paths: 404
    for name, (filename, content_type) in STATIC_FILES.items():
        root.putChild(name, StaticFile(filename, content_type))
    root.putChild(b"metrics", FreshAnswer(CONTENT_TYPE.encode(), [summaries], lambda: generate_latest(registry)))
    root.putChild(b"status.json", FreshAnswer(
        b"application/json", [summaries, sessions],
        lambda: json.dumps(status_document(dispatcher, summaries, sessions)).encode()))
    return QuietSite(root, timeout=IDLE_TIMEOUT)
