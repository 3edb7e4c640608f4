"""Cache-aside with single flight, stale-while-revalidate, early refresh and leases.

::

    async with Cache(client, ttl=300, stale_ttl=60) as cache:
        user = await cache.get_or_load(f"user:{uid}", lambda: db.fetch_user(uid))

What it guarantees:

* **Single flight.** On a miss, one loader call runs per key in this process and every
  concurrent caller awaits its result. The load runs in the cache's own task group, so a
  caller that is cancelled (a client hung up) stops waiting without cancelling the load
  for the others; a load whose callers have all gone still completes and fills the cache.
  With ``distributed=True`` a lease in Redis (``SET NX PX``) extends this to the fleet.
* **No stale set.** A fill is written by a Lua script only if the entry still carries the
  version the loader saw, so an :meth:`Cache.invalidate` or :meth:`Cache.set` that ran
  while a slow loader was busy is never overwritten by that loader's older value.
* **TTL on every entry**, shortened by up to ``jitter`` (a fraction) so keys written
  together do not expire together; ``ttl=None`` (never expire) must be asked for.
* **A bad entry is a miss.** An entry the serializer refuses (written with another
  serializer or pickle key, corrupted, or forged) is never raised to the reader: reads
  return the default, the next load replaces it, and ``stats.unreadable`` counts it.
* **Hot keys are cheap.** Readers of a key that arrive while a GET of it is in flight
  share that GET's reply (never one sent before a write of this process returned).

Stored form: one Redis string per entry, a 21-byte header (kind, 8-byte version, the
"fresh until" time in server-clock milliseconds, the last load's duration in ms) followed
by the serialized value. Redis's own TTL is the end of the stale window.

This module is the policy and the single-flight state machine; the mechanisms it drives
live in private modules, in the order a read flows through them: ``_near`` (the
in-process layer) and ``_near_tracking`` (its invalidations), ``_cache_flight`` (shared
GETs and loads in flight), ``_cache_entry`` (the stored form), ``_cache_lease`` (the fill
script and the fleet lease).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import random
import string
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, ParamSpec, Self, TypeVar, overload

import anyio
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskGroup

from ._cache_entry import (
    HEADER_SIZE,
    NEGATIVE,
    NO_VERSION,
    TOMBSTONE,
    TOMBSTONE_SLACK_MS,
    Entry,
    decode_entry,
    jittered_ms,
    pack_header,
    tombstone,
)
from ._cache_flight import Flight, SharedRead
from ._cache_keys import call_key, function_name
from ._cache_lease import EntryWriter
from ._commands import execute, execute_many
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, BoundedMemo, KeySpace, KeyT, check_prefix, keyspace
from ._near import MISS, NearCachePolicy, NearStore
from ._near_tracking import Tracking
from ._scope import background
from ._scripts import Script
from ._validate import (
    MAX_NAME_BYTES,
    check_callable,
    check_choice,
    check_count,
    check_flag,
    check_items,
    check_number,
    check_pairs,
    check_seconds,
)
from .errors import ConfigurationError, RedisPatternsError, SerializationError
from .serializers import Serializer, check_serializer, default_serializer

__all__ = (
    "Cache",
    "CacheClosed",
    "CacheError",
    "CachePolicy",
    "CacheStats",
    "CachedFunction",
    "NearCachePolicy",
    "ValueTooLarge",
    "cached",
)

if sys.version_info >= (3, 13):
    from typing import TypeVar as DefaultTypeVar
else:  # a TypeVar with a default (PEP 696) before Python 3.13
    from typing_extensions import TypeVar as DefaultTypeVar

logger: logging.Logger = logging.getLogger("aioredispatterns.cache")

# The value type of a Cache[T]; a plain Cache(...) is a Cache[Any].
T = DefaultTypeVar("T", default=Any)
V = TypeVar("V")
D = TypeVar("D")
K = TypeVar("K", bound=str | bytes)
P = ParamSpec("P")
R = TypeVar("R")

MiB: Final = 1024 * 1024
# Redis's own limit for one string value.
_MAX_VALUE_SIZE: Final = 512 * MiB

_WARM = Script.load("cache_warm")

_KEY_CACHE_SIZE: Final = 4096
_KEY_CACHE_BYTES: Final = 4 * MiB
_MAX_KEY_BYTES: Final = 64 * 1024
_MAX_BLOCK: Final = 2.0


class CacheError(RedisPatternsError):
    """Base of the errors raised by :class:`Cache`."""


class ValueTooLarge(CacheError, ValueError):
    """A value's stored form is above ``max_value_size`` (and ``oversize="raise"``).

    Nothing was written for that key.
    """

    def __init__(self, key: object, size: int, limit: int) -> None:
        super().__init__(f"cache value for {key!r} is {size} bytes, above the {limit}-byte limit")
        self.key = key
        self.size = size
        self.limit = limit


class CacheClosed(CacheError, RuntimeError):
    """The cache is not open (use ``async with Cache(...)``), or closed during a load."""


class _Unreadable:
    __slots__ = ()


# What _decode_value returns for an entry the serializer cannot decode.
_UNREADABLE: Final = _Unreadable()


class _Unset:
    """The type of ``UNSET``: "not given" where ``None`` has a meaning of its own."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


def _check_seconds(
    name: str, value: object, *, allow_none: bool = False, zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    check_seconds(name, value, zero=zero)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How a :class:`Cache` stores and refreshes entries (validated on creation).

    Attributes:
        ttl: seconds an entry is fresh; ``None`` means it never expires (explicitly).
        stale_ttl: seconds after ``ttl`` during which the old value is still served at
            once while one background refresh replaces it (stale-while-revalidate), and
            kept when that refresh fails (stale-if-error). 0 turns both off.
        negative_ttl: when set, a loader result of ``None`` ("not found") is cached for
            this many seconds; when ``None``, a ``None`` result is not cached at all.
        jitter: each TTL is shortened by a random fraction up to this (0 <= jitter < 1).
        early_refresh: XFetch's beta (1.0 is the paper's default): a fresh hit triggers a
            background refresh with a probability that grows as expiry nears, scaled by
            the last load's duration. ``None`` turns it off.
        distributed: one loader per key across every process sharing the Redis (a
            lease); otherwise one per key per process.
        lease_ttl: seconds a fleet-wide lease lives: the longest a crashed lease holder
            can hold others back. Keep it above a typical load and below ``ttl``.
        lease_wait: seconds a caller waits for another process's load before loading
            itself (default: ``lease_ttl``).
        max_load_time: a load that takes longer (from the miss to the fill) is returned
            to its callers but not written, and invalidation tombstones live this long:
            together they make the stale-set check hold for every written fill.
        refresh_backoff: after a failed background refresh, seconds before this process
            tries that key again (stale values keep being served meanwhile).
        max_value_size: the largest stored form in bytes (``None``: no limit).
        oversize: ``"raise"`` a :class:`ValueTooLarge`, or ``"skip"`` storing it (the
            caller still gets the value) and count it in ``oversize_skips``.
    """

    ttl: float | None
    stale_ttl: float = 0.0
    negative_ttl: float | None = None
    jitter: float = 0.1
    early_refresh: float | None = None
    distributed: bool = False
    lease_ttl: float = 10.0
    lease_wait: float | None = None
    max_load_time: float = 60.0
    refresh_backoff: float = 1.0
    max_value_size: int | None = MiB
    oversize: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        if isinstance(self.ttl, _Unset):
            raise ConfigurationError(
                "a cache needs a TTL: pass ttl=<seconds>, or ttl=None to keep entries forever"
            )
        _check_seconds("ttl", self.ttl, allow_none=True)
        _check_seconds("stale_ttl", self.stale_ttl, zero=True)
        _check_seconds("negative_ttl", self.negative_ttl, allow_none=True)
        _check_seconds("lease_ttl", self.lease_ttl)
        _check_seconds("lease_wait", self.lease_wait, allow_none=True, zero=True)
        _check_seconds("max_load_time", self.max_load_time)
        _check_seconds("refresh_backoff", self.refresh_backoff, zero=True)
        check_number("jitter", self.jitter, minimum=0)
        if self.jitter >= 1:
            raise ConfigurationError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.early_refresh is not None:
            check_number("early_refresh", self.early_refresh, above=0, maximum=1000)
        check_flag("distributed", self.distributed)
        if self.max_value_size is not None:
            check_count(
                "max_value_size",
                self.max_value_size,
                minimum=HEADER_SIZE + 1,
                maximum=_MAX_VALUE_SIZE,
            )
        check_choice("oversize", self.oversize, ("raise", "skip"))
        if (
            self.distributed
            and self.ttl is not None
            and self.lease_ttl >= self.ttl + self.stale_ttl
        ):
            raise ConfigurationError("lease_ttl must be shorter than the entry's lifetime")


@dataclass(slots=True)
class CacheStats:
    """Counters of one :class:`Cache` in this process since it was created.

    :attr:`Cache.stats` returns a copy: later activity does not change it.

    Attributes:
        hits: reads answered from Redis with a fresh value (or a cached "not found").
        misses: reads that found nothing usable (absent, invalidated, unreadable).
        loads: loader calls that returned.
        coalesced: misses that joined a load already in flight instead of starting one.
        stale_served: reads answered with a value past its fresh TTL.
        refreshes: background refreshes started (stale-while-revalidate and early).
        early_refreshes: refreshes started by XFetch before the entry went stale.
        load_errors: loader calls that raised.
        stale_if_error: failed refreshes that left the stale value in place.
        fills_refused: loaded values not written because the entry changed meanwhile
            (an invalidate or set won the race) or the load outlasted ``max_load_time``.
        oversize_skips: values not stored because they were too large.
        lease_waits: loads this process waited on in another process (distributed).
        lease_timeouts: waits that ran out and loaded here instead.
        shared_reads: reads answered by another reader's GET of the same key that was
            already in flight (a hot key costs one round trip per batch of readers).
        fill_errors: loaded values returned to their callers but not cached because
            Redis failed during the fill.
        unreadable: entries the serializer could not decode (another serializer or key,
            corrupted, forged): each counted as a miss, and replaced by the next load.
        near_hits: reads answered from process memory (``near=``), no round trip.
        near_misses: reads the near layer could not answer (they went to Redis).
        near_invalidations: keys evicted from the near layer because a process wrote
            them (the server's invalidations, and this process's own writes).
        near_flushes: times the whole near layer was dropped (a tracking connection lost
            or silent, a FLUSHDB / FLUSHALL, a cluster's slot map changed, a close).
        near_bytes: the near layer's size now (keys, values and per-entry overhead).
        near_entries: entries in the near layer now.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    coalesced: int = 0
    stale_served: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    load_errors: int = 0
    stale_if_error: int = 0
    fills_refused: int = 0
    oversize_skips: int = 0
    lease_waits: int = 0
    lease_timeouts: int = 0
    shared_reads: int = 0
    fill_errors: int = 0
    unreadable: int = 0
    near_hits: int = 0
    near_misses: int = 0
    near_invalidations: int = 0
    near_flushes: int = 0
    near_bytes: int = 0
    near_entries: int = 0


class Cache(AsyncContextManagerMixin, Generic[T]):
    """A cache-aside cache on Redis. Open it with ``async with Cache(client, ttl=...)``.

    Keys are the caller's strings; each is stored as ``<prefix>:cache:{<key>}`` (one
    cluster slot per entry, shared with its lease). Values go through ``serializer``
    (JSON by default).

    Typing: ``Cache[User](client, ttl=60)`` tells a type checker what the cache holds,
    so :meth:`get` returns ``User | None`` and :meth:`set` accepts ``User``; a plain
    ``Cache(...)`` is a ``Cache[Any]``. :meth:`get_or_load` always returns its loader's
    type. The subscript changes nothing at runtime: the serializer decides what comes back.

    Args:
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` (see ``connect()``); not
            closed by the cache.
        ttl: seconds an entry is fresh, or ``None`` explicitly for no expiry. Required.
        serializer: how values become bytes (default: JSON).
        prefix: the namespace of every key (no braces).
        max_key_bytes: the longest key accepted, in bytes once encoded (default 1024, at
            most 64 KiB); a longer one raises :class:`~aioredispatterns.InvalidKeyError`
            before any command. Hash long keys yourself if you need them.
        near: a :class:`NearCachePolicy` to serve hot keys from process memory, kept
            correct by the server's invalidations (``CLIENT TRACKING``): a write by any
            process evicts the key here within the invalidation's trip; a lost tracking
            connection flushes the whole layer. ``None`` (default): every read is a GET.
        **policy: the other fields of :class:`CachePolicy`.

    Closing (leaving ``async with``) cancels loads and refreshes still in flight: their
    waiters get :class:`CacheClosed`, leases they held are released (shielded, bounded)
    and no task of the cache is left running. Redis keeps every entry already written.

    Raises:
        ConfigurationError: bad options (before any command is sent).
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        ttl: float | _Unset | None = UNSET,
        serializer: Serializer | None = None,
        prefix: str = DEFAULT_PREFIX,
        stale_ttl: float = 0.0,
        negative_ttl: float | None = None,
        jitter: float = 0.1,
        early_refresh: float | None = None,
        distributed: bool = False,
        lease_ttl: float = 10.0,
        lease_wait: float | None = None,
        max_load_time: float = 60.0,
        refresh_backoff: float = 1.0,
        max_value_size: int | None = MiB,
        oversize: Literal["raise", "skip"] = "raise",
        max_key_bytes: int = MAX_NAME_BYTES,
        near: NearCachePolicy | None = None,
    ) -> None:
        self._client = check_client(client)
        if near is not None and not isinstance(near, NearCachePolicy):
            raise ConfigurationError(f"near must be a NearCachePolicy or None, got {near!r}")
        self._max_key_bytes = check_count(
            "max_key_bytes", max_key_bytes, minimum=1, maximum=_MAX_KEY_BYTES
        )
        self.policy: CachePolicy = CachePolicy(
            ttl=ttl,  # type: ignore[arg-type]  # UNSET is refused in __post_init__
            stale_ttl=stale_ttl,
            negative_ttl=negative_ttl,
            jitter=jitter,
            early_refresh=early_refresh,
            distributed=distributed,
            lease_ttl=lease_ttl,
            lease_wait=lease_wait,
            max_load_time=max_load_time,
            refresh_backoff=refresh_backoff,
            max_value_size=max_value_size,
            oversize=oversize,
        )
        self._serializer = check_serializer(
            serializer if serializer is not None else default_serializer()
        )
        self._prefix = check_prefix(prefix)
        self._flights: dict[KeyT, Flight] = {}
        self._reads: dict[KeyT, SharedRead] = {}
        self._key_cache: BoundedMemo[KeySpace] = BoundedMemo(
            _KEY_CACHE_SIZE, _KEY_CACHE_BYTES, _KEY_CACHE_BYTES
        )
        self._refresh_blocked: dict[KeyT, float] = {}
        self._counters = CacheStats()
        self._tg: TaskGroup | None = None
        self._clock_offset_ms = 0.0
        self._near_policy = near
        self._writer = EntryWriter(self._client, self.policy.lease_ttl)
        # The near layer and its tracking exist while the cache is open.
        self._near: NearStore | None = None
        self._tracking: Tracking | None = None
        self._near_counts = NearStore(near or NearCachePolicy())  # counters across opens

    # ----------------------------------------------------------------- lifecycle

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        await self._sync_clock()
        async with background("Cache") as tg:
            self._tg = tg
            try:
                if self._near_policy is not None:
                    store = self._near_counts
                    tracking = Tracking(self._client, f"{self._prefix}:cache", store)
                    self._tracking = tracking
                    await tracking.start(tg)
                    self._near = store
                yield self
            finally:
                self._tg = None
                if self._tracking is not None:
                    self._tracking.stop()
                    self._tracking = None
                if self._near is not None:
                    self._near.flush()
                    self._near = None

    async def _sync_clock(self) -> None:
        # Fresh-until times are compared by every process: use the server's clock
        # (one TIME at start, then the local clock plus the measured offset).
        try:
            before = time.time()
            reply = await execute(self._client, "TIME")
            after = time.time()
        except RedisPatternsError:
            return  # unreachable now: local clock until the next open
        server_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        self._clock_offset_ms = server_ms - (before + after) * 500

    def _now_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise CacheClosed("the cache is not open: use 'async with Cache(...) as cache'")
        return self._tg

    # ----------------------------------------------------------------- keys, encoding

    def _keys(self, key: str | bytes) -> KeySpace:
        # Building and validating a key space costs about a microsecond: remember it.
        try:
            ks = self._key_cache.get(key)
        except TypeError:  # unhashable (a list, a bytearray): not a key
            ks = None
        if ks is None:
            ks = keyspace(self._prefix, "cache", key, max_bytes=self._max_key_bytes)
            self._key_cache.put(key, ks, len(key) + len(ks.base))
        return ks

    def _encode(
        self, key: object, value: Any, *, seconds: float | None, delta_ms: int, negative: bool
    ) -> tuple[bytes, int] | None:
        """The stored form and its TTL in ms (0: none); None when skipped as oversize."""
        policy = self.policy
        payload = b"" if negative else self._serializer.dumps(value)
        size = HEADER_SIZE + len(payload)
        if policy.max_value_size is not None and size > policy.max_value_size:
            if policy.oversize == "raise":
                raise ValueTooLarge(key, size, policy.max_value_size)
            self._counters.oversize_skips += 1
            logger.info("not caching %r: %d bytes, above max_value_size", key, size)
            return None
        if seconds is None:
            fresh_until, px = 0, 0
        else:
            fresh_ms = jittered_ms(seconds, policy.jitter)
            fresh_until = int(self._now_ms()) + fresh_ms
            px = fresh_ms + (0 if negative else int(policy.stale_ttl * 1000))
        header = pack_header(negative=negative, fresh_until=fresh_until, delta_ms=delta_ms)
        return header + payload, px

    def _resolve_ttl(self, ttl: float | _Unset | None) -> float | None:
        if isinstance(ttl, _Unset):
            return self.policy.ttl
        _check_seconds("ttl", ttl, allow_none=True)
        return ttl

    # ----------------------------------------------------------------- reads

    async def get_or_load(
        self,
        key: str | bytes,
        loader: Callable[[], Awaitable[V]],
        *,
        ttl: float | _Unset | None = UNSET,
    ) -> V:
        """Return the cached value of ``key``, loading it with ``loader()`` on a miss.

        A fresh hit costs one GET. On a miss one ``loader()`` call runs per key in this
        process (across the fleet with ``distributed=True``); every concurrent caller
        gets its result, or its exception (not cached). A value past its fresh TTL but
        within ``stale_ttl`` is returned at once while one background refresh runs.
        Concurrent callers of one key share the first caller's loader and ``ttl``.

        Args:
            key: the cache key (non-empty str or bytes).
            loader: a coroutine function returning the value; ``None`` means "not found"
                (cached for ``negative_ttl`` if set, else not cached).
            ttl: fresh seconds for this entry (default: the cache's ``ttl``).

        Raises:
            ValueTooLarge: the loaded value is above ``max_value_size`` (policy "raise").
            CacheClosed: the cache is not open, or closed during the load.
            ConnectionFailed, CommandTimeout: Redis could not be reached for the read
                (a failure while filling after a successful load only counts in
                ``fill_errors``: the loaded value is returned).
            Whatever ``loader`` raises.

        Cancellation: only this caller stops waiting; the load goes on for the others
        and still fills the cache when it completes.
        """
        check_callable("loader", loader)
        if ttl is not UNSET:
            _check_seconds("ttl", ttl, allow_none=True)
        ks = self._keys(key)
        rkey = ks.base
        if self._near is not None:
            near_value = self._near_value(rkey)
            if near_value is not MISS:
                return near_value  # type: ignore[no-any-return]
        flight = self._flights.get(rkey)
        if flight is not None and not flight.refresh:
            self._counters.misses += 1
            self._counters.coalesced += 1
            return await flight.wait()  # type: ignore[no-any-return]
        seen_at = time.monotonic()  # before the GET: a fill's age counts from here
        raw = await self._get(rkey)
        if raw is not None:
            entry = decode_entry(raw)
            value: Any = _UNREADABLE
            if entry is not None and entry.kind != TOMBSTONE:
                value = self._decode_value(entry, rkey)
            if value is not _UNREADABLE:
                assert entry is not None
                now = self._now_ms()
                if entry.fresh_until == 0 or now < entry.fresh_until:
                    self._counters.hits += 1
                    beta = self.policy.early_refresh
                    if (
                        beta is not None
                        and entry.delta_ms
                        and now - entry.delta_ms * beta * math.log(1.0 - random.random())
                        >= entry.fresh_until
                    ) and self._start_refresh(ks, entry, loader, ttl):
                        self._counters.early_refreshes += 1
                    return value  # type: ignore[no-any-return]
                self._counters.stale_served += 1
                self._start_refresh(ks, entry, loader, ttl)
                return value  # type: ignore[no-any-return]
            seen = entry.version if entry is not None else NO_VERSION
        else:
            seen = NO_VERSION
        self._counters.misses += 1
        return await self._join(ks, seen, seen_at, loader, ttl)  # type: ignore[no-any-return]

    async def _get(self, rkey: KeyT) -> bytes | None:
        """GET ``rkey``; readers arriving while a GET of it is in flight share its reply.

        A hot key then costs one round trip per batch of readers. A reader that joins
        is never hurt by the sender's cancellation or error: it sends its own GET.
        Writes from this process (set, invalidate, fills) detach the shared GET first,
        so a read that begins after a write returns never gets a reply older than it.
        """
        shared = self._reads.get(rkey)
        if shared is not None:
            if shared.done is None:
                shared.done = anyio.Event()
            await shared.done.wait()
            if shared.ok:
                self._counters.shared_reads += 1
                return shared.raw
            return await execute(self._client, "GET", rkey)  # type: ignore[no-any-return]
        shared = self._reads[rkey] = SharedRead()
        ticket: int | None = None
        try:
            if self._tracking is not None:
                ticket = await self._tracking.ticket(rkey)
            shared.raw = await execute(self._client, "GET", rkey)
            shared.ok = True
            if ticket is not None:
                self._near_fill(rkey, ticket, shared.raw)
                ticket = None
            return shared.raw
        finally:
            if ticket is not None and self._near is not None:
                self._near.abandon(rkey, ticket)
            if self._reads.get(rkey) is shared:
                del self._reads[rkey]
            if shared.done is not None:
                shared.done.set()

    # ----------------------------------------------------------------- near layer

    def _near_value(self, rkey: KeyT) -> Any:
        """The near layer's value of ``rkey`` (None: a cached "not found"), or MISS."""
        near = self._near
        assert near is not None
        assert self._tracking is not None
        if self._tracking.cluster:
            self._tracking.check_topology()
        try:
            return near.value(rkey, self._serializer.loads)
        except SerializationError:
            near.invalidate([rkey])
            return MISS  # Redis has the same bytes: the remote path counts it

    def _near_fill(self, rkey: KeyT, ticket: int, raw: bytes | None) -> None:
        """Keep a fresh entry read under ``ticket`` in the near layer, for no longer
        than it stays fresh in Redis."""
        near = self._near
        if near is None:
            return
        entry = decode_entry(raw) if raw is not None else None
        if entry is None or entry.kind == TOMBSTONE:
            near.abandon(rkey, ticket)
            return
        if entry.fresh_until == 0:
            seconds = math.inf
        else:
            seconds = (entry.fresh_until - self._now_ms()) / 1000
        near.store(rkey, ticket, None if entry.kind == NEGATIVE else entry.payload, seconds)

    def _near_evict(self, rkeys: list[KeyT]) -> None:
        """This process writes ``rkeys``: drop them here at once (read-your-writes)."""
        if self._near is not None:
            self._near.invalidate(rkeys)

    @overload
    async def get(self, key: str | bytes) -> T | None: ...
    @overload
    async def get(self, key: str | bytes, default: D) -> T | D: ...
    async def get(self, key: str | bytes, default: Any = None) -> Any:
        """The cached value of ``key`` (fresh or within ``stale_ttl``), else ``default``.

        A cached "not found" also returns ``default``. Never loads, never refreshes.
        Cancellation: nothing to undo (a read).
        """
        rkey = self._keys(key).base
        if self._near is not None:
            near_value = self._near_value(rkey)
            if near_value is not MISS:
                return default if near_value is None else near_value
        raw = await self._get(rkey)
        return self._value_of(raw, default, rkey)

    def _value_of(self, raw: bytes | None, default: Any, rkey: KeyT) -> Any:
        entry = decode_entry(raw) if raw is not None else None
        value = _UNREADABLE
        if entry is not None and entry.kind != TOMBSTONE:
            value = self._decode_value(entry, rkey)
        if value is _UNREADABLE:
            self._counters.misses += 1
            return default
        self._counters.hits += 1
        assert entry is not None
        return default if entry.kind == NEGATIVE else value

    def _decode_value(self, entry: Entry, rkey: KeyT) -> Any:
        """The entry's value (None for a cached "not found"), or _UNREADABLE.

        An entry the serializer cannot decode (written with another serializer or key,
        corrupted, or forged) is a miss: a read returns the default and a load replaces
        it, instead of the key failing until its TTL runs out.
        """
        if entry.kind == NEGATIVE:
            return None
        try:
            return self._serializer.loads(entry.payload)
        except SerializationError as exc:
            self._counters.unreadable += 1
            logger.warning("cache entry %r cannot be decoded, treated as a miss: %s", rkey, exc)
            return _UNREADABLE

    async def get_many(self, keys: Iterable[K]) -> dict[K, T]:
        """The cached values of ``keys`` in pipelined batches (cluster-safe).

        The result maps each key that has a value (fresh or within ``stale_ttl``);
        misses and cached "not found" entries are left out. Never loads.
        Cancellation: nothing to undo (reads).
        """
        wanted = check_items("keys", keys)
        found: dict[K, T] = {}
        if self._near is not None:
            remote: list[K] = []
            for key in wanted:
                value = self._near_value(self._keys(key).base)
                if value is MISS:
                    remote.append(key)
                elif value is not None:
                    found[key] = value
            wanted = remote
        rkeys = [self._keys(k).base for k in wanted]
        tickets: list[int | None] = []
        try:
            if self._tracking is not None:
                tickets = [await self._tracking.ticket(rkey) for rkey in rkeys]
            replies = await execute_many(
                self._client, [("GET", rkey) for rkey in rkeys], idempotent=True
            )
            missing = object()
            for key, rkey, raw in zip(wanted, rkeys, replies, strict=True):
                value = self._value_of(raw, missing, rkey)
                if value is not missing:
                    found[key] = value
            for rkey, ticket, raw in zip(rkeys, tickets, replies, strict=False):
                if ticket is not None:
                    self._near_fill(rkey, ticket, raw)
            tickets = []
        finally:
            if self._near is not None:
                for rkey, ticket in zip(rkeys, tickets, strict=False):
                    if ticket is not None:
                        self._near.abandon(rkey, ticket)
        return found

    # ----------------------------------------------------------------- writes

    async def set(
        self, key: str | bytes, value: T | None, *, ttl: float | _Unset | None = UNSET
    ) -> bool:
        """Store ``value`` under ``key`` with a new version (write-through on update).

        A load that began before this call will not overwrite it. ``None`` stores a
        "not found" entry (reads return their default). Returns False only when the
        value was skipped as oversize (policy "skip").

        Raises:
            ValueTooLarge: above ``max_value_size`` (policy "raise"); nothing written.
            SerializationError: ``value`` cannot be serialized; nothing written.

        Cancellation: the SET may or may not have reached Redis.
        """
        ks = self._keys(key)
        seconds = self._resolve_ttl(ttl)
        encoded = self._encode(key, value, seconds=seconds, delta_ms=0, negative=value is None)
        if encoded is None:
            return False
        blob, px = encoded
        self._reads.pop(ks.base, None)
        self._near_evict([ks.base])
        args: tuple[Any, ...] = ("SET", ks.base, blob) + (("PX", px) if px else ())
        await execute(self._client, *args)
        return True

    async def set_many(
        self,
        items: Mapping[K, T | None] | Iterable[tuple[K, T | None]],
        *,
        ttl: float | _Unset | None = UNSET,
        only_missing: bool = False,
    ) -> int:
        """Store many values in pipelined batches (cluster-safe); returns how many were written.

        With ``only_missing=True`` live entries are kept (invalidated ones are written).
        Oversize values
        raise (before anything is written) or are skipped, per the policy.

        Cancellation: some batches may have been written, others not.
        """
        check_flag("only_missing", only_missing)
        seconds = self._resolve_ttl(ttl)
        pairs: list[tuple[Any, Any]] = (
            list(items.items()) if isinstance(items, Mapping) else check_pairs("items", items)
        )
        commands: list[tuple[Any, ...]] = []
        for key, value in pairs:
            encoded = self._encode(key, value, seconds=seconds, delta_ms=0, negative=value is None)
            if encoded is None:
                continue
            blob, px = encoded
            rkey = self._keys(key).base
            self._reads.pop(rkey, None)
            self._near_evict([rkey])
            command: tuple[Any, ...]
            if only_missing:
                # EVAL, not EVALSHA: a pipeline cannot fall back on NOSCRIPT per command,
                # and warming is a cold-start operation where the script text is cheap.
                command = ("EVAL", _WARM.source, 1, rkey, blob, px)
            else:
                command = ("SET", rkey, blob) + (("PX", px) if px else ())
            commands.append(command)
        # Not re-sent after a connection failure: another process may have written a
        # newer value in between.
        replies = await execute_many(self._client, commands, idempotent=False)
        return sum(1 for reply in replies if reply)

    async def warm(
        self,
        items: Mapping[K, T | None] | Iterable[tuple[K, T | None]],
        *,
        ttl: float | _Unset | None = UNSET,
    ) -> int:
        """Pre-warm a cold cache: store the values whose keys hold nothing yet.

        Live entries (fresher than what a warm-up computed) are kept; invalidated ones
        are written. Returns
        how many were written. Same batching, limits and cancellation as :meth:`set_many`.
        """
        return await self.set_many(items, ttl=ttl, only_missing=True)

    async def invalidate(self, *keys: str | bytes) -> None:
        """Drop ``keys`` from the cache (call it after writing the source of truth).

        Each entry is replaced by a small tombstone that lives ``max_load_time`` (+5 s), so a
        load that began before this call cannot write its older value afterwards; the
        next read loads afresh.

        Cancellation: some keys may have been invalidated, others not.
        """
        if not keys:
            return
        # The slack covers the fill's trip to Redis after the client-side time check.
        ttl_ms = int(self.policy.max_load_time * 1000) + TOMBSTONE_SLACK_MS
        commands = [("SET", self._keys(k).base, tombstone(), "PX", ttl_ms) for k in keys]
        for command in commands:
            self._reads.pop(command[1], None)
        self._near_evict([command[1] for command in commands])
        if len(commands) == 1:
            await execute(self._client, *commands[0])
        else:
            await execute_many(self._client, commands, idempotent=False)

    # ----------------------------------------------------------------- stats

    @property
    def stats(self) -> CacheStats:
        """A snapshot of this cache's counters (this process only).

        Every primitive exposes its counters this way (``.stats``, a snapshot that later
        activity does not change); :class:`aioredispatterns.metrics.PrometheusCollector`
        exports them.
        """
        stats = copy.copy(self._counters)
        near = self._near_counts
        stats.near_hits = near.hits
        stats.near_misses = near.misses
        stats.near_invalidations = near.invalidations
        stats.near_flushes = near.flushes
        stats.near_bytes = near.bytes
        stats.near_entries = len(near)
        return stats

    # ----------------------------------------------------------------- single flight

    async def _join(
        self,
        ks: KeySpace,
        seen: bytes,
        seen_at: float,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | _Unset | None,
    ) -> Any:
        while True:
            flight = self._flights.get(ks.base)
            if flight is None:
                seconds = self._resolve_ttl(ttl)
                tg = self._task_group()
                flight = Flight(refresh=False)
                self._flights[ks.base] = flight
                tg.start_soon(self._run_flight, ks, flight, seen, seen_at, loader, seconds, None)
                break
            if not flight.refresh:
                self._counters.coalesced += 1
                break
            # A refresh of a value that has since gone (invalidated): its result may
            # predate the invalidation, so wait for it to end and load afresh.
            await flight.done.wait()
        return await flight.wait()

    def _start_refresh(
        self,
        ks: KeySpace,
        entry: Entry,
        loader: Callable[[], Awaitable[Any]],
        ttl: float | _Unset | None,
    ) -> bool:
        """Start one background refresh of ``ks`` unless one runs; True if started."""
        rkey = ks.base
        if rkey in self._flights or self._tg is None:
            return False
        blocked = self._refresh_blocked.get(rkey)
        if blocked is not None:
            if anyio.current_time() < blocked:
                return False
            del self._refresh_blocked[rkey]
        seconds = self._resolve_ttl(ttl)
        self._counters.refreshes += 1
        flight = Flight(refresh=True)
        self._flights[rkey] = flight
        self._tg.start_soon(
            self._run_flight,
            ks,
            flight,
            entry.version,
            time.monotonic(),
            loader,
            seconds,
            entry,
        )
        return True

    async def _run_flight(
        self,
        ks: KeySpace,
        flight: Flight,
        seen: bytes,
        seen_at: float,
        loader: Callable[[], Awaitable[Any]],
        seconds: float | None,
        stale: Entry | None,
    ) -> None:
        try:
            if stale is not None:
                flight.value = await self._refresh(ks, seen, seen_at, loader, seconds)
            elif self.policy.distributed:
                flight.value = await self._load_distributed(ks, seen, seen_at, loader, seconds)
            else:
                flight.value = await self._load_and_fill(ks, seen, seen_at, loader, seconds, "")
        except Exception as exc:
            flight.error, flight.traceback = exc, exc.__traceback__
            if stale is not None:
                # Stale-if-error: the stale entry stays in Redis until its stale TTL ends.
                self._counters.stale_if_error += 1
                logger.warning(
                    "refresh of %r failed, its stale value is served for up to %ss more: %r",
                    ks.base,
                    self.policy.refresh_backoff,
                    exc,
                )
                if len(self._refresh_blocked) >= _KEY_CACHE_SIZE:
                    self._refresh_blocked.clear()  # bounded: forgetting only retries sooner
                self._refresh_blocked[ks.base] = anyio.current_time() + self.policy.refresh_backoff
        except BaseException:
            flight.error = CacheClosed("the cache was closed while this load was in flight")
            raise
        finally:
            if self._flights.get(ks.base) is flight:
                del self._flights[ks.base]
            flight.done.set()

    async def _load_and_fill(
        self,
        ks: KeySpace,
        seen: bytes,
        seen_at: float,
        loader: Callable[[], Awaitable[Any]],
        seconds: float | None,
        token: str,
    ) -> Any:
        """Run the loader and fill the entry if it did not change since ``seen``.

        With a lease ``token``, the lease is released and other processes are woken
        whatever happens (shielded, so a closing cache still lets them go).
        """
        filled = False
        try:
            started = time.monotonic()
            try:
                value = await loader()
            except Exception:
                self._counters.load_errors += 1
                raise
            finished = time.monotonic()
            self._counters.loads += 1
            negative = value is None
            if negative and self.policy.negative_ttl is None:
                return value
            encoded = self._encode(
                ks.base,
                value,
                seconds=self.policy.negative_ttl if negative else seconds,
                delta_ms=int((finished - started) * 1000),
                negative=negative,
            )
            if encoded is None:
                return value
            if finished - seen_at >= self.policy.max_load_time:
                # An invalidation's tombstone may have expired: writing could be stale.
                self._counters.fills_refused += 1
                return value
            blob, px = encoded
            self._reads.pop(ks.base, None)
            self._near_evict([ks.base])
            try:
                written = await self._writer.fill(ks, seen, blob, px, token)
            except RedisPatternsError:
                # The value is good; only caching it failed. Callers get it, the next
                # miss loads again, and a lease we held expires on its own.
                self._counters.fill_errors += 1
                logger.warning("filling %r failed; the loaded value was returned uncached", ks.base)
                filled = True
                return value
            filled = True
            if not written:
                self._counters.fills_refused += 1
            return value
        finally:
            if token and not filled:
                await self._writer.give_back(ks, seen, token)

    async def _load_distributed(
        self,
        ks: KeySpace,
        seen: bytes,
        seen_at: float,
        loader: Callable[[], Awaitable[Any]],
        seconds: float | None,
    ) -> Any:
        policy = self.policy
        writer = self._writer
        token = writer.new_token()
        wait = policy.lease_ttl if policy.lease_wait is None else policy.lease_wait
        deadline = anyio.current_time() + wait
        waited = False
        while True:
            status, data = await writer.acquire(ks, token)
            if status == 1:
                entry = decode_entry(data)
                if entry is not None:
                    value = self._decode_value(entry, ks.base)
                    if value is not _UNREADABLE:
                        return value
                    seen = entry.version  # the load below replaces the unreadable entry
                break  # not ours, or unreadable: load without the lease
            if status == 2:
                entry = decode_entry(data) if data else None
                seen = entry.version if entry is not None else NO_VERSION
                return await self._load_and_fill(ks, seen, time.monotonic(), loader, seconds, token)
            if not waited:
                waited = True
                self._counters.lease_waits += 1
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                self._counters.lease_timeouts += 1
                logger.info(
                    "waited %.2fs for another process to load %r; loading here", wait, ks.base
                )
                break
            # Sleep until the holder's fill wakes us, its lease runs out, or our wait ends
            # (in slices below any client's socket timeout: a cluster client reads a
            # blocking reply under its socket timeout).
            lease_left = int(data) / 1000 + 0.02 if int(data) > 0 else 0.05
            block = max(0.01, min(remaining, lease_left, _MAX_BLOCK))
            await writer.wait_for_wake(ks, block)
        return await self._load_and_fill(ks, seen, seen_at, loader, seconds, "")

    async def _refresh(
        self,
        ks: KeySpace,
        seen: bytes,
        seen_at: float,
        loader: Callable[[], Awaitable[Any]],
        seconds: float | None,
    ) -> Any:
        token = ""
        if self.policy.distributed:
            taken = await self._writer.take_for_refresh(ks)
            if taken is None:
                return None  # another process is refreshing this key
            token = taken
        return await self._load_and_fill(ks, seen, seen_at, loader, seconds, token)

    # ----------------------------------------------------------------- decorator

    def cached(
        self,
        *,
        ttl: float | _Unset | None = UNSET,
        key: str | Callable[..., str] | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
        """Cache a coroutine function's results, keyed by its arguments.

        Args:
            ttl: fresh seconds (default: the cache's ``ttl``).
            key: ``None`` (default) builds the key from the function's module, name and
                bound arguments (deterministic and injective: ``f(1)`` and ``f(x=1)`` share
                a key, ``f(1)`` and ``f("1")`` do not; arguments must be None, bool, int,
                float, str, bytes or tuples/lists/dicts/sets of those). A format string
                such as ``"user:{user_id}"`` is filled from the bound arguments; a callable
                gets the call's arguments and returns the key.

        Returns a :class:`CachedFunction`; calling it behaves like :meth:`get_or_load`.
        """

        return cached(self, ttl=ttl, key=key)


def cached(
    cache: Cache[Any] | Callable[[], Cache[Any]],
    *,
    ttl: float | _Unset | None = UNSET,
    key: str | Callable[..., str] | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """:meth:`Cache.cached` for a cache that does not exist yet when the function is
    defined: ``cache`` may be a zero-argument callable returning the :class:`Cache`,
    called on every call (e.g. ``lambda: app.state.cache``, with the cache created and
    closed in the app's lifespan).

    Raises:
        ConfigurationError: at decoration, a function that is not ``async def``, a bad
            ``key`` or ``ttl``; at call time, a provider that returns no ``Cache``.

    Cancellation: as :meth:`Cache.get_or_load`: a cancelled caller stops waiting, the
    shared load goes on in the cache's task group.
    """
    if not isinstance(cache, Cache) and not callable(cache):
        raise ConfigurationError(
            f"cache must be a Cache or a callable returning one, got {cache!r}"
        )

    def decorate(func: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        if not inspect.iscoroutinefunction(func):
            raise ConfigurationError("cached() decorates coroutine functions (async def)")
        if key is not None and not isinstance(key, str) and not callable(key):
            raise ConfigurationError("key must be a format string, a callable or None")
        if isinstance(key, str):
            _check_key_template(key, inspect.signature(func))
        if not isinstance(ttl, _Unset):
            _check_seconds("ttl", ttl, allow_none=True)
        return CachedFunction(cache, func, ttl=ttl, key=key)

    return decorate


def _check_key_template(template: str, signature: inspect.Signature) -> None:
    """Refuse, at decoration, a key template that could not be filled at call time."""
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigurationError(f"key template {template!r} is malformed: {exc}") from None
    for field_name in fields:
        base = field_name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise ConfigurationError(
                f"key template {template!r}: name the argument in each field, e.g. {{user_id}}"
            )
        if base not in params and not takes_any:
            raise ConfigurationError(
                f"key template {template!r} names {base!r}, which is not an argument of "
                f"the function ({', '.join(params) or 'none'})"
            )


class CachedFunction(Generic[P, R]):
    """A coroutine function whose results live in a :class:`Cache` (see ``Cache.cached``).

    Calling it returns the cached result or runs the function once (single flight) on a
    miss; :meth:`invalidate` with the same arguments drops that result.

    Cancellation: as :meth:`Cache.get_or_load`: a cancelled caller stops waiting, the
    shared load goes on in the cache's task group and still fills the cache.
    """

    def __init__(
        self,
        cache: Cache[Any] | Callable[[], Cache[Any]],
        func: Callable[P, Awaitable[R]],
        *,
        ttl: float | _Unset | None,
        key: str | Callable[..., str] | None,
    ) -> None:
        self._cache = cache
        self._func = func
        self._ttl = ttl
        self._key = key
        self._signature = inspect.signature(func)
        self._name = function_name(func)
        functools.update_wrapper(self, func)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of a call with these arguments."""
        if self._key is None:
            return call_key(self._name, self._signature, args, kwargs)
        if isinstance(self._key, str):
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return self._key.format(**bound.arguments)
        return self._key(*args, **kwargs)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._resolve().get_or_load(
            self.key_for(*args, **kwargs),
            functools.partial(self._func, *args, **kwargs),
            ttl=self._ttl,
        )

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached result of a call with these arguments."""
        await self._resolve().invalidate(self.key_for(*args, **kwargs))

    def _resolve(self) -> Cache[Any]:
        if isinstance(self._cache, Cache):
            return self._cache
        found = self._cache()
        if not isinstance(found, Cache):
            raise ConfigurationError(
                f"the cache provider of {self._name} returned {found!r}, not a Cache"
            )
        return found
