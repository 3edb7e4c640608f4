"""Cache figures the benchmark runner's table does not fit: stampede and bytes per entry.

    python benchmarks/cache.py [--url redis://127.0.0.1:PORT/0] [--callers 1000]

Without ``--url`` it starts a throwaway embedded Valkey (the ``server`` extra). It prints:

* stampede: loader calls for N concurrent cold misses of one key, in 1 process and
  split over 4 processes (counted in Redis), for each library;
* bytes per entry: ``MEMORY USAGE`` of one 1 KiB value stored by each library vs a plain
  ``SET ... EX`` of the same bytes under a key of the same length.

The hit-path rows (``cache hit c1`` / ``c64``) are built-in scenarios of the runner:
``python -m aioredispatterns bench --only "cache hit"``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis

from aioredispatterns import connect
from aioredispatterns.cache import Cache
from aioredispatterns.serializers import default_serializer

VALUE = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin"] * 4}
KEY = "bench-user-42"


async def _close_quietly(cache: Any) -> None:
    # aiocache 0.12 and cashews 7 close their redis-py clients with the deprecated close().
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        await cache.close()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- stampede table

LOAD_SECONDS = 0.2


async def _stampede_worker(library: str, url: str, prefix: str, callers: int) -> None:
    """One process: ``callers`` concurrent cold reads of one key; loads counted in Redis."""
    counter_client = connect(url, max_connections=16)  # a blocking pool: callers queue
    counter = f"{prefix}:loads"

    async def load() -> Any:
        await counter_client.incr(counter)
        await anyio.sleep(LOAD_SECONDS)
        return VALUE

    async def go(read: Callable[[], Awaitable[Any]]) -> None:
        await counter_client.incr(f"{prefix}:ready")
        while not await counter_client.exists(f"{prefix}:go"):  # noqa: ASYNC110
            await anyio.sleep(0.002)
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(read)

    pool = callers + 8
    try:
        if library.startswith("aioredispatterns"):
            client = connect(url, max_connections=min(pool, 64))
            distributed = library.endswith("distributed")
            try:
                async with Cache(client, ttl=60, prefix=prefix, distributed=distributed) as cache:
                    await go(lambda: cache.get_or_load(KEY, load))
            finally:
                await client.aclose()
        elif library.startswith("cashews"):
            from cashews import Cache as CashewsCache

            cache = CashewsCache()
            cache.setup(url, max_connections=pool)
            wrapped = cache(ttl="1m", key=f"{prefix}:{KEY}", lock=library.endswith("lock"))(load)
            try:
                await go(wrapped)
            finally:
                await _close_quietly(cache)
        else:
            from urllib.parse import urlsplit

            from aiocache import Cache as AiocacheKind
            from aiocache import cached, cached_stampede

            parts = urlsplit(url)
            kind = cached_stampede if library.endswith("stampede") else cached
            decorator = kind(
                ttl=60,
                key=f"{prefix}:{KEY}",
                cache=AiocacheKind.REDIS,
                endpoint=parts.hostname,
                port=parts.port,
                pool_max_size=pool,
            )
            try:
                await go(decorator(load))
            finally:
                await _close_quietly(decorator.cache)
    finally:
        await counter_client.aclose()


async def _stampede(url: str, library: str, processes: int, callers: int, run: int) -> str:
    prefix = f"stampede-{library}-{processes}-{run}"
    client = Redis.from_url(url)
    per_process = callers // processes
    workers = [
        await anyio.open_process(
            [sys.executable, __file__, "--worker", library, url, prefix, str(per_process)],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    try:
        with anyio.fail_after(120):
            while int(await client.get(f"{prefix}:ready") or 0) < processes:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            await client.set(f"{prefix}:go", 1)
            failed = [worker for worker in workers if await worker.wait() != 0]
        loads = int(await client.get(f"{prefix}:loads") or 0)
        return f"{loads} (a worker failed)" if failed else str(loads)
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            await worker.aclose()
        await client.aclose()


async def _bytes_per_entry(url: str) -> list[tuple[str, int]]:
    value = {"blob": "v" * 1010}  # 1 KiB of JSON
    client = Redis.from_url(url)
    rows: list[tuple[str, int]] = []
    try:
        encoded = default_serializer().dumps(value)
        arp = connect(url)
        try:
            async with Cache(arp, ttl=300, prefix="mem") as cache:
                await cache.set("entry-1", value)
        finally:
            await arp.aclose()
        ours = "mem:cache:{entry-1}"
        await client.set("mem:cache:{entry-2}", encoded, ex=300)  # same key length
        rows.append(
            (
                f"plain SET EX ({len(encoded)} B value)",
                await client.memory_usage("mem:cache:{entry-2}"),
            )
        )
        rows.append(("aioredispatterns Cache", await client.memory_usage(ours)))
        if _has("cashews"):
            from cashews import Cache as CashewsCache

            cashews = CashewsCache()
            cashews.setup(url)
            await cashews.set("mem:cashews:{entry}", value, expire=300)
            await _close_quietly(cashews)
            rows.append(("cashews", await client.memory_usage("mem:cashews:{entry}")))
        if _has("aiocache"):
            from urllib.parse import urlsplit

            from aiocache import RedisCache

            parts = urlsplit(url)
            aiocache = RedisCache(endpoint=parts.hostname, port=parts.port)
            await aiocache.set("mem:aiocach:{entry}", value, ttl=300)
            await _close_quietly(aiocache)
            rows.append(("aiocache", await client.memory_usage("mem:aiocach:{entry}")))
    finally:
        await client.aclose()
    return rows


async def _report(url: str | None, callers: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            from aioredispatterns.testing import RedisServer, find_server_binary

            server = RedisServer(find_server_binary("valkey-9.1"), name="bench-valkey").start()
            stack.callback(server.stop)
            url = server.url
        libraries = ["aioredispatterns", "aioredispatterns distributed"]
        if _has("cashews"):
            libraries += ["cashews", "cashews lock"]
        if _has("aiocache"):
            libraries += ["aiocache", "aiocache stampede"]
        print(f"stampede: {callers} concurrent cold reads of one key, loader takes {LOAD_SECONDS}s")
        print(f"{'library':32} {'1 process':>10} {'4 processes':>12}")
        for run, library in enumerate(libraries):
            one = await _stampede(url, library, 1, callers, run)
            four = await _stampede(url, library, 4, callers, run)
            print(f"{library:32} {one:>10} {four:>12}")
        print()
        rows = await _bytes_per_entry(url)
        base = rows[0][1]
        print(f"{'stored form of a 1 KiB JSON value':40} {'MEMORY USAGE':>12} {'x plain':>8}")
        for name, size in rows:
            print(f"{name:40} {size:>12} {size / base:>8.2f}")
        print(json.dumps({"bytes": dict(rows)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        library, url, prefix, callers = sys.argv[2:6]
        anyio.run(_stampede_worker, library, url, prefix, int(callers))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server of your own (default: embedded Valkey 9.1)")
    parser.add_argument("--callers", type=int, default=1000)
    args = parser.parse_args()
    anyio.run(_report, args.url, args.callers)


if __name__ == "__main__":
    main()
