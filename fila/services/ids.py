"""Cheap unique ids for the hot path.

``uuid4()`` asks the kernel for 16 random bytes on every call, which showed up in profiles
of the request path. Ledger-entry and request ids need uniqueness, not secrecy, so they come
from a per-process Mersenne Twister seeded from ``os.urandom``. Secrets (API keys) never come
from here: they use ``secrets``.

Aggregate ids are UUID version 7 (RFC 9562): the first 48 bits are the Unix time in
milliseconds, the other 74 free bits random. They are the events table's primary key, and a
ledger only grows: random (version 4) keys land on a random page of that index on every insert,
time-ordered keys on its right edge, which stays in memory. ``bench/bench_ledger_ids.py`` on
this machine, batches of 100 as the batcher writes them: 75,755 -> 92,051 rows/s with 200,000
rows already stored, 66,405 -> 90,697 with 1,000,000 (the gap grows with the ledger). Within
one millisecond the order is random (74 bits). Python's ``uuid`` has ``uuid7`` only from 3.14;
the layout is four lines on the generator this module already keeps, so no package for it.
"""

from __future__ import annotations

import os
import random
import time
from uuid import UUID

_random = random.Random(os.urandom(32))
_VERSION_7 = (0x7 << 76) | (0x2 << 62)                      # version 7, RFC 4122/9562 variant
_RAND_A_SHIFT = 64                                          # 12 random bits after the version
_RAND_B = (1 << 62) - 1                                     # 62 random bits after the variant


def reseed() -> None:
    """Call in a forked child so siblings never share a sequence."""
    _random.seed(os.urandom(32))


def new_uuid() -> UUID:
    """A time-ordered UUID (version 7): milliseconds since the epoch, then 74 random bits."""
    bits = _random.getrandbits(74)
    return UUID(int=((time.time_ns() // 1_000_000) << 80) | _VERSION_7
                | ((bits >> 62) << _RAND_A_SHIFT) | (bits & _RAND_B))


def new_request_id() -> str:
    return f"{_random.getrandbits(128):032x}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed)
