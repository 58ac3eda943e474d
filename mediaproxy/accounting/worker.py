"""Feeding a backend from its spool, one record at a time, in a thread of its
own (database and RADIUS clients block), retrying with backoff while it fails.

A record leaves the spool only after its backend took it, so a backend that
is down, slow or restarting loses nothing; records wait and go in order.
"""

import logging
import os

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from mediaproxy.accounting.spool import Spool

log = logging.getLogger("mediaproxy.accounting")

FIRST_RETRY, LAST_RETRY = 1.0, 60.0


class BackendWorker:
    def __init__(self, backend, spool_dir: str, reactor, run_in_thread=None):
        self.backend = backend
        self.reactor = reactor
        self.spool = Spool(spool_dir)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="accounting-%s" % backend.name)
        # How a blocking write is run: in the backend's own thread (tests pass a synchronous stand-in).
        self.run_in_thread = run_in_thread or (lambda f, *args: threads.deferToThreadPool(reactor, self.pool, f, *args))
        self.last_error = None
        self.written = 0
        self._busy = False
        self._retry_call = None
        self._delay = FIRST_RETRY
        self._unspooled = []          # records the disk refused: kept in memory, spooled again later

    @property
    def queued(self) -> int:
        return len(self.spool) + len(self._unspooled)

    def start(self) -> None:
        self.pool.start()
        if len(self.spool):
            log.info("%s accounting: %d records waiting from before", self.backend.name, len(self.spool))
        self._drain()

    def stop(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self.pool.stop()
        try:
            self.backend.close()
        except Exception:
            pass
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
        if self._busy or (self._retry_call is not None and self._retry_call.active()):
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
        error = "%s: %s" % (failure.type.__name__, failure.getErrorMessage())
        if error != self.last_error:
            log.error("%s accounting failed (%s); %d records waiting, retrying", self.backend.name, error,
                      self.queued)
        self.last_error = error
        self._retry_call = self.reactor.callLater(self._delay, self._drain)
        self._delay = min(self._delay * 2, LAST_RETRY)

    def status(self) -> dict:
        return {"backend": self.backend.name, "queued": self.queued, "written": self.written,
                "last_error": self.last_error}
