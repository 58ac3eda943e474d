"""The forwarding interface: how streams get their sockets and packets.

The relay core asks a Forwarding to open a port pair (RTP on the even port,
RTCP on the next) and hands it a receiver, the stream's packet path:
`receiver(component, source, data, now)` returns where to send the packet,
as (out_port, destination), or None to drop it. Implementations: user space
(Twisted UDP, `userspace.py`), the kernel (conntrack, later) and the
in-memory one below for tests.
"""

from typing import Callable, Mapping, Optional, Protocol, Tuple, Union

from mediaproxy.relay.streams import StreamListener

Address = Tuple[str, int]
Receiver = Callable[[int, Address, bytes, float], Optional[Tuple[int, Address]]]


def ip_version(ip: str) -> int:
    """4 or 6: the IP version of an address's text (callers pass canonical addresses)."""
    return 6 if ":" in ip else 4


def addresses_by_version(addresses: Union[str, Mapping[int, str]]) -> dict:
    """{4: IPv4 address, 6: IPv6 address} of one address or of such a mapping."""
    if isinstance(addresses, str):
        return {ip_version(addresses): addresses}
    return dict(addresses)


def primary_version(addresses: Mapping[int, str]) -> int:
    """The version of the relay's main address (IPv4 when it has one): the summary's `ip`,
    the pairs opened without a version."""
    return 4 if 4 in addresses else 6


class PortUnavailable(Exception):
    """The port pair could not be bound (someone else holds one of its ports)."""


class Forwarding(Protocol):
    """Also a StreamListener: told when sub-streams latch, to hand them to the kernel."""

    def open(self, port: int, receiver: Receiver, ip_version: Optional[int] = None) -> None:
        """Bind the pair port/port+1 on the relay's address of that IP version (None: its main
        one) and deliver its packets to receiver; raises PortUnavailable."""

    def close(self, port: int) -> None:
        """Release the pair (and whatever the kernel forwards for it); unknown ports are ignored."""

    def prepare(self, ports) -> None:
        """These pairs are the next to be opened (on the main address): get them ready now, while
        nothing waits, so that `open` has less to do when a request does."""

    def latched(self, stream, component: int) -> None: ...

    def unlatched(self, stream) -> None: ...

    def refresh_counters(self) -> None:
        """Bring the streams' kernel counters up to date."""

    def traffic_bytes(self) -> int:
        """UDP payload bytes relayed since start (user space and kernel): what bps_relayed samples."""

    def status(self) -> dict:
        """What the relay's summary says of its forwarding."""

    def stop(self) -> None:
        """The relay stops: no more reading or kernel work (what is open stays as it is)."""


class MemoryForwarding(StreamListener):
    """Forwarding without sockets, for tests: `deliver` plays a packet, `sent` records the output."""

    def __init__(self, unavailable=()):
        self.receivers = {}
        self.versions = {}           # even port -> the IP version it was opened for (None: the main one)
        self.sent = []
        self.unavailable = set(unavailable)

    def open(self, port: int, receiver: Receiver, ip_version: Optional[int] = None) -> None:
        if port in self.unavailable or port in self.receivers:
            raise PortUnavailable(port)
        self.receivers[port] = receiver
        self.versions[port] = ip_version

    def close(self, port: int) -> None:
        self.receivers.pop(port, None)
        self.versions.pop(port, None)

    def prepare(self, ports) -> None:
        pass

    def refresh_counters(self) -> None:
        pass

    def traffic_bytes(self) -> int:
        return sum(len(data) for _, _, data in self.sent)

    def status(self) -> dict:
        return {"forwarding": "memory"}

    def stop(self) -> None:
        pass

    def deliver(self, local_port: int, source: Address, data: bytes, now: float = 0.0):
        """A packet arrives on local_port (even: RTP, odd: RTCP); returns what was sent or None."""
        pair, component = local_port & ~1, local_port & 1
        result = self.receivers[pair](component, source, data, now)
        if result is not None:
            out_port, destination = result
            self.sent.append((out_port, destination, data))
        return result
