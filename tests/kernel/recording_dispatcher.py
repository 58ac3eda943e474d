#!/usr/bin/env python3
"""The real media-dispatcher, with one more accounting backend for the tests.

    recording_dispatcher.py --accounting-file PATH [media-dispatcher options]

Every session the dispatcher accounts (SPEC §7: when it ends by `remove` or
`expired`, if it had started) is appended to PATH as one JSON line: the
statistics the relay answered `remove` with, or sent with `expired`, plus
what the dispatcher adds (dialog_id, timed_out, all_streams_ice). That is how
the kernel tests read a `remove` reply, which the proxy socket only answers
with `removed`. Nothing else differs from scripts/media-dispatcher.
"""

import json
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, os.pardir)
sys.path.insert(0, os.path.normpath(REPO))

from mediaproxy.daemon import run  # noqa: E402


class JsonLinesAccounting:
    """An accounting backend (the Dispatcher's `accounting` list takes objects with save())."""

    def __init__(self, path: str):
        self.path = path

    def save(self, statistics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(statistics) + "\n")


def main(argv) -> int:
    if len(argv) < 2 or argv[0] != "--accounting-file":
        print("usage: recording_dispatcher.py --accounting-file PATH [media-dispatcher options]", file=sys.stderr)
        return 2
    path, rest = argv[1], argv[2:]

    def build(configuration, reactor):
        from mediaproxy.dispatcher.service import DispatcherService
        service = DispatcherService(configuration, reactor)
        service.dispatcher.accounting.append(JsonLinesAccounting(path))
        return service

    return run("media-dispatcher", build, lambda configuration: configuration.dispatcher.log_level, argv=rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
