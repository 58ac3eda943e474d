"""The dispatcher's session table on disk, so a restart keeps its calls (SPEC §8).

JSON, written atomically (a temporary file renamed over the old one). A file
that cannot be read or makes no sense is logged and set aside, never fatal.
"""

import json
import logging
import os
import time
from dataclasses import asdict, fields

from mediaproxy.statefile import set_aside, write_atomically

log = logging.getLogger("mediaproxy.dispatcher")

FORMAT_VERSION = 1


def encode_state(records, saved_at: float) -> str:
    return json.dumps({"version": FORMAT_VERSION, "saved_at": saved_at,
                       "sessions": [asdict(record) for record in records]}, indent=0)


def decode_state(text: str, record_type) -> list:
    """The records of a state file; ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("sessions"), list):
        raise ValueError("not a version %d dispatcher state" % FORMAT_VERSION)
    names = {f.name for f in fields(record_type)}
    records = []
    for item in data["sessions"]:
        if not isinstance(item, dict) or not isinstance(item.get("call_id"), str) \
                or not isinstance(item.get("relay_ip"), str):
            raise ValueError("a session without call_id or relay_ip")
        records.append(record_type(**{key: value for key, value in item.items() if key in names}))
    return records


def save_state(path: str, records) -> bool:
    try:
        write_atomically(path, encode_state(records, time.time()))
    except OSError as e:
        log.error("could not save the session table to %s: %s", path, e.strerror or e)
        return False
    return True


def load_state(path: str, record_type) -> list:
    """The saved records; a missing file is an empty table, a bad one is set aside."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        log.error("cannot read the saved session table %s: %s", path, e)
        set_aside(path)
        return []
    try:
        records = decode_state(text, record_type)
    except (ValueError, TypeError) as e:
        log.error("the saved session table %s is unusable (%s)", path, e)
        set_aside(path)
        return []
    os.unlink(path)        # restored: a crash from now on must not restore it twice
    return records

