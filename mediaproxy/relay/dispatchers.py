"""The relay's links to its dispatchers: TLS client connections, kept up.

Each configured dispatcher (IP, hostname, or a domain whose _sip._udp SRV
records name the proxies) resolves to a set of addresses, looked up again
every dns_check_interval. Every address gets a ClientService that reconnects
after reconnect_delay. On a link the relay answers the dispatcher's commands
and pings it every keepalive_interval; three unanswered pings drop the link.
"""

import ipaddress
import logging

from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.names import client, dns
from twisted.names.error import DNSNameError, DNSServerError

from mediaproxy.peer import VerifiedPeerProtocol
from mediaproxy.protocol.framing import (MAX_LINE_LENGTH, MAX_REQUEST_SIZE, FramingError, Line, RequestReader,
                                         encode_line, is_number)
from mediaproxy.protocol.relaylink import PING, PONG, LinkError, encode_expired, encode_reply, parse_command
from mediaproxy.tlslayer import TLSFactory

log = logging.getLogger("mediaproxy.relay")

DISPATCHER_PORT = 25060
MAX_UNANSWERED_PINGS = 3


class DispatcherLink(VerifiedPeerProtocol):
    peer_kind = "dispatcher"

    def __init__(self, relay, keepalive_interval: float):
        self.relay = relay
        self.keepalive_interval = keepalive_interval
        # Twice the proxy's limits: whatever the dispatcher accepted from the proxy fits here.
        self.reader = RequestReader(single_lines=[PONG], max_line_length=2 * MAX_LINE_LENGTH,
                                    max_request_size=2 * MAX_REQUEST_SIZE)
        self.unanswered_pings = 0
        self._ping_call = None

    def peer_verified(self):
        log.info("connected to dispatcher %s", self.peer_ip)
        self._ping_call = self.clock.callLater(self.keepalive_interval, self._ping)
        self.relay.dispatcher_connected(self)

    def _ping(self):
        if self.unanswered_pings >= MAX_UNANSWERED_PINGS:
            log.warning("dispatcher %s did not answer %d pings: reconnecting", self.peer_ip, self.unanswered_pings)
            self._ping_call = None
            self.transport.abortConnection()
            return
        self.unanswered_pings += 1
        self.transport.write(encode_line(PING))
        self._ping_call = self.clock.callLater(self.keepalive_interval, self._ping)

    def dataReceived(self, data):
        if not self.verified:
            return
        for event in self.reader.feed(data):
            if isinstance(event, Line):
                self.unanswered_pings = 0
            elif isinstance(event, FramingError):
                log.warning("dispatcher %s sent a bad request: %s", self.peer_ip, event)
                seq = (event.command or "").partition(" ")[2].strip()
                if is_number(seq):
                    self.transport.write(encode_reply(int(seq), "error"))
            else:
                self.unanswered_pings = 0
                try:
                    command = parse_command(event)
                except LinkError as e:
                    log.warning("dispatcher %s: %s", self.peer_ip, e)
                    seq = event.command.partition(" ")[2].strip()
                    if is_number(seq):
                        self.transport.write(encode_reply(int(seq), "error"))
                    continue
                try:
                    result = self.relay.handle_command(self, command)
                except Exception:
                    # a bug must cost this command, not the link and every call's next request
                    log.exception("%s command %d (call_id %s) failed", command.name, command.seq,
                                  command.headers.get("call_id", "-"))
                    result = "error"
                self.transport.write(encode_reply(command.seq, result))

    def send_expired(self, statistics: dict) -> None:
        self.transport.write(encode_expired(statistics))

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        if self.verified:
            log.warning("lost dispatcher %s: %s", self.peer_ip, reason.getErrorMessage())
            self.relay.dispatcher_disconnected(self)


class DispatcherLinkFactory(Factory):
    expected_name = None
    handshake_timeout = None        # [TLS] handshake_timeout (mediaproxy.peer's default when None)

    def __init__(self, relay, credentials, passport, verify_interval, keepalive_interval, clock,
                 verify_names=False):
        self.verify_names = verify_names
        self.relay = relay
        self.credentials = credentials
        self.passport = passport
        self.verify_interval = verify_interval
        self.keepalive_interval = keepalive_interval
        self.clock = clock

    def named(self, name: str) -> "DispatcherLinkFactory":
        """The factory for the dispatcher known by `name` (checked against its certificate if asked)."""
        factory = DispatcherLinkFactory(self.relay, self.credentials, self.passport, self.verify_interval,
                                        self.keepalive_interval, self.clock, self.verify_names)
        factory.expected_name = name
        factory.handshake_timeout = self.handshake_timeout
        return factory

    def buildProtocol(self, addr):
        link = DispatcherLink(self.relay, self.keepalive_interval)
        link.factory = self
        if self.verify_names:
            link.expected_name = self.expected_name
        link.credentials = self.credentials
        link.passport = self.passport
        link.verify_interval = self.verify_interval
        link.clock = self.clock
        return link


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@defer.inlineCallbacks
def resolve_dispatcher(host: str, port, resolver):
    """{(ip, port): the name the dispatcher there is known by} for one configured entry."""
    if _is_ip(host):
        return {(host, port or DISPATCHER_PORT): host}
    targets = [(host, port or DISPATCHER_PORT)]
    if port is None:
        try:
            answers, _, _ = yield resolver.lookupService("_sip._udp." + host)
            srv = [a.payload for a in answers if a.type == dns.SRV]
            if srv:
                targets = [(str(record.target), DISPATCHER_PORT) for record in srv]
        except (DNSNameError, DNSServerError, defer.TimeoutError, OSError):
            pass
        except Exception as e:
            log.debug("SRV lookup of %s failed: %s", host, e)
    addresses = {}
    for name, target_port in targets:
        if _is_ip(name):
            addresses[(name, target_port)] = name
            continue
        try:
            ip = yield resolver.getHostByName(name)
            addresses[(ip, target_port)] = name
        except Exception as e:
            log.warning("cannot resolve dispatcher %s: %s", name, e)
    return addresses


def link_source(relay_addresses: dict, dispatcher_ip: str):
    """The address a link to the dispatcher at `dispatcher_ip` leaves from: relay_ip of that
    address's family, as the dispatcher knows the relay by it; None lets the routes choose (no
    relay_ip of that family)."""
    return relay_addresses.get(6 if ":" in dispatcher_ip else 4)


class DispatcherPool(service.MultiService):
    """Keeps one ClientService per dispatcher address, following DNS."""

    def __init__(self, entries, factory, credentials, relay_addresses, reactor, reconnect_delay, dns_check_interval):
        super().__init__()
        self.entries = entries
        self.factory = factory
        self.credentials = credentials
        self.relay_addresses = relay_addresses      # {4: ip, 6: ip} of relay_ip, {} when not set
        self.reactor = reactor
        self.reconnect_delay = reconnect_delay
        self.dns_check_interval = dns_check_interval
        self.connections = {}         # (ip, port) -> ClientService
        self._resolver = None
        self._refresh_call = None
        self._known = {}              # configured entry -> {(ip, port): name} last resolved

    def startService(self):
        super().startService()
        self._refresh()

    @defer.inlineCallbacks
    def _refresh(self):
        self._refresh_call = None
        try:
            if self._resolver is None and not all(_is_ip(host) for host, _ in self.entries):
                self._resolver = client.createResolver(reactor=self.reactor)
            for entry in self.entries:
                found = yield resolve_dispatcher(*entry, self._resolver)
                if found:
                    self._known[entry] = found
                elif entry in self._known:
                    # a failed look-up is no reason to drop a dispatcher we are talking to
                    log.warning("dispatcher %s did not resolve: keeping the addresses it had", entry[0])
            if not self.running:
                return
            wanted = {}
            for addresses in self._known.values():
                wanted.update(addresses)
            for address in set(self.connections) - set(wanted):
                log.info("dispatcher %s:%d is no longer in DNS: disconnecting", *address)
                self.connections.pop(address).disownServiceParent()
            for address in set(wanted) - set(self.connections):
                self._connect(address, wanted[address])
        except Exception:
            log.exception("looking up the dispatchers failed")
        finally:
            if self.running:
                self._refresh_call = self.reactor.callLater(self.dns_check_interval, self._refresh)

    def _connect(self, address, name):
        host, port = address
        source = link_source(self.relay_addresses, host)
        bind = (source, 0) if source else None
        tcp = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
        endpoint = tcp(self.reactor, host, port, timeout=10, bindAddress=bind)
        delay = self.reconnect_delay
        tls = TLSFactory(self.factory.named(name), lambda: self.credentials.ssl_context(False), server_side=False)
        connection = internet.ClientService(endpoint, tls, retryPolicy=lambda attempt: delay, clock=self.reactor)
        connection.setServiceParent(self)
        self.connections[address] = connection
        log.info("connecting to dispatcher %s:%d", host, port)

    def stopService(self):
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        return super().stopService()
