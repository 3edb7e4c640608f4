"""Rate limiters against real servers: exact decisions, bounds, atomicity, TTLs, cancellation."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioredispatterns import ConfigurationError, InvalidKeyError, connect
from aioredispatterns._validate import MAX_SECONDS
from aioredispatterns.ratelimit import (
    GCRA,
    FixedWindow,
    Policy,
    RateLimitDecision,
    RateLimiter,
    RateLimitError,
    RateLimitExceeded,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from aioredispatterns.testing import borrowed_connections, command_calls

US = 1_000_000
#: The largest limit, capacity or burst a policy accepts (documented in ratelimit).
MAX_SIZE = 10**12


def us(decision: RateLimitDecision) -> int:
    return round(decision.server_time * US)


async def assert_every_key_has_ttl(client: Any, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    ttls = [await client.pttl(k) for k in keys]
    # -2: the key expired between SCAN and PTTL (fine); -1 would be a key without a TTL.
    assert all(t > 0 or t == -2 for t in ttls), dict(zip(keys, ttls, strict=True))


# --- bad input, before any command -------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBucket(0, 1.0),
        lambda: TokenBucket(5, 0),
        lambda: TokenBucket(5, -1.0),
        lambda: TokenBucket(5, math.inf),
        lambda: TokenBucket(1.5, 1.0),  # type: ignore[arg-type]
        lambda: GCRA(0, 1.0),
        lambda: GCRA(5, 0.0),
        lambda: GCRA(5, 1.0, burst=0),
        lambda: SlidingWindowLog(-1, 1.0),
        lambda: SlidingWindowLog(5, math.nan),
        lambda: SlidingWindowCounter(5, -2),
        lambda: FixedWindow(True, 1.0),
        lambda: FixedWindow(5, "1"),  # type: ignore[arg-type]
        # Periods beyond ten years: the server's µs arithmetic would overflow (these two
        # used to answer allowed=False, retry_after=0 and make wait() spin).
        lambda: GCRA(1, 1e15),
        lambda: FixedWindow(1, 1e15),
        lambda: SlidingWindowLog(1, 1e15),
        lambda: SlidingWindowCounter(1, 1e15),
        lambda: GCRA(1, MAX_SECONDS * 1.001),
        lambda: FixedWindow(1, math.inf),
        # Sizes beyond what the script computes exactly (2**63 reported remaining=0).
        lambda: TokenBucket(2**63, 1.0),
        lambda: TokenBucket(MAX_SIZE + 1, 1e6),
        lambda: GCRA(MAX_SIZE + 1, 1e7),
        lambda: GCRA(10, 1.0, burst=2**63),
        lambda: SlidingWindowLog(MAX_SIZE + 1, 1.0),
        lambda: FixedWindow(10**400, 1.0),
        # Rates: finite, > 0, at most one unit per µs, an empty bucket refilled in 10 years.
        lambda: TokenBucket(5, math.nan),
        lambda: TokenBucket(5, 2e6),
        lambda: TokenBucket(1, 1e-9),
        lambda: TokenBucket(MAX_SIZE, 1.0),
        lambda: GCRA(10**6, 0.5),  # less than a µs per unit
        lambda: GCRA(1, 1.0, burst=10**9),  # a full burst books 31 years ahead
        lambda: FixedWindow(1, 1e-7),  # a window below one µs
    ],
)
def test_bad_policies_raise(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBucket(MAX_SIZE, 1e6),
        lambda: TokenBucket(1, 1.001 / MAX_SECONDS),
        lambda: GCRA(MAX_SIZE, 1e6),
        lambda: GCRA(1, MAX_SECONDS),
        lambda: GCRA(10, MAX_SECONDS, burst=10),
        lambda: SlidingWindowLog(MAX_SIZE, MAX_SECONDS),
        lambda: SlidingWindowCounter(MAX_SIZE, 1e-6),
        lambda: FixedWindow(1, MAX_SECONDS),
    ],
)
def test_policies_at_the_bounds_are_accepted(make: Callable[[], object]) -> None:
    make()


async def test_bad_calls_raise_before_any_command() -> None:
    # A client pointing at a closed port: any command would fail with ConnectionFailed.
    from aioredispatterns.testing import free_port

    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        limiter = RateLimiter(client, [TokenBucket(5, 1.0), FixedWindow(3, 1.0)])
        with pytest.raises(ConfigurationError, match="smallest capacity"):
            await limiter.hit("u", cost=4)
        for bad_cost in (0, -1, 1.0, True, None, "1", 10**400):
            with pytest.raises(ConfigurationError):
                await limiter.hit("u", cost=bad_cost)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                await limiter.wait("u", cost=bad_cost)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            await limiter.hit("")
        with pytest.raises(InvalidKeyError):
            await limiter.peek(b"")
        with pytest.raises(InvalidKeyError):
            await limiter.hit(5)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            await limiter.hit("\udc80")  # a lone surrogate cannot be sent
        for bad_timeout in (-1, math.inf, math.nan, True, "1", MAX_SECONDS * 2):
            with pytest.raises(ConfigurationError):
                await limiter.wait("u", timeout=bad_timeout)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            RateLimiter(client, [])
        with pytest.raises(ConfigurationError):
            RateLimiter(client, [object()])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError):
            RateLimiter(client, 5)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            RateLimiter(client, GCRA(1, 1.0), name="")
        with pytest.raises(ConfigurationError):
            RateLimiter(client, GCRA(1, 1.0), name="n" * 1025)
        with pytest.raises(ConfigurationError):
            RateLimiter(client, GCRA(1, 1.0), name=b"bytes")  # type: ignore[arg-type]
        for bad_max in (0, 64 * 1024 + 1, True, 1.5, None):
            with pytest.raises(ConfigurationError):
                RateLimiter(client, GCRA(1, 1.0), max_identity_bytes=bad_max)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            RateLimiter("redis://x", GCRA(1, 1.0))  # type: ignore[arg-type]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(7, 1.0),
        GCRA(7, 60.0),
        GCRA(3, 60.0, burst=7),
        SlidingWindowLog(7, 60.0),
        SlidingWindowCounter(7, 60.0),
        FixedWindow(7, 60.0),
    ],
    ids=repr,
)
async def test_a_cost_above_the_limit_is_refused_on_every_policy(policy: Policy) -> None:
    """A cost that could never be admitted is bad input, on every policy alike."""
    from aioredispatterns.testing import free_port

    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        limiter = RateLimiter(client, policy)
        for method in (limiter.hit, limiter.peek, limiter.wait):
            with pytest.raises(ConfigurationError, match="smallest capacity"):
                await method("u", 8)
    finally:
        await client.aclose()


def test_errors_hierarchy() -> None:
    d = RateLimitDecision(False, 1, 0, 1.0, 1.0, 0.0)
    err = RateLimitExceeded(d)
    assert isinstance(err, RateLimitError)
    assert isinstance(err, TimeoutError)
    assert err.decision is d


# --- exact behaviour per policy (every matrix server) -------------------------------------


async def test_token_bucket_burst_then_refill(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, TokenBucket(capacity=3, rate=5.0), prefix=key_prefix)
    decisions = [await limiter.hit("u") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    denied = decisions[3]
    assert 0 < denied.retry_after <= 0.2
    assert denied.limit == 3
    await anyio.sleep(denied.retry_after + 0.01)
    assert (await limiter.hit("u")).allowed
    await assert_every_key_has_ttl(redis_client, key_prefix)


async def test_gcra_spacing(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, GCRA(limit=2, period=60.0), prefix=key_prefix)
    first, second, third = [await limiter.hit("u") for _ in range(3)]
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert (first.remaining, second.remaining) == (1, 0)
    # One cell every 30 s: the next request may pass ~30 s after the first.
    assert 29.9 < third.retry_after <= 30.0
    assert 59.9 < third.reset_after <= 60.0
    assert (await redis_client.pttl(limiter._keys("u")[0])) > 59_000


async def test_sliding_log_is_exact_per_window(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, SlidingWindowLog(limit=3, window=0.3), prefix=key_prefix)
    a = await limiter.hit("u", cost=2)
    await anyio.sleep(0.1)
    b = await limiter.hit("u")
    c = await limiter.hit("u")
    assert (a.allowed, b.allowed, c.allowed) == (True, True, False)
    # The two units of `a` leave the window first: retry when a is 0.3 s old.
    assert c.retry_after == pytest.approx(0.3 - (c.server_time - a.server_time), abs=2e-6)
    await anyio.sleep(c.retry_after)
    assert (await limiter.hit("u", cost=2)).allowed
    await assert_every_key_has_ttl(redis_client, key_prefix)


async def test_fixed_window_resets_at_boundary(redis_client: Any, key_prefix: str) -> None:
    window = 0.5
    limiter = RateLimiter(redis_client, FixedWindow(limit=2, window=window), prefix=key_prefix)
    for attempt in range(5):
        # Start each attempt just after a window boundary, under a fresh identity, so the
        # three hits share one window even on a loaded machine (else try the next one).
        now = (await limiter.peek("clock")).server_time
        await anyio.sleep(window - (now % window) + 0.005)
        identity = f"u{attempt}"
        decisions = [await limiter.hit(identity) for _ in range(3)]
        if decisions[-1].server_time // window == decisions[0].server_time // window:
            break
    allowed = [d.allowed for d in decisions]
    assert allowed == [True, True, False]
    assert [d.remaining for d in decisions] == [1, 0, 0]
    denied = decisions[-1]
    boundary = (math.floor(denied.server_time / window) + 1) * window
    assert denied.retry_after == pytest.approx(boundary - denied.server_time, abs=2e-6)
    await anyio.sleep(denied.retry_after + 0.005)
    assert (await limiter.hit(identity)).remaining == 1


async def test_sliding_counter_weights_previous_window(redis_client: Any, key_prefix: str) -> None:
    window = 0.4
    limiter = RateLimiter(redis_client, SlidingWindowCounter(10, window), prefix=key_prefix)
    first = await limiter.peek("u")
    # Start right after a window boundary so the sequence below stays in two windows.
    await anyio.sleep(window - (first.server_time % window) + 0.002)
    filled = await limiter.hit("u", cost=10)
    assert filled.allowed
    start = math.floor(filled.server_time / window) * window
    await anyio.sleep(start + window + window / 2 - filled.server_time)
    half = await limiter.peek("u", cost=1)
    frac = (half.server_time - (start + window)) / window
    assert half.remaining == math.floor(10 - 10 * (1 - frac) + 1e-9)
    assert half.allowed == (10 * (1 - frac) + 1 <= 10)


async def test_peek_never_writes_and_reset_forgets(redis_client: Any, key_prefix: str) -> None:
    policies: list[Policy] = [
        TokenBucket(2, 1.0),
        GCRA(2, 1.0),
        SlidingWindowLog(2, 1.0),
        SlidingWindowCounter(2, 1.0),
        FixedWindow(2, 1.0),
    ]
    limiter = RateLimiter(redis_client, policies, prefix=key_prefix)
    peeked = await limiter.peek("u", cost=2)
    assert peeked.allowed
    assert peeked.remaining == 2
    assert [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")] == []
    await limiter.hit("u", cost=2)
    assert not (await limiter.peek("u")).allowed
    assert len([k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")]) == 5
    await limiter.reset("u")
    assert [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")] == []
    assert (await limiter.hit("u", cost=2)).allowed


async def test_identities_and_names_are_independent(redis_client: Any, key_prefix: str) -> None:
    a = RateLimiter(redis_client, GCRA(1, 60.0), name="a", prefix=key_prefix)
    b = RateLimiter(redis_client, GCRA(1, 60.0), name="b", prefix=key_prefix)
    assert (await a.hit("x")).allowed
    assert not (await a.hit("x")).allowed
    assert (await a.hit(b"y")).allowed
    assert (await a.hit("{brace}")).allowed
    assert (await b.hit("x")).allowed


async def test_multi_limit_consumes_all_or_none(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(
        redis_client, [TokenBucket(5, 0.01), FixedWindow(3, 3600.0)], prefix=key_prefix
    )
    for _ in range(3):
        assert (await limiter.hit("u")).allowed
    denied = await limiter.hit("u")
    assert not denied.allowed
    assert [d.allowed for d in denied.per_limit] == [True, False]
    assert denied.limit == 3  # the binding (denying) limit
    # The bucket allowed, yet nothing was taken from it: 5 - 3 tokens, not 5 - 4.
    state = await limiter.peek("u")
    assert [d.remaining for d in state.per_limit] == [2, 0]
    # A cost the window admits but the bucket (2 left) does not: none consumed either.
    await limiter.reset("u")
    assert (await limiter.hit("u", cost=3)).allowed
    both = await limiter.hit("u", cost=3)
    assert not both.allowed
    state = await limiter.peek("u")
    assert [d.remaining for d in state.per_limit] == [2, 0]  # 5 - 3 tokens, 3 - 3 units
    assert both.per_limit[0].retry_after > both.per_limit[1].retry_after or (
        both.retry_after == max(d.retry_after for d in both.per_limit)
    )
    await assert_every_key_has_ttl(redis_client, key_prefix)


async def test_wait_sleeps_until_allowed_or_gives_up(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, TokenBucket(1, 10.0), prefix=key_prefix)
    assert (await limiter.hit("u")).allowed
    started = anyio.current_time()
    decision = await limiter.wait("u", timeout=1.0)
    assert decision.allowed
    assert 0.05 < anyio.current_time() - started < 0.5
    # The next token is ~0.1 s away: a 0.01 s timeout fails at once and takes nothing.
    started = anyio.current_time()
    with pytest.raises(RateLimitExceeded) as info:
        await limiter.wait("u", timeout=0.01)
    assert anyio.current_time() - started < 0.05
    assert info.value.decision.retry_after > 0.01
    assert (await limiter.wait("u")).allowed


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(3, 15.0),
        GCRA(3, 0.2),
        SlidingWindowLog(3, 0.2),
        SlidingWindowCounter(3, 0.2),
        FixedWindow(3, 0.2),
    ],
    ids=lambda p: type(p).__name__,
)
async def test_retry_after_is_when_the_request_passes(
    redis_client: Any, key_prefix: str, policy: Policy
) -> None:
    limiter = RateLimiter(redis_client, policy, prefix=key_prefix)
    denied = await limiter.hit("u", cost=2)
    while denied.allowed:
        denied = await limiter.hit("u", cost=2)
    # Not too late: a later peek's wait shrinks by exactly the server time that passed.
    await anyio.sleep(denied.retry_after / 3)
    later = await limiter.peek("u", cost=2)
    if not later.allowed:
        elapsed = later.server_time - denied.server_time
        assert later.retry_after == pytest.approx(denied.retry_after - elapsed, abs=5e-6)
    # Not too early: after retry_after, the same request passes.
    await anyio.sleep(max(0.0, denied.retry_after - (later.server_time - denied.server_time)))
    assert (await limiter.hit("u", cost=2)).allowed


async def test_ttl_set_on_every_path(redis_client: Any, key_prefix: str) -> None:
    """Allowed, denied, peeked, multi-denied: afterwards no key lives without a TTL."""
    policies: list[Policy] = [
        TokenBucket(3, 0.001),
        GCRA(3, 3000.0),
        SlidingWindowLog(3, 3000.0),
        SlidingWindowCounter(3, 3000.0),
        FixedWindow(3, 3000.0),
    ]
    for i, policy in enumerate(policies):
        limiter = RateLimiter(redis_client, policy, name=f"p{i}", prefix=key_prefix)
        for cost in (1, 2, 1, 3, 1):
            await limiter.hit("u", cost)
            await limiter.peek("u", cost)
    multi = RateLimiter(redis_client, policies, name="all", prefix=key_prefix)
    for cost in (3, 1, 2):
        await multi.hit("u", cost)
    await assert_every_key_has_ttl(redis_client, key_prefix)
    # The TTL is when the state no longer matters (bucket refilled after 3 / 0.001 s).
    bucket_ttl = await redis_client.pttl(
        RateLimiter(redis_client, policies[0], name="p0", prefix=key_prefix)._keys("u")[0]
    )
    assert 2_990_000 < bucket_ttl <= 3_000_000


# --- costs up to the limit, sizes and spans at their bounds -----------------------------


async def script_calls(client: Any) -> int:
    """How many scripts the server (every primary of a cluster) has run so far."""
    return await command_calls(client, "evalsha") + await command_calls(client, "eval")


def _expect_refused_until_a_boundary(
    policy: Policy, first: RateLimitDecision, denied: RateLimitDecision
) -> None:
    """``denied`` should be refused; a fixed window may have turned over in between."""
    if denied.allowed:
        assert isinstance(policy, FixedWindow)
        window = round(policy.window * US)
        assert us(first) // window != us(denied) // window
        return
    assert denied.retry_after > 0
    assert denied.remaining == 0


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(10_000, 0.01),
        GCRA(10_000, 60.0),
        GCRA(100, 60.0, burst=10_000),
        SlidingWindowLog(10_000, 60.0),
        SlidingWindowCounter(10_000, 3600.0),
        FixedWindow(10_000, 3600.0),
    ],
    ids=repr,
)
async def test_cost_equal_to_the_limit_is_admitted_on_every_policy(
    redis_client: Any, key_prefix: str, policy: Policy
) -> None:
    limiter = RateLimiter(redis_client, policy, prefix=key_prefix)
    fresh = await limiter.peek("u", cost=10_000)
    assert (fresh.allowed, fresh.remaining) == (True, 10_000)
    first = await limiter.hit("u", cost=10_000)
    assert (first.allowed, first.remaining) == (True, 0)
    _expect_refused_until_a_boundary(policy, first, await limiter.hit("u"))
    await assert_every_key_has_ttl(redis_client, key_prefix)


async def test_sliding_log_takes_any_cost_up_to_its_limit(
    redis_client: Any, key_prefix: str
) -> None:
    """SlidingWindowLog(10000, 60).hit(cost=4000) used to fail (Lua unpack limit)."""
    limiter = RateLimiter(redis_client, SlidingWindowLog(10_000, 60.0), prefix=key_prefix)
    key = limiter._keys("u")[0]
    decisions = [await limiter.hit("u", cost) for cost in (4000, 4000, 4000, 2000, 1)]
    assert [d.allowed for d in decisions] == [True, True, False, True, False]
    assert [d.remaining for d in decisions] == [6000, 2000, 2000, 0, 0]
    # One member per admitted hit, whatever its cost: no per-unit work on the server.
    assert await redis_client.zcard(key) == 3
    # The refused 4000 waits for the first hit to leave (it frees 4000 >= 2000 needed).
    refused = decisions[2]
    assert refused.retry_after == pytest.approx(
        60.0 - (refused.server_time - decisions[0].server_time), abs=2e-6
    )
    # The whole limit at once on a fresh identity, then nothing more.
    assert (await limiter.hit("v", cost=10_000)).allowed
    assert not (await limiter.hit("v")).allowed
    assert await redis_client.zcard(limiter._keys("v")[0]) == 1


async def test_sliding_log_huge_cost_is_one_member(redis_client: Any, key_prefix: str) -> None:
    """cost=10**6 used to add a million members in one script (a ~1 s server stall)."""
    limiter = RateLimiter(redis_client, SlidingWindowLog(MAX_SIZE, 60.0), prefix=key_prefix)
    for cost in (10**6, MAX_SIZE - 10**6):
        assert (await limiter.hit("u", cost)).allowed
    assert await redis_client.zcard(limiter._keys("u")[0]) == 2
    refused = await limiter.hit("u")
    assert not refused.allowed
    assert (await limiter.peek("u")).remaining == 0


async def test_sliding_log_retry_after_finds_the_hits_that_must_leave(
    redis_client: Any, key_prefix: str
) -> None:
    """With hits of several costs, a refused request waits exactly for the oldest hits
    whose units, once out of the window, make room for it (and no longer)."""
    window = 60.0
    limiter = RateLimiter(redis_client, SlidingWindowLog(10, window), prefix=key_prefix)
    costs = [3, 1, 2, 1, 1]
    hits = []
    for cost in costs:
        hits.append(await limiter.hit("u", cost))
        await anyio.sleep(0.002)  # distinct server times
    assert all(d.allowed for d in hits)
    in_window = sum(costs)  # 8 of 10
    prefix_sums = [sum(costs[: i + 1]) for i in range(len(costs))]
    for cost in range(3, 11):
        need = in_window + cost - 10  # units that must leave first
        leaving = next(i for i, total in enumerate(prefix_sums) if total >= need)
        for decision in (await limiter.peek("u", cost), await limiter.hit("u", cost)):
            assert not decision.allowed
            expected = hits[leaving].server_time + window - decision.server_time
            assert decision.retry_after == pytest.approx(expected, abs=2e-6), (cost, leaving)
    assert await redis_client.zcard(limiter._keys("u")[0]) == len(costs)  # nothing taken


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(MAX_SIZE, 1e6),
        GCRA(MAX_SIZE, 1e6),
        SlidingWindowLog(MAX_SIZE, 60.0),
        SlidingWindowCounter(MAX_SIZE, 3600.0),
        FixedWindow(MAX_SIZE, 3600.0),
    ],
    ids=lambda p: type(p).__name__,
)
async def test_largest_sizes_are_counted_exactly(
    redis_client: Any, key_prefix: str, policy: Policy
) -> None:
    """TokenBucket(2**63, 1.0) used to report remaining=0 on a fresh identity."""
    limiter = RateLimiter(redis_client, policy, prefix=key_prefix)
    assert (await limiter.peek("u")).remaining == MAX_SIZE
    # A fresh identity's first hit is exact to the unit, at the top of the range.
    assert (await limiter.hit("u")).remaining == MAX_SIZE - 1
    assert (await limiter.hit("v", cost=MAX_SIZE - 1)).remaining == 1
    # The whole size at once, then the whole size again is refused.
    first = await limiter.hit("w", cost=MAX_SIZE)
    assert (first.allowed, first.remaining) == (True, 0)
    again = await limiter.hit("w", cost=MAX_SIZE)
    if isinstance(policy, FixedWindow) and again.allowed:
        assert us(first) // (3600 * US) != us(again) // (3600 * US)  # a new window
    else:
        assert not again.allowed
        assert again.retry_after > 0
    assert await redis_client.pttl(limiter._keys("w")[0]) > 0


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(1, 1.001 / MAX_SECONDS),
        GCRA(1, MAX_SECONDS),
        GCRA(1000, MAX_SECONDS),
        SlidingWindowLog(1, MAX_SECONDS),
        SlidingWindowCounter(1, MAX_SECONDS),
        FixedWindow(1, MAX_SECONDS),
    ],
    ids=repr,
)
async def test_longest_spans_refuse_with_a_real_wait(
    redis_client: Any, key_prefix: str, policy: Policy
) -> None:
    """Ten-year periods still answer exact waits; wait() sleeps instead of spinning."""
    limiter = RateLimiter(redis_client, policy, prefix=key_prefix)
    first = await limiter.hit("u", cost=policy.size)
    assert first.allowed
    refused = await limiter.hit("u")
    assert not refused.allowed
    # The next unit is years away (a fixed window: up to the end of an epoch-aligned
    # window; a sliding counter: up to two windows), never 0 and never overflowed.
    assert 0 < refused.retry_after <= 2 * MAX_SECONDS
    if isinstance(policy, TokenBucket | GCRA | SlidingWindowLog):
        # One unit's interval (bucket, GCRA) or the window (log), minus the time since.
        expected = policy.interval_us / US
        elapsed = refused.server_time - first.server_time
        assert refused.retry_after == pytest.approx(expected - elapsed, rel=1e-9, abs=1e-5)
    for key in limiter._keys("u"):
        assert await redis_client.pttl(key) > 0
    before = await script_calls(redis_client)
    with anyio.move_on_after(0.5):
        await limiter.wait("u")
    assert await script_calls(redis_client) - before <= 2


async def test_wait_never_spins_on_a_refusal_without_a_wait(
    redis_client: Any, key_prefix: str
) -> None:
    """The script's answer when its arithmetic overflowed (GCRA(1, 1e15) used to get
    there): refused with a wait of 0. wait() sent 17,596 commands a second on it."""
    limiter = RateLimiter(redis_client, GCRA(1, 60.0), prefix=key_prefix)
    # Forge the policy arguments beyond the bounds the constructor enforces: a size of 0
    # and an interval of 1e21 µs, so the wait (1e21 µs) overflows the integer reply.
    limiter._hit_one = ("1", "1", "2", "0", "1e+21")
    refused = await limiter.hit("u")
    assert not refused.allowed
    assert refused.retry_after > 0  # the floor, not "retry now"
    before = await script_calls(redis_client)
    with anyio.move_on_after(1.0):
        await limiter.wait("u")
    assert await script_calls(redis_client) - before <= 12  # a 0.1 s floor: ~10


# --- identities ---------------------------------------------------------------------------


async def test_identity_size_is_bounded_before_any_command(
    redis_client: Any, key_prefix: str
) -> None:
    """A 1 MiB identity used to cost ~2.4 MiB per policy on the server, and stay cached."""
    from aioredispatterns.testing import free_port

    huge = "x" * (1 << 20)
    closed = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        limiter = RateLimiter(closed, [GCRA(1, 60.0), SlidingWindowLog(1, 60.0)])
        for identity in (huge, huge.encode(), "x" * 1025, "é" * 513, b"x" * 1025):
            for call in (limiter.hit, limiter.peek, limiter.wait, limiter.reset):
                with pytest.raises(InvalidKeyError, match="1024"):
                    await call(identity)
        assert not limiter._key_cache
    finally:
        await closed.aclose()
    # On a real server: nothing runs, nothing is written.
    limiter = RateLimiter(redis_client, GCRA(1, 60.0), prefix=key_prefix)
    before = await script_calls(redis_client)
    with pytest.raises(InvalidKeyError):
        await limiter.hit(huge)
    assert await script_calls(redis_client) == before
    assert [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")] == []
    # Up to the limit is fine, in bytes once encoded; the limit can be raised.
    assert (await limiter.hit("x" * 1024)).allowed
    assert (await limiter.hit("é" * 512)).allowed
    roomy = RateLimiter(
        redis_client, GCRA(1, 60.0), prefix=key_prefix, max_identity_bytes=64 * 1024
    )
    assert (await roomy.hit("y" * 64 * 1024)).allowed
    with pytest.raises(InvalidKeyError):
        await roomy.hit("y" * (64 * 1024 + 1))


async def test_key_cache_is_bounded_in_bytes() -> None:
    import sys

    from aioredispatterns import ratelimit
    from aioredispatterns.testing import free_port

    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        await _fill_the_key_cache(client, ratelimit._KEY_CACHE_BYTES, sys.getsizeof)
    finally:
        await client.aclose()


async def _fill_the_key_cache(client: Any, budget: int, sizeof: Callable[[object], int]) -> None:
    limiter = RateLimiter(
        client,
        [GCRA(1, 60.0), SlidingWindowLog(1, 60.0), FixedWindow(1, 60.0)],
        max_identity_bytes=64 * 1024,
    )

    def cached_bytes() -> int:
        return sum(
            sizeof(i) + sizeof(keys) + sum(sizeof(k) for k in keys)
            for i, keys in limiter._key_cache.items()
        )

    for n in range(3000):  # ~1 KiB identities: the byte budget binds before the count
        limiter._keys(f"{n:04d}" + "i" * 1020)
        assert limiter._key_cache.bytes <= budget
        if n % 100 == 0:
            assert cached_bytes() == limiter._key_cache.bytes
    assert 0 < len(limiter._key_cache) < 3000
    limiter._keys("hot")
    limiter._keys("z" * 64 * 1024)  # too big to cache: it does not flush the hot ones
    assert "hot" in limiter._key_cache
    assert "z" * 64 * 1024 not in limiter._key_cache
    # Keys built for a cached identity are the same as for a fresh one.
    assert limiter._keys("hot") == RateLimiter(client, limiter.policies)._keys("hot")


# --- bounds (hypothesis, real servers) --------------------------------------------------


def _admitted(decisions: Sequence[tuple[RateLimitDecision, int]]) -> list[tuple[int, int]]:
    return sorted((us(d), cost) for d, cost in decisions if d.allowed)


def check_bound(policy: Policy, decisions: Sequence[tuple[RateLimitDecision, int]]) -> None:
    admitted = _admitted(decisions)
    times = [t for t, _ in admitted]
    costs = [c for _, c in admitted]
    if isinstance(policy, TokenBucket | GCRA):
        if isinstance(policy, TokenBucket):
            burst, per_us = policy.capacity, policy.rate / US
        else:
            burst, per_us = policy.size, policy.limit / (policy.period * US)
        for i in range(len(admitted)):
            total = 0
            for j in range(i, len(admitted)):
                total += costs[j]
                bound = burst + per_us * (times[j] - times[i])
                assert total <= bound + 1e-6, (policy, i, j, total, bound)
        return
    window = round(policy.window * US)
    if isinstance(policy, SlidingWindowLog):
        for j in range(len(admitted)):
            inside = sum(c for t, c in admitted if times[j] - window < t <= times[j])
            assert inside <= policy.limit, (policy, j, inside)
        return
    per_window: dict[int, int] = {}
    for t, c in admitted:
        per_window[t // window] = per_window.get(t // window, 0) + c
    assert max(per_window.values(), default=0) <= policy.limit, (policy, per_window)
    if isinstance(policy, SlidingWindowCounter):
        for j in range(len(admitted)):
            inside = sum(c for t, c in admitted if times[j] - window < t <= times[j])
            assert inside < 2 * policy.limit, (policy, j, inside)


def _policy_strategy() -> st.SearchStrategy[Policy]:
    size = st.integers(2, 6)
    window = st.sampled_from([0.05, 0.08, 0.12])
    return st.one_of(
        st.builds(TokenBucket, size, st.sampled_from([20.0, 50.0, 100.0])),
        st.builds(GCRA, size, window, st.none() | size),
        st.builds(SlidingWindowLog, size, window),
        st.builds(SlidingWindowCounter, size, window),
        st.builds(FixedWindow, size, window),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    policy=_policy_strategy(),
    schedule=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.002, 0.01, 0.03]),
            st.integers(1, 2) | st.integers(1, 6),
        ),
        min_size=1,
        max_size=25,
    ),
)
async def test_admitted_never_exceeds_bound(
    redis_url: str, policy: Policy, schedule: list[tuple[float, int]]
) -> None:
    client = connect(redis_url)
    limiter = RateLimiter(client, policy, prefix=f"h{uuid.uuid4().hex[:10]}")
    decisions: list[tuple[RateLimitDecision, int]] = []
    try:
        for gap, wanted in schedule:
            if gap:
                await anyio.sleep(gap)
            cost = min(wanted, policy.size)  # a larger cost is bad input
            decisions.append((await limiter.hit("u", cost), cost))
    finally:
        await client.aclose()
    assert decisions[0][0].allowed  # a fresh limit admits (cost <= its size)
    check_bound(policy, decisions)


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(8, 100.0),
        GCRA(8, 0.08),
        SlidingWindowLog(8, 0.08),
        SlidingWindowCounter(8, 0.08),
        FixedWindow(8, 0.08),
    ],
    ids=lambda p: type(p).__name__,
)
async def test_bound_holds_with_8_concurrent_clients(redis_url: str, policy: Policy) -> None:
    """8 clients on separate connections race on one identity: still within the bound."""
    prefix = f"c{uuid.uuid4().hex[:10]}"
    clients = [connect(redis_url) for _ in range(8)]
    decisions: list[tuple[RateLimitDecision, int]] = []
    try:

        async def worker(client: Any, seed: int) -> None:
            limiter = RateLimiter(client, policy, prefix=prefix)
            for i in range(40):
                cost = 1 + (seed + i) % 2
                decisions.append((await limiter.hit("shared", cost), cost))
                if i % 7 == seed % 7:
                    await anyio.sleep(0.004)

        async with anyio.create_task_group() as tg:
            for n, client in enumerate(clients):
                tg.start_soon(worker, client, n)
    finally:
        for client in clients:
            await client.aclose()
    assert len(decisions) == 320
    admitted = sum(1 for d, _ in decisions if d.allowed)
    assert 0 < admitted < 320  # the limit was reached and also admitted requests
    check_bound(policy, decisions)


# --- cancellation and cluster -------------------------------------------------------------


async def test_cancelled_hits_leak_nothing(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(
        redis_client, [SlidingWindowLog(1000, 60.0), GCRA(1000, 60.0)], prefix=key_prefix
    )
    # Open the pool's connections first: redis-py leaks the socket of a connection whose
    # connect() is cancelled half-way (ResourceWarning), which is not what this test is about.
    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(limiter.peek, f"u{i % 5}")
    with anyio.move_on_after(0.002):
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(limiter.hit, f"u{i % 5}")
    # Cancelled waiters leave a usable pool: no connection is held, the next hit works,
    # and every unit the server took is visible and bounded by a TTL.
    assert not borrowed_connections(redis_client)
    decision = await limiter.hit("u0")
    assert decision.allowed
    await assert_every_key_has_ttl(redis_client, key_prefix)
    taken = sum([await redis_client.zcard(limiter._keys(f"u{i}")[0]) for i in range(5)], start=0)
    assert 1 <= taken <= 201


# Policies whose next unit is a full 30 s away whenever the first hit lands (a fixed
# window's epoch-aligned boundary could fall inside the 50 ms and let the wait succeed).
@pytest.mark.parametrize("policy", [GCRA(1, 30.0), SlidingWindowLog(1, 30.0)], ids=repr)
async def test_cancelled_wait_consumes_nothing(
    redis_client: Any, key_prefix: str, policy: Policy
) -> None:
    limiter = RateLimiter(redis_client, policy, prefix=key_prefix)
    assert (await limiter.hit("u")).allowed
    key = limiter._keys("u")[0]
    before = await redis_client.dump(key)  # the serialized state, whatever its type
    with anyio.move_on_after(0.05) as scope:
        await limiter.wait("u")
    assert scope.cancelled_caught
    assert await redis_client.dump(key) == before


@pytest.mark.cluster
async def test_multi_limit_on_cluster(cluster_client: Any) -> None:
    limiter = RateLimiter(
        cluster_client,
        [GCRA(3, 60.0), SlidingWindowLog(2, 60.0), FixedWindow(5, 60.0)],
        prefix=f"k{uuid.uuid4().hex[:8]}",
    )
    for identity in ("alice", "bob", "carol"):
        assert [(await limiter.hit(identity)).allowed for _ in range(3)] == [True, True, False]
        await limiter.reset(identity)
        assert (await limiter.peek(identity)).remaining == 2


@pytest.mark.replication
async def test_replica_gets_the_same_state_on_redis_6_2() -> None:
    """TIME inside a writing script is fine on 6.2: writes replicate as effects.

    The replica ends up with the very state the primary decided (and the TTL), so a
    failover does not hand out a fresh quota.
    """
    from aioredispatterns.testing import (
        ServerNotAvailable,
        find_server_binary,
        start_replica_pair,
    )

    try:
        binary = find_server_binary("redis-6.2")
    except ServerNotAvailable:
        pytest.skip("no redis-6.2 binary")
    primary, replica = start_replica_pair(binary, name="rl-6.2")
    clients = [connect(primary.url), connect(replica.url)]
    try:
        limiter = RateLimiter(
            clients[0], [TokenBucket(3, 0.01), SlidingWindowLog(3, 600.0)], name="repl"
        )
        for _ in range(4):
            await limiter.hit("u")
        await clients[0].execute_command("WAIT", 1, 5000)
        for key in limiter._keys("u"):
            # DUMP: the serialized value, the same bytes on both if the state is the same.
            assert await clients[1].dump(key) == await clients[0].dump(key)
            assert await clients[1].pttl(key) > 0
        on_replica = RateLimiter(clients[1], limiter.policies, name="repl")
        assert not (await on_replica.peek("u")).allowed  # peek never writes: fine on a replica
    finally:
        for client in clients:
            await client.aclose()
        replica.stop()
        primary.stop()


async def test_name_and_identity_never_share_keys(redis_client: Any, key_prefix: str) -> None:
    policy = FixedWindow(1, 60.0)
    first = RateLimiter(redis_client, policy, name="a:b", prefix=key_prefix)
    second = RateLimiter(redis_client, policy, name="a", prefix=key_prefix)
    assert first._keys("c") != second._keys("b:c")
    assert (await first.hit("c")).allowed
    assert (await second.hit("b:c")).allowed  # its own limit, not the first one's
    as_bytes = [k if isinstance(k, bytes) else k.encode() for k in first._keys("c")]
    assert as_bytes == first._keys(b"c")  # str and bytes name the same Redis key
