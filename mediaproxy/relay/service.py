"""The media-relay service tree: the relay core, its forwarding and its dispatcher links."""

import ipaddress
import logging
import socket
import time

from twisted.application import internet, service

from mediaproxy.relay.core import RelayCore
from mediaproxy.relay.dispatchers import DispatcherLinkFactory, DispatcherPool
from mediaproxy.relay.forwarding import primary_version
from mediaproxy.relay.kernel.adoption import saved_flows
from mediaproxy.relay.kernel.forwarding import KernelForwarding
from mediaproxy.relay.kernel.setup import KernelUnavailable, start_kernel_path
from mediaproxy.relay.ports import PortPool
from mediaproxy.relay.state import FILE_NAME as STATE_FILE, RelayState, load_state, save_state
from mediaproxy.relay.userspace import UserspaceForwarding
from mediaproxy.tls import Credentials

log = logging.getLogger("mediaproxy.relay")

SLOW_SAMPLING = 0.010      # seconds: a sampling pass slower than this is logged
TIMEOUT_CHECK_INTERVAL = 1    # seconds between looks for silent streams
MAX_UNDELIVERED = 10000       # expired reports kept for a dispatcher that is away
READY_PAIRS = 8               # port pairs bound ahead (Forwarding.prepare): the offers of a busy turn


class StartupError(Exception):
    pass


def default_route_addresses() -> dict:
    """The local addresses of the default routes by IP version: IPv4, and IPv6 when the host has
    an IPv6 default route (and an address on it that is not link-local). A UDP connect only
    looks the route up, it sends nothing."""
    addresses = {}
    for version, family, probe in ((4, socket.AF_INET, "192.0.2.1"), (6, socket.AF_INET6, "2001:db8::1")):
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:                 # no IPv6 in this kernel
            continue
        try:
            sock.connect((probe, 9))    # looks the route up, sends nothing
            ip = sock.getsockname()[0]
        except OSError:
            continue
        finally:
            sock.close()
        address = ipaddress.ip_address(ip)
        if not (address.is_link_local or address.is_loopback or address.is_unspecified):
            addresses[version] = str(address)
    if not addresses:
        raise StartupError("there is no default route to take the relay's address from: set [Relay] relay_ip")
    return addresses


def routable_predicate(private_ranges):
    def routable(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_global or any(address in network for network in private_ranges)
    return routable


class RelayService(service.MultiService):
    def __init__(self, configuration, reactor):
        super().__init__()
        config = configuration.relay
        self.reactor = reactor
        self.configuration = configuration
        if not config.dispatchers:
            raise StartupError("no dispatchers to connect to: set [Relay] dispatchers")
        self.relay_addresses = config.relay_addresses or default_route_addresses()
        self.relay_ip = self.relay_addresses[primary_version(self.relay_addresses)]
        advertised = dict(self.relay_addresses)
        for version, ip in config.advertised_addresses.items():
            if version not in self.relay_addresses:
                raise StartupError("config.ini: [Relay] advertised_ip = %r: the relay has no IPv%d address to announce "
                                   "as %s (its addresses: %s)" % (config.advertised_ip, version, ip,
                                                                  ", ".join(self.relay_addresses.values())))
            advertised[version] = ip
        # what saved calls must have been saved with to be restored (their ports, entries); an
        # IPv4-only relay's setup is what it was before IPv6 (see state.ADDED_LATER)
        self.setup = {"relay_ip": self.relay_addresses.get(4), "advertised_ip": advertised.get(4),
                      "port_range": list(config.port_range), "conntrack_mark": config.conntrack_mark}
        if 6 in self.relay_addresses:
            self.setup.update(relay_ip6=self.relay_addresses[6], advertised_ip6=advertised[6])
        self.state_path = configuration.runtime_path(STATE_FILE)
        # no stream waits longer than this without traffic: an older file holds only ended calls
        max_age = max(config.stream_timeout, config.on_hold_timeout)
        saved = load_state(self.state_path, self.setup, reactor.seconds(), max_age)
        keep = saved_flows(saved.kernel_entries, self.relay_addresses) if saved is not None else frozenset()
        try:
            self.forwarding = self._make_forwarding(config, reactor, keep)
        except StartupError:
            if saved is not None:
                save_state(self.state_path, saved)      # for a start that gets further
            raise
        self.core = RelayCore(advertised, PortPool(*config.port_range), self.forwarding, reactor.seconds(),
                              routable_predicate(config.routable_private_ranges),
                              stream_timeout=config.stream_timeout, on_hold_timeout=config.on_hold_timeout,
                              relatch_after=None if config.strict_source else config.relatch_after)
        self.links = set()
        self._preparing = None        # the call of _prepare_ports, after the turn that answers an update
        self.undelivered = {}         # dispatcher ip -> statistics of sessions that expired while it was away
        if saved is not None:
            self._restore(saved)
        self.credentials = Credentials(configuration.config_path(configuration.tls.certs_path), "relay")
        factory = DispatcherLinkFactory(self, self.credentials, config.passport, configuration.tls.verify_interval,
                                        config.keepalive_interval, reactor, config.verify_dispatcher_names)
        factory.handshake_timeout = configuration.tls.handshake_timeout      # read by mediaproxy.peer
        self.pool = DispatcherPool(config.dispatchers, factory, self.credentials,
                                   config.relay_addresses, reactor,
                                   config.reconnect_delay, config.dns_check_interval)
        self.pool.setServiceParent(self)
        sampler = internet.TimerService(config.traffic_sampling_period, self._sample_traffic)
        sampler.clock = reactor
        sampler.setServiceParent(self)
        timeouts = internet.TimerService(TIMEOUT_CHECK_INTERVAL, self._check_timeouts)
        timeouts.clock = reactor
        timeouts.setServiceParent(self)

    def _make_forwarding(self, config, reactor, keep):
        addresses = self.relay_addresses
        if config.kernel_forwarding == "no":
            log.info("kernel forwarding is off (kernel_forwarding = no): media is relayed in user space")
            return UserspaceForwarding(addresses, reactor)
        try:
            table, events = start_kernel_path(addresses, config.conntrack_mark, config.port_range, keep)
        except KernelUnavailable as e:
            if config.kernel_forwarding == "yes":
                raise StartupError("the kernel path is required (kernel_forwarding = yes) but %s" % e) from None
            log.warning("kernel forwarding unavailable, media is relayed in user space: %s", e)
            return UserspaceForwarding(addresses, reactor)
        # kernel_forwarding = yes holds for the versions of relay_ip (an IPv6 address found by
        # itself on a dual-stack host does not stop a relay that was set up for IPv4)
        required = set(config.relay_addresses) or {primary_version(addresses)}
        for version, reason in sorted(table.unavailable.items()):
            if config.kernel_forwarding == "yes" and version in required:
                table.netlink.close()
                events.close()
                raise StartupError("the kernel path is required (kernel_forwarding = yes) but for IPv%d %s"
                                   % (version, reason))
            log.warning("kernel forwarding unavailable for IPv%d, its media is relayed in user space: %s",
                        version, reason)
        log.info("kernel forwarding on%s: running streams are relayed by conntrack (mark %#x)",
                 " for IPv%s" % " and IPv".join(map(str, sorted(table.versions))) if len(addresses) > 1 else "",
                 config.conntrack_mark)
        forwarding = KernelForwarding(addresses, reactor, table, events, config.port_range)
        forwarding.on_expired = self._stream_expired
        return forwarding

    def _stream_expired(self, stream, status, timeout_wait):
        expired = self.core.stream_expired(stream, status, timeout_wait, self.reactor.seconds())
        if expired is not None:
            self._report_expired(*expired)

    def _check_timeouts(self):
        for owner_ip, statistics in self.core.check_timeouts(self.reactor.seconds()):
            self._report_expired(owner_ip, statistics)

    def _report_expired(self, owner_ip, statistics):
        owner = next((link for link in self.links if link.peer_ip == owner_ip), None)
        if owner is None:
            waiting = self.undelivered.setdefault(owner_ip, [])
            if len(waiting) < MAX_UNDELIVERED:
                waiting.append(statistics)
                log.warning("session %s expired while its dispatcher %s is not connected: reported when it is",
                            statistics["call_id"], owner_ip)
            else:
                log.error("session %s expired while its dispatcher %s is not connected, and %d reports wait "
                          "already: this one is dropped", statistics["call_id"], owner_ip, len(waiting))
        else:
            owner.send_expired(statistics)
        self._stop_if_done()

    def startService(self):
        super().startService()
        low, high = self.configuration.relay.port_range
        log.info("relaying media on %s (announced as %s), ports %d-%d", ", ".join(self.relay_addresses.values()),
                 ", ".join(self.core.advertised_ips.values()), low, high - 1)

    def _sample_traffic(self):
        started = time.perf_counter()
        self.core.sample_traffic(self.reactor.seconds())
        cost = time.perf_counter() - started
        if cost > SLOW_SAMPLING:
            log.warning("sampling the relayed traffic took %.1f ms", cost * 1000)

    # Dispatcher links.

    def dispatcher_connected(self, link):
        self.links.add(link)
        for statistics in self.undelivered.pop(link.peer_ip, []):
            link.send_expired(statistics)

    def dispatcher_disconnected(self, link):
        self.links.discard(link)

    def handle_command(self, link, command) -> str:
        result = self.core.handle(command.name, command.headers, self.reactor.seconds(), owner=link.peer_ip)
        self._stop_if_done()
        if command.name == "update" and self._preparing is None:
            self._preparing = self.reactor.callLater(0, self._prepare_ports)
        return result

    def _prepare_ports(self):
        """Bind the next pairs now that the answers of the turn are out (see Forwarding.prepare)."""
        self._preparing = None
        self.forwarding.prepare(self.core.ports.upcoming(READY_PAIRS))

    def _stop_if_done(self):
        if self.core.halting and not self.core.sessions:
            log.info("the last session has ended: stopping")
            self.reactor.callLater(0, self._stop_reactor)

    # Shutdown.

    def graceful_shutdown(self):
        """SIGHUP: refuse new sessions, exit when the last one ends."""
        if self.core.halting:
            return
        self.core.halting = True
        count = len(self.core.sessions)
        if count == 0:
            log.info("graceful shutdown: no sessions, stopping")
            self.reactor.callLater(0, self._stop_reactor)
        else:
            log.info("graceful shutdown: refusing new sessions, waiting for %d to end", count)

    def _stop_reactor(self):
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self):
        if self._preparing is not None and self._preparing.active():
            self._preparing.cancel()
        now = self.reactor.seconds()
        if not (self.configuration.relay.keep_calls_on_restart and self._save_calls(now)):
            self.core.close_all(now)
        self.forwarding.stop()
        return super().stopService()

    # Calls carried over a restart (keep_calls_on_restart).

    def _save_calls(self, now) -> bool:
        """Write the sessions for the next start and leave their kernel entries relaying;
        False when there is nothing to keep or it could not be saved."""
        if not self.core.sessions and not self.undelivered:
            return False
        kernel = isinstance(self.forwarding, KernelForwarding)
        entries = self.forwarding.saved_entries() if kernel else []     # first: it brings the counters up to date
        state = RelayState(self.setup, self.core.saved_sessions(), entries, self.undelivered, now)
        if not save_state(self.state_path, state):
            return False
        log.info("stopping with %d sessions kept for the next start in %s (%d sub-streams go on in the kernel)",
                 len(state.sessions), self.state_path, len(entries))
        return True

    def _restore(self, saved: RelayState) -> None:
        now = self.reactor.seconds()
        self.undelivered = {ip: list(reports) for ip, reports in saved.undelivered.items() if isinstance(reports, list)}
        sessions = self.core.restore(saved.sessions, now)
        streams = [stream for session in sessions for stream in session.all_streams if not stream.ended]
        if isinstance(self.forwarding, KernelForwarding):
            self.forwarding.adopt(streams, saved.kernel_entries)
        elif saved.kernel_entries:
            log.warning("%d kernel entries of the restored calls cannot be adopted: the kernel path is off",
                        len(saved.kernel_entries))
        log.info("restored %d sessions saved %.1f s ago (%d streams)", len(sessions), now - saved.saved_at,
                 len(streams))
