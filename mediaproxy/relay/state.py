"""The relay's calls on disk, so a restart does not drop them (SPEC §8).

On SIGTERM (keep_calls_on_restart = yes) the relay writes its sessions,
the kernel entries that carry their running streams (which stay in the
kernel meanwhile) and the `expired` reports still owed to dispatchers; the
next start reads them back. JSON, written atomically (a temporary file
renamed over the old one). A file that cannot be read, makes no sense, was
written for another relay set-up (address, ports, mark) or is too old is
logged and set aside, never fatal: the relay then starts without calls.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from mediaproxy.statefile import set_aside, write_atomically

log = logging.getLogger("mediaproxy.relay")

FORMAT_VERSION = 1
FILE_NAME = "relay-state.json"


@dataclass
class RelayState:
    """What a restart carries over. `setup` names what the state is valid for (the relay's
    addresses, port range, conntrack mark): the calls' ports and entries only make sense there."""
    setup: dict
    sessions: list = field(default_factory=list)          # session.session_state() dicts
    kernel_entries: list = field(default_factory=list)    # kernel.adoption.entry_state() dicts
    undelivered: dict = field(default_factory=dict)       # dispatcher ip -> statistics of expired sessions
    saved_at: float = 0.0


# Setup keys newer than some state files: a file without them was saved by a relay without
# them (no IPv6 address, so no IPv6 calls), and its calls apply to one that has them.
ADDED_LATER = frozenset(["relay_ip6", "advertised_ip6"])


class StaleState(ValueError):
    """A readable state file that does not apply to this run."""


def encode_state(state: RelayState) -> str:
    return json.dumps({"version": FORMAT_VERSION, "saved_at": state.saved_at, "setup": state.setup,
                       "sessions": state.sessions, "kernel_entries": state.kernel_entries,
                       "undelivered": state.undelivered}, separators=(",", ":"))


def decode_state(text: str) -> RelayState:
    """The state of a file's text; ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError("not a version %d relay state" % FORMAT_VERSION)
    setup, sessions = data.get("setup"), data.get("sessions")
    entries, undelivered = data.get("kernel_entries", []), data.get("undelivered", {})
    saved_at = data.get("saved_at")
    if not isinstance(setup, dict) or not isinstance(sessions, list) or not isinstance(entries, list) \
            or not isinstance(undelivered, dict) or not isinstance(saved_at, (int, float)):
        raise ValueError("a relay state without its setup, sessions or time")
    if not all(isinstance(s, dict) and isinstance(s.get("call_id"), str) for s in sessions):
        raise ValueError("a session without call_id")
    if not all(isinstance(e, dict) for e in entries):
        raise ValueError("a kernel entry that is not an object")
    return RelayState(setup, sessions, entries, undelivered, float(saved_at))


def check_applies(state: RelayState, setup: dict, now: float, max_age: float) -> None:
    """Raise StaleState when the saved calls cannot be this run's."""
    keys = set(state.setup) | (set(setup) - ADDED_LATER)
    changed = sorted(key for key in keys if state.setup.get(key) != setup.get(key))
    if changed:
        raise StaleState("it was saved with another %s" % ", ".join(changed))
    age = now - state.saved_at
    if age > max_age:
        raise StaleState("it was saved %d s ago, more than the %d s any of its streams can wait" % (age, max_age))


def save_state(path: str, state: RelayState) -> bool:
    try:
        write_atomically(path, encode_state(state))
    except OSError as e:
        log.error("could not save the relay's calls to %s: %s", path, e.strerror or e)
        return False
    return True


def load_state(path: str, setup: dict, now: float, max_age: float):
    """The saved state, or None: a missing file is no state, an unusable one is set aside.
    The file is gone afterwards (restored once: a crash from now on must not restore it twice)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.error("cannot read the saved calls %s: %s", path, e)
        set_aside(path)
        return None
    try:
        state = decode_state(text)
        check_applies(state, setup, now, max_age)
    except StaleState as e:
        log.warning("the saved calls %s are not restored: %s", path, e)
        set_aside(path)
        return None
    except (ValueError, TypeError) as e:
        log.error("the saved calls %s are unusable (%s)", path, e)
        set_aside(path)
        return None
    os.unlink(path)
    return state


def remove_state(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("could not remove %s: %s", path, e.strerror)

