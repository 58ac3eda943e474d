"""Allocation of even/odd UDP port pairs from the relay's port range (sans-IO)."""

from collections import deque
from itertools import islice


class PortsExhausted(Exception):
    """No port pair is free in the configured range."""


class PortPool:
    """Even ports of [start, end); port P carries RTP, P+1 RTCP.

    Freed ports go to the back of the queue, so a port is reused as late as
    possible and late packets of an ended call do not latch a new one.
    Ports that could not be bound are set aside and not handed out again.
    """

    def __init__(self, start: int, end: int):
        if start % 2 or end % 2 or not 0 < start < end <= 65536:
            raise ValueError("port range must have even bounds with start < end")
        self.start, self.end = start, end
        self._free = deque(range(start, end, 2))
        self._used = set()
        self.set_aside_ports = set()

    @property
    def capacity(self) -> int:
        return (self.end - self.start) // 2

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return len(self._used)

    def upcoming(self, count: int) -> list:
        """The pairs the next `count` allocations hand out, in order (while nothing is claimed)."""
        return list(islice(self._free, count))

    def allocate(self) -> int:
        if not self._free:
            raise PortsExhausted("all %d port pairs of %d:%d are in use" % (self.capacity, self.start, self.end))
        port = self._free.popleft()
        self._used.add(port)
        return port

    def claim(self, ports) -> set:
        """Take these very pairs (the calls restored after a restart keep their ports); returns
        the ones that are not free pairs of the range. One pass over the free queue for all."""
        wanted = set(ports)
        free = set(self._free)
        taken = wanted & free
        self._free = deque(port for port in self._free if port not in taken)
        self._used |= taken
        return wanted - taken

    def release(self, port: int) -> None:
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)

    def set_aside(self, port: int) -> None:
        """The pair could not be bound (someone else holds it): never hand it out again."""
        self._used.discard(port)
        self.set_aside_ports.add(port)
