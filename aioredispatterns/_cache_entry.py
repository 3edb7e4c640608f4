"""A :class:`~aioredispatterns.Cache` entry as stored in Redis: one string per key.

A 21-byte header (kind, an 8-byte random version, the "fresh until" time in server-clock
milliseconds with 0 for "always fresh", the last load's duration in ms) followed by the
serialized value. Redis's own TTL is the end of the stale window. A tombstone (left by an
invalidation) has the header only; ``cache_acquire.lua`` and ``cache_fill.lua`` know the
layout too.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass
from typing import Final

__all__ = (
    "HEADER_SIZE",
    "NEGATIVE",
    "NO_VERSION",
    "TOMBSTONE",
    "TOMBSTONE_SLACK_MS",
    "VALUE",
    "Entry",
    "decode_entry",
    "jittered_ms",
    "pack_header",
    "tombstone",
)

# Entry header: kind, version, fresh-until (server ms, 0 = always fresh), load time (ms).
_HEADER: Final = struct.Struct(">B8sQI")
HEADER_SIZE: Final = _HEADER.size
VALUE: Final = 0xA0
NEGATIVE: Final = 0xA1
TOMBSTONE: Final = 0xA2  # also hard-coded in cache_acquire.lua
NO_VERSION: Final = b""
# How much longer than max_load_time a tombstone lives: the fill's trip to Redis after
# the client-side time check.
TOMBSTONE_SLACK_MS: Final = 5000


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded header and the serialized value that follows it."""

    kind: int
    version: bytes
    fresh_until: int
    delta_ms: int
    payload: bytes


def decode_entry(raw: bytes) -> Entry | None:
    """The entry in ``raw`` (tombstones included), or None when it is not one of ours."""
    if len(raw) < HEADER_SIZE or raw[0] not in (VALUE, NEGATIVE, TOMBSTONE):
        return None
    kind, version, fresh_until, delta_ms = _HEADER.unpack_from(raw)
    return Entry(kind, version, fresh_until, delta_ms, raw[HEADER_SIZE:])


def pack_header(*, negative: bool, fresh_until: int, delta_ms: int) -> bytes:
    """The header of a new value (or cached "not found") entry, with a fresh version."""
    return _HEADER.pack(
        NEGATIVE if negative else VALUE, os.urandom(8), fresh_until, min(delta_ms, 0xFFFFFFFF)
    )


def tombstone() -> bytes:
    """A tombstone with a fresh version (what an invalidation writes)."""
    return _HEADER.pack(TOMBSTONE, os.urandom(8), 0, 0)


def jittered_ms(seconds: float, jitter: float) -> int:
    """``seconds`` in ms, shortened by a random fraction up to ``jitter``."""
    factor = 1.0 - random.random() * jitter if jitter else 1.0
    return max(1, int(seconds * 1000 * factor))
