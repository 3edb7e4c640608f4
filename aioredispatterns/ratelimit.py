"""Rate limiters decided on the server's clock, atomically, over one or several limits.

Every decision is one Lua script (``_lua/ratelimit_decide.lua``) that reads the time from
the server (``redis.call('TIME')``), so clients whose wall clocks disagree still share one
limit exactly; the script evaluates every limit of a :class:`RateLimiter` and either
consumes from all of them or from none. All keys of one identity share one hash tag, so
the script runs in one cluster slot.

Policies::

    TokenBucket(capacity, rate)          bursts up to capacity, refills rate tokens/s
    GCRA(limit, period, burst=None)      limit per period, evenly spaced; one timestamp key
    SlidingWindowLog(limit, window)      exact: at most limit in any window (sorted set)
    SlidingWindowCounter(limit, window)  approximate sliding window from two counters
    FixedWindow(limit, window)           at most limit per window aligned to the epoch

State, one key per policy: a token bucket and GCRA keep one timestamp (a bucket of
``capacity`` tokens refilled every ``1/rate`` seconds *is* GCRA with burst ``capacity``:
tokens = capacity - (timestamp - now) * rate, so the two share their code), the sliding
log a sorted set with one member per admitted hit, the counter policies a short string.
Every key written gets a TTL in the same script (when it would expire, the limit is back
to its full quota, so expiry loses nothing). Peeks write nothing; a denied hit consumes
nothing (a sliding log does drop the entries that have left its window, which changes no
decision).

Bounds, checked when a policy is built (:class:`~aioredispatterns.ConfigurationError`,
before any command): a limit, capacity or burst is an ``int`` from 1 to ``10**12``; a
period or window is at most ten years (a window at least a microsecond, a period or a
rate at least a microsecond per unit); a bucket's refill horizon (``capacity / rate``)
and GCRA's (``burst * period / limit``) are at most ten years. Within them every number
the script computes (server time in µs plus a span, a count plus a cost, a sliding log's
running total) stays far below ``2**53``, where the server's Lua doubles stop being
exact integers. A cost is an ``int`` from 1 to the smallest size of the limiter's
policies (a larger one could never be admitted). An identity is at most 1024 bytes
unless the limiter raises ``max_identity_bytes``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, NamedTuple, TypeAlias

import anyio

from ._commands import execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, BoundedMemo, KeySpace, KeyT, check_prefix, keyspace
from ._scripts import Script
from ._validate import (
    MAX_NAME_BYTES,
    MAX_SECONDS,
    check_count,
    check_name,
    check_number,
    check_seconds,
)
from .errors import ConfigurationError, RedisPatternsError

logger: logging.Logger = logging.getLogger("aioredispatterns.ratelimit")

__all__ = (
    "FixedWindow",
    "GCRA",
    "LimiterStats",
    "Policy",
    "RateLimitDecision",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiter",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
)

_DECIDE = Script.load("ratelimit_decide")

_US = 1_000_000

#: The largest limit, capacity or burst a policy accepts (and so the largest cost). Far
#: below 2**53, so a count plus a cost, or a count carrying a fraction (a sliding counter's
#: estimate), is still computed exactly enough by the server's Lua doubles.
_MAX_SIZE: Final = 10**12
#: The longest span a policy may book ahead, in µs (ten years): see the module docstring.
_MAX_SPAN_US: Final = MAX_SECONDS * _US
#: The most ``max_identity_bytes`` may be raised to (the default is 1024 bytes).
_MAX_IDENTITY_BYTES: Final = 64 * 1024
#: A denied decision that would come back with no wait (the bounds rule it out) waits this
#: long instead, so that :meth:`RateLimiter.wait` can never spin.
_RETRY_FLOOR: Final = 0.1


class RateLimitError(RedisPatternsError):
    """Base of the rate limiter's errors."""


class RateLimitExceeded(RateLimitError, TimeoutError):
    """The limit did not allow the request in time (:meth:`RateLimiter.wait`, endpoints).

    Attributes:
        decision: the last denying decision; ``decision.retry_after`` says when to retry.
    """

    def __init__(self, decision: RateLimitDecision, message: str | None = None) -> None:
        super().__init__(message or f"rate limited; retry after {decision.retry_after:.3f}s")
        self.decision = decision


def _size(name: str, value: object) -> int:
    return check_count(name, value, minimum=1, maximum=_MAX_SIZE)


def _check_span(what: str, size: int, interval_us: float) -> None:
    """Refuse a policy that would book more than ten years ahead (``size * interval``)."""
    if interval_us < 1:
        raise ConfigurationError(f"{what}: at least 1 microsecond per unit, got {interval_us} µs")
    if size * interval_us > _MAX_SPAN_US:
        raise ConfigurationError(
            f"{what}: {size} units take {size * interval_us / _US:g} s to refill, "
            f"above the limit of {MAX_SECONDS:g} s (ten years)"
        )


class _PolicyBase:
    """What the script needs from a policy: a kind code, a size and an interval in µs."""

    __slots__ = ()

    kind: ClassVar[int]
    tag: ClassVar[str]

    @property
    def size(self) -> int:
        """The most a single moment admits (capacity, burst or limit)."""
        raise NotImplementedError

    @property
    def interval_us(self) -> float:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class TokenBucket(_PolicyBase):
    """A bucket of ``capacity`` tokens refilled continuously at ``rate`` tokens per second.

    Bound: over any interval of ``t`` seconds at most ``capacity + rate * t`` units pass.
    State: one timestamp, the moment the bucket will be full again (the tokens follow
    from it and the server's clock); the key expires then.

    Raises:
        ConfigurationError: ``capacity`` is not an int in ``[1, 10**12]``; ``rate`` is not
            a finite number above 0 and at most one token per microsecond; or an empty
            bucket would take more than ten years to refill (``capacity / rate``).
    """

    capacity: int
    rate: float
    kind: ClassVar[int] = 1
    tag: ClassVar[str] = "tb"

    def __post_init__(self) -> None:
        _size("capacity", self.capacity)
        check_number("rate", self.rate, above=0, maximum=_US)
        _check_span("TokenBucket(capacity, rate)", self.capacity, _US / self.rate)

    @property
    def size(self) -> int:
        return self.capacity

    @property
    def interval_us(self) -> float:
        return _US / self.rate


@dataclass(frozen=True, slots=True)
class GCRA(_PolicyBase):
    """Generic cell rate algorithm: ``limit`` per ``period`` seconds, evenly spaced.

    ``burst`` (default ``limit``) is how many may pass at once after a quiet spell.
    Bound: over any interval of ``t`` seconds at most ``burst + limit / period * t``.
    State: one string key holding the theoretical arrival time.

    Raises:
        ConfigurationError: ``limit`` or ``burst`` not an int in ``[1, 10**12]``; ``period``
            not a number of seconds in ``(0, ten years]``; less than a microsecond per
            unit (``period / limit``); or a full burst booking more than ten years ahead
            (``burst * period / limit``).
    """

    limit: int
    period: float
    burst: int | None = None
    kind: ClassVar[int] = 2
    tag: ClassVar[str] = "gcra"

    def __post_init__(self) -> None:
        _size("limit", self.limit)
        check_seconds("period", self.period)
        if self.burst is not None:
            _size("burst", self.burst)
        _check_span("GCRA(limit, period, burst)", self.size, self.interval_us)

    @property
    def size(self) -> int:
        return self.limit if self.burst is None else self.burst

    @property
    def interval_us(self) -> float:
        return self.period * _US / self.limit


class _WindowPolicy(_PolicyBase):
    """The shared part of the windowed policies: ``limit`` units per ``window`` seconds."""

    __slots__ = ()
    limit: int
    window: float

    def __post_init__(self) -> None:
        _size("limit", self.limit)
        check_seconds("window", self.window, minimum=1 / _US)

    @property
    def size(self) -> int:
        return self.limit

    @property
    def interval_us(self) -> float:
        return float(round(self.window * _US))


@dataclass(frozen=True, slots=True)
class SlidingWindowLog(_WindowPolicy):
    """Exact sliding window: at most ``limit`` units in any ``window`` seconds.

    State: a sorted set with one member per admitted *hit*, whatever its cost (memory
    grows with the number of hits in a window, not with ``limit``); each member carries
    a running total of the units admitted, so a decision costs a few O(log n) lookups
    for any cost up to ``limit``, never one operation per unit. The bound stays exact:
    a hit is recorded at the server's time (one microsecond later if that would not be
    after the previous hit, so a clock that steps back only keeps hits in the window
    longer).

    Raises:
        ConfigurationError: ``limit`` not an int in ``[1, 10**12]`` or ``window`` not a
            number of seconds in ``[1 µs, ten years]``.
    """

    limit: int
    window: float
    kind: ClassVar[int] = 3
    # "log2": the log of hits (one member per hit) replaced a log of units, which kept
    # its state under "log"; the two formats never share a key.
    tag: ClassVar[str] = "log2"


@dataclass(frozen=True, slots=True)
class SlidingWindowCounter(_WindowPolicy):
    """Approximate sliding window from the current and previous fixed windows' counts.

    The previous window's count is weighted by how much of it the sliding window still
    covers. Bound: at most ``limit`` per aligned window, and fewer than ``2 * limit`` in any
    ``window`` seconds (the estimate assumes the previous window's traffic was even).
    State: one short string (window, count, previous count), whatever the limit.

    Raises:
        ConfigurationError: ``limit`` not an int in ``[1, 10**12]`` or ``window`` not a
            number of seconds in ``[1 µs, ten years]``.
    """

    limit: int
    window: float
    kind: ClassVar[int] = 4
    tag: ClassVar[str] = "swc"


@dataclass(frozen=True, slots=True)
class FixedWindow(_WindowPolicy):
    """At most ``limit`` units per ``window`` seconds, windows aligned to the server epoch.

    Up to ``2 * limit`` can pass around a window boundary.
    State: one short string (window, count).

    Raises:
        ConfigurationError: ``limit`` not an int in ``[1, 10**12]`` or ``window`` not a
            number of seconds in ``[1 µs, ten years]``.
    """

    limit: int
    window: float
    kind: ClassVar[int] = 5
    tag: ClassVar[str] = "fw"


Policy: TypeAlias = TokenBucket | GCRA | SlidingWindowLog | SlidingWindowCounter | FixedWindow
_POLICY_TYPES = (TokenBucket, GCRA, SlidingWindowLog, SlidingWindowCounter, FixedWindow)


class RateLimitDecision(NamedTuple):
    """The answer for one request (an immutable named tuple: cheap to build per request).

    With several limits, ``limit``/``remaining``/``reset_after`` describe the binding
    limit (the one with the fewest units left; when denied, the one to wait longest for)
    and ``per_limit`` holds each limit's own decision, in the limiter's order (it is
    empty when the limiter has a single policy: the decision is that policy's).

    Attributes:
        allowed: every limit allowed the request (and, for :meth:`RateLimiter.hit`,
            consumed it).
        limit: the binding policy's size (capacity, burst or limit).
        remaining: units that could still pass now (after this request if consumed).
        retry_after: seconds until a request of the same cost could pass: 0 if allowed,
            always above 0 if not.
        reset_after: seconds until the binding limit is back to its full quota.
        server_time: the server's clock when the script decided, in seconds.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    server_time: float
    per_limit: tuple[RateLimitDecision, ...] = ()


def _retry_after(retry_us: int) -> float:
    # A denied decision always has a wait: the script answers at least 1 µs whenever the
    # policies' bounds hold. Should it ever answer 0 (or an overflowed number), wait a
    # floor rather than report "retry now" and let wait() spin on the server.
    return retry_us / _US if retry_us > 0 else _RETRY_FLOOR


def _parse(reply: Sequence[int], policies: Sequence[Policy]) -> RateLimitDecision:
    # The reply's numbers are RESP integers already (ints, not bytes).
    allowed = reply[0] == 1
    server_time = reply[1] / _US
    if len(policies) == 1:  # the common case: one RateLimitDecision, no per-limit tuple
        _, _, _, remaining, retry_us, reset_us = reply
        return RateLimitDecision(
            allowed,
            policies[0].size,
            remaining if remaining > 0 else 0,
            0.0 if allowed else _retry_after(retry_us),
            reset_us / _US if reset_us > 0 else 0.0,
            server_time,
        )
    parts = []
    for i, policy in enumerate(policies):
        ok, remaining, retry_us, reset_us = reply[2 + 4 * i : 6 + 4 * i]
        parts.append(
            RateLimitDecision(
                allowed=ok == 1,
                limit=policy.size,
                remaining=max(0, remaining),
                retry_after=0.0 if ok == 1 else _retry_after(retry_us),
                reset_after=max(0, reset_us) / _US,
                server_time=server_time,
            )
        )
    if allowed:
        binding = min(parts, key=lambda d: d.remaining)
        retry_after = 0.0
    else:
        binding = max((d for d in parts if not d.allowed), key=lambda d: d.retry_after)
        retry_after = binding.retry_after
    return RateLimitDecision(
        allowed=allowed,
        limit=binding.limit,
        remaining=binding.remaining,
        retry_after=retry_after,
        reset_after=binding.reset_after,
        server_time=server_time,
        per_limit=tuple(parts),
    )


# The limiter's identity -> keys cache holds at most this many identities and this many
# bytes (identities, keys and their Python objects); an identity whose entry would take
# more than a 64th of it is not cached at all (building its keys costs little next to
# sending them), so one huge identity cannot flush the small, hot ones.
_KEY_CACHE_SIZE = 4096
_KEY_CACHE_BYTES = 4 * 1024 * 1024
_KEY_CACHE_MAX_ENTRY = _KEY_CACHE_BYTES // 64


@dataclass(slots=True)
class LimiterStats:
    """Counters of one :class:`RateLimiter` in this process (``.stats`` is a copy).

    A plain snapshot in memory: reading it sends nothing, so nothing to cancel.

    Attributes:
        decisions: hits answered by the server.
        allowed: hits allowed (units consumed).
        denied: hits refused.
        peeks: peeks answered.
        waits: sleeps of :meth:`RateLimiter.wait` between refused hits.
        errors: hits or peeks that failed (the server unreachable or erring).
    """

    decisions: int = 0
    allowed: int = 0
    denied: int = 0
    peeks: int = 0
    waits: int = 0
    errors: int = 0


class RateLimiter:
    """Rate limits for many identities (users, IPs, API keys) under one name.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        policies: one policy, or several that must all allow a request (for example
            ``[GCRA(10, 1.0), FixedWindow(1000, 3600)]``); they are decided atomically.
        name: what this limiter is called; two limiters with the same name and prefix
            share their state (a non-empty str of at most 1024 bytes).
        prefix: the key prefix.
        max_identity_bytes: the longest identity accepted, in bytes once encoded (default
            1024, at most 64 KiB). A longer one raises
            :class:`~aioredispatterns.InvalidKeyError` before any command: every byte of
            an identity is stored in each of its keys and in the limiter's key cache, so
            hash long identities (an API key, a URL) yourself.

    Keys: ``<prefix>:ratelimit:{<n>:<name>:<identity>}:<index>:<kind>``, one per policy,
    where ``<n>`` is the name's length in bytes (so no name/identity split can collide).

    Cancellation: each decision is one atomic script; a caller cancelled after it ran
    loses the reply, not the decision (see :meth:`hit`). Nothing runs in the background.

    Raises:
        ConfigurationError: no policy, a non-policy, a bad name, prefix or
            ``max_identity_bytes``.
    """

    def __init__(
        self,
        client: AnyRedis,
        policies: Policy | Sequence[Policy],
        *,
        name: str = "default",
        prefix: str = DEFAULT_PREFIX,
        max_identity_bytes: int = MAX_NAME_BYTES,
    ) -> None:
        self._client = check_client(client)
        if isinstance(policies, _PolicyBase):
            items: tuple[object, ...] = (policies,)
        elif isinstance(policies, Sequence) and not isinstance(policies, str | bytes):
            items = tuple(policies)
        else:
            raise ConfigurationError(
                f"policies must be a policy or a sequence of them: {policies!r}"
            )
        if not items:
            raise ConfigurationError("a RateLimiter needs at least one policy")
        checked: list[Policy] = []
        for policy in items:
            if not isinstance(policy, _POLICY_TYPES):
                raise ConfigurationError(f"not a rate-limit policy: {policy!r}")
            checked.append(policy)
        if not isinstance(name, str):
            raise ConfigurationError(f"name must be a str, got {type(name).__name__}")
        check_name("name", name)
        self._prefix = check_prefix(prefix)
        self._max_identity_bytes = check_count(
            "max_identity_bytes", max_identity_bytes, minimum=1, maximum=_MAX_IDENTITY_BYTES
        )
        self._name = name
        self._counts = LimiterStats()
        # "<n>:<name>:" goes before the identity in the hash tag (see _space).
        self._tag_head = f"{len(name.encode())}:{name}:"
        self._tag_max_bytes = len(self._tag_head.encode()) + self._max_identity_bytes
        self._policies: tuple[Policy, ...] = tuple(checked)
        self._max_cost = min(p.size for p in checked)
        args: list[str] = []
        for policy in checked:
            args += [str(policy.kind), str(policy.size), repr(policy.interval_us)]
        self._args = tuple(args)
        self._hit_one = ("1", "1", *args)  # ARGV of the most common call, built once
        # identity -> its keys; building them (validation, hash tag) costs more than the
        # rest of a decision on the client. Bounded in entries and bytes: cleared when full.
        # Only valid identities get in, so a hit on the cache needs no check.
        self._key_cache: BoundedMemo[list[KeyT]] = BoundedMemo(
            _KEY_CACHE_SIZE, _KEY_CACHE_BYTES, _KEY_CACHE_MAX_ENTRY
        )

    @property
    def max_identity_bytes(self) -> int:
        """The longest identity accepted, in bytes once encoded."""
        return self._max_identity_bytes

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies every request must pass."""
        return self._policies

    def _keys(self, identity: KeyT) -> list[KeyT]:
        keys = self._key_cache.get(identity) if isinstance(identity, str | bytes) else None
        if keys is None:
            space = self._space(identity)
            keys = [space.key(i, p.tag) for i, p in enumerate(self._policies)]
            size = sys.getsizeof(identity) + sys.getsizeof(keys)
            size += sum(sys.getsizeof(k) for k in keys)
            self._key_cache.put(identity, keys, size)
        return keys

    def _space(self, identity: object) -> KeySpace:
        checked = check_name("identity", identity, max_bytes=self._max_identity_bytes)
        # The name's byte length goes first, so that ("a:b", "c") and ("a", "b:c") can
        # never share a key: the pair is always read back unambiguously.
        joined: KeyT
        if isinstance(checked, bytes):
            joined = self._tag_head.encode() + checked
        else:
            joined = self._tag_head + checked
        return keyspace(self._prefix, "ratelimit", joined, max_bytes=self._tag_max_bytes)

    def _check_cost(self, cost: object) -> int:
        cost = check_count("cost", cost, minimum=1)
        if cost > self._max_cost:
            raise ConfigurationError(
                f"cost {cost} exceeds the smallest capacity ({self._max_cost}): "
                "it could never be allowed"
            )
        return cost

    def _argv(self, mode: str, cost: object) -> Sequence[str]:
        if cost == 1 and mode == "1" and type(cost) is int:
            return self._hit_one
        return (mode, str(self._check_cost(cost)), *self._args)

    async def hit(self, identity: KeyT, cost: int = 1) -> RateLimitDecision:
        """Ask for ``cost`` units for ``identity``; consume them if every limit allows.

        Raises:
            InvalidKeyError: ``identity`` is empty, neither str nor bytes, not valid
                UTF-8 or longer than ``max_identity_bytes`` (before any command is sent).
            ConfigurationError: ``cost`` is not an int, below 1 or above the smallest
                size of the policies (before any command is sent).
            ConnectionFailed, CommandTimeout: the server did not answer.

        Cancellation: the script runs atomically on the server; if it ran before the
        caller was cancelled, the units stay consumed (the reply is lost).
        """
        # One await between the caller and the script: this is the hot path.
        keys = self._keys(identity)
        try:
            reply = await _DECIDE.run(self._client, keys, self._argv("1", cost))
        except RedisPatternsError as exc:
            self._count_error(exc)
            raise
        decision = _parse(reply, self._policies)
        counts = self._counts
        counts.decisions += 1
        if decision.allowed:
            counts.allowed += 1
        else:
            counts.denied += 1
        return decision

    async def peek(self, identity: KeyT, cost: int = 1) -> RateLimitDecision:
        """Whether ``cost`` units would be allowed now, without consuming or writing.

        ``remaining`` and ``reset_after`` describe the state as it is (nothing consumed).
        Cancellation: harmless; nothing is written.
        """
        keys = self._keys(identity)
        try:
            reply = await _DECIDE.run(self._client, keys, self._argv("0", cost))
        except RedisPatternsError as exc:
            self._count_error(exc)
            raise
        self._counts.peeks += 1
        return _parse(reply, self._policies)

    def _count_error(self, exc: RedisPatternsError) -> None:
        if isinstance(exc, ConfigurationError):
            return  # the caller's input, not the limiter's trouble
        self._counts.errors += 1
        # One line per failed decision at DEBUG (an outage would flood WARNING); the
        # caller gets the error and ``stats.errors`` counts it.
        logger.debug("rate-limit decision for %r failed: %s", self._name, exc)

    @property
    def stats(self) -> LimiterStats:
        """A snapshot of this limiter's counters (this process only)."""
        return dataclasses.replace(self._counts)

    # A timeout argument rather than fail_after(): knowing the deadline lets wait() give
    # up at once when the next chance lies beyond it, instead of sleeping in vain.
    async def wait(
        self,
        identity: KeyT,
        cost: int = 1,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> RateLimitDecision:
        """Hit until allowed, sleeping ``retry_after`` between tries; return the decision.

        Args:
            timeout: the most seconds to wait (``None``: no limit). When the next chance
                lies beyond it, this raises at once instead of sleeping in vain.

        Raises:
            RateLimitExceeded: not allowed within ``timeout`` (nothing consumed).
            ConfigurationError, InvalidKeyError: as :meth:`hit`, or a ``timeout`` that
                is not a number of seconds in ``[0, ten years]``.

        Cancellation: nothing is consumed while sleeping; a cancellation during the final,
        successful script loses the reply but the units stay consumed.
        """
        if timeout is not None:
            check_seconds("timeout", timeout, zero=True)
        checked = self._check_cost(cost)
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            decision = await self.hit(identity, checked)
            if decision.allowed:
                return decision
            if deadline is not None and anyio.current_time() + decision.retry_after > deadline:
                raise RateLimitExceeded(decision, f"not allowed within {timeout}s")
            # Never 0 here (_retry_after floors it), so this loop sleeps between hits.
            self._counts.waits += 1
            await anyio.sleep(decision.retry_after)

    async def reset(self, identity: KeyT) -> None:
        """Forget the state of ``identity``: its next request sees every limit full.

        Cancellation: the DEL either ran or did not; no partial state either way.
        """
        await execute(self._client, "DEL", *self._keys(identity))
