"""Auto-pipelined command path vs redis-py's pool: GET, SET and EVALSHA at 1-256 tasks.

Also one reference row: redis-py's explicit pipeline of 100 GETs from one task, the
ceiling a hand-batched client reaches (each call counts 100 operations).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from ..._commands import execute
from ..._scripts import Script
from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario

VALUE = b"x" * 64
CONCURRENCY = (1, 16, 64, 256)
PIPELINE_DEPTH = 100
# A small read-modify-write script, the shape of the library's own scripts.
ECHO_SCRIPT = b"return redis.call('GET', KEYS[1])"

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _ours(command: str, concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = env.client(max_connections=concurrency + 4)
        key = f"{env.prefix}:ap"
        await client.set(key, VALUE)
        sha = hashlib.sha1(ECHO_SCRIPT).hexdigest()
        script = Script(name="bench", source=ECHO_SCRIPT, sha=sha)
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


def _redis_py(command: str, concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
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


@asynccontextmanager
async def _explicit_pipeline(env: BenchEnv) -> AsyncIterator[Operation]:
    client = redis_py(env.url)
    key = f"{env.prefix}:ap"
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
    """Per command and concurrency: redis-py's pool (baseline) and ours."""
    rows = []
    for command in ("GET", "SET", "EVALSHA"):
        for concurrency in CONCURRENCY:
            group = f"auto-pipeline {command} c{concurrency}"
            rows.append(
                Scenario(group, "redis-py pool", concurrency, _redis_py(command, concurrency), True)
            )
            rows.append(
                Scenario(group, "aioredispatterns", concurrency, _ours(command, concurrency))
            )
    rows.append(
        Scenario(
            f"GET pipelined x{PIPELINE_DEPTH} (reference)",
            "redis-py explicit pipeline",
            1,
            _explicit_pipeline,
            baseline=True,
            ops_per_call=PIPELINE_DEPTH,
        )
    )
    return rows
