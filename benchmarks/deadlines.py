"""Deadline figures of the command layer (not a throughput scenario: the runner skips it).

    python benchmarks/deadlines.py [valkey-9.1 redis-7 ...]

Against throwaway servers started here (stopped by pid), it prints:

* **stalled server:** 64 concurrent GETs while the server is stopped (SIGSTOP) for 1.75 x
  ``socket_timeout``, as one burst and under continuous load: the slowest call divided by
  ``socket_timeout`` (the promise: at most 1.1), and how many got ``CommandTimeout``;
* **callers under their own deadline:** 32 callers under ``move_on_after(0.3)`` while the
  server is stopped or killed, with a warm and a cold client: how far past 0.3 s the
  slowest one returned (the promise: at most 50 ms), whatever role it held in the
  auto-pipeline (writer, reader, connector).

Run it with a CPU hog on each core to see the figures hold on a busy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import anyio
import anyio.lowlevel

import aioredispatterns as arp
from aioredispatterns._commands import execute
from aioredispatterns.testing import RedisServer, find_server_binary


async def _stalled(
    server: RedisServer, socket_timeout: float, continuous: bool
) -> tuple[float, int]:
    assert server.pid is not None
    client = arp.connect(server.url, socket_timeout=socket_timeout, retries=0)
    await execute(client, "PING")
    durations: list[float] = []
    timeouts = 0
    running = True

    async def worker(index: int) -> None:
        nonlocal timeouts
        while running:
            started = time.monotonic()
            try:
                await execute(client, "GET", f"k{index}")
            except arp.CommandTimeout:
                timeouts += 1
            durations.append(time.monotonic() - started)
            if not continuous:
                return
            await anyio.lowlevel.checkpoint()

    try:
        async with anyio.create_task_group() as tg:
            for index in range(64):
                tg.start_soon(worker, index)
            await anyio.sleep(0.3 if continuous else 0)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                await anyio.sleep(socket_timeout * 1.75)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            running = False
    finally:
        await client.aclose()
    return max(durations) / socket_timeout, timeouts


async def _overrun(client: object, deadline: float) -> float:
    overruns: list[float] = []

    async def one(index: int) -> None:
        started = time.monotonic()
        with anyio.move_on_after(deadline), contextlib.suppress(arp.RedisPatternsError):
            await execute(client, "INCR", f"k{index % 4}")  # type: ignore[arg-type]
        overruns.append(time.monotonic() - started - deadline)

    async with anyio.create_task_group() as tg:
        for index in range(32):
            tg.start_soon(one, index)
    return max(overruns)


async def _own_deadline(server: RedisServer, how: str, warm: bool) -> list[float]:
    assert server.pid is not None
    client = arp.connect(server.url, socket_timeout=5, connect_timeout=2, retries=3)
    try:
        if warm:
            await execute(client, "PING")
        if how == "killed":
            server.kill()
        else:
            os.kill(server.pid, signal.SIGSTOP)
        try:
            return [await _overrun(client, 0.3) for _ in range(5)]
        finally:
            if how == "killed":
                server.restart()
            else:
                os.kill(server.pid, signal.SIGCONT)
    finally:
        await client.aclose()


async def main(kind: str) -> None:
    with RedisServer(find_server_binary(kind), name="deadlines") as server:
        for socket_timeout in (1.0, 2.0):
            for continuous in (False, True):
                trials = [await _stalled(server, socket_timeout, continuous) for _ in range(3)]
                mode = "continuous load" if continuous else "one burst"
                ratios = ", ".join(f"{ratio:.3f}" for ratio, _ in trials)
                counts = ", ".join(str(count) for _, count in trials)
                print(
                    f"{kind} stalled, socket_timeout={socket_timeout:g} s, {mode}: "
                    f"slowest/socket_timeout {ratios}; CommandTimeouts {counts}",
                    flush=True,
                )
        for how in ("stopped", "killed"):
            for warm in (True, False):
                runs = await _own_deadline(server, how, warm)
                shown = ", ".join(f"{run * 1000:.1f}" for run in runs)
                print(
                    f"{kind} {how}, {'warm' if warm else 'cold'} client, move_on_after(0.3): "
                    f"slowest overrun {max(runs) * 1000:.1f} ms (runs: {shown})",
                    flush=True,
                )


if __name__ == "__main__":
    for name in sys.argv[1:] or ["valkey-9.1"]:
        asyncio.run(main(name))
