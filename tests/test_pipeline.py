"""Auto-pipelining: same replies as sequential execution, failures and cancellations
confined to the callers they concern."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aioredispatterns import (
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    connect,
    pipeline_stats,
)
from aioredispatterns._commands import execute, execute_blocking
from aioredispatterns._connection import state_of
from aioredispatterns._scripts import Script
from aioredispatterns.testing import (
    RedisServer,
    borrowed_connections,
    node_clients,
    on_every_node,
)

INCR_AND_GET = Script(
    name="test_incr_and_get",
    source=b"redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])",
    sha=__import__("hashlib")
    .sha1(b"redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])")
    .hexdigest(),
)


@pytest_asyncio.fixture
async def plain(redis_url: str) -> AsyncIterator[Redis]:
    """A client with auto-pipelining off: the sequential reference."""
    client = connect(redis_url, auto_pipeline=False)
    try:
        yield client
    finally:
        await client.aclose()


def _mixed_commands(prefix: str, count: int, seed: int) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    keys = [f"{prefix}:k{index}" for index in range(20)]
    commands: list[tuple[Any, ...]] = []
    for _ in range(count):
        key = rng.choice(keys)
        kind = rng.randrange(4)
        if kind == 0:
            commands.append(("GET", key))
        elif kind == 1:
            commands.append(("SET", key, rng.randrange(1000)))
        elif kind == 2:
            commands.append(("INCR", key))
        else:
            commands.append(("EVALSHA", key))
    return commands


async def _run(client: Redis, command: tuple[Any, ...]) -> Any:
    try:
        if command[0] == "EVALSHA":
            return await INCR_AND_GET.run(client, [command[1]])
        return await execute(client, *command)
    except CommandError as exc:  # INCR of a non-integer is part of the workload
        return ("error", str(exc).split()[0])


async def test_concurrent_mixed_commands_match_sequential_execution(
    redis_client: Redis, plain: Redis, key_prefix: str
) -> None:
    concurrent = _mixed_commands(f"{key_prefix}:a", 10_000, seed=7)
    sequential = _mixed_commands(f"{key_prefix}:b", 10_000, seed=7)
    # Loaded up front: a NOSCRIPT retry is re-queued behind later commands (documented).
    await plain.script_load(INCR_AND_GET.source)
    # All 10,000 are issued at once; the batches keep their order on the connection.
    got = await asyncio.gather(*(_run(redis_client, command) for command in concurrent))
    expected = [await _run(plain, command) for command in sequential]
    assert got == expected
    stats = pipeline_stats(redis_client)
    assert stats is not None
    assert stats.commands >= 10_000
    # They were pipelined, not sent one by one: thousands awaited replies at once, and
    # each write carried many commands (16 while the iteration was still queueing).
    assert stats.max_in_flight > 1000
    assert stats.mean_batch_size >= 10
    assert stats.connection_errors == 0


@pytest.mark.standalone_only(
    reason="pauses one server and kills its pipeline connection (a cluster node's failure "
    "failing only its own callers is tests/test_cluster_faults.py)"
)
async def test_killed_connection_fails_only_its_batch(
    redis_client: Redis, plain: Redis, key_prefix: str, redis_server: RedisServer
) -> None:
    if not redis_server.owned:
        pytest.skip("pauses and kills clients: needs a server this suite started")
    connection_id = await execute(redis_client, "CLIENT", "ID")
    await plain.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    try:
        batch = [
            asyncio.ensure_future(execute(redis_client, "SET", f"{key_prefix}:{i}", i))
            for i in range(50)
        ]
        await asyncio.sleep(0.2)  # the batch is written and held by the pause
        assert not any(call.done() for call in batch)
        assert await plain.execute_command("CLIENT", "KILL", "ID", connection_id) == 1
        results = await asyncio.gather(*batch, return_exceptions=True)
    finally:
        await plain.execute_command("CLIENT", "UNPAUSE")
    assert all(isinstance(result, ConnectionFailed) for result in results)
    # The next batch takes a fresh connection and succeeds.
    after = await asyncio.gather(
        *(execute(redis_client, "SET", f"{key_prefix}:after{i}", i) for i in range(20))
    )
    assert all(after)
    assert await execute(redis_client, "GET", f"{key_prefix}:after7") == b"7"
    stats = pipeline_stats(redis_client)
    assert stats is not None
    assert stats.connection_errors == 1


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cancelled=st.sets(st.integers(min_value=0, max_value=199), max_size=120),
    delays=st.lists(st.integers(min_value=0, max_value=3), min_size=200, max_size=200),
    native=st.booleans(),
)
async def test_cancelling_random_callers_never_mixes_replies(
    redis_client: Redis, cancelled: set[int], delays: list[int], native: bool
) -> None:
    prefix = f"h{random.getrandbits(48):x}"
    await asyncio.gather(
        *(execute(redis_client, "SET", f"{prefix}:{i}", f"v{i}") for i in range(200))
    )
    results: dict[int, Any] = {}

    async def caller(index: int) -> None:
        results[index] = await execute(redis_client, "GET", f"{prefix}:{index}")

    async def canceller(index: int, target: Any, cancel: Any) -> None:
        for _ in range(delays[index]):
            await asyncio.sleep(0)
        cancel(target)

    if native:
        tasks = [asyncio.ensure_future(caller(i)) for i in range(200)]
        killers = [
            asyncio.ensure_future(canceller(i, tasks[i], lambda t: t.cancel())) for i in cancelled
        ]
        await asyncio.gather(*tasks, *killers, return_exceptions=True)
    else:
        async with anyio.create_task_group() as tg:
            for index in range(200):
                scope = anyio.CancelScope()

                async def scoped(index: int = index, scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await caller(index)

                tg.start_soon(scoped)
                if index in cancelled:
                    tg.start_soon(canceller, index, scope, lambda s: s.cancel())
    for index, value in results.items():
        assert value == f"v{index}".encode(), f"caller {index} got {value!r}"
    assert set(range(200)) - cancelled <= set(results)
    # And the connection is still in step afterwards.
    check = await asyncio.gather(
        *(execute(redis_client, "GET", f"{prefix}:{i}") for i in range(0, 200, 7))
    )
    assert check == [f"v{i}".encode() for i in range(0, 200, 7)]
    stats = pipeline_stats(redis_client)
    assert stats is not None
    assert stats.connection_errors == 0  # no connection was thrown away for a cancellation


async def test_noscript_inside_a_batch_reloads_and_retries_only_those_calls(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = [f"{key_prefix}:s{i}" for i in range(100)]
    await on_every_node(redis_client, "SCRIPT", "FLUSH")
    replies = await asyncio.gather(
        *(INCR_AND_GET.run(redis_client, [key]) for key in keys),
        *(execute(redis_client, "SET", f"{key}:plain", 1) for key in keys),
    )
    assert replies[:100] == [b"1"] * 100
    assert all(replies[100:])
    # Loaded again (on a cluster, on every primary: the 100 keys spread over all of them).
    loaded = await on_every_node(redis_client, "SCRIPT", "EXISTS", INCR_AND_GET.sha)
    assert all(int(reply[0]) for reply in loaded)


async def test_error_reply_fails_only_its_caller(redis_client: Redis, key_prefix: str) -> None:
    await execute(redis_client, "SET", f"{key_prefix}:text", "abc")
    results = await asyncio.gather(
        execute(redis_client, "SET", f"{key_prefix}:n", 1),
        execute(redis_client, "INCR", f"{key_prefix}:text"),
        execute(redis_client, "INCR", f"{key_prefix}:n"),
        return_exceptions=True,
    )
    assert results[0] is True
    assert isinstance(results[1], CommandError)
    assert results[2] == 2


async def test_bad_argument_fails_before_anything_is_queued(
    redis_client: Redis, key_prefix: str
) -> None:
    with pytest.raises(ConfigurationError):  # redis-py's DataError: bad input, nothing sent
        await execute(redis_client, "SET", f"{key_prefix}:k", True)  # type: ignore[arg-type]
    assert await redis_client.exists(f"{key_prefix}:k") == 0


async def test_blocking_commands_never_enter_the_shared_batch(
    redis_client: Redis, key_prefix: str
) -> None:
    with pytest.raises(ConfigurationError, match="execute_blocking"):
        await execute(redis_client, "BLPOP", f"{key_prefix}:q", 1)
    await redis_client.rpush(f"{key_prefix}:q", "x")
    reply = await execute_blocking(redis_client, "BLPOP", f"{key_prefix}:q", 1, block=1)
    assert list(reply) == [f"{key_prefix}:q".encode(), b"x"]


async def test_opting_out_uses_the_pool_directly(redis_url: str) -> None:
    client = connect(redis_url, auto_pipeline=False)
    try:
        assert await execute(client, "PING") is True
        assert pipeline_stats(client) is None
    finally:
        await client.aclose()


async def test_response_callbacks_match_redis_py(redis_client: Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:h"
    await redis_client.hset(key, mapping={"a": "1", "b": "2"})
    assert await execute(redis_client, "HGETALL", key) == await redis_client.hgetall(key)
    assert await execute(redis_client, "SET", f"{key_prefix}:x", 1) is True
    assert await execute(redis_client, "EXISTS", key) == 1


@pytest.mark.standalone_only(reason="restarts a server of its own")
async def test_server_restart_between_batches_reconnects(redis_server: RedisServer) -> None:
    """A connection the server closed while idle is replaced before anything is written
    to it, whether one caller comes next or a crowd that would be written mid-iteration."""
    if not redis_server.owned:
        pytest.skip("restarts a server: needs one this suite started")
    with RedisServer(redis_server.binary, name="restart") as server:
        client = connect(server.url)
        try:
            for crowd in (1, 64):
                assert await execute(client, "SET", "n", 0) is True
                server.kill()
                server.restart()
                await anyio.sleep(0.1)  # let the loop see the old connection's EOF
                replies = await asyncio.gather(
                    *(execute(client, "INCR", "n") for _ in range(crowd))
                )
                assert sorted(replies) == list(range(1, crowd + 1))
            stats = pipeline_stats(client)
            assert stats is not None
            assert stats.connection_errors == 0
        finally:
            await client.aclose()


@pytest.mark.standalone_only(reason="stops (SIGSTOP) a server of its own")
async def test_a_stalled_server_fails_every_caller_within_the_socket_timeout(
    redis_server: RedisServer,
) -> None:
    """A server that stops reading (SIGSTOP) fills the socket: the write waits at most
    socket_timeout, its callers fail, and the callers queued behind it are not left
    waiting for a writer; once the server is back, the next command works."""
    if not redis_server.owned:
        pytest.skip("stops a server: needs one this suite started")
    with RedisServer(redis_server.binary, name="stall") as server:
        client = connect(server.url, socket_timeout=0.5, retries=0)
        assert server.pid is not None
        try:
            assert await execute(client, "PING") is True
            os.kill(server.pid, signal.SIGSTOP)
            try:
                value = b"x" * (16 << 20)  # more than the kernel's socket buffers hold
                with anyio.fail_after(30):
                    results = await asyncio.gather(
                        *(execute(client, "SET", f"k{i}", value) for i in range(3)),
                        return_exceptions=True,
                    )
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert all(isinstance(r, CommandTimeout | ConnectionFailed) for r in results), results
            assert await execute(client, "SET", "after", 1) is True
            assert await execute(client, "GET", "after") == b"1"
        finally:
            await client.aclose()


async def test_writes_take_the_direct_stream_path(redis_client: Redis) -> None:
    """The fast write path reads redis-py's connection streams (no public synchronous
    write exists); if a redis-py release renames them, writes silently fall back to the
    slow path, so this fails instead."""
    from aioredispatterns._transport import open_stream_writer

    assert await execute(redis_client, "PING") is True
    # On a cluster: the pipelines of the nodes that carried a command (the PING's node).
    pipelines = [state_of(node).pipeline for node in node_clients(redis_client)]
    kept = [p.kept_connection for p in pipelines if p is not None and p.kept_connection]
    assert kept
    for connection in kept:
        assert open_stream_writer(connection) is not None


async def test_a_long_iteration_is_written_in_chunks_as_it_queues(
    redis_client: Redis, key_prefix: str
) -> None:
    """The server gets the first commands of a busy iteration while later callers still
    run, instead of idling until the iteration ends; replies stay in order."""
    key = f"{key_prefix}:chunks"
    await INCR_AND_GET.run(redis_client, [key])  # warm: connection open, script loaded
    before = pipeline_stats(redis_client)
    assert before is not None
    replies = await asyncio.gather(*(INCR_AND_GET.run(redis_client, [key]) for _ in range(64)))
    assert replies == [str(n).encode() for n in range(2, 66)]
    after = pipeline_stats(redis_client)
    assert after is not None
    assert after.commands - before.commands == 64
    assert after.batches - before.batches >= 4  # written 16 at a time, not in one write


async def test_no_connection_leaks_after_cancellations(redis_url: str) -> None:
    client = connect(redis_url, max_connections=4)
    try:
        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as tg:
                for index in range(500):
                    tg.start_soon(execute, client, "SET", f"leak:{index}", index)
        await execute(client, "PING")
        # One connection carries the pipeline (on a cluster, one per node that got a
        # command); nothing else is held.
        assert borrowed_connections(client) == []
        in_use = [len(n.connection_pool._in_use_connections) for n in node_clients(client)]  # type: ignore[attr-defined]
        assert max(in_use) == 1
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_cluster_batches_group_by_node(cluster_client: RedisCluster) -> None:
    keys = [f"key:{index}" for index in range(600)]
    assert all(await asyncio.gather(*(execute(cluster_client, "SET", key, key) for key in keys)))
    values = await asyncio.gather(*(execute(cluster_client, "GET", key) for key in keys))
    assert values == [key.encode() for key in keys]
    stats = pipeline_stats(cluster_client)
    assert stats is not None
    # One auto-pipeline per node (three primaries): the 1,200 commands shared round trips.
    assert stats.commands == 1200
    assert stats.mean_batch_size > 8
    replies = await asyncio.gather(
        *(INCR_AND_GET.run(cluster_client, [f"c:{i}"]) for i in range(60))
    )
    assert replies == [b"1"] * 60


@pytest.mark.parametrize("how", ["native", "anyio"])
async def test_cancelled_writer_does_not_strand_the_batch(
    redis_client: Redis, key_prefix: str, how: str
) -> None:
    """The first caller of an iteration writes the batch; cancelling it right then must
    neither lose the others' replies nor leave the reader role with nobody."""
    await execute(redis_client, "SET", f"{key_prefix}:k", "v")
    for _round in range(20):
        with anyio.fail_after(5):
            # On an idle connection the first caller writes at once; with a command in
            # flight, the next one waits out the iteration to gather the batch.
            busy = asyncio.ensure_future(execute(redis_client, "GET", f"{key_prefix}:k"))
            if how == "native":
                writer = asyncio.ensure_future(execute(redis_client, "GET", f"{key_prefix}:k"))
                others = [
                    asyncio.ensure_future(execute(redis_client, "GET", f"{key_prefix}:k"))
                    for _ in range(10)
                ]
                await asyncio.sleep(0)  # the writer is now inside its one-iteration wait
                writer.cancel()
                assert await asyncio.gather(*others) == [b"v"] * 10
                with pytest.raises(asyncio.CancelledError):
                    await writer
            else:
                got: list[Any] = []
                async with anyio.create_task_group() as tg:
                    scope = anyio.CancelScope()

                    async def first(scope: anyio.CancelScope = scope) -> None:
                        with scope:
                            await execute(redis_client, "GET", f"{key_prefix}:k")

                    async def other(got: list[Any] = got) -> None:
                        got.append(await execute(redis_client, "GET", f"{key_prefix}:k"))

                    tg.start_soon(first)
                    for _ in range(10):
                        tg.start_soon(other)
                    await asyncio.sleep(0)
                    scope.cancel()
                assert got == [b"v"] * 10
            assert await busy == b"v"
    assert await execute(redis_client, "GET", f"{key_prefix}:k") == b"v"
