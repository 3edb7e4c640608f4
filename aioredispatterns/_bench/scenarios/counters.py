"""Counter increments per second: ours vs the redis-py calls a user would write by hand.

Groups ``counter c1`` / ``counter c64``; every operation adds 1 to one counter:

* baseline: redis-py ``INCR`` on one key (the seed's ``INCR pageview:home:...``);
* ``arp Counter.incr``: the same INCRBY through ``connect()``'s client (auto-pipelined);
* ``arp Counter.incr, ttl``: INCRBY and PEXPIRE in one script, next to the reference
  ``redis-py MULTI INCR + PEXPIRE`` (a transaction, so the key never lives without a TTL);
* ``arp HashCounter.incr``: HINCRBY on one field of one hash (reference: redis-py
  ``HINCRBY``);
* ``arp BucketedCounter.incr``: one script that picks the minute bucket by the server's
  clock and sets its expiry, next to the reference ``redis-py MULTI INCR + EXPIREAT`` on
  a key named by the client's clock (what a user writes without the server's clock).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ...counters import BucketedCounter, Counter, HashCounter
from ..redis_py import Redis, redis_py
from ..scenario import BenchEnv, Operation, Scenario

TTL = 3600
WIDTH = 60
RETENTION = 86400

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _raw(concurrency: int, make: Callable[[Redis, str], Callable[[], Awaitable[object]]]) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
        try:
            # A key per row: the rows write different types (string, hash).
            yield make(client, f"{env.prefix}:raw-{make.__name__.strip('_')}")
        finally:
            await client.aclose()

    return setup


def _incr(client: Redis, key: str) -> Callable[[], Awaitable[object]]:
    return lambda: client.incr(key)


def _hincrby(client: Redis, key: str) -> Callable[[], Awaitable[object]]:
    return lambda: client.hincrby(key, "views", 1)


def _incr_expire(client: Redis, key: str) -> Callable[[], Awaitable[object]]:
    async def operation() -> object:
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, TTL * 1000)
            return await pipe.execute()

    return operation


def _bucket_client_clock(client: Redis, key: str) -> Callable[[], Awaitable[object]]:
    async def operation() -> object:
        start = int(time.time()) // WIDTH * WIDTH
        bucket = f"{key}:{start}"
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(bucket)
            pipe.expireat(bucket, start + WIDTH + RETENTION)
            return await pipe.execute()

    return operation


def _ours(concurrency: int, make: Callable[[Any, str], Operation]) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = env.client(max_connections=concurrency + 4)
        try:
            yield make(client, env.prefix)
        finally:
            await client.aclose()

    return setup


def _counter(client: Any, prefix: str) -> Operation:
    return Counter(client, "bench", prefix=prefix).incr


def _counter_ttl(client: Any, prefix: str) -> Operation:
    return Counter(client, "bench-ttl", ttl=TTL, prefix=prefix).incr


def _hash_counter(client: Any, prefix: str) -> Operation:
    counters = HashCounter(client, "bench", prefix=prefix)
    return lambda: counters.incr("views")


def _bucketed(client: Any, prefix: str) -> Operation:
    return BucketedCounter(client, "bench", width=WIDTH, retention=RETENTION, prefix=prefix).incr


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Increments per second at c1 and c64: each counter against its hand-written twin."""
    rows: list[Scenario] = []
    for c in (1, 64):
        group = f"counter c{c}"
        rows += [
            Scenario(group, "redis-py INCR", c, _raw(c, _incr), baseline=True, unit="incrs"),
            Scenario(group, "arp Counter.incr", c, _ours(c, _counter), unit="incrs"),
            Scenario(group, "redis-py MULTI INCR + PEXPIRE", c, _raw(c, _incr_expire),
                     unit="incrs", role="reference"),
            Scenario(group, "arp Counter.incr, ttl", c, _ours(c, _counter_ttl), unit="incrs"),
            Scenario(group, "redis-py HINCRBY", c, _raw(c, _hincrby), unit="incrs",
                     role="reference"),
            Scenario(group, "arp HashCounter.incr", c, _ours(c, _hash_counter), unit="incrs"),
            Scenario(group, "redis-py MULTI INCR + EXPIREAT, client clock", c,
                     _raw(c, _bucket_client_clock), unit="incrs", role="reference"),
            Scenario(group, "arp BucketedCounter.incr", c, _ours(c, _bucketed), unit="incrs"),
        ]  # fmt: skip
    return rows
