"""A durable queue of accounting records: one JSON file per record in a
directory, written atomically and fsynced, removed once the backend took it.
Names sort in arrival order. Sans-Twisted: plain files."""

import itertools
import json
import logging
import os
import time

from mediaproxy.statefile import write_atomically

log = logging.getLogger("mediaproxy.accounting")


class Spool:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._counter = itertools.count()
        self._names = sorted(name for name in os.listdir(directory) if name.endswith(".json"))
        for name in os.listdir(directory):
            if name.endswith(".tmp"):          # a write that a crash cut short: never acknowledged
                os.unlink(os.path.join(directory, name))

    def __len__(self) -> int:
        return len(self._names)

    def put(self, record: dict) -> str:
        """Store a record for good; raises OSError (e.g. disk full) when it cannot."""
        name = "%020d-%06d.json" % (time.time_ns(), next(self._counter) % 1000000)
        # .tmp: what a crash cut short, removed at the next start (see __init__)
        write_atomically(os.path.join(self.directory, name), json.dumps(record, separators=(",", ":")), ".tmp")
        self._names.append(name)
        return name

    def first(self):
        """(name, record) of the oldest record, or None; an unreadable file is set aside."""
        while self._names:
            name = self._names[0]
            path = os.path.join(self.directory, name)
            try:
                with open(path) as f:
                    return name, json.load(f)
            except FileNotFoundError:
                self._names.pop(0)
            except (OSError, ValueError) as e:
                log.error("accounting record %s cannot be read (%s): set aside as %s.bad", path, e, path)
                self._names.pop(0)
                try:
                    os.replace(path, path + ".bad")
                except OSError:
                    pass
        return None

    def set_aside(self, name: str) -> str:
        """A record its backend will never take: kept as NAME.bad for the operator."""
        path = os.path.join(self.directory, name)
        try:
            os.replace(path, path + ".bad")
        except OSError:
            pass
        if name in self._names:
            self._names.remove(name)
        return path + ".bad"

    def remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass
        if self._names and self._names[0] == name:
            self._names.pop(0)
        elif name in self._names:
            self._names.remove(name)
