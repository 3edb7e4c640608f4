"""Native ``Task.cancel()`` (not an anyio scope) is never lost, and a connection closed
under replies still owed never hands them to the wrong callers."""

from __future__ import annotations

import asyncio

import anyio

from aioredispatterns import Lock, connect
from aioredispatterns._commands import execute
from aioredispatterns._connection import state_of
from aioredispatterns.testing import RedisServer


async def test_a_cancelled_lock_waiter_never_enters_the_body(own_server: RedisServer) -> None:
    """Cancelled at every step of its start (connect, handshake, BLPOP send): redis-py's
    wait_for used to keep the result and the waiter then ran the lock body."""
    holder = connect(own_server.url)
    try:
        for steps in range(30):
            client = connect(own_server.url, socket_timeout=0.5)  # fresh: it connects too
            lease = await Lock(holder, "L", ttl=5).acquire()
            entered: list[bool] = []

            async def waiter(client: object = client, entered: list[bool] = entered) -> None:
                async with Lock(client, "L", ttl=5, timeout=3):  # type: ignore[arg-type]
                    entered.append(True)

            task = asyncio.get_running_loop().create_task(waiter())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.sleep(0.05)
            await lease.release()
            with anyio.fail_after(10):
                await asyncio.wait({task})
            assert task.cancelled(), f"cancel lost after {steps} steps: {task!r}"
            assert not entered
            await client.aclose()
    finally:
        await holder.aclose()


async def test_replies_owed_on_a_closed_connection_never_shift(own_server: RedisServer) -> None:
    client = connect(own_server.url, socket_timeout=2)
    admin = connect(own_server.url, auto_pipeline=False)
    try:
        await execute(client, "SET", "a", "A")
        await execute(client, "SET", "b", "B")
        pipeline = state_of(client).pipeline
        assert pipeline is not None
        for attempt in range(20):
            # The server holds replies back: a caller cancelled after its command was
            # written leaves its reply owed on the kept connection.
            await admin.execute_command("CLIENT", "PAUSE", 200, "ALL")
            task = asyncio.get_running_loop().create_task(execute(client, "GET", "a"))
            for _ in range(attempt % 4 + 1):
                await asyncio.sleep(0)
            with anyio.fail_after(5):
                while not pipeline._in_flight:  # noqa: ASYNC110 - the pipeline's state
                    await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.wait({task})
            assert pipeline._in_flight  # owed, and its caller is gone
            await client.connection_pool.disconnect()  # redis-py's public API
            got: dict[str, object] = {}

            async def get(key: str, got: dict[str, object] = got) -> None:
                got[key] = await execute(client, "GET", key)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(get, "a")
                    tg.start_soon(get, "b")
            assert got == {"a": b"A", "b": b"B"}
    finally:
        await client.aclose()
        await admin.aclose()
