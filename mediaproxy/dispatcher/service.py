"""The media-dispatcher service tree: proxy socket, relay port, management port,
HTTP port (metrics and status page)."""

import errno
import grp
import logging
import os
import socket

from twisted.application import internet, service
from twisted.internet.error import CannotListenError

from mediaproxy.accounting.service import Accounting, AccountingError
from mediaproxy.dispatcher.core import Dispatcher, SessionRecord
from mediaproxy.dispatcher.dialogs import DialogTerminator
from mediaproxy.dispatcher.frontends import ManagementFactory, listen_for_proxy
from mediaproxy.dispatcher.relaylink import RelayLinkFactory
from mediaproxy.dispatcher.state import load_state, save_state
from mediaproxy.dispatcher.web import make_site
from mediaproxy.tls import Credentials
from mediaproxy.tlslayer import TLSFactory

log = logging.getLogger("mediaproxy.dispatcher")

STATE_FILE = "dispatcher-state.json"
CLEANUP_INTERVAL = 60      # seconds between looks for sessions to forget


class StartupError(Exception):
    """The dispatcher cannot start (socket in use, bad certificates...)."""


def remove_stale_socket(path: str) -> None:
    """Remove a UNIX socket left by a dead dispatcher; refuse if one is alive there."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise StartupError("cannot use %s: %s" % (path, e.strerror)) from None
    else:
        raise StartupError("another dispatcher is listening on %s" % path)
    finally:
        probe.close()


def group_id(name):
    """The id of the group ``name`` (None: keep the process's group)."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError("[Dispatcher] socket_group: there is no group %r" % name) from None


def give_to_group(path: str, gid) -> None:
    """Let the proxy's group use a socket of ours (mode 0660: not world-writable)."""
    if gid is None:
        return
    try:
        os.chown(path, -1, gid)
    except OSError as e:
        raise StartupError("cannot give %s to group %d: %s" % (path, gid, e.strerror)) from None


class DispatcherService(service.MultiService):
    def __init__(self, configuration, reactor):
        super().__init__()
        self.configuration = configuration
        self.reactor = reactor
        config = configuration.dispatcher
        certs_path = configuration.config_path(configuration.tls.certs_path)
        self.credentials = Credentials(certs_path, "dispatcher")
        self.dialogs = DialogTerminator(configuration.opensips.socket_path,
                                        configuration.runtime_path("dispatcher-rpc.sock"),
                                        configuration.opensips.proxy, reactor)
        try:
            self.accounting = Accounting(configuration, reactor)
        except AccountingError as e:
            raise StartupError(str(e)) from None
        # without a backend nothing reads a removed session's statistics: the relay's answer is not decoded
        self.dispatcher = Dispatcher(reactor, dialogs=self.dialogs,
                                     accounting=[self.accounting] if self.accounting.workers else [])
        self.socket_path = configuration.runtime_path(config.socket_path)
        self.socket_gid = group_id(config.socket_group)
        self.state_path = configuration.runtime_path(STATE_FILE)
        cleaner = internet.TimerService(min(CLEANUP_INTERVAL, config.cleanup_dead_relays_after,
                                            config.cleanup_expired_sessions_after),
                                        self.dispatcher.clean_up, config.cleanup_dead_relays_after,
                                        config.cleanup_expired_sessions_after)
        cleaner.clock = reactor
        cleaner.setServiceParent(self)

        tls = configuration.tls
        relays = RelayLinkFactory(self.dispatcher, config, self.credentials, reactor)
        relays.verify_interval = tls.verify_interval
        relays.handshake_timeout = tls.handshake_timeout      # read by mediaproxy.peer
        host, port = config.listen
        internet.TCPServer(port, self._tls(relays), interface=host, reactor=reactor).setServiceParent(self)

        host, port = config.listen_management
        if config.management_use_tls:
            management = ManagementFactory(self.dispatcher, self.credentials, config.management_passport,
                                           tls.verify_interval, reactor, idle_timeout=config.management_idle_timeout,
                                           handshake_timeout=tls.handshake_timeout)
            internet.TCPServer(port, self._tls(management), interface=host, reactor=reactor).setServiceParent(self)
        else:
            management = ManagementFactory(self.dispatcher, clock=reactor,
                                           idle_timeout=config.management_idle_timeout)
            internet.TCPServer(port, management, interface=host, reactor=reactor).setServiceParent(self)
        self.management_address = (host, port)
        self.web_site = make_site(self.dispatcher, reactor) if config.listen_metrics is not None else None
        self._metrics_port = None

    def _tls(self, factory):
        return TLSFactory(factory, lambda: self.credentials.ssl_context(True), server_side=True)

    def startService(self):
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        remove_stale_socket(self.socket_path)
        self.dispatcher.restore(load_state(self.state_path, SessionRecord))
        self._proxy_port = listen_for_proxy(self.reactor, self.socket_path, self.dispatcher, mode=0o660)
        give_to_group(self.socket_path, self.socket_gid)
        self.dialogs.start()
        give_to_group(self.dialogs.own_socket, self.socket_gid)
        self.accounting.start()
        super().startService()
        self._metrics_port = self._listen_metrics()
        config = self.configuration.dispatcher
        log.info("listening for the proxy on %s, relays on %s:%d, management on %s:%d (%s)",
                 self.socket_path, *config.listen, *config.listen_management,
                 "TLS" if config.management_use_tls else "plain TCP")
        if config.management_exposed:
            log.warning("the management port %s:%d is plain TCP on an address other hosts may reach: "
                        "anyone who gets to it sees every session; firewall it, bind it to 127.0.0.1 "
                        "or set management_use_tls = yes", *config.listen_management)

    def _listen_metrics(self):
        """The HTTP port; one that cannot be opened costs the metrics, not the calls: logged, no more."""
        config = self.configuration.dispatcher
        if self.web_site is None:
            return None
        host, port = config.listen_metrics
        url = "http://%s:%d/" % ("[%s]" % host if ":" in host else host, port)
        try:
            listening = self.reactor.listenTCP(port, self.web_site, interface=host)
        except CannotListenError as e:
            log.error("no metrics or status page: cannot listen on %s: %s", url, e.socketError)
            return None
        log.info("metrics on %smetrics, status page on %s", url, url)
        if config.metrics_exposed:
            log.warning("the metrics and status page port %s is on an address other hosts may reach: anyone "
                        "who gets to it sees every call; firewall it or bind it to 127.0.0.1", url)
        return listening

    def stopService(self):
        if self._metrics_port is not None:
            self._metrics_port.stopListening()
            self._metrics_port = None
        self.dialogs.stop()
        if save_state(self.state_path, self.dispatcher.sessions.values()):
            log.info("saved %d sessions to %s", len(self.dispatcher.sessions), self.state_path)
        self.accounting.stop()
        deferred = super().stopService()
        if getattr(self, "_proxy_port", None) is not None:
            self._proxy_port.stopListening()       # Twisted removes the socket file
        return deferred
