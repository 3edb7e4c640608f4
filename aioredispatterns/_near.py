"""The near layer of a :class:`~aioredispatterns.Cache`: entries kept in process memory.

A bounded LRU (by entry count *and* bytes) of stored entries, each with a local expiry,
and the placeholder rule that keeps it correct against the server's invalidations:

* A read that may fill the near layer takes a ticket *before* its GET is sent
  (:meth:`NearStore.begin`). An invalidation of that key, or a flush, voids every ticket
  of the key; :meth:`NearStore.store` keeps the reply only if its ticket is still the
  key's current one. So a value read before an invalidation arrived is never stored
  after it (track, read, invalidation, store-stale: the race Redis' client-side caching
  docs describe).
* The layer stores the serialized payload, not the decoded object: every hit decodes
  afresh, so a caller that mutates what it got cannot change what the next caller gets.

The invalidations come from :mod:`._near_tracking`; this module knows nothing of Redis.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._keys import KeyT
from ._validate import check_count, check_seconds

__all__ = ("MISS", "NearCachePolicy", "NearStore")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


#: What :meth:`NearStore.value` returns when it cannot answer.
MISS: Final = _Miss()

# Bytes charged per entry on top of its key and payload (the tuple, the dict slot).
_ENTRY_OVERHEAD: Final = 120


@dataclass(frozen=True, slots=True)
class NearCachePolicy:
    """The in-process layer of a :class:`~aioredispatterns.Cache` (``Cache(near=...)``).

    Entries are copies of fresh Redis entries, evicted when any process writes the key
    (the server's ``CLIENT TRACKING`` invalidations, ``BCAST`` on the cache's key prefix),
    least recently used first when a bound is reached, and when their time is up.

    Attributes:
        max_bytes: memory bound: keys plus serialized values plus a fixed overhead per
            entry (64 MiB by default).
        max_entries: entry bound (10,000 by default).
        ttl: the longest an entry is kept, in seconds; never longer than the entry's
            fresh time in Redis either (60 by default).
        heartbeat: seconds between PINGs on each tracking connection; one that stays
            silent for two heartbeats is declared lost and the near layer is flushed
            (1 by default). This bounds how long a silently dead connection can leave
            stale entries in place.

    A near hit is answered without an ``await`` on I/O, so there is nothing to cancel;
    a read cancelled while its GET is in flight stores nothing near.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_entries: int = 10_000
    ttl: float = 60.0
    heartbeat: float = 1.0

    def __post_init__(self) -> None:
        check_count("max_bytes", self.max_bytes, minimum=1)
        check_count("max_entries", self.max_entries, minimum=1)
        check_seconds("ttl", self.ttl)
        check_seconds("heartbeat", self.heartbeat)


class NearStore:
    """The LRU and its tickets (see the module docstring). Single event loop, no locks."""

    __slots__ = (
        "_entries",
        "_pending",
        "_seq",
        "bytes",
        "flushes",
        "hits",
        "invalidations",
        "misses",
        "policy",
    )

    def __init__(self, policy: NearCachePolicy) -> None:
        self.policy = policy
        # key -> (expires at, monotonic; payload or None), least recently used first.
        self._entries: collections.OrderedDict[KeyT, tuple[float, bytes | None]] = (
            collections.OrderedDict()
        )
        # key -> the ticket of the read allowed to store it.
        self._pending: dict[KeyT, int] = {}
        self._seq = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def value(self, key: KeyT, loads: Callable[[bytes], Any]) -> Any:
        """``key``'s value decoded by ``loads`` (None for a cached "not found"), or
        :data:`MISS` (absent or expired). ``loads``' errors propagate.

        The hot path of every near hit: kept to one dict lookup and one clock read.
        """
        item = self._entries.get(key)
        if item is None:
            self.misses += 1
            return MISS
        if item[0] <= time.monotonic():
            self._drop(key)
            self.misses += 1
            return MISS
        self._entries.move_to_end(key)
        self.hits += 1
        payload = item[1]
        return None if payload is None else loads(payload)

    def begin(self, key: KeyT) -> int:
        """A ticket for a read of ``key`` about to be sent (voids older tickets)."""
        self._seq += 1
        self._pending[key] = self._seq
        return self._seq

    def abandon(self, key: KeyT, ticket: int) -> None:
        """The read of ``ticket`` will not store (it failed or was cancelled)."""
        if self._pending.get(key) == ticket:
            del self._pending[key]

    def store(self, key: KeyT, ticket: int, payload: bytes | None, seconds: float) -> bool:
        """Keep ``payload`` (None: a cached "not found") for at most ``seconds`` (and the
        policy's ttl) if ``ticket`` is still ``key``'s current one; True if kept."""
        if self._pending.get(key) != ticket:
            return False
        del self._pending[key]
        policy = self.policy
        size = len(key) + len(payload or b"") + _ENTRY_OVERHEAD
        if seconds <= 0 or size > policy.max_bytes:
            return False
        self._drop(key)
        self._entries[key] = (time.monotonic() + min(seconds, policy.ttl), payload)
        self.bytes += size
        while self.bytes > policy.max_bytes or len(self._entries) > policy.max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        return True

    def invalidate(self, keys: list[KeyT]) -> None:
        """The server (or this process) changed ``keys``: evict them, void their tickets.

        A key arrives as bytes from the server while the cache may hold it as str (or
        the other way round): both forms are dropped.
        """
        for key in keys:
            self.invalidations += 1
            other: KeyT = (
                key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key.encode()
            )
            for form in (key, other):
                self._pending.pop(form, None)
                self._drop(form)

    def flush(self) -> None:
        """Forget everything and void every ticket (a tracking gap: anything may be stale)."""
        self.flushes += 1
        self._entries.clear()
        self._pending.clear()
        self.bytes = 0

    def _drop(self, key: KeyT) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self.bytes -= len(key) + len(item[1] or b"") + _ENTRY_OVERHEAD
