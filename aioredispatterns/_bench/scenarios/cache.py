"""Cache hit path: Cache.get_or_load vs raw redis-py GET + deserialize, cashews, aiocache.

Groups "cache hit c1" and "cache hit c64": the baseline is redis-py ``GET`` + JSON decode
of the same value; "cache hit c64 64 keys" spreads the readers over 64 keys, so no two
concurrent readers share a GET (the auto-pipeline alone, without coalescing). cashews and
aiocache rows appear when those libraries are installed (the ``bench`` extra).

Groups "near cache hit c1" and "near cache hit c64" measure the in-process layer
(``Cache(near=NearCachePolicy())``) against this library's own remote hit path (the
baseline), cashews' two-level cache (``client_side=True``) and aiocache's memory cache.
"near invalidation" measures what a near cache costs a writer: another client's SET,
then the near reader polling until it sees the new value (the write's round trip plus
the invalidation's trip), against the same SET followed by one remote GET.

The stampede and bytes-per-entry tables are a separate script: ``benchmarks/cache.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ..._connection import connect
from ...cache import Cache, NearCachePolicy
from ...serializers import default_serializer
from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, load

VALUE = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin"] * 4}
KEY = "bench-user-42"

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _pool_size(concurrency: int) -> int:
    return max(concurrency, 1) + 4


def raw(concurrency: int, keys: int = 1) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
        names = [f"{env.prefix}:raw:{KEY}-{i}" for i in range(keys)]
        serializer = default_serializer()
        for name in names:
            await client.set(name, serializer.dumps(VALUE), ex=3600)
        cycle = itertools.cycle(names)

        async def operation() -> object:
            return serializer.loads(cast(bytes, await client.get(next(cycle))))

        try:
            yield operation
        finally:
            await client.aclose()

    return setup


async def _load() -> Any:
    return VALUE


async def _never() -> Any:
    raise AssertionError("hit path benchmark: the loader must not run")


def ours(concurrency: int, keys: int = 1, *, plain_client: bool = False) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # plain_client: the client a redis-py user already has (non-blocking pool).
        client: Any = (
            redis_py(env.url, concurrency)
            if plain_client
            else connect(env.url, max_connections=_pool_size(concurrency))
        )
        names = itertools.cycle([f"{KEY}-{i}" for i in range(keys)])
        try:
            async with Cache(client, ttl=3600, prefix=env.prefix) as cache:
                await cache.set_many({f"{KEY}-{i}": VALUE for i in range(keys)})
                yield lambda: cache.get_or_load(next(names), _never)
        finally:
            await client.aclose()

    return setup


def near(concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = connect(env.url, max_connections=_pool_size(concurrency))
        try:
            async with Cache(client, ttl=3600, prefix=env.prefix, near=NearCachePolicy()) as cache:
                await cache.set(KEY, VALUE)
                await cache.get_or_load(KEY, _never)  # the first read keeps it near
                yield lambda: cache.get_or_load(KEY, _never)
        finally:
            await client.aclose()

    return setup


def _invalidation(*, near_reader: bool) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        reader_client = connect(env.url)
        writer_client = connect(env.url)
        policy = NearCachePolicy() if near_reader else None
        versions = itertools.count()
        try:
            async with (
                Cache(reader_client, ttl=3600, prefix=env.prefix, near=policy) as reader,
                Cache(writer_client, ttl=3600, prefix=env.prefix) as writer,
            ):

                async def operation() -> object:
                    version = next(versions)
                    await writer.set(KEY, version)
                    while await reader.get(KEY) != version:
                        await anyio.lowlevel.checkpoint()
                    return version

                yield operation
        finally:
            await reader_client.aclose()
            await writer_client.aclose()

    return setup


def _cashews(concurrency: int, *, client_side: bool = False) -> Setup:
    """cashews' ``@cache`` on Redis; ``client_side``: its two-level (in-memory) cache."""

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        cache = load("cashews").Cache()
        options: dict[str, Any] = {"client_side": True} if client_side else {}
        cache.setup(env.url, max_connections=_pool_size(concurrency), **options)
        name = "cashews2" if client_side else "cashews"
        cached: Operation = cache(ttl="1h", key=f"{env.prefix}:{name}:{KEY}")(_load)
        await cached()
        try:
            yield cached
        finally:
            await cache.close()

    return setup


def _aiocache(concurrency: int, *, memory: bool = False) -> Setup:
    """aiocache's ``@cached`` on Redis; ``memory``: on its in-process memory cache."""

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        aiocache = load("aiocache")
        if memory:
            decorator = aiocache.cached(ttl=3600, key=f"{env.prefix}:aiomem:{KEY}")
        else:
            parts = urlsplit(env.url)
            decorator = aiocache.cached(
                ttl=3600,
                key=f"{env.prefix}:aiocache:{KEY}",
                cache=aiocache.Cache.REDIS,
                endpoint=parts.hostname,
                port=parts.port,
                pool_max_size=_pool_size(concurrency),
            )
        cached: Operation = decorator(_load)
        await cached()
        try:
            yield cached
        finally:
            await decorator.cache.close()

    return setup


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Hit path at c1 and c64 (one hot key), and c64 over 64 keys."""
    rows = []
    for concurrency in (1, 64):
        group = f"cache hit c{concurrency}"
        rows += [
            Scenario(group, "redis-py GET + json", concurrency, raw(concurrency), baseline=True),
            Scenario(group, "Cache.get_or_load", concurrency, ours(concurrency)),
            Scenario(
                group,
                "Cache.get_or_load, redis-py client",
                concurrency,
                ours(concurrency, plain_client=True),
            ),
        ]
        if has("cashews"):
            rows.append(
                Scenario(group, "cashews @cache", concurrency, _cashews(concurrency),
                         role="competitor")
            )  # fmt: skip
        if has("aiocache"):
            rows.append(
                Scenario(group, "aiocache @cached", concurrency, _aiocache(concurrency),
                         role="competitor")
            )  # fmt: skip
    for concurrency in (1, 64):
        group = f"near cache hit c{concurrency}"
        rows += [
            Scenario(group, "Cache.get_or_load (Redis)", concurrency, ours(concurrency),
                     baseline=True),
            Scenario(group, "Cache.get_or_load, near=", concurrency, near(concurrency)),
        ]  # fmt: skip
        if has("cashews"):
            rows.append(
                Scenario(group, "cashews two-level (client_side, stale)", concurrency,
                         _cashews(concurrency, client_side=True), role="competitor")
            )  # fmt: skip
        if has("aiocache"):
            rows.append(
                Scenario(group, "aiocache memory (no invalidation)", concurrency,
                         _aiocache(concurrency, memory=True), role="competitor")
            )  # fmt: skip
    group = "near invalidation"
    rows += [
        Scenario(group, "SET, then a remote GET sees it", 1, _invalidation(near_reader=False),
                 baseline=True),
        Scenario(group, "SET, then the near layer sees it", 1, _invalidation(near_reader=True)),
    ]  # fmt: skip
    group = "cache hit c64 64 keys"
    rows.append(Scenario(group, "redis-py GET + json", 64, raw(64, 64), baseline=True))
    rows.append(Scenario(group, "Cache.get_or_load", 64, ours(64, 64)))
    return rows
