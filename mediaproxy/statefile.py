"""What the daemons keep on disk across a restart (the dispatcher's session
table and accounting spool, the relay's calls): written atomically, set
aside when unusable."""

import logging
import os
import time

log = logging.getLogger("mediaproxy")


def write_atomically(path: str, text: str, temporary_suffix: str = ".new") -> None:
    """`text` in `path`, all of it or none (a temporary file, fsynced, renamed over it); raises
    OSError (e.g. a full disk), leaving no temporary file behind."""
    temporary = path + temporary_suffix
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def set_aside(path: str) -> None:
    """An unusable file is kept for the operator as PATH.bad-TIME, and is not read again."""
    aside = "%s.bad-%d" % (path, int(time.time()))
    try:
        os.replace(path, aside)
        log.error("it is kept as %s", aside)
    except OSError:
        pass
