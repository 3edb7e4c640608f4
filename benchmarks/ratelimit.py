"""Rate-limit decisions per second: our policies vs `limits` vs a raw EVALSHA of the seed script.

Every operation decides one request for one of 1,000 identities (round robin), each limited
to 100 per second, so the load mixes allowed and denied decisions the way a busy API does.

Groups ``ratelimit c1`` / ``ratelimit c64``: the baseline is redis-py running the seed
document's token-bucket script by EVALSHA with the client's clock (what a user would write
from the seed); our rows decide on the server's clock through ``connect()``'s client;
the ``limits`` rows (moving window, fixed window; its default async Redis storage) are
skipped when ``limits`` is not installed (``pip install 'aioredispatterns[bench]'``).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from redis.asyncio import Redis

from aioredispatterns._bench import BenchEnv, Operation, Scenario
from aioredispatterns.ratelimit import (
    GCRA,
    FixedWindow,
    Policy,
    RateLimiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)

IDENTITIES = 1000
LIMIT = 100

# The seed document's script, verbatim in substance: client clock in ARGV[3], and no
# EXPIRE on the rejecting path (the bugs our script fixes).
SEED_TOKEN_BUCKET = b"""
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local refill_rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local data = redis.call('HMGET', key, 'tokens', 'last_refill')
local tokens = tonumber(data[1]) or limit
local last_refill = tonumber(data[2]) or now
local elapsed = now - last_refill
tokens = math.min(limit, tokens + elapsed * refill_rate)
if tokens < 1 then
redis.call('HSET', key, 'tokens', tokens, 'last_refill', now)
return 0
end
tokens = tokens - 1
redis.call('HSET', key, 'tokens', tokens, 'last_refill', now)
redis.call('EXPIRE', key, 3600)
return 1
"""

POLICIES: dict[str, Policy] = {
    "token bucket": TokenBucket(LIMIT, float(LIMIT)),
    "GCRA": GCRA(LIMIT, 1.0),
    "sliding log": SlidingWindowLog(LIMIT, 1.0),
    "sliding counter": SlidingWindowCounter(LIMIT, 1.0),
    "fixed window": FixedWindow(LIMIT, 1.0),
}


def _identities() -> Callable[[], str]:
    counter = itertools.cycle([f"user{i}" for i in range(IDENTITIES)])
    return lambda: next(counter)


def _seed_script(concurrency: int) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = Redis.from_url(env.url, max_connections=concurrency + 4)
        sha = hashlib.sha1(SEED_TOKEN_BUCKET).hexdigest()
        await client.script_load(SEED_TOKEN_BUCKET)
        identity = _identities()
        prefix = f"{env.prefix}:seed"

        async def operation() -> object:
            key = f"{prefix}:{identity()}"
            return await client.evalsha(sha, 1, key, LIMIT, LIMIT, time.time())

        try:
            yield operation
        finally:
            await client.aclose()

    return setup


def _ours(policy: Policy, concurrency: int, plain: bool = False) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # connect()'s client (bounded blocking pool, socket timeouts, retries) by default;
        # `plain`: the same redis-py client the baseline uses, to show the limiter's own cost.
        client: Any = (
            Redis.from_url(env.url, max_connections=concurrency + 4)
            if plain
            else env.client(max_connections=concurrency + 4)
        )
        limiter = RateLimiter(client, policy, name="bench", prefix=env.prefix)
        identity = _identities()
        try:
            yield lambda: limiter.hit(identity())
        finally:
            await client.aclose()

    return setup


def _limits(strategy: str) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

        storage = RedisStorage(env.url.replace("redis://", "async+redis://", 1))
        kind = MovingWindowRateLimiter if strategy == "moving" else FixedWindowRateLimiter
        limiter = kind(storage)
        item = RateLimitItemPerSecond(LIMIT)
        identity = _identities()
        try:
            yield lambda: limiter.hit(item, f"{env.prefix}:limits-{strategy}", identity())
        finally:
            # limits has no close(); disconnect its client's pool so no socket leaks.
            client = getattr(getattr(storage, "bridge", None), "storage", None)
            pool = getattr(client, "connection_pool", None)
            if pool is not None:
                pool.disconnect()
                await anyio.sleep(0.01)  # let the transports finish closing

    return setup


def _have_limits() -> bool:
    try:
        import coredis  # noqa: F401  (the default async Redis storage of limits)
        import limits.aio.storage  # noqa: F401
    except ImportError:
        return False
    return True


def scenarios(env: BenchEnv) -> list[Scenario]:
    rows: list[Scenario] = []
    for concurrency in (1, 64):
        group = f"ratelimit c{concurrency}"
        rows.append(
            Scenario(
                group,
                "redis-py EVALSHA seed token bucket",
                concurrency,
                _seed_script(concurrency),
                baseline=True,
            )
        )
        for name, policy in POLICIES.items():
            rows.append(Scenario(group, f"arp {name}", concurrency, _ours(policy, concurrency)))
        rows.append(
            Scenario(
                group,
                "arp token bucket, plain redis-py client",
                concurrency,
                _ours(POLICIES["token bucket"], concurrency, plain=True),
            )
        )
        if _have_limits():
            rows.append(Scenario(group, "limits moving window", concurrency, _limits("moving")))
            rows.append(Scenario(group, "limits fixed window", concurrency, _limits("fixed")))
    return rows
