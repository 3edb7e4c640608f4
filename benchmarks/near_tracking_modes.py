"""What CLIENT TRACKING costs the server: BCAST PREFIX (the near cache's choice) vs OPTIN.

A writer SETs keys under a cache prefix while N tracking connections (N processes' near
caches) listen. Reported per mode: the writer's SETs per second, the server's CPU time
per SET (``INFO cpu``, user + sys), and the invalidations the listeners received.

* ``none``: no tracking connection (the floor).
* ``bcast``: each listener runs ``CLIENT TRACKING ON BCAST PREFIX <prefix>`` (RESP3).
* ``optin``: each listener runs ``CLIENT TRACKING ON OPTIN`` and has read every key once
  with ``CLIENT CACHING YES`` (what a near cache does for the keys it holds); after each
  invalidation it reads the key again (``CLIENT CACHING YES`` + GET, as a near cache
  re-filling its copy would, over the tracking connection: OPTIN tracks only keys read
  there), so the server keeps tracking it.

Usage: ``python benchmarks/near_tracking_modes.py [--url URL] [--listeners 4]
[--keys 1000] [--writes 50000]``; without ``--url`` an embedded Valkey is started.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import anyio
import redis.asyncio as redis

PREFIX = "bench:cache:"


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from aioredispatterns.testing import RedisServer, find_server_binary

    with RedisServer(find_server_binary("valkey-9.1")) as server:
        yield server.url


async def _cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _listener(url: str, mode: str, keys: list[str], counts: list[int], ready: Any) -> None:
    client = redis.Redis.from_url(url, protocol=3, single_connection_client=True)
    received = 0
    try:
        await client.initialize()
        conn = client.connection
        assert conn is not None

        async def as_reply(response: Any) -> Any:
            return response

        conn._parser.set_invalidation_push_handler(as_reply)  # type: ignore[union-attr]
        if mode == "bcast":
            await client.execute_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", PREFIX)
        else:
            await client.execute_command("CLIENT", "TRACKING", "ON", "OPTIN")
            for key in keys:
                await client.execute_command("CLIENT", "CACHING", "YES")
                await client.execute_command("GET", key)
        ready.set()
        while True:
            reply = await conn.read_response(push_request=True)
            if isinstance(reply, list) and reply and reply[0] == b"invalidate" and reply[1]:
                received += len(reply[1])
                if mode == "optin":
                    for key in reply[1]:  # re-fill: read it again so it stays tracked
                        await conn.send_command("CLIENT", "CACHING", "YES")
                        await conn.send_command("GET", key)
    finally:
        counts.append(received)
        with anyio.CancelScope(shield=True):
            await client.aclose()


async def _run(url: str, mode: str, listeners: int, nkeys: int, writes: int) -> dict[str, float]:
    keys = [f"{PREFIX}{index}" for index in range(nkeys)]
    writer = redis.Redis.from_url(url)
    await writer.flushdb()
    await writer.mset({key: "v" for key in keys})
    counts: list[int] = []
    async with anyio.create_task_group() as tg:
        if mode != "none":
            for _ in range(listeners):
                ready = anyio.Event()
                tg.start_soon(_listener, url, mode, keys, counts, ready)
                await ready.wait()
        before = await _cpu(writer)
        started = time.perf_counter()
        pipe_size = 100
        for start in range(0, writes, pipe_size):
            pipe = writer.pipeline(transaction=False)
            for index in range(start, min(start + pipe_size, writes)):
                pipe.set(keys[index % nkeys], index)
            await pipe.execute()
        elapsed = time.perf_counter() - started
        await anyio.sleep(0.5)  # let the listeners drain
        cpu = await _cpu(writer) - before
        tg.cancel_scope.cancel()
    await writer.aclose()
    return {
        "sets_per_s": writes / elapsed,
        "server_us_per_set": cpu / writes * 1e6,
        "invalidations": float(sum(counts)),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--listeners", type=int, default=4)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with _server(args.url) as url:
        results: dict[str, list[dict[str, float]]] = {"none": [], "bcast": [], "optin": []}
        for _ in range(args.rounds):  # interleaved rounds: the machine's noise hits all modes
            for mode in results:
                results[mode].append(await _run(url, mode, args.listeners, args.keys, args.writes))
    print(
        f"{args.listeners} listeners, {args.keys} keys, {args.writes} pipelined SETs, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'mode':<6} {'SETs/s':>10} {'server us/SET':>14} {'invalidations':>14}")
    for mode, rows in results.items():

        def median(field: str, rows: list[dict[str, float]] = rows) -> float:
            values = sorted(row[field] for row in rows)
            return values[len(values) // 2]

        print(
            f"{mode:<6} {median('sets_per_s'):>10,.0f} {median('server_us_per_set'):>14.2f} "
            f"{median('invalidations'):>14,.0f}"
        )


if __name__ == "__main__":
    anyio.run(main)
