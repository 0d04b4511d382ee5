"""Cheap unique ids for the hot path.

``uuid4()`` asks the kernel for 16 random bytes on every call, which showed up in profiles
of the request path. Ledger-entry and request ids need uniqueness, not secrecy, so they come
from a per-process Mersenne Twister seeded from ``os.urandom`` (collision odds as uuid4's:
122 random bits). Secrets (API keys) never come from here: they use ``secrets``.
"""

from __future__ import annotations

import os
import random
from uuid import UUID

_random = random.Random(os.urandom(32))
_VERSION_4 = (0x4 << 76) | (0x2 << 62)                      # version 4, RFC 4122 variant
_MASK = ((1 << 128) - 1) & ~((0xF << 76) | (0x3 << 62))


def reseed() -> None:
    """Call in a forked child so siblings never share a sequence."""
    _random.seed(os.urandom(32))


def new_uuid() -> UUID:
    return UUID(int=(_random.getrandbits(128) & _MASK) | _VERSION_4)


def new_request_id() -> str:
    return f"{_random.getrandbits(128):032x}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reseed)
