"""What the dispatcher counts as it works: proxy requests (by outcome, with
their latency), sessions set up and expired, relay commands that timed out.

Plain numbers, no metrics library: every proxy request passes here, so
counting one is a Counter increment and a bisect. mediaproxy/dispatcher/metrics.py
turns them into Prometheus metrics when scraped.
"""

import bisect
import collections
import time

# Upper bounds (s) of the proxy request latency histogram; the proxy module gives up after 500 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROXY_COMMANDS = ("update", "remove")
OK = "ok"

# Why a proxy request was answered `error`.
MALFORMED = "malformed"                     # the request could not be parsed
NO_RELAY = "no_relay"                       # no relay took the new session
RELAY_ERROR = "relay_error"                 # its relay answered error (or nonsense)
RELAY_HALTING = "relay_halting"             # its relay is shutting down
RELAY_TIMEOUT = "relay_timeout"             # its relay did not answer in time
RELAY_UNAVAILABLE = "relay_unavailable"     # its relay is not connected
UNKNOWN_SESSION = "unknown_session"         # a remove of a session nobody knows (often expired before)
INTERNAL = "internal"                       # a bug: logged with its traceback

# The stream statuses (SPEC §6) of streams that timed out, and their label values.
STREAM_TIMEOUTS = {"no-traffic timeout": "no_traffic", "on hold timeout": "on_hold",
                   "conntrack timeout": "conntrack", "unselected ICE candidate": "unselected_ice"}


class RequestStats:
    """One command's requests: how many by outcome, and their latency histogram (counts per
    bucket, not cumulative: the last one is +Inf; and the sum of the values)."""

    __slots__ = ("outcomes", "counts", "total")

    def __init__(self):
        self.outcomes = {}              # OK or a failure reason -> requests
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class DispatcherCounters:
    def __init__(self, timer=time.perf_counter):
        self.timer = timer
        self.requests = {command: RequestStats() for command in PROXY_COMMANDS + ("other",)}
        self.sessions_created = 0
        self.sessions_expired = 0
        self.stream_timeouts = collections.Counter()    # kind (a STREAM_TIMEOUTS value) -> streams
        self.relay_timeouts = collections.Counter()     # (relay ip, command) -> commands

    def request_done(self, command: str, outcome: str, started: float) -> None:
        """A proxy request answered: `outcome` is OK or why it failed; `started` is timer() when it came."""
        elapsed = self.timer() - started
        # a malformed command word is not a label value of its own
        stats = self.requests.get(command) or self.requests["other"]
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.counts[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        stats.total += elapsed

    def session_expired(self, statistics: dict) -> None:
        """A relay reported a session whose streams all ended by themselves."""
        self.sessions_expired += 1
        for stream in statistics.get("streams") or ():
            kind = STREAM_TIMEOUTS.get(stream.get("status")) if isinstance(stream, dict) else None
            if kind is not None:        # its other streams were closed or rejected before
                self.stream_timeouts[kind] += 1

    def relay_timed_out(self, relay_ip: str, command: str) -> None:
        self.relay_timeouts[relay_ip, command] += 1
