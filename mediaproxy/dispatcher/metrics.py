"""The dispatcher's Prometheus metrics, made when scraped from what it knows:
its counters (mediaproxy/dispatcher/counters.py), its relays and session
table, the relays' last `summary` answers (RelayAnswers) and the accounting
queues.

Per relay (label `relay`, its IP): whether it answers, its sessions,
streams, traffic, port use and kernel entries as its summary says. Relays
that hold sessions but are not connected are listed with `up` 0.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from mediaproxy import __version__
from mediaproxy.dispatcher.counters import LATENCY_BUCKETS, OK, PROXY_COMMANDS, STREAM_TIMEOUTS

PREFIX = "mediaproxy_"
# The Prometheus text format is what generate_latest writes; newer prometheus_client
# versions name a later version in CONTENT_TYPE_LATEST, which older servers do not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value):
    """A figure of a relay's answer, or None when it is not a number (a relay is not trusted to send one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


class DispatcherCollector:
    def __init__(self, dispatcher, summaries):
        self.dispatcher = dispatcher
        self.summaries = summaries        # RelayAnswers of `summary`

    def describe(self):
        return []           # names depend on nothing to check at registration

    def collect(self):
        yield from self._dispatcher_metrics()
        yield from self._request_metrics()
        yield from self._relay_metrics()
        yield from self._accounting_metrics()

    # The dispatcher itself

    def _dispatcher_metrics(self):
        dispatcher, counters = self.dispatcher, self.dispatcher.counters
        info = GaugeMetricFamily(PREFIX + "dispatcher_info", "The dispatcher's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        per_relay = {}
        for record in list(dispatcher.sessions.values()):
            per_relay[record.relay_ip] = per_relay.get(record.relay_ip, 0) + 1
        sessions = GaugeMetricFamily(PREFIX + "dispatcher_sessions",
                                     "Sessions in the dispatcher's table, by the relay that holds them.",
                                     labels=["relay"])
        for ip, count in sorted(per_relay.items()):
            sessions.add_metric([ip], count)
        yield sessions
        yield CounterMetricFamily(PREFIX + "sessions_created", "Sessions a relay took on a first offer.",
                                  value=counters.sessions_created)
        yield CounterMetricFamily(PREFIX + "sessions_expired",
                                  "Sessions a relay ended because all their streams timed out.",
                                  value=counters.sessions_expired)
        streams = CounterMetricFamily(PREFIX + "stream_timeouts",
                                      "Streams of expired sessions that timed out, by kind.", labels=["kind"])
        for kind in STREAM_TIMEOUTS.values():
            streams.add_metric([kind], counters.stream_timeouts[kind])
        yield streams
        timeouts = CounterMetricFamily(PREFIX + "relay_command_timeouts",
                                       "Commands a relay did not answer within relay_timeout.",
                                       labels=["relay", "command"])
        for (ip, command), count in sorted(counters.relay_timeouts.items()):
            timeouts.add_metric([ip, command], count)
        yield timeouts

    def _request_metrics(self):
        counters = self.dispatcher.counters
        requests = CounterMetricFamily(PREFIX + "proxy_requests",
                                       "Requests of the proxy module, by command and result (ok or error).",
                                       labels=["command", "result"])
        failures = CounterMetricFamily(PREFIX + "proxy_request_failures",
                                       "Requests of the proxy module answered error, by command and reason.",
                                       labels=["command", "reason"])
        latency = HistogramMetricFamily(PREFIX + "proxy_request_duration_seconds",
                                        "Time from a proxy request to its answer.", labels=["command"])
        for command, stats in counters.requests.items():
            if command not in PROXY_COMMANDS and not stats.outcomes:
                continue        # "other" (malformed command words) only once there was one
            outcomes = dict(stats.outcomes)
            ok = outcomes.pop(OK, 0)
            requests.add_metric([command, "ok"], ok)
            requests.add_metric([command, "error"], sum(outcomes.values()))
            for reason, count in sorted(outcomes.items()):
                failures.add_metric([command, reason], count)
            buckets, cumulative = [], 0
            for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), stats.counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([command], buckets, stats.total)
        yield requests
        yield failures
        yield latency

    # The relays

    def _relay_metrics(self):
        dispatcher, summaries = self.dispatcher, self.summaries
        families = {
            "up": GaugeMetricFamily(PREFIX + "relay_up", "1 if the relay is connected and answered its last "
                                    "summary, else 0.", labels=["relay"]),
            "info": GaugeMetricFamily(PREFIX + "relay_info", "The relay's version and how it forwards media.",
                                      labels=["relay", "version", "forwarding"]),
            "draining": GaugeMetricFamily(PREFIX + "relay_draining",
                                          "1 if an operator drained the relay (no new sessions).", labels=["relay"]),
            "halting": GaugeMetricFamily(PREFIX + "relay_halting", "1 if the relay is shutting down gracefully.",
                                         labels=["relay"]),
            "uptime": GaugeMetricFamily(PREFIX + "relay_uptime_seconds", "Seconds since the relay started.",
                                        labels=["relay"]),
            "sessions": GaugeMetricFamily(PREFIX + "relay_sessions", "Sessions on the relay.", labels=["relay"]),
            "streams": GaugeMetricFamily(PREFIX + "relay_streams", "Active streams on the relay, by media type.",
                                         labels=["relay", "media_type"]),
            "bps": GaugeMetricFamily(PREFIX + "relay_relayed_bits_per_second",
                                     "Media the relay forwarded, over its last sampling period.", labels=["relay"]),
            "packets": CounterMetricFamily(PREFIX + "relay_userspace_packets",
                                           "Packets the relay forwarded in user space (not in the kernel).",
                                           labels=["relay"]),
            "ports": GaugeMetricFamily(PREFIX + "relay_port_pairs",
                                       "The relay's media port pairs, by state (used, free, set_aside).",
                                       labels=["relay", "state"]),
            "kernel": GaugeMetricFamily(PREFIX + "relay_kernel_entries",
                                        "Conntrack entries forwarding the relay's streams in the kernel.",
                                        labels=["relay"]),
            "age": GaugeMetricFamily(PREFIX + "relay_summary_age_seconds",
                                     "Seconds since the relay's last summary answer.", labels=["relay"]),
        }
        connected = dict(dispatcher.relays)
        for ip in sorted(set(connected) | set(dispatcher.missing_relays)):
            relay = connected.get(ip)
            summary = summaries.answer(ip) if relay is not None else None
            answering = relay is not None and relay.active and summary is not None and ip not in summaries.failing
            families["up"].add_metric([ip], 1 if answering else 0)
            families["draining"].add_metric([ip], 1 if ip in dispatcher.draining else 0)
            if relay is None:
                continue
            summary = summary or {}
            families["halting"].add_metric([ip], 1 if relay.halting or summary.get("status") == "halting" else 0)
            families["info"].add_metric([ip, str(summary.get("version", "")), str(summary.get("forwarding", ""))], 1)
            self._add(families["age"], [ip], summaries.age(ip))
            self._add(families["uptime"], [ip], summary.get("uptime"))
            self._add(families["sessions"], [ip], summary.get("session_count"))
            self._add(families["bps"], [ip], summary.get("bps_relayed"))
            self._add(families["packets"], [ip], summary.get("userspace_packets"))
            self._add(families["kernel"], [ip], summary.get("kernel_entries"))
            streams = summary.get("stream_count")
            for media_type, count in sorted(streams.items() if isinstance(streams, dict) else ()):
                self._add(families["streams"], [ip, str(media_type)], count)
            ports = summary.get("port_pairs")
            for state in ("used", "free", "set_aside"):
                self._add(families["ports"], [ip, state], ports.get(state) if isinstance(ports, dict) else None)
        yield from families.values()

    @staticmethod
    def _add(family, labels, value):
        value = _number(value)
        if value is not None:
            family.add_metric(labels, value)

    # Accounting

    def _accounting_metrics(self):
        queued = GaugeMetricFamily(PREFIX + "accounting_queued_records",
                                   "Accounting records waiting for their back-end.", labels=["backend"])
        written = CounterMetricFamily(PREFIX + "accounting_written_records",
                                      "Accounting records a back-end took.", labels=["backend"])
        set_aside = CounterMetricFamily(PREFIX + "accounting_set_aside_records",
                                        "Accounting records a back-end refused for good (kept as .bad files).",
                                        labels=["backend"])
        for backend in self.dispatcher.accounting:
            for status in getattr(backend, "status", lambda: [])():
                name = str(status.get("backend"))
                self._add(queued, [name], status.get("queued"))
                self._add(written, [name], status.get("written"))
                self._add(set_aside, [name], status.get("set_aside"))
        yield queued
        yield written
        yield set_aside
