"""What both daemons share: options, logging, daemonizing, pid file, signals.

Nothing happens at import time; `run()` does it in order: parse options,
read the configuration, set up logging, fork, build the service, run the
reactor.
"""

import argparse
import gc
import logging
import os
import signal
import socket
import sys

from mediaproxy import __version__
from mediaproxy.configuration import ConfigError, load_configuration
from mediaproxy.logs import bridge_twisted_logging, setup_logging
from mediaproxy.tls import TLSError

log = logging.getLogger("mediaproxy")

DEFAULT_CONFIG_DIR = "/etc/mediaproxy"
DEFAULT_RUNTIME_DIR = "/run/mediaproxy"


def parse_options(name: str, argv=None):
    parser = argparse.ArgumentParser(prog=name, description="MediaProxy %s" % name.split("-")[-1])
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
                        help="read DIR/config.ini and the TLS files (default %(default)s)")
    parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR, metavar="DIR",
                        help="sockets, pid file and state (default %(default)s)")
    if name == "media-dispatcher":
        parser.add_argument("--spool-dir", metavar="DIR",
                            help="accounting records waiting for their back-end; must survive a reboot "
                                 "(default RUNTIME_DIR/accounting)")
    parser.add_argument("--no-fork", action="store_true", help="stay in the foreground and log to the terminal")
    parser.add_argument("--systemd", action="store_true",
                        help="run as a systemd service: foreground, log to the journal, notify readiness")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser.parse_args(argv)


def daemonize(pid_path: str) -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    write_pid_file(pid_path)


def write_pid_file(pid_path: str) -> None:
    with open(pid_path, "w") as f:
        f.write("%d\n" % os.getpid())


def notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd: %s", e)


def toggle_debug(signum, frame) -> None:
    root = logging.getLogger()
    debug = root.level != logging.DEBUG
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    log.warning("debug logging %s", "on" if debug else "off")


def run(name: str, build_service, level_of, on_sighup=None, argv=None) -> int:
    """Run a daemon. build_service(configuration, reactor) returns the root service."""
    options = parse_options(name, argv)
    try:
        configuration = load_configuration(options.config_dir, options.runtime_dir,
                                           getattr(options, "spool_dir", None))
    except ConfigError as e:
        print("%s: %s" % (name, e), file=sys.stderr)
        return 1
    setup_logging(name, options, level_of(configuration))
    try:
        os.makedirs(configuration.runtime_dir, exist_ok=True)
    except OSError as e:
        print("%s: cannot create the runtime directory %s: %s" % (name, configuration.runtime_dir, e.strerror),
              file=sys.stderr)
        return 1
    pid_path = os.path.join(configuration.runtime_dir, name + ".pid")
    if not (options.no_fork or options.systemd):
        daemonize(pid_path)
    else:
        write_pid_file(pid_path)

    from twisted.internet import reactor
    from mediaproxy import outgoing
    bridge_twisted_logging()
    outgoing.install(reactor)
    try:
        root = build_service(configuration, reactor)
        root.startService()
    except (TLSError, ConfigError) as e:
        log.critical("cannot start: %s", e)
        _remove(pid_path)
        return 1
    except Exception as e:
        if type(e).__name__ in ("StartupError", "CannotListenError"):
            log.critical("cannot start: %s", e)
        else:
            log.critical("cannot start: %s", e, exc_info=True)
        _remove(pid_path)
        return 1

    stopped = []

    def stop_service():
        if not stopped:
            stopped.append(True)
            return root.stopService()
    reactor.addSystemEventTrigger("before", "shutdown", stop_service)
    reactor.callWhenRunning(_handle_stop_signals, reactor)
    signal.signal(signal.SIGUSR1, toggle_debug)
    if on_sighup is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(on_sighup, root))
    if options.systemd:
        reactor.callWhenRunning(notify_systemd, "READY=1")
    log.info("%s %s started", name, __version__)
    reactor.callWhenRunning(_freeze_startup_objects)
    reactor.run()
    log.info("%s stopped", name)
    _remove(pid_path)
    return 0


def _freeze_startup_objects() -> None:
    """Leave what start-up made (modules, Twisted, the configuration, restored sessions: some
    100,000 objects) out of the cycle collector's passes: a full pass over them stopped a daemon
    for 12-24 ms, in the middle of the proxy's requests."""
    gc.collect()
    gc.freeze()


def _handle_stop_signals(reactor) -> None:
    """SIGTERM/SIGINT stop the daemon; a repeated signal while it stops is harmless."""
    from twisted.internet.error import ReactorNotRunning

    def stop():
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: reactor.callFromThread(stop))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
