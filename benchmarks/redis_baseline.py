"""Raw redis-py baselines: GET / SET one by one through the pool, and pipelined."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis

from aioredispatterns._bench import BenchEnv, Operation, Scenario

VALUE = b"x" * 64
PIPELINE_DEPTH = 100


def _redis_py(env: BenchEnv, concurrency: int) -> Redis:
    # A plain redis-py client, as its users build it (pool large enough for the load).
    return Redis.from_url(env.url, max_connections=max(concurrency, 1) + 4)


def _single(command: str, concurrency: int) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = _redis_py(env, concurrency)
        key = f"{env.prefix}:baseline"
        await client.set(key, VALUE)
        try:
            if command == "GET":
                yield lambda: client.get(key)
            else:
                yield lambda: client.set(key, VALUE)
        finally:
            await client.aclose()

    return setup


@asynccontextmanager
async def _pipelined(env: BenchEnv) -> AsyncIterator[Operation]:
    client = _redis_py(env, 1)
    key = f"{env.prefix}:baseline"
    await client.set(key, VALUE)

    async def operation() -> object:
        pipe = client.pipeline(transaction=False)
        for _ in range(PIPELINE_DEPTH):
            pipe.get(key)
        return await pipe.execute()

    try:
        yield operation
    finally:
        await client.aclose()


def scenarios(env: BenchEnv) -> list[Scenario]:
    rows = []
    for command in ("GET", "SET"):
        for concurrency in (1, 64):
            rows.append(
                Scenario(
                    group=f"{command} c{concurrency}",
                    name="redis-py pool",
                    concurrency=concurrency,
                    setup=_single(command, concurrency),
                    baseline=True,
                )
            )
    rows.append(
        Scenario(
            group=f"GET pipelined x{PIPELINE_DEPTH}",
            name="redis-py pipeline",
            concurrency=1,
            setup=_pipelined,
            baseline=True,
            ops_per_call=PIPELINE_DEPTH,
        )
    )
    return rows
