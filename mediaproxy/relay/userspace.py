"""User-space forwarding: Twisted UDP sockets carry the packets.

Used for the first packets of every stream (latching) and for everything on
hosts without the kernel path. Each port of a pair is one socket; a packet
goes through the stream's packet path and out of the other leg's socket.
"""

import logging
from socket import AF_INET6

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol

from mediaproxy.relay.forwarding import PortUnavailable
from mediaproxy.relay.streams import StreamListener

log = logging.getLogger("mediaproxy.relay")


class MediaSocket(DatagramProtocol):
    __slots__ = ("forwarding", "component", "receiver")

    def __init__(self, forwarding, component, receiver):
        self.forwarding = forwarding
        self.component = component
        self.receiver = receiver

    def datagramReceived(self, data, address):
        # The per-packet path. Twisted's Port.doRead already reduced the address to (host, port).
        forwarding = self.forwarding
        result = self.receiver(self.component, address, data, forwarding.clock.seconds())
        if result is None:
            return
        out_port, destination = result
        if out_port in forwarding.kernel_ports:
            # Left in the socket from before the hand-over: sent now it would not be
            # NATed like the kernel's packets but leave from another source port.
            return
        out = forwarding.sockets.get(out_port)
        if out is not None:
            forwarding.packets_forwarded += 1
            forwarding.bytes_forwarded += len(data)
            # The socket's sendto, not Port.write: for every datagram Port.write checks the
            # address's syntax with inet_pton four times, two of them failing with an exception
            # (about 15% of the relay's time under load). The destination is an address the
            # kernel gave (latched) or one parse_ip checked (SDP); only its family may not fit
            # the socket (an IPv6 SDP address on an IPv4 relay), and sendto would then take the
            # literal for a host name to look up.
            if (":" in destination[0]) is not (out.addressFamily == AF_INET6):
                log.debug("cannot send to %s:%d: not an address of the relay's family", *destination)
                return
            try:
                out.socket.sendto(data, destination)
            except OSError as e:     # e.g. no route: the packet is lost, the relay goes on
                log.debug("cannot send to %s:%d: %s", destination[0], destination[1], e)


class UserspaceForwarding(StreamListener):
    def __init__(self, ip: str, reactor):
        self.ip = ip
        self.clock = reactor
        self.reactor = reactor
        self.sockets = {}            # port -> listening transport (both ports of each pair)
        self.receivers = {}          # even port of an open pair -> its stream's packet path
        self.kernel_ports = frozenset()   # ports whose packets the kernel relays (see KernelForwarding)
        self.packets_forwarded = 0
        self.bytes_forwarded = 0

    def open(self, port: int, receiver) -> None:
        opened = []
        try:
            for component in (0, 1):
                opened.append(self.listen(port + component, receiver))
        except CannotListenError:
            for listening in opened:
                listening.stopListening()
            raise PortUnavailable(port) from None
        self.sockets[port], self.sockets[port + 1] = opened
        self.receivers[port] = receiver

    def listen(self, port: int, receiver):
        """One socket of a pair (RTP on the even port, RTCP on the odd one); raises CannotListenError."""
        return self.reactor.listenUDP(port, MediaSocket(self, port & 1, receiver), interface=self.ip)

    def close(self, port: int) -> None:
        self.receivers.pop(port, None)
        for p in (port, port + 1):
            listening = self.sockets.pop(p, None)
            if listening is not None:
                listening.stopListening()

    def refresh_counters(self) -> None:
        pass

    def traffic_bytes(self) -> int:
        return self.bytes_forwarded

    def status(self) -> dict:
        return {"forwarding": "userspace", "userspace_packets": self.packets_forwarded}
