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
from aioredispatterns.testing import borrowed_connections

US = 1_000_000


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
        lambda: FixedWindow(True, 1.0),  # type: ignore[arg-type]
        lambda: FixedWindow(5, "1"),  # type: ignore[arg-type]
    ],
)
def test_bad_policies_raise(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        make()


async def test_bad_calls_raise_before_any_command() -> None:
    # A client pointing at a closed port: any command would fail with ConnectionFailed.
    from aioredispatterns.testing import free_port

    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        limiter = RateLimiter(client, [TokenBucket(5, 1.0), FixedWindow(3, 1.0)])
        with pytest.raises(ConfigurationError, match="smallest capacity"):
            await limiter.hit("u", cost=4)
        for bad_cost in (0, -1, 1.0, True):
            with pytest.raises(ConfigurationError):
                await limiter.hit("u", cost=bad_cost)
        with pytest.raises(InvalidKeyError):
            await limiter.hit("")
        with pytest.raises(InvalidKeyError):
            await limiter.peek(b"")
        with pytest.raises(ConfigurationError):
            await limiter.wait("u", timeout=-1)
        with pytest.raises(ConfigurationError):
            RateLimiter(client, [])
        with pytest.raises(ConfigurationError):
            RateLimiter(client, [object()])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError):
            RateLimiter(client, GCRA(1, 1.0), name="")
        with pytest.raises(ConfigurationError):
            RateLimiter("redis://x", GCRA(1, 1.0))  # type: ignore[arg-type]
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
    limiter = RateLimiter(redis_client, FixedWindow(limit=2, window=0.2), prefix=key_prefix)
    decisions = [await limiter.hit("u") for _ in range(3)]
    allowed = [d.allowed for d in decisions]
    if allowed != [True, True, False]:  # a window boundary fell between the hits
        decisions = [await limiter.hit("u") for _ in range(3)]
        allowed = [d.allowed for d in decisions]
    assert allowed == [True, True, False]
    assert [d.remaining for d in decisions] == [1, 0, 0]
    denied = decisions[-1]
    boundary = (math.floor(denied.server_time / 0.2) + 1) * 0.2
    assert denied.retry_after == pytest.approx(boundary - denied.server_time, abs=2e-6)
    await anyio.sleep(denied.retry_after + 0.005)
    assert (await limiter.hit("u")).remaining == 1


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
        st.tuples(st.sampled_from([0.0, 0.0, 0.002, 0.01, 0.03]), st.integers(1, 2)),
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
        for gap, cost in schedule:
            if gap:
                await anyio.sleep(gap)
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
