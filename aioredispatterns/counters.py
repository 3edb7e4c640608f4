"""Counters: plain and hash-field counters, time-bucketed counts, unique counts (HyperLogLog).

The seed's "counters and analytics" patterns, with the key naming, TTLs, time buckets and
cluster tags done once::

    Counter(client, "revenue:total")            INCRBY / DECRBY / INCRBYFLOAT on one key
    HashCounter(client, "user:42")              many small counters in one hash (HINCRBY)
    BucketedCounter(client, "pageviews:home",   one counter per minute / hour / day,
                    width=60, retention=...)    by the server's clock, each bucket expiring
    UniqueCounter(client, "visitors",           a HyperLogLog per bucket: distinct items
                  width=86400, retention=...)   per day and over any run of days

**Time buckets.** A bucket of width ``w`` seconds holds the moments ``[k*w, (k+1)*w)``
since the Unix epoch (UTC: a day bucket runs from midnight UTC, not local midnight). A
write lands in the bucket that holds *now on the server's clock* (``TIME`` inside the
write's Lua script), so clients whose clocks disagree still count into the same bucket;
``at=`` names the moment explicitly instead (backfills, and tests that must not wait
for a minute to pass). Every write sets its bucket's expiry, absolutely, to the bucket's
end plus ``retention`` (``PEXPIREAT``), so no bucket ever lives without a TTL and a
write into a bucket already past its retention writes nothing. A read of a run of
buckets (:meth:`BucketedCounter.last`, :meth:`BucketedCounter.range`) is one script,
one round trip, and counts a bucket that does not exist (never written, or expired) as 0.

**HyperLogLog.** :class:`UniqueCounter` estimates how many distinct items were added,
with a standard error of 0.81% (Redis's HyperLogLog: 16,384 registers, at most 12 KB
per bucket whatever the count), so about 95% of estimates fall within ±1.6% of the true
count; small sets (a few hundred items) are counted nearly exactly. The union over a run
of buckets is a ``PFCOUNT`` of all their keys (a distinct count, not a sum: an item seen
on three days counts once), or with ``cache_ttl`` a ``PFMERGE`` into a cache key that
expires after ``cache_ttl``.

**Cluster.** Every key of one counter shares one hash tag (``{<name>}``), so the scripts
and multi-key reads run in one slot. A series' bucket keys are built inside its scripts
from the series' base key (the bucket depends on the server's clock, which the client
does not know); they carry that key's tag, so they live in the slot the script runs in.

**Numbers.** :class:`Counter` and :class:`HashCounter` take any signed 64-bit amount and
return exact values (an overflow past ``2**63 - 1`` is the server's error). A time
bucket's count is exact up to ``2**53`` (Lua numbers are doubles); its amounts are ints
within ``±2**53``. Times are seconds since the epoch, from 0 to the end of year 9999.

Cancellation: every write is a single command or a single script, atomic on the server;
a caller cancelled after it ran loses the reply, not the write. Nothing runs in the
background.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from ._commands import Arg, execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, KeyT, keyspace
from ._scripts import Script
from ._validate import (
    MAX_SECONDS,
    check_count,
    check_items,
    check_name,
    check_number,
    check_seconds,
    shown,
)
from .errors import ConfigurationError, RedisPatternsError

__all__ = (
    "Bucket",
    "BucketedCounter",
    "Counter",
    "CounterError",
    "HashCounter",
    "Series",
    "UniqueCounter",
)

_INCR = Script.load("counter_incr")
_BUCKET_INCR = Script.load("bucket_incr")
_BUCKET_READ = Script.load("bucket_read")
_UNIQUE_ADD = Script.load("unique_add")
_UNIQUE_READ = Script.load("unique_read")

#: The bounds of a signed 64-bit integer, what INCRBY / HINCRBY take.
_MAX_INT64: Final = 2**63 - 1
#: A bucket's count comes back through Lua's doubles: amounts stay within 2**53.
_MAX_BUCKET_AMOUNT: Final = 2**53
#: The latest moment accepted (``at``, ``start``, ``end``): the end of year 9999 UTC.
_MAX_TIME: Final = 253_402_300_799.0
#: The most buckets one read of a :class:`BucketedCounter` covers (one GET each, inside
#: one script: a week of minutes is 10,080).
_MAX_READ_BUCKETS: Final = 100_000
#: The most buckets one read of a :class:`UniqueCounter` covers: the union merges one
#: 12 KB HyperLogLog per bucket (a year of days is 366, a month of hours 744).
_MAX_UNIQUE_BUCKETS: Final = 1024


class CounterError(RedisPatternsError, ValueError):
    """A counter's stored value is not a number the call can read.

    For example :meth:`Counter.get` on a counter that :meth:`Counter.incr_float` made
    fractional (read it with :meth:`Counter.get_float`), or a key written by someone else.
    """


class Bucket(NamedTuple):
    """One time bucket of a series: ``for start, value in series.buckets``.

    Attributes:
        start: when the bucket begins, in seconds since the epoch (a multiple of the
            width); it holds the moments ``[start, start + width)``.
        value: its count (:class:`BucketedCounter`) or its estimated number of distinct
            items (:class:`UniqueCounter`); 0 for a bucket never written or expired.
    """

    start: int
    value: int


class Series(NamedTuple):
    """Consecutive time buckets, oldest first, read in one round trip.

    Attributes:
        buckets: every bucket of the run, including empty ones (value 0).
        total: :class:`BucketedCounter`: the sum of the values. :class:`UniqueCounter`:
            the estimated number of distinct items over all the buckets (an item seen in
            several buckets counts once, so this is usually less than the sum).
    """

    buckets: tuple[Bucket, ...]
    total: int


def _as_int(value: Any, what: str) -> int:
    """An integer reply: an int already, or a bulk string (bytes / str) holding one."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CounterError(f"{what} holds {shown(value)}, not an integer") from None


def _as_float(value: Any, what: str) -> float:
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CounterError(f"{what} holds {shown(value)}, not a number") from None


def _check_int64(name: str, value: object) -> int:
    # The hot path: one type test and two comparisons for the usual small int.
    if type(value) is int and -_MAX_INT64 <= value <= _MAX_INT64:
        return value
    return check_count(name, value, minimum=-_MAX_INT64, maximum=_MAX_INT64)


def _check_float_amount(value: object) -> float:
    return float(check_number("amount", value))


def _ttl_ms(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    return max(1, round(check_seconds("ttl", ttl) * 1000))


class _OneKey:
    """What Counter and HashCounter share: one key under its hash tag, an optional TTL."""

    __slots__ = ("_client", "_key", "_ttl_ms", "name", "ttl")
    _PRIMITIVE = ""

    def __init__(
        self,
        client: AnyRedis,
        name: KeyT,
        *,
        ttl: float | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._client = check_client(client)
        self._key = keyspace(prefix, self._PRIMITIVE, name).key()
        self._ttl_ms = _ttl_ms(ttl)
        self.name: KeyT = name
        self.ttl: float | None = None if ttl is None else float(ttl)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl}>"


class Counter(_OneKey):
    """One counter on one key: increment, decrement, add a float, read, reset.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the counter's name (a non-empty str or bytes of at most 1024 bytes); two
            counters with the same name and prefix are the same counter.
        ttl: if given, every write sets the key's TTL to this many seconds (in the same
            script as the write, so it never lives without one): a counter nobody
            updates for ``ttl`` seconds disappears and reads as 0. ``None`` (default):
            no TTL.
        prefix: the key prefix.

    Keys: ``<prefix>:counter:{<name>}``, a string holding the value.

    Integer counts (:meth:`incr`, :meth:`decr`) are exact over the whole signed 64-bit
    range; :meth:`incr_float` turns the value into a decimal (INCRBYFLOAT: 17 significant
    digits), after which only :meth:`incr_float` and :meth:`get_float` apply.

    Cancellation: each call is one command (one script with ``ttl``); a caller cancelled
    after it ran loses the reply, not the change. Nothing runs in the background.

    Raises:
        ConfigurationError: a bad ``ttl`` or ``prefix`` (before any command).
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
    """

    __slots__ = ()
    _PRIMITIVE = "counter"

    async def incr(self, amount: int = 1) -> int:
        """Add ``amount`` (an int, may be negative) and return the new value.

        A counter that does not exist starts at 0.

        Raises:
            ConfigurationError: ``amount`` is not an int within ±(2**63 - 1) (before any
                command).
            CommandError: the value is not an integer (after :meth:`incr_float`, or a key
                someone else wrote), or the result would overflow 64 bits; nothing changed.
            ConnectionFailed, CommandTimeout: the server did not answer.

        Cancellation: the INCRBY either ran or did not; if it ran, the change stays.
        """
        amount = _check_int64("amount", amount)
        if self._ttl_ms is None:
            return _as_int(await execute(self._client, "INCRBY", self._key, amount), "counter")
        reply = await _INCR.run(self._client, [self._key], ["INCRBY", self._ttl_ms, amount])
        return _as_int(reply, "counter")

    async def decr(self, amount: int = 1) -> int:
        """Subtract ``amount`` and return the new value (see :meth:`incr`)."""
        return await self.incr(-_check_int64("amount", amount))

    async def incr_float(self, amount: float) -> float:
        """Add ``amount`` (a finite int or float, may be negative); return the new value.

        Redis keeps the value as a decimal string with 17 significant digits
        (INCRBYFLOAT), so ``0.1`` added ten times reads back as ``1.0``.

        Raises:
            ConfigurationError: ``amount`` is not a finite number (before any command).
            CommandError: the value is not a number, or the result is not finite.

        Cancellation: as :meth:`incr`.
        """
        checked = _check_float_amount(amount)
        if self._ttl_ms is None:
            reply = await execute(self._client, "INCRBYFLOAT", self._key, repr(checked))
        else:
            args: list[Arg] = ["INCRBYFLOAT", self._ttl_ms, repr(checked)]
            reply = await _INCR.run(self._client, [self._key], args)
        return _as_float(reply, "counter")

    async def get(self) -> int:
        """The current value (0 if the counter does not exist).

        Raises:
            CounterError: the value is not an integer (use :meth:`get_float` after
                :meth:`incr_float`).

        Cancellation: harmless; nothing is written.
        """
        return _as_int(await execute(self._client, "GET", self._key), "counter")

    async def get_float(self) -> float:
        """The current value as a float (0.0 if the counter does not exist).

        Raises:
            CounterError: the key holds something that is not a number.

        Cancellation: harmless; nothing is written.
        """
        return _as_float(await execute(self._client, "GET", self._key), "counter")

    async def reset(self) -> None:
        """Delete the counter: it reads 0 until the next increment.

        Cancellation: the DEL either ran or did not.
        """
        await execute(self._client, "DEL", self._key)


class HashCounter(_OneKey):
    """Many small integer counters in one hash: one field per counter (HINCRBY).

    ``HashCounter(client, "user:42").incr("orders")`` is the seed's
    ``HINCRBY user:42:counters orders 1``. A small hash (up to 128 fields of short names
    and values, by the server's default ``hash-max-listpack-entries``) is stored
    compactly, far smaller than one key per counter, and every counter of it is read in
    one command (:meth:`get_all`).

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the hash's name (a non-empty str or bytes of at most 1024 bytes).
        ttl: if given, every write sets the whole hash's TTL to this many seconds (in
            the same script as the write). ``None`` (default): no TTL.
        prefix: the key prefix.

    Keys: ``<prefix>:hashcounter:{<name>}``, a hash of field -> integer.

    Cancellation: each call is one command (one script with ``ttl``); a caller cancelled
    after it ran loses the reply, not the change.

    Raises:
        ConfigurationError: a bad ``ttl`` or ``prefix`` (before any command).
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
    """

    __slots__ = ()
    _PRIMITIVE = "hashcounter"

    async def incr(self, field: str, amount: int = 1) -> int:
        """Add ``amount`` (an int, may be negative) to ``field``; return its new value.

        Raises:
            InvalidKeyError: ``field`` is not a non-empty str of at most 1024 bytes.
            ConfigurationError: ``amount`` is not an int within ±(2**63 - 1).
            CommandError: the field holds something that is not an integer, or the
                result would overflow 64 bits; nothing changed.

        Cancellation: the HINCRBY either ran or did not.
        """
        _check_field(field)
        amount = _check_int64("amount", amount)
        if self._ttl_ms is None:
            reply = await execute(self._client, "HINCRBY", self._key, field, amount)
        else:
            args: list[Arg] = ["HINCRBY", self._ttl_ms, field, amount]
            reply = await _INCR.run(self._client, [self._key], args)
        return _as_int(reply, f"field {field!r}")

    async def decr(self, field: str, amount: int = 1) -> int:
        """Subtract ``amount`` from ``field``; return its new value (see :meth:`incr`)."""
        return await self.incr(field, -_check_int64("amount", amount))

    async def get(self, field: str) -> int:
        """The value of ``field`` (0 if it does not exist).

        Raises:
            CounterError: the field holds something that is not an integer.

        Cancellation: harmless; nothing is written.
        """
        _check_field(field)
        return _as_int(await execute(self._client, "HGET", self._key, field), f"field {field!r}")

    async def get_many(self, fields: Iterable[str]) -> dict[str, int]:
        """The values of ``fields`` in one command (0 for those that do not exist).

        Raises:
            ConfigurationError: ``fields`` is not an iterable of non-empty str.
            CounterError: a field holds something that is not an integer.

        Cancellation: harmless; nothing is written.
        """
        names = [_check_field(field) for field in check_items("fields", fields)]
        if not names:
            return {}
        values = await execute(self._client, "HMGET", self._key, *names)
        return {
            name: _as_int(value, f"field {name!r}")
            for name, value in zip(names, values, strict=True)
        }

    async def get_all(self) -> dict[str, int]:
        """Every field and its value, in one command (an empty dict if none).

        Raises:
            CounterError: a field holds something that is not an integer.

        Cancellation: harmless; nothing is written.
        """
        reply = await execute(self._client, "HGETALL", self._key)
        items = reply.items() if isinstance(reply, dict) else _pairs(reply)
        result: dict[str, int] = {}
        for field, value in items:
            name = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            result[name] = _as_int(value, f"field {name!r}")
        return result

    async def remove(self, *fields: str) -> int:
        """Delete ``fields`` (at least one); return how many existed.

        Raises:
            ConfigurationError: no field given.
            InvalidKeyError: a field is not a non-empty str.

        Cancellation: the HDEL either ran or did not.
        """
        if not fields:
            raise ConfigurationError("remove() needs at least one field")
        names = [_check_field(field) for field in fields]
        return int(await execute(self._client, "HDEL", self._key, *names))

    async def reset(self) -> None:
        """Delete the whole hash: every field reads 0 until written again.

        Cancellation: the DEL either ran or did not.
        """
        await execute(self._client, "DEL", self._key)


def _check_field(field: object) -> str:
    if not isinstance(field, str):
        raise ConfigurationError(f"a field must be a str, got {type(field).__name__}")
    check_name("field", field)
    return field


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


# --- time buckets ------------------------------------------------------------------------


def _check_width(width: object) -> int:
    return check_count("width", width, minimum=1, maximum=int(MAX_SECONDS))


def _check_time(name: str, value: object) -> float:
    return float(check_number(name, value, minimum=0, maximum=_MAX_TIME))


class _Buckets:
    """What the two bucketed counters share: the series' base key, width and retention."""

    __slots__ = ("_base", "_client", "_max_read", "_retention_ms", "name", "retention", "width")

    _primitive: str = ""

    def __init__(
        self,
        client: AnyRedis,
        name: KeyT,
        *,
        width: int,
        retention: float,
        prefix: str,
        max_read: int,
    ) -> None:
        self._client = check_client(client)
        self.width: int = _check_width(width)
        self.retention: float = check_seconds("retention", retention)
        self._retention_ms = max(1, round(self.retention * 1000))
        self._base = keyspace(prefix, self._primitive, name).key()
        self._max_read = max_read
        self.name: KeyT = name

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} width={self.width}s "
            f"retention={self.retention:g}s>"
        )

    def bucket_start(self, at: float) -> int:
        """The start of the bucket that holds the moment ``at`` (epoch seconds).

        Raises:
            ConfigurationError: ``at`` is not a number from 0 to the end of year 9999.
        """
        return self._index(_check_time("at", at)) * self.width

    def _index(self, at: float) -> int:
        # Floor division, not floor(at / width): a float quotient can round up to the
        # next integer for a moment just before a boundary.
        return int(at // self.width)

    def _at_index(self, at: float | None) -> int | str:
        """The bucket index of an explicit moment, or '' for the server's clock."""
        return "" if at is None else self._index(_check_time("at", at))

    def _range_args(self, start: float, end: float) -> tuple[int, int]:
        """(last index, number of buckets) of every bucket holding a moment of the range."""
        first = self._index(_check_time("start", start))
        last = self._index(_check_time("end", end))
        if last < first:
            raise ConfigurationError(f"end ({shown(end)}) is before start ({shown(start)})")
        return last, self._check_buckets(last - first + 1)

    def _check_buckets(self, n: object) -> int:
        checked = check_count("buckets", n, minimum=1)
        if checked > self._max_read:
            raise ConfigurationError(
                f"a read covers at most {self._max_read} buckets, this one {checked}: "
                "read it in parts, or use wider buckets"
            )
        return checked


def _series(reply: Sequence[Any], width: int, *, union: bool) -> Series:
    last_start = int(reply[0])
    counts = [_as_int(value, "bucket") for value in reply[2 if union else 1 :]]
    first_start = last_start - (len(counts) - 1) * width
    buckets = tuple(Bucket(first_start + i * width, value) for i, value in enumerate(counts))
    total = int(reply[1]) if union else sum(counts)
    return Series(buckets, total)


class BucketedCounter(_Buckets):
    """A counter per time bucket (per minute, hour, day ...) by the server's clock.

    ``BucketedCounter(client, "pageviews:home", width=60, retention=7 * 86400)`` counts
    page views per minute and keeps each minute for a week after it ends; ``last(60)``
    reads the past hour, minute by minute, in one round trip.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the series' name (a non-empty str or bytes of at most 1024 bytes).
        width: the bucket width in whole seconds (60: per minute, 3600: per hour, 86400:
            per day; at least 1). Buckets are aligned to the Unix epoch (UTC).
        retention: how long a bucket is kept after it ends, in seconds (> 0): every
            write sets the bucket's expiry to its end plus ``retention``.
        prefix: the key prefix.

    Keys: ``<prefix>:bucketed:{<name>}:<bucket start>``, one string per bucket, each with
    its TTL; all in one hash slot.

    Cancellation: each write is one script, atomic (the count and its TTL together); a
    caller cancelled after it ran loses the reply, not the write.

    Raises:
        ConfigurationError: a bad ``width``, ``retention`` or ``prefix`` (before any
            command).
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
    """

    __slots__ = ()
    _primitive = "bucketed"

    def __init__(
        self,
        client: AnyRedis,
        name: KeyT,
        *,
        width: int,
        retention: float,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(
            client, name, width=width, retention=retention, prefix=prefix,
            max_read=_MAX_READ_BUCKETS,
        )  # fmt: skip

    async def incr(self, amount: int = 1, *, at: float | None = None) -> int:
        """Add ``amount`` to the current bucket (or the one holding ``at``); return its count.

        Args:
            amount: an int within ±2**53 (negative to correct a count).
            at: the moment to count at, in epoch seconds (backfills, tests); ``None``
                (default): now, on the server's clock.

        Returns:
            The bucket's count after the write, or 0 if the bucket was already past its
            retention (``at`` too old): then nothing is written.

        Raises:
            ConfigurationError: a bad ``amount`` or ``at`` (before any command).
            ScriptError: the bucket's key holds something that is not an integer.

        Cancellation: the script either ran or did not; if it ran, the count and the
        bucket's TTL were both written.
        """
        if not (type(amount) is int and -_MAX_BUCKET_AMOUNT <= amount <= _MAX_BUCKET_AMOUNT):
            check_count("amount", amount, minimum=-_MAX_BUCKET_AMOUNT, maximum=_MAX_BUCKET_AMOUNT)
        args: list[Arg] = [amount, self.width, self._retention_ms, self._at_index(at)]
        _, _, count = await _BUCKET_INCR.run(self._client, [self._base], args)
        return int(count)

    async def last(self, buckets: int, *, at: float | None = None) -> Series:
        """The ``buckets`` most recent buckets, oldest first, the current one last.

        Args:
            buckets: how many (1 to 100,000).
            at: end with the bucket holding this moment (epoch seconds) instead of the
                one holding now on the server's clock.

        Raises:
            ConfigurationError: a bad ``buckets`` or ``at`` (before any command).
            CounterError: a bucket's key holds something that is not an integer.

        Cancellation: harmless; nothing is written.
        """
        n = self._check_buckets(buckets)
        args: list[Arg] = [self.width, n, self._at_index(at)]
        reply = await _BUCKET_READ.run(self._client, [self._base], args)
        return _series(reply, self.width, union=False)

    async def range(self, start: float, end: float) -> Series:
        """Every bucket that holds a moment of ``[start, end]`` (epoch seconds), oldest first.

        Both ends are inclusive: ``range(t, t)`` is the one bucket holding ``t``.

        Raises:
            ConfigurationError: ``start`` or ``end`` not a time, ``end`` before ``start``,
                or more than 100,000 buckets (before any command).
            CounterError: a bucket's key holds something that is not an integer.

        Cancellation: harmless; nothing is written.
        """
        last, n = self._range_args(start, end)
        reply = await _BUCKET_READ.run(self._client, [self._base], [self.width, n, last])
        return _series(reply, self.width, union=False)


def _check_items(items: tuple[object, ...]) -> list[Arg]:
    if not items:
        raise ConfigurationError("add() needs at least one item")
    checked: list[Arg] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | bytes | int):
            raise ConfigurationError(f"an item must be str, bytes or int, got {shown(item)}")
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise ConfigurationError(f"an item is not valid Unicode: {shown(item)}") from None
        checked.append(item)
    return checked


class UniqueCounter(_Buckets):
    """Distinct items per time bucket and over runs of buckets (HyperLogLog).

    ``UniqueCounter(client, "visitors", width=86400, retention=30 * 86400)`` counts
    distinct visitors per day; ``(await uniques.last(7)).total`` is the number of distinct
    visitors over the past seven days (a visitor seen on several days counts once).

    Every count is an estimate with a standard error of 0.81% (about 95% of estimates
    within ±1.6%); a bucket takes at most 12 KB whatever it counts. An item is a str,
    bytes or int (``42`` and ``"42"`` are the same item).

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the series' name (a non-empty str or bytes of at most 1024 bytes).
        width: the bucket width in whole seconds (86400: per day; at least 1), aligned
            to the Unix epoch (UTC).
        retention: how long a bucket is kept after it ends, in seconds (> 0): every
            write sets the bucket's expiry to its end plus ``retention``.
        prefix: the key prefix.

    Keys: ``<prefix>:unique:{<name>}:<bucket start>`` (one HyperLogLog per bucket, each
    with its TTL) and ``...:union:<first start>:<last start>`` (cached unions, with
    ``cache_ttl``); all in one hash slot.

    Cancellation: each write is one script, atomic (the items and the bucket's TTL
    together); a caller cancelled after it ran loses the reply, not the write.

    Raises:
        ConfigurationError: a bad ``width``, ``retention`` or ``prefix`` (before any
            command).
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
    """

    __slots__ = ()
    _primitive = "unique"

    #: The standard error of every estimate (Redis's HyperLogLog, 16,384 registers).
    STANDARD_ERROR: Final = 0.0081

    def __init__(
        self,
        client: AnyRedis,
        name: KeyT,
        *,
        width: int,
        retention: float,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(
            client, name, width=width, retention=retention, prefix=prefix,
            max_read=_MAX_UNIQUE_BUCKETS,
        )  # fmt: skip

    async def add(self, *items: str | bytes | int, at: float | None = None) -> bool:
        """Add ``items`` to the current bucket (or the one holding ``at``).

        Send many items per call (thousands are fine; the script adds them in chunks)
        rather than one call per item.

        Args:
            items: at least one str, bytes or int.
            at: the moment to count at, in epoch seconds; ``None`` (default): now, on
                the server's clock.

        Returns:
            True if the bucket's estimate changed (some item was new to it, most likely);
            False if not, or if the bucket was already past its retention (``at`` too
            old): then nothing is written.

        Raises:
            ConfigurationError: no item, an item of another type, or a bad ``at`` (before
                any command).
            ScriptError: the bucket's key holds something that is not a HyperLogLog.

        Cancellation: the script either ran or did not; if it ran, every item and the
        bucket's TTL were written.
        """
        checked = _check_items(items)
        args: list[Arg] = [self.width, self._retention_ms, self._at_index(at), *checked]
        _, _, changed = await _UNIQUE_ADD.run(self._client, [self._base], args)
        return bool(changed)

    async def last(
        self, buckets: int, *, at: float | None = None, cache_ttl: float | None = None
    ) -> Series:
        """The ``buckets`` most recent buckets' estimates and their union, in one round trip.

        Args:
            buckets: how many (1 to 1024), the current one last.
            at: end with the bucket holding this moment (epoch seconds) instead of the
                one holding now on the server's clock.
            cache_ttl: see :meth:`range`.

        Raises:
            ConfigurationError: a bad ``buckets``, ``at`` or ``cache_ttl``.
            ScriptError: a bucket's key holds something that is not a HyperLogLog.

        Cancellation: harmless; at most a union cache (with its TTL) is written.
        """
        n = self._check_buckets(buckets)
        args: list[Arg] = [self.width, n, self._at_index(at), _cache_ms(cache_ttl)]
        reply = await _UNIQUE_READ.run(self._client, [self._base], args)
        return _series(reply, self.width, union=True)

    async def range(self, start: float, end: float, *, cache_ttl: float | None = None) -> Series:
        """Every bucket holding a moment of ``[start, end]`` and their union, oldest first.

        ``total`` is the estimated number of distinct items over all those buckets.

        Args:
            start, end: epoch seconds, both inclusive; at most 1024 buckets.
            cache_ttl: ``None`` (default): the union is computed on every call (PFCOUNT
                of all the buckets' keys, merging one 12 KB HyperLogLog per bucket). A
                number of seconds: the union is merged (PFMERGE) into a cache key that
                expires after ``cache_ttl``, and later calls for the same buckets read
                it; items added meanwhile are missing from ``total`` until it expires
                (the per-bucket estimates are always current). Worth it for a run of
                many closed buckets read often (a dashboard's "last 30 days").

        Raises:
            ConfigurationError: a bad ``start``, ``end`` or ``cache_ttl``, ``end`` before
                ``start`` or more than 1024 buckets (before any command).
            ScriptError: a bucket's key holds something that is not a HyperLogLog.

        Cancellation: harmless; at most a union cache (with its TTL) is written.
        """
        last, n = self._range_args(start, end)
        args: list[Arg] = [self.width, n, last, _cache_ms(cache_ttl)]
        reply = await _UNIQUE_READ.run(self._client, [self._base], args)
        return _series(reply, self.width, union=True)


def _cache_ms(cache_ttl: float | None) -> int:
    if cache_ttl is None:
        return 0
    return max(1, round(check_seconds("cache_ttl", cache_ttl) * 1000))
