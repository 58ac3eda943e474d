"""Feeding a backend from its spool, one record at a time, in a thread of its
own (database and RADIUS clients block), retrying with backoff while it fails.

A record leaves the spool only after its backend took it, so a backend that
is down, slow or restarting loses nothing; records wait and go in order. A
record the backend refuses for a reason that will not pass (a value it
cannot store) is set aside as a .bad file, logged and counted, so it does
not hold up the others. The thread is a daemon: a backend that hangs cannot
keep the dispatcher from stopping (its record stays in the spool).
"""

import logging
import os
import queue
import threading

from twisted.internet import defer

from mediaproxy.accounting.spool import Spool

log = logging.getLogger("mediaproxy.accounting")

FIRST_RETRY, LAST_RETRY = 1.0, 60.0
MAX_ERROR_TEXT = 200


class BackendThread:
    """Runs the backend's blocking calls, one at a time, in one daemon thread."""

    def __init__(self, name: str, reactor):
        self.reactor = reactor
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)          # not joined: a write in progress may hang

    def run(self, function, *args) -> defer.Deferred:
        deferred = defer.Deferred()
        self.jobs.put((deferred, function, args))
        return deferred

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            deferred, function, args = job
            try:
                result = function(*args)
            except BaseException as e:
                self.reactor.callFromThread(deferred.errback, e)
            else:
                self.reactor.callFromThread(deferred.callback, result)


def error_text(failure) -> str:
    """One short line: database errors carry their statement and parameters on more lines."""
    message = failure.getErrorMessage().strip().splitlines()
    text = "%s: %s" % (failure.type.__name__, message[0] if message else "")
    return text[:MAX_ERROR_TEXT]


class BackendWorker:
    def __init__(self, backend, spool_dir: str, reactor, run_in_thread=None):
        self.backend = backend
        self.reactor = reactor
        self.spool = Spool(spool_dir)
        self.thread = BackendThread("accounting-%s" % backend.name, reactor)
        # How a blocking write is run: in the backend's own thread (tests pass a synchronous stand-in).
        self.run_in_thread = run_in_thread or self.thread.run
        self.last_error = None
        self.written = 0
        self.set_aside = 0
        self._busy = False
        self._retry_call = None
        self._delay = FIRST_RETRY
        self._unspooled = []          # records the disk refused: kept in memory, spooled again later
        self._stopped = False

    @property
    def queued(self) -> int:
        return len(self.spool) + len(self._unspooled)

    def start(self) -> None:
        self.thread.start()
        if len(self.spool):
            log.info("%s accounting: %d records waiting from before", self.backend.name, len(self.spool))
        self._drain()

    def stop(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._stopped = True
        self.thread.stop()
        if self._unspooled:
            log.error("%s accounting: %d records could not be stored on disk and are lost at exit",
                      self.backend.name, len(self._unspooled))

    def submit(self, record: dict) -> None:
        self._unspooled.append(record)
        self._spool_pending()
        self._drain()

    def _spool_pending(self) -> None:
        while self._unspooled:
            try:
                self.spool.put(self._unspooled[0])
            except OSError as e:
                log.error("%s accounting: cannot store a record in %s: %s (%d kept in memory)", self.backend.name,
                          self.spool.directory, os.strerror(e.errno) if e.errno else e, len(self._unspooled))
                return
            self._unspooled.pop(0)

    def _drain(self) -> None:
        if self._stopped or self._busy or (self._retry_call is not None and self._retry_call.active()):
            return
        self._spool_pending()
        entry = self.spool.first()
        if entry is None:
            return
        name, record = entry
        self._busy = True
        deferred = self.run_in_thread(self.backend.write, record)
        deferred.addCallbacks(self._written, self._failed, callbackArgs=(name, record), errbackArgs=(name, record))

    def _written(self, _, name, record):
        self._busy = False
        self.spool.remove(name)
        self.written += 1
        if self.last_error is not None:
            log.info("%s accounting works again; %d records waiting", self.backend.name, self.queued)
        self.last_error = None
        self._delay = FIRST_RETRY
        self._drain()

    def _failed(self, failure, name, record):
        self._busy = False
        error = error_text(failure)
        if failure.check(*getattr(self.backend, "permanent_errors", ())):
            path = self.spool.set_aside(name)
            self.set_aside += 1
            log.error("%s accounting refused session %s for good (%s): the record is kept as %s", self.backend.name,
                      record.get("call_id") if isinstance(record, dict) else "?", error, path)
            self._drain()
            return
        if error != self.last_error:
            log.error("%s accounting failed (%s); %d records waiting, retrying", self.backend.name, error,
                      self.queued)
        self.last_error = error
        self._retry_call = self.reactor.callLater(self._delay, self._drain)
        self._delay = min(self._delay * 2, LAST_RETRY)

    def status(self) -> dict:
        return {"backend": self.backend.name, "queued": self.queued, "written": self.written,
                "set_aside": self.set_aside, "last_error": self.last_error}
