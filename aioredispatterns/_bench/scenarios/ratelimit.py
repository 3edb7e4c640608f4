"""Rate-limit decisions per second: our policies vs ``limits`` vs a raw EVALSHA of the seed script.

Every operation decides one request for one of 1,000 identities (round robin), each limited
to 100 per second, so the load mixes allowed and denied decisions the way a busy API does.

Groups ``ratelimit c1`` / ``ratelimit c64``: the baseline is redis-py running the seed
document's token-bucket script by EVALSHA with the client's clock (what a user would write
from the seed); our rows decide on the server's clock through ``connect()``'s client;
the ``limits`` rows (moving window, fixed window; its default async Redis storage) appear
when ``limits`` is installed (the ``bench`` extra).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ...ratelimit import (
    GCRA,
    FixedWindow,
    Policy,
    RateLimiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, load

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

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _identities() -> Callable[[], str]:
    counter = itertools.cycle([f"user{i}" for i in range(IDENTITIES)])
    return lambda: next(counter)


def seed_script(concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
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


def ours(policy: Policy, concurrency: int, plain: bool = False) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # connect()'s client (bounded blocking pool, socket timeouts, retries) by default;
        # `plain`: the same redis-py client the baseline uses, to show the limiter's own cost.
        client: Any = (
            redis_py(env.url, concurrency) if plain else env.client(max_connections=concurrency + 4)
        )
        limiter = RateLimiter(client, policy, name="bench", prefix=env.prefix)
        identity = _identities()
        try:
            yield lambda: limiter.hit(identity())
        finally:
            await client.aclose()

    return setup


def _limits(strategy: str) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        limits = load("limits")
        storage = load("limits.aio.storage").RedisStorage(
            env.url.replace("redis://", "async+redis://", 1)
        )
        strategies = load("limits.aio.strategies")
        kind = (
            strategies.MovingWindowRateLimiter
            if strategy == "moving"
            else strategies.FixedWindowRateLimiter
        )
        limiter = kind(storage)
        item = limits.RateLimitItemPerSecond(LIMIT)
        identity = _identities()
        namespace = f"{env.prefix}:limits-{strategy}"
        try:
            yield lambda: limiter.hit(item, namespace, identity())
        finally:
            # limits has no close(); disconnect its client's pool so no socket leaks.
            client = getattr(getattr(storage, "bridge", None), "storage", None)
            pool = getattr(client, "connection_pool", None)
            if pool is not None:
                pool.disconnect()
                await anyio.sleep(0.01)  # let the transports finish closing

    return setup


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Decisions per second at c1 and c64: every policy, limits, the seed script."""
    rows: list[Scenario] = []
    for concurrency in (1, 64):
        group = f"ratelimit c{concurrency}"
        rows.append(
            Scenario(group, "redis-py EVALSHA seed token bucket", concurrency,
                     seed_script(concurrency), baseline=True, unit="decisions")
        )  # fmt: skip
        for name, policy in POLICIES.items():
            rows.append(
                Scenario(group, f"arp {name}", concurrency, ours(policy, concurrency),
                         unit="decisions")
            )  # fmt: skip
        rows.append(
            Scenario(group, "arp token bucket, plain redis-py client", concurrency,
                     ours(POLICIES["token bucket"], concurrency, plain=True), unit="decisions")
        )  # fmt: skip
        if has("limits") and has("coredis"):  # coredis: limits' default async Redis storage
            for strategy, label in (("moving", "moving window"), ("fixed", "fixed window")):
                rows.append(
                    Scenario(group, f"limits {label}", concurrency, _limits(strategy),
                             unit="decisions", role="competitor")
                )  # fmt: skip
    return rows
