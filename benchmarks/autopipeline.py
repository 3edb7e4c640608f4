"""Auto-pipelined command path vs redis-py's pool: GET, SET and EVALSHA."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from aioredispatterns._bench import BenchEnv, Operation, Scenario
from aioredispatterns._commands import execute
from aioredispatterns._scripts import Script

VALUE = b"x" * 64
CONCURRENCY = (1, 16, 64, 256)
# A small read-modify-write script, the shape of the library's own scripts.
ECHO_SCRIPT = b"return redis.call('GET', KEYS[1])"


def _ours(
    command: str, concurrency: int
) -> Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = env.client(max_connections=concurrency + 4)
        key = f"{env.prefix}:ap"
        await client.set(key, VALUE)
        script = Script(name="bench", source=ECHO_SCRIPT, sha=_sha1(ECHO_SCRIPT))
        try:
            if command == "GET":
                yield lambda: execute(client, "GET", key)
            elif command == "SET":
                yield lambda: execute(client, "SET", key, VALUE)
            else:
                yield lambda: script.run(client, [key])
        finally:
            await client.aclose()

    return setup


def _redis_py(
    command: str, concurrency: int
) -> Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        from redis.asyncio import Redis

        client = Redis.from_url(env.url, max_connections=concurrency + 4)
        key = f"{env.prefix}:ap"
        await client.set(key, VALUE)
        sha = await client.script_load(ECHO_SCRIPT)
        try:
            if command == "GET":
                yield lambda: client.get(key)
            elif command == "SET":
                yield lambda: client.set(key, VALUE)
            else:
                yield lambda: client.evalsha(sha, 1, key)
        finally:
            await client.aclose()

    return setup


def _sha1(source: bytes) -> str:
    import hashlib

    return hashlib.sha1(source).hexdigest()


def scenarios(env: BenchEnv) -> list[Scenario]:
    rows = []
    for command in ("GET", "SET", "EVALSHA"):
        for concurrency in CONCURRENCY:
            group = f"auto-pipeline {command} c{concurrency}"
            rows.append(
                Scenario(
                    group,
                    "redis-py pool",
                    concurrency,
                    _redis_py(command, concurrency),
                    baseline=True,
                )
            )
            rows.append(
                Scenario(group, "aioredispatterns", concurrency, _ours(command, concurrency))
            )
    return rows
