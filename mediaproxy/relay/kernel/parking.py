"""The sockets of ports the kernel relays are closed while it does.

A port whose packets a conntrack NAT entry relays never sees them in the
relay process, so its socket would only cost a descriptor: at four sockets
a stream a relay runs out of descriptors (20,000 here) at 5,000 calls, long
before the kernel runs out of entries. A parked port keeps its place in the
port pool; when its entry goes (the stream moves, pauses, is put on hold)
its socket is opened again.

A packet to a parked port from an address no entry matches (a stranger, or
a party that moved without a new offer: a NAT that rebinds) is delivered to
the relay's address where no socket listens. One raw socket per relay
address (IPv4, IPv6) sees every UDP
packet delivered to that address in its port range (the kernel's
NAT-relayed packets are forwarded, not delivered, so it does not see those):
the port's leg counts it as dropped and says whether the port listens again
(only when the leg may latch a new source, without strict source). With
strict source a stranger spraying a call's ports never gets its packets
into the relay process beyond their headers on the raw socket.
"""

import ctypes
import errno
import logging
import socket
import struct

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

log = logging.getLogger("mediaproxy.relay")

SO_ATTACH_FILTER = 26
UDP_HEADER_END = 64             # bytes of a packet the raw socket keeps: IP header (<= 60) and ports
READS_PER_TURN = 256            # packets read from the raw socket before the reactor does something else


def port_range_filter(low: int, high: int) -> bytes:
    """Classic BPF for a raw IPv4 UDP socket: keep the headers of packets to ports low..high-1."""
    program = [
        (0xB1, 0, 0, 0),                     # ldxb 4*([0]&0xf): X = IP header length
        (0x48, 0, 0, 2),                     # ldh [x+2]: the UDP destination port
        (0x35, 0, 2, low),                   # jge #low, next, drop
        (0x35, 1, 0, high),                  # jge #high, drop, keep
        (0x06, 0, 0, UDP_HEADER_END),        # ret: keep the headers
        (0x06, 0, 0, 0),                     # ret 0: drop
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def port_range_filter6(low: int, high: int) -> bytes:
    """The same for a raw IPv6 UDP socket, which receives packets from their UDP header on."""
    program = [
        (0x28, 0, 0, 2),                     # ldh [2]: the UDP destination port
        (0x35, 0, 2, low),                   # jge #low, next, drop
        (0x35, 1, 0, high),                  # jge #high, drop, keep
        (0x06, 0, 0, UDP_HEADER_END),        # ret: keep the headers
        (0x06, 0, 0, 0),                     # ret 0: drop
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    instructions = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(instructions))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def destination_port(packet: bytes):
    """The UDP destination port of a raw IPv4 packet, or None if it is too short."""
    header = (packet[0] & 0x0F) * 4 if packet else 0
    if len(packet) < header + 4:
        return None
    return (packet[header + 2] << 8) | packet[header + 3]


def source_address(packet: bytes):
    """(source IP, source port) of a raw IPv4 UDP packet whose destination_port is not None."""
    header = (packet[0] & 0x0F) * 4
    return socket.inet_ntoa(packet[12:16]), (packet[header] << 8) | packet[header + 1]


def udp_ports6(datagram: bytes):
    """(source port, destination port) of what a raw IPv6 UDP socket received, or None if too short."""
    if len(datagram) < 4:
        return None
    return (datagram[0] << 8) | datagram[1], (datagram[2] << 8) | datagram[3]


@implementer(IReadDescriptor)
class _Catcher:
    """The raw socket of one relay address: which parked ports packets arrive at."""

    def __init__(self, ip: str, port_range, on_packet):
        self.on_packet = on_packet
        self.ipv6 = ":" in ip
        self.sock = socket.socket(socket.AF_INET6 if self.ipv6 else socket.AF_INET, socket.SOCK_RAW,
                                  socket.IPPROTO_UDP)
        try:
            attach_filter(self.sock, (port_range_filter6 if self.ipv6 else port_range_filter)(*port_range))
            self.sock.bind((ip, 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        packet_of = self._packet6 if self.ipv6 else self._packet4
        for _ in range(READS_PER_TURN):
            try:
                packet = packet_of()
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    log.error("the raw IPv%d socket that wakes up parked ports failed: %s", 6 if self.ipv6 else 4, e)
                return
            if packet is not None:
                self.on_packet(*packet)

    def _packet4(self):
        """(destination port, source address) of the next packet, or None; the IP header carries both."""
        packet = self.sock.recv(UDP_HEADER_END)
        port = destination_port(packet)
        return None if port is None else (port, source_address(packet))

    def _packet6(self):
        """The same for IPv6: a raw IPv6 socket gives the UDP header, and the source with recvfrom."""
        datagram, address = self.sock.recvfrom(UDP_HEADER_END)
        ports = udp_ports6(datagram)
        return None if ports is None else (ports[1], (address[0], ports[0]))

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "parked-ports"

    def close(self):
        self.sock.close()


class PortParking:
    """Parks and wakes the sockets of a UserspaceForwarding (its ``sockets``,
    ``receivers`` and ``listen``; the receivers are the streams' legs).
    ``expected_source(port)``: the addresses whose packets to a parked port the
    kernel relays (copies of theirs are no strangers').

    A port is parked when its pair is open (has a receiver) but the port has no
    socket: no set of parked ports is kept (four ports a call), only their count.
    The forwarding tells `forget` of a pair it closes before it drops the pair.
    """

    def __init__(self, forwarding, reactor, port_range=None, expected_source=lambda port: ()):
        self.forwarding = forwarding
        self.reactor = reactor
        self.expected_source = expected_source
        self._parked_count = 0
        self._catchers = []
        ips = getattr(forwarding, "ips", None) or {0: forwarding.ip}
        for ip in (ips.values() if port_range is not None else ()):
            try:
                catcher = _Catcher(ip, port_range, self._packet_to)
            except OSError as e:
                log.warning("parked ports of %s cannot be woken by a moving party (no raw socket: %s); "
                            "a new offer still wakes them", ip, e.strerror)
            else:
                reactor.addReader(catcher)
                self._catchers.append(catcher)

    def __len__(self):
        return self._parked_count

    def is_parked(self, port: int) -> bool:
        forwarding = self.forwarding
        return port not in forwarding.sockets and (port & ~1) in forwarding.receivers

    def stop(self) -> None:
        for catcher in self._catchers:
            self.reactor.removeReader(catcher)
            catcher.close()
        self._catchers = []

    def park(self, port: int) -> None:
        listening = self.forwarding.sockets.pop(port, None)
        if listening is not None:
            listening.drain()           # what arrived before the hand-over still counts
            listening.stopListening()
            if self.is_parked(port):
                self._parked_count += 1

    def wake(self, port: int) -> None:
        if not self.is_parked(port):
            return
        forwarding = self.forwarding
        try:
            forwarding.sockets[port] = forwarding.listen(port, forwarding.receivers[port & ~1])
        except CannotListenError as e:
            # it stays parked (deaf): a stranger's packet to it tries again
            log.error("port %d cannot be listened on again, its stream is deaf: %s", port, e.socketError)
            return
        self._parked_count -= 1

    def forget(self, pair: int) -> None:
        """The pair is closing: nothing of it is to be woken."""
        for port in (pair, pair + 1):
            if self.is_parked(port):
                self._parked_count -= 1

    def _packet_to(self, port: int, source) -> None:
        # The raw socket also sees copies of packets that arrived just before their port was
        # parked, from the parties the kernel now relays: only a stranger's packet counts.
        if self.is_parked(port) and source not in self.expected_source(port):
            leg = self.forwarding.receivers[port & ~1]
            if leg.dropped_by_kernel(port & 1, source, self.reactor.seconds()):
                log.debug("a packet from %s:%d to parked port %d: listening on it again", *source, port)
                self.wake(port)
