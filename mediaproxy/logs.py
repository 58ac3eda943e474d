"""The daemons' logging: the standard logging module, set up for operators,
with the info lines of every call made cheap.

In the foreground (--no-fork, --systemd: the journal) lines go to stderr
once per reactor turn (outgoing.at_turn_end) instead of one write each, and
a warning or worse at once. The relay and the dispatcher log a line or two
for every call; through the logging module each took 35-45 µs on a busy
daemon (a LogRecord, handler dispatch, a formatter), with three lines a
call a quarter of the daemons' time (bench.control_ab). A QuickLogger's
`info` writes such a line straight into the handler's buffer, the same text
the formatter would make, when the set-up is the plain one made here;
anything else (other handlers, extra arguments, other levels) takes the
logging module's path as before.
"""

import logging
import logging.handlers
import sys
import time
from collections.abc import Mapping

_quick = None           # the _TurnBufferedHandler QuickLogger.info writes to directly, or None


class QuickLogger(logging.Logger):
    """A Logger whose plain info lines skip the LogRecord when `setup_logging` made that safe."""

    def info(self, msg, *args, **kwargs):
        handler = _quick
        if handler is None or kwargs or not self.isEnabledFor(logging.INFO) \
                or (len(args) == 1 and isinstance(args[0], Mapping)):
            super().info(msg, *args, **kwargs)
            return
        try:
            message = msg % args if args else str(msg)
        except (TypeError, ValueError):
            super().info(msg, *args)           # the logging module reports the bad format
            return
        handler.write_info(self.name, message)


def use_quick_loggers() -> None:
    """Loggers made from now on are QuickLoggers (mediaproxy/__init__.py: before any module
    makes its own), unless something else chose another class already."""
    if logging.getLoggerClass() is logging.Logger:
        logging.setLoggerClass(QuickLogger)


class _Formatter(logging.Formatter):
    """The standard format, with the time text made once a second instead of once a line."""

    _second = None
    _second_text = ""

    def formatTime(self, record, datefmt=None):
        return self.time_text(record.created, record.msecs)

    def time_text(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return "%s,%03d" % (self._second_text, msecs)


TERMINAL_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s: %(message)s"         # the journal adds time and name


class _TurnBufferedHandler(logging.StreamHandler):
    """Log lines to a stream in one write per reactor turn instead of one each; a warning or worse
    is written at once. `write_out` is called at the end of every turn and when logging shuts down."""

    def __init__(self, fd: int, fmt: str):
        super().__init__(open(fd, "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace",
                              closefd=False))
        self.setFormatter(_Formatter(fmt))
        self.with_time = fmt == TERMINAL_FORMAT
        self.waiting = False

    def flush(self):
        """What emit calls after every line: the lines wait for write_out."""

    def emit(self, record):
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.write_out()
        else:
            self.waiting = True

    def write_info(self, name: str, message: str) -> None:
        """An info line of logger `name`, the text format() makes, without a LogRecord."""
        if self.with_time:
            now = time.time()
            line = "%s %s INFO: %s\n" % (self.formatter.time_text(now, (now - int(now)) * 1000), name, message)
        else:
            line = "INFO: %s\n" % message
        self.acquire()          # the accounting worker thread logs too
        try:
            self.stream.write(line)
            self.waiting = True
        finally:
            self.release()

    def write_out(self):
        self.acquire()
        try:
            self.waiting = False
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass                # the terminal or file is gone: nothing else to tell it to
        finally:
            self.release()

    def close(self):
        self.write_out()
        super().close()


def setup_logging(name: str, options, level: int, fd: int = None) -> None:
    """`fd`: where the foreground logs (default: stderr's)."""
    global _quick
    # Session lines are logged on every request: leave out what the formats here never show
    # (the logging HOWTO's "Optimization": the caller's frame, thread and multiprocessing names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    _quick = None
    if options.no_fork or options.systemd:
        handler = _TurnBufferedHandler(sys.stderr.fileno() if fd is None else fd,
                                       TERMINAL_FORMAT if options.no_fork else JOURNAL_FORMAT)
        from mediaproxy import outgoing
        outgoing.at_turn_end(lambda: handler.waiting and handler.write_out())
        _quick = handler
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility="daemon")
        handler.setFormatter(logging.Formatter(name + "[%(process)d]: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if options.debug else level)
    # Twisted's own messages (listening ports, connection retries) are chatty at info.
    logging.getLogger("twisted").setLevel(logging.WARNING if not options.debug else logging.DEBUG)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)     # its debug lines are per netlink message


def bridge_twisted_logging() -> None:
    from twisted.logger import STDLibLogObserver, globalLogBeginner
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
