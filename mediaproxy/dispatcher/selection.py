"""Which relays a new session is offered to, in order (sans-IO).

A policy is any object with `order(relays, preferred_ip, rng)` returning the
relays to try, first choice first; `relays` are the connected relays that
may take new sessions. Operators can plug their own in by dotted name with
`[Dispatcher] relay_selection` (later).
"""

import random
from typing import Optional, Protocol, Sequence


class SelectionPolicy(Protocol):
    def order(self, relays: Sequence, preferred_ip: Optional[str], rng: random.Random) -> list: ...


class PreferredThenRandom:
    """The proxy's preferred relay (`media_relay`) first when it is available, then the others at random."""

    def order(self, relays, preferred_ip, rng):
        others = [relay for relay in relays if relay.ip != preferred_ip]
        rng.shuffle(others)
        preferred = [relay for relay in relays if relay.ip == preferred_ip]
        return preferred + others
