"""User-space forwarding: UDP sockets read by the reactor carry the packets.

Used for the first packets of every stream (latching) and for everything on
hosts without the kernel path. Each port of a pair is one socket; a packet
goes through the stream's packet path and out of the other leg's socket.

The sockets are ours, not Twisted's udp.Port: a relay opens and closes four
for every call, and udp.Port logs two messages for each (built even when
nobody logs them) and checks the syntax of every destination four times.
Nor are they the reactor's readers: they are in an epoll of their own
(MediaPoller), itself one reader of the reactor, so that a socket joins it
with one epoll_ctl and leaves it by being closed, without the reactor's
bookkeeping and an epoll_ctl more for each of the four.

The next pairs of the port pool are bound ahead (`prepare`, after a request
is answered): a new call takes sockets that are open already, and the time
of opening them is not part of any request's.
"""

import errno
import logging
import select
from _socket import socket as raw_socket
from socket import AF_INET, AF_INET6, SOCK_DGRAM, SOCK_NONBLOCK

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from mediaproxy.relay.forwarding import PortUnavailable, addresses_by_version, primary_version
from mediaproxy.relay.streams import StreamListener

log = logging.getLogger("mediaproxy.relay")

MAX_DATAGRAM = 65535           # never cut a datagram short
READS_PER_TURN = 64            # datagrams read from one socket before the reactor does something else


def _unclaimed(component, source, data, now):
    """The receiver of a pair bound ahead: nobody was given its port yet, its packets are stray."""
    return None


def _close(ports) -> None:
    for listening in ports:
        listening.stopListening()


class MediaPort:
    """One socket of a port pair (RTP on the even port, RTCP on the odd one)."""

    __slots__ = ("socket", "forwarding", "component", "receiver", "ipv6")

    def __init__(self, forwarding, port: int, receiver, ip: str = None):
        ip = ip or forwarding.ip
        self.ipv6 = ":" in ip
        # non-blocking from the start: one system call less than setblocking, four per call; the C
        # socket type, without the Python layer of socket.socket (its __init__ and close, in Python)
        sock = raw_socket(AF_INET6 if self.ipv6 else AF_INET, SOCK_DGRAM | SOCK_NONBLOCK)
        try:
            sock.bind((ip, port))
        except OSError as e:
            sock.close()
            raise CannotListenError(ip, port, e) from None
        self.socket = sock
        self.forwarding = forwarding
        self.component = port & 1
        self.receiver = receiver
        try:
            forwarding.poller.add(self)
        except OSError:
            sock.close()
            raise

    def drain(self) -> None:
        """Read all that waits in the socket. Called when the kernel takes this port over: the
        packets are counted, and not sent (their out port is the kernel's by then, see _read)."""
        self._read(1 << 62)

    def stopListening(self) -> None:
        fd = self.socket.fileno()
        if fd >= 0:
            self.forwarding.poller.discard(fd)
            self.socket.close()         # which takes it out of the poller's epoll

    def doRead(self):
        self._read(READS_PER_TURN)

    def _read(self, limit: int) -> None:
        # The per-packet path of user-space forwarding.
        forwarding = self.forwarding
        # A Leg's __call__ as a bound method: called without the argument tuple that calling the leg builds.
        recvfrom, receiver, component = self.socket.recvfrom, self.receiver.__call__, self.component
        now = forwarding.clock.seconds()
        for _ in range(limit):
            try:
                data, address = recvfrom(MAX_DATAGRAM)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.debug("receiving on port %d: %s", self.socket.getsockname()[1], e)
                return
            if self.ipv6:
                address = address[:2]
            result = receiver(component, address, data, now)
            if result is None:
                continue
            out_port, destination = result
            if out_port in forwarding.kernel_ports:
                # Left in the socket from before the hand-over: sent now it would not be
                # NATed like the kernel's packets but leave from another source port.
                continue
            out = forwarding.sockets.get(out_port)
            if out is None:
                continue
            if (":" in destination[0]) is not out.ipv6:
                # an SDP address of the other family: sendto would take it for a host name
                log.debug("cannot send to %s:%d: not an address of the relay's family", *destination)
                continue
            forwarding.packets_forwarded += 1
            forwarding.bytes_forwarded += len(data)
            try:
                out.socket.sendto(data, destination)
            except OSError as e:     # e.g. no route: the packet is lost, the relay goes on
                log.debug("cannot send to %s:%d: %s", destination[0], destination[1], e)


@implementer(IReadDescriptor)
class MediaPoller:
    """The media sockets' epoll, read by the reactor as one descriptor."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.epoll = select.epoll()
        self.fileno = self.epoll.fileno
        self.ports = {}                 # fd -> MediaPort
        reactor.addReader(self)

    def add(self, port: MediaPort) -> None:
        fd = port.socket.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.ports[fd] = port

    def discard(self, fd: int) -> None:
        """The port of `fd` is closing (closed, it leaves the epoll by itself)."""
        self.ports.pop(fd, None)

    def doRead(self):
        ports = self.ports
        for fd, _ in self.epoll.poll(0, len(ports) or 1):
            port = ports.get(fd)
            if port is None:
                continue
            try:
                port.doRead()
            except Exception:
                # as the reactor does with a reader that fails: logged, and that socket closed
                log.exception("media port %d failed: closed", port.socket.getsockname()[1])
                port.stopListening()

    def stop(self) -> None:
        self.reactor.removeReader(self)
        self.epoll.close()

    def connectionLost(self, reason):
        self.epoll.close()

    def logPrefix(self):
        return "media"


class UserspaceForwarding(StreamListener):
    """`ip`: the relay's address, or its addresses by IP version ({4: ..., 6: ...}); a pair is
    opened on the address of the version its stream has (IPv4 and IPv6 are never bridged)."""

    def __init__(self, ip, reactor):
        self.ips = addresses_by_version(ip)
        self.main_version = primary_version(self.ips)
        self.ip = self.ips[self.main_version]
        # even port -> IP version of the pairs not on the main address (a parked port reopens there)
        self.other_version_pairs = {}
        self.clock = reactor
        self.reactor = reactor
        self.poller = MediaPoller(reactor)
        self.sockets = {}            # port -> MediaPort (both ports of each pair)
        self.receivers = {}          # even port of an open pair -> its stream's packet path
        self.ready = {}              # even port -> its two MediaPorts, bound ahead (see prepare)
        self.kernel_ports = frozenset()   # ports whose packets the kernel relays (see KernelForwarding)
        self.packets_forwarded = 0
        self.bytes_forwarded = 0

    def prepare(self, ports) -> None:
        ready = self.ready
        for port in [port for port in ready if port not in ports]:
            _close(ready.pop(port))
        for port in ports:
            if port in ready or port in self.receivers:
                continue
            try:
                ready[port] = self._bind_pair(port, _unclaimed)
            except (CannotListenError, OSError):    # in use, or no descriptor left: `open` tries, says so
                continue

    def open(self, port: int, receiver, ip_version: int = None) -> None:
        other_version = ip_version is not None and ip_version != self.main_version
        ready = self.ready.pop(port, None)
        if ready is not None:
            if not other_version:
                # (stray packets that came while it was ready were read and dropped at each turn,
                # as a freshly bound socket would not have had them)
                for listening in ready:
                    listening.receiver = receiver
                self.sockets[port], self.sockets[port + 1] = ready
                self.receivers[port] = receiver
                return
            _close(ready)                           # bound on the main address: not this pair's
        if other_version:
            if ip_version not in self.ips:
                raise ValueError("the relay has no IPv%d address" % ip_version)
            self.other_version_pairs[port] = ip_version
        try:
            self.sockets[port], self.sockets[port + 1] = self._bind_pair(port, receiver)
        except CannotListenError:
            self.other_version_pairs.pop(port, None)
            raise PortUnavailable(port) from None
        except OSError:                 # no descriptor or buffer left: the caller says so
            self.other_version_pairs.pop(port, None)
            raise
        self.receivers[port] = receiver

    def _bind_pair(self, port: int, receiver) -> list:
        """Both sockets of the pair of even `port`, or neither (what the second raised is raised)."""
        first = self.listen(port, receiver)
        try:
            return [first, self.listen(port + 1, receiver)]
        except BaseException:
            first.stopListening()
            raise

    def listen(self, port: int, receiver) -> MediaPort:
        """One socket of a pair, on the address of its pair's IP version; raises CannotListenError."""
        version = self.other_version_pairs.get(port & ~1)
        return MediaPort(self, port, receiver, self.ips[version] if version is not None else None)

    def stop(self) -> None:
        """No more reading (the relay stops): the sockets are closed with the process or by close."""
        for port in list(self.ready):
            _close(self.ready.pop(port))
        self.poller.stop()

    def ip_of(self, port: int) -> str:
        """The relay address the pair of `port` is open on."""
        return self.ips[self.other_version_pairs.get(port & ~1, self.main_version)]

    def close(self, port: int) -> None:
        self.receivers.pop(port, None)
        self.other_version_pairs.pop(port, None)
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
