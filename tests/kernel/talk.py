"""Two parties talking at a steady rate in the background, with when each packet arrived.

``Talk`` sends RTP both ways every ``1/rate`` s (RTCP every ``rtcp_every``
packets) from a thread while the test does something else to the relay (a
restart), reads what arrives and keeps the arrival times of each party's
RTP: from them, the longest silence a listener heard. The parties are the
thread's alone until ``stop`` returns.
"""

from __future__ import annotations

import threading
import time

from tests.kernel.helpers import RTP, MediaParty, settle


class Talk:
    def __init__(self, caller: MediaParty, callee: MediaParty, caller_facing, callee_facing,
                 rate: float = 50.0, rtcp_every: int = 10) -> None:
        self.caller, self.callee = caller, callee
        self.destinations = {id(caller): caller_facing, id(callee): callee_facing}
        self.interval = 1.0 / rate
        self.rtcp_every = rtcp_every
        self.arrivals: dict[str, list[float]] = {"caller": [], "callee": []}   # RTP heard by each
        self.sent = 0                     # RTP packets each party sent
        self._before = {"caller": caller.received_count(RTP), "callee": callee.received_count(RTP)}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="talk", daemon=True)

    def __enter__(self) -> "Talk":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def heard(self, party: str) -> int:
        return len(self.arrivals[party])

    def stop(self) -> None:
        """Stop sending, and read until nothing more arrives."""
        if self._thread.is_alive():
            self._stopping.set()
            self._thread.join(timeout=10)
            assert not self._thread.is_alive(), "the talking thread did not stop"
            settle(self.caller, self.callee)
            self._note_arrivals()

    def _run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self._stopping.is_set():
            for party in (self.caller, self.callee):
                destination = self.destinations[id(party)]
                party.send_rtp(destination)
                if self.rtcp_every and n % self.rtcp_every == 0:
                    party.send_rtcp(destination)
            self.sent += 1
            n += 1
            # read often: the arrival time of a packet is when it is read
            while True:
                self._read()
                delay = start + n * self.interval - time.monotonic()
                if delay <= 0:
                    break
                self._stopping.wait(min(delay, 0.002))

    def _read(self) -> None:
        for party in (self.caller, self.callee):
            party.drain()
        self._note_arrivals()

    def _note_arrivals(self) -> None:
        now = time.monotonic()
        for name, party in (("caller", self.caller), ("callee", self.callee)):
            arrivals = self.arrivals[name]
            arrivals.extend([now] * (party.received_count(RTP) - self._before[name] - len(arrivals)))

    def longest_silence(self, party: str) -> float:
        """The longest time (s) between two RTP packets ``party`` heard while the talk went on."""
        arrivals = self.arrivals[party]
        return max((b - a for a, b in zip(arrivals, arrivals[1:])), default=float("inf"))
