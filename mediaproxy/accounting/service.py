"""The dispatcher's accounting: the configured backends, each with its spool
and worker. `save(statistics)` is all the dispatcher calls."""

import logging

from mediaproxy.accounting.worker import BackendWorker

log = logging.getLogger("mediaproxy.accounting")


class AccountingError(Exception):
    """A backend cannot be set up from the configuration; the dispatcher does not start."""


def make_backend(name: str, configuration):
    try:
        if name == "database":
            from mediaproxy.accounting.database import DatabaseBackend
            return DatabaseBackend(configuration.database)
        if name == "radius":
            from mediaproxy.accounting.radius import RadiusBackend
            return RadiusBackend(configuration.radius, configuration.config_dir)
    except (ValueError, ImportError) as e:
        raise AccountingError("%s accounting: %s" % (name, e)) from None
    raise AccountingError("unknown accounting backend %r" % name)


class Accounting:
    def __init__(self, configuration, reactor):
        self.workers = []
        for name in configuration.dispatcher.accounting:
            backend = make_backend(name, configuration)
            self.workers.append(BackendWorker(backend, configuration.spool_path(name), reactor))

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def save(self, statistics: dict) -> None:
        for worker in self.workers:
            worker.submit(statistics)

    def status(self) -> list:
        return [worker.status() for worker in self.workers]
