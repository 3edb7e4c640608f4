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
log a sorted set, the counter policies a short string. Every key written gets a TTL in
the same script (when it would expire, the limit is back to its full quota, so expiry
loses nothing). Peeks write nothing; a denied hit consumes nothing (a sliding log does
drop the entries that have left its window, which changes no decision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, TypeAlias

import anyio

from ._commands import execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, KeySpace, KeyT, check_key, check_prefix, keyspace
from ._scripts import Script
from .errors import ConfigurationError, RedisPatternsError

__all__ = (
    "FixedWindow",
    "GCRA",
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


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive int, got {value!r}")
    return value


def _positive_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds * _US < 1:
        raise ConfigurationError(f"{what} must be finite and at least 1 microsecond: {value!r}")
    return seconds


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
        ConfigurationError: ``capacity`` is not a positive int or ``rate`` not positive.
    """

    capacity: int
    rate: float
    kind: ClassVar[int] = 1
    tag: ClassVar[str] = "tb"

    def __post_init__(self) -> None:
        _positive_int(self.capacity, "capacity")
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise ConfigurationError(f"rate must be a number, got {self.rate!r}")
        if not math.isfinite(self.rate) or self.rate <= 0:
            raise ConfigurationError(f"rate must be positive and finite, got {self.rate!r}")
        _positive_seconds(1.0 / self.rate, "1 / rate")

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
        ConfigurationError: a non-positive limit, period or burst.
    """

    limit: int
    period: float
    burst: int | None = None
    kind: ClassVar[int] = 2
    tag: ClassVar[str] = "gcra"

    def __post_init__(self) -> None:
        _positive_int(self.limit, "limit")
        _positive_seconds(self.period, "period")
        if self.burst is not None:
            _positive_int(self.burst, "burst")
        _positive_seconds(self.period / self.limit, "period / limit")

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
        _positive_int(self.limit, "limit")
        _positive_seconds(self.window, "window")

    @property
    def size(self) -> int:
        return self.limit

    @property
    def interval_us(self) -> float:
        return float(round(self.window * _US))


@dataclass(frozen=True, slots=True)
class SlidingWindowLog(_WindowPolicy):
    """Exact sliding window: at most ``limit`` units in any ``window`` seconds.

    State: a sorted set with one member per admitted unit (memory grows with ``limit``).

    Raises:
        ConfigurationError: a non-positive limit or window.
    """

    limit: int
    window: float
    kind: ClassVar[int] = 3
    tag: ClassVar[str] = "log"


@dataclass(frozen=True, slots=True)
class SlidingWindowCounter(_WindowPolicy):
    """Approximate sliding window from the current and previous fixed windows' counts.

    The previous window's count is weighted by how much of it the sliding window still
    covers. Bound: at most ``limit`` per aligned window, and fewer than ``2 * limit`` in any
    ``window`` seconds (the estimate assumes the previous window's traffic was even).
    State: one short string (window, count, previous count), whatever the limit.

    Raises:
        ConfigurationError: a non-positive limit or window.
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
        ConfigurationError: a non-positive limit or window.
    """

    limit: int
    window: float
    kind: ClassVar[int] = 5
    tag: ClassVar[str] = "fw"


Policy: TypeAlias = TokenBucket | GCRA | SlidingWindowLog | SlidingWindowCounter | FixedWindow


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
        retry_after: seconds until a request of the same cost could pass (0 if allowed).
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
            0.0 if allowed or retry_us <= 0 else retry_us / _US,
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
                retry_after=max(0, retry_us) / _US if ok != 1 else 0.0,
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


_KEY_CACHE_SIZE = 4096


class RateLimiter:
    """Rate limits for many identities (users, IPs, API keys) under one name.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        policies: one policy, or several that must all allow a request (for example
            ``[GCRA(10, 1.0), FixedWindow(1000, 3600)]``); they are decided atomically.
        name: what this limiter is called; two limiters with the same name and prefix
            share their state.
        prefix: the key prefix.

    Keys: ``<prefix>:ratelimit:{<n>:<name>:<identity>}:<index>:<kind>``, one per policy,
    where ``<n>`` is the name's length in bytes (so no name/identity split can collide).

    Cancellation: each decision is one atomic script; a caller cancelled after it ran
    loses the reply, not the decision (see :meth:`hit`). Nothing runs in the background.

    Raises:
        ConfigurationError: no policy, a non-policy, or a bad name or prefix.
    """

    def __init__(
        self,
        client: AnyRedis,
        policies: Policy | Sequence[Policy],
        *,
        name: str = "default",
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._client = check_client(client)
        items = (policies,) if isinstance(policies, _PolicyBase) else tuple(policies)
        if not items:
            raise ConfigurationError("a RateLimiter needs at least one policy")
        for policy in items:
            if not isinstance(policy, _PolicyBase):
                raise ConfigurationError(f"not a rate-limit policy: {policy!r}")
        if not isinstance(name, str) or not name:
            raise ConfigurationError("name must be a non-empty str")
        self._prefix = check_prefix(prefix)
        self._name = name
        self._policies: tuple[Policy, ...] = items
        self._max_cost = min(p.size for p in items)
        args: list[str] = []
        for policy in items:
            args += [str(policy.kind), str(policy.size), repr(policy.interval_us)]
        self._args = tuple(args)
        self._hit_one = ("1", "1", *args)  # ARGV of the most common call, built once
        # identity -> its keys; building them (validation, hash tag) costs more than the
        # rest of a decision on the client. Bounded: cleared when full.
        self._key_cache: dict[KeyT, list[KeyT]] = {}

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies every request must pass."""
        return self._policies

    def _keys(self, identity: KeyT) -> list[KeyT]:
        keys = self._key_cache.get(identity) if isinstance(identity, str | bytes) else None
        if keys is None:
            space = self._space(identity)
            keys = [space.key(i, p.tag) for i, p in enumerate(self._policies)]
            if len(self._key_cache) >= _KEY_CACHE_SIZE:
                self._key_cache.clear()
            self._key_cache[identity] = keys
        return keys

    def _space(self, identity: object) -> KeySpace:
        checked = check_key(identity, "identity")
        # The name's byte length goes first, so that ("a:b", "c") and ("a", "b:c") can
        # never share a key: the pair is always read back unambiguously.
        name = self._name.encode()
        joined: KeyT
        if isinstance(checked, bytes):
            joined = b"%d:%s:%s" % (len(name), name, checked)
        else:
            joined = f"{len(name)}:{self._name}:{checked}"
        return keyspace(self._prefix, "ratelimit", joined)

    def _check_cost(self, cost: object) -> int:
        cost = _positive_int(cost, "cost")
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
            ConfigurationError: empty identity, or a cost below 1 or above a capacity
                (before any command is sent).
            ConnectionFailed, CommandTimeout: the server did not answer.

        Cancellation: the script runs atomically on the server; if it ran before the
        caller was cancelled, the units stay consumed (the reply is lost).
        """
        # One await between the caller and the script: this is the hot path.
        keys = self._keys(identity)
        reply = await _DECIDE.run(self._client, keys, self._argv("1", cost))
        return _parse(reply, self._policies)

    async def peek(self, identity: KeyT, cost: int = 1) -> RateLimitDecision:
        """Whether ``cost`` units would be allowed now, without consuming or writing.

        ``remaining`` and ``reset_after`` describe the state as it is (nothing consumed).
        Cancellation: harmless; nothing is written.
        """
        keys = self._keys(identity)
        reply = await _DECIDE.run(self._client, keys, self._argv("0", cost))
        return _parse(reply, self._policies)

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

        Cancellation: nothing is consumed while sleeping; a cancellation during the final,
        successful script loses the reply but the units stay consumed.
        """
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise ConfigurationError(f"timeout must be None or >= 0, got {timeout!r}")
        checked = self._check_cost(cost)
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            decision = await self.hit(identity, checked)
            if decision.allowed:
                return decision
            if deadline is not None and anyio.current_time() + decision.retry_after > deadline:
                raise RateLimitExceeded(decision, f"not allowed within {timeout}s")
            await anyio.sleep(decision.retry_after)

    async def reset(self, identity: KeyT) -> None:
        """Forget the state of ``identity``: its next request sees every limit full.

        Cancellation: the DEL either ran or did not; no partial state either way.
        """
        await execute(self._client, "DEL", *self._keys(identity))
