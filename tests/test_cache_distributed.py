"""Cache(distributed=True): one loader per key across processes, leases, wake-ups, cluster.

Run as a script, this file is the worker process of the multi-process test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from aioredispatterns import connect
from aioredispatterns.cache import Cache
from aioredispatterns.testing import RedisServer

PROCESSES = 4
CALLERS = 500


async def _worker(url: str, prefix: str) -> None:
    client = connect(url)
    counter = f"{prefix}:loader-calls"
    try:
        async with Cache(client, ttl=60, distributed=True, lease_ttl=5, prefix=prefix) as cache:

            async def loader() -> dict[str, int]:
                await client.incr(counter)  # counted in Redis: across all processes
                await anyio.sleep(0.3)
                return {"answer": 42}

            await client.incr(f"{prefix}:ready")
            while not await client.exists(f"{prefix}:go"):  # noqa: ASYNC110 - another process
                await anyio.sleep(0.002)
            results: list[Any] = []

            async def call() -> None:
                results.append(await cache.get_or_load("cold", loader))

            async with anyio.create_task_group() as tg:
                for _ in range(CALLERS):
                    tg.start_soon(call)
            assert results == [{"answer": 42}] * CALLERS
            print(json.dumps(dataclasses.asdict(cache.stats)))
    finally:
        await client.aclose()


async def test_four_processes_run_the_loader_once_in_total(
    redis_client: Redis, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    logs = [tmp_path / f"worker-{i}.log" for i in range(PROCESSES)]
    with contextlib.ExitStack() as files:
        workers = [
            await anyio.open_process(
                [sys.executable, __file__, redis_url, key_prefix],
                stdout=subprocess.DEVNULL,
                stderr=files.enter_context(log.open("wb")),
            )
            for log in logs
        ]
        try:
            with anyio.fail_after(60):
                while int(await redis_client.get(f"{key_prefix}:ready") or 0) < PROCESSES:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await redis_client.set(f"{key_prefix}:go", 1)
            with anyio.fail_after(60):
                for worker, log in zip(workers, logs, strict=True):
                    assert await worker.wait() == 0, log.read_text()
        finally:
            for worker in workers:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
                await worker.aclose()
    assert int(await redis_client.get(f"{key_prefix}:loader-calls") or 0) == 1
    # The lease is gone once the value landed.
    assert await redis_client.exists(f"{key_prefix}:cache:{{cold}}:lease") == 0


async def test_waiters_in_other_processes_are_woken_by_the_fill(
    redis_url: str, key_prefix: str
) -> None:
    # Two clients stand for two processes: B waits on A's lease and is woken when A
    # fills, long before the lease would have run out.
    a, b = connect(redis_url), connect(redis_url)
    gate = anyio.Event()
    a_calls = b_calls = 0

    async def load_a() -> str:
        nonlocal a_calls
        a_calls += 1
        await gate.wait()
        return "from A"

    async def load_b() -> str:
        nonlocal b_calls
        b_calls += 1
        return "from B"

    try:
        async with (
            Cache(a, ttl=60, distributed=True, lease_ttl=10, prefix=key_prefix) as cache_a,
            Cache(b, ttl=60, distributed=True, lease_ttl=10, prefix=key_prefix) as cache_b,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cache_a.get_or_load, "k", load_a)
            while not a_calls:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            got: list[str] = []

            async def wait_b() -> None:
                got.append(await cache_b.get_or_load("k", load_b))

            tg.start_soon(wait_b)
            await anyio.sleep(0.2)  # B is blocked on A's lease
            assert got == []
            released = time.perf_counter()
            gate.set()
            with anyio.fail_after(1):
                while not got:  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            woken_after = time.perf_counter() - released
        assert got == ["from A"]
        assert b_calls == 0
        assert woken_after < 1.0  # woken by the fill, not by the 10 s lease expiry
        assert cache_b.stats.lease_waits == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_dead_lease_holder_blocks_others_no_longer_than_its_lease(
    redis_client: Redis, key_prefix: str
) -> None:
    # A process took the lease and died: nobody fills or wakes anyone.
    await redis_client.set(f"{key_prefix}:cache:{{k}}:lease", "dead", px=300)
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        return "mine"

    async with Cache(
        redis_client, ttl=60, distributed=True, lease_ttl=5, prefix=key_prefix
    ) as cache:
        started = time.perf_counter()
        assert await cache.get_or_load("k", loader) == "mine"
        elapsed = time.perf_counter() - started
        assert cache.stats.lease_timeouts == 0  # the lease ran out; we took it
    assert calls == 1
    assert 0.25 < elapsed < 2.0  # the 300 ms lease, not lease_ttl (5 s)


async def test_the_wait_for_another_process_is_bounded(
    redis_client: Redis, key_prefix: str
) -> None:
    await redis_client.set(f"{key_prefix}:cache:{{k}}:lease", "slow", px=30_000)
    async with Cache(
        redis_client, ttl=60, distributed=True, lease_wait=0.2, prefix=key_prefix
    ) as cache:
        started = time.perf_counter()

        async def loader() -> str:
            return "loaded here"

        assert await cache.get_or_load("k", loader) == "loaded here"
        assert time.perf_counter() - started < 1.0
        assert cache.stats.lease_timeouts == 1
        assert await cache.get("k") == "loaded here"


async def test_loader_error_releases_the_lease(redis_client: Redis, key_prefix: str) -> None:
    async def failing() -> str:
        raise LookupError("nope")

    async with Cache(redis_client, ttl=60, distributed=True, prefix=key_prefix) as cache:
        with pytest.raises(LookupError):
            await cache.get_or_load("k", failing)
        assert await redis_client.exists(f"{key_prefix}:cache:{{k}}:lease") == 0


async def test_cancelled_lease_holder_releases_on_close(
    redis_client: Redis, key_prefix: str
) -> None:
    gate = anyio.Event()

    async def stuck() -> str:
        await gate.wait()
        return "never"

    async with Cache(redis_client, ttl=60, distributed=True, prefix=key_prefix) as cache:
        with anyio.move_on_after(0.1):
            await cache.get_or_load("k", stuck)
        assert await redis_client.exists(f"{key_prefix}:cache:{{k}}:lease") == 1
    # Closing cancelled the load; the shielded release let the lease go.
    assert await redis_client.exists(f"{key_prefix}:cache:{{k}}:lease") == 0


@pytest.mark.cluster
async def test_cluster_batches_and_distributed_loads(cluster_client: Any, key_prefix: str) -> None:
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        return "v"

    async with Cache(cluster_client, ttl=60, distributed=True, prefix=key_prefix) as cache:
        items = {f"key-{i}": i for i in range(200)}  # spread over every node
        assert await cache.set_many(items) == 200
        assert await cache.get_many(list(items)) == items
        await cache.invalidate(*list(items)[:100])
        assert len(await cache.get_many(list(items))) == 100
        assert await cache.warm(items) == 100

        results: list[str] = []

        async def call() -> None:
            results.append(await cache.get_or_load("hot", loader))

        # A cluster node's pool raises instead of waiting when all its connections are
        # busy, so stay below max_connections (32) per node here.
        async with anyio.create_task_group() as tg:
            for _ in range(25):
                tg.start_soon(call)
    assert results == ["v"] * 25
    assert calls == 1


@pytest.mark.cluster
async def test_cluster_waiter_is_woken_by_another_clients_fill(
    redis_cluster: Any, key_prefix: str
) -> None:
    a, b = connect(redis_cluster.url), connect(redis_cluster.url)
    gate, loading = anyio.Event(), anyio.Event()

    async def load_a() -> str:
        loading.set()
        await gate.wait()
        return "from A"

    async def load_b() -> str:
        raise AssertionError("B must wait for A's load")

    try:
        async with (
            Cache(a, ttl=60, distributed=True, prefix=key_prefix) as cache_a,
            Cache(b, ttl=60, distributed=True, prefix=key_prefix) as cache_b,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cache_a.get_or_load, "k", load_a)
            with anyio.fail_after(10):
                await loading.wait()  # A holds the lease (a fixed sleep raced it)
            got: list[str] = []

            async def wait_b() -> None:
                got.append(await cache_b.get_or_load("k", load_b))

            tg.start_soon(wait_b)
            with anyio.fail_after(10):
                while not cache_b.stats.lease_waits:  # noqa: ASYNC110 - B is blocked on A
                    await anyio.sleep(0.005)
            gate.set()
        assert got == ["from A"]
        assert cache_b.stats.lease_waits == 1
    finally:
        await a.aclose()
        await b.aclose()


if __name__ == "__main__":
    anyio.run(_worker, sys.argv[1], sys.argv[2])


@pytest.mark.standalone_only(reason="a FaultProxy sits in front of one server's port")
async def test_a_lease_whose_grant_was_cut_off_is_given_back(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """The lease script ran but its reply was lost: the lease is deleted at once (it
    used to stay until lease_ttl, holding every other process back)."""
    if not redis_server.owned:
        pytest.skip("needs a server this suite started (a proxy in front of it)")
    from aioredispatterns import CommandTimeout
    from aioredispatterns.testing import FaultProxy

    async def load() -> int:
        return 1

    with FaultProxy(redis_server.port) as proxy:
        client = connect(proxy.url, socket_timeout=0.5, retries=0)
        try:
            async with Cache(
                client, ttl=60, distributed=True, lease_ttl=30, prefix=key_prefix
            ) as cache:
                await cache.get_or_load("warm", load)  # connected, scripts cached
                # The fleet-wide load on its own: its first command takes the lease, and
                # that reply is lost (the script ran).
                proxy.drop_replies(1)
                with pytest.raises(CommandTimeout):
                    await cache._load_distributed(cache._keys("k"), b"", 0.0, load, 60.0)
            admin = connect(redis_server.url)
            try:
                assert await admin.exists(f"{key_prefix}:cache:{{k}}:lease") == 0
            finally:
                await admin.aclose()
        finally:
            proxy.heal()
            await client.aclose()
