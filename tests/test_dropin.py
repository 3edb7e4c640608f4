"""The client ``connect()`` returns is a drop-in redis-py client whose own short commands
ride the auto-pipeline: same replies as redis-py, the commands that need a connection of
their own still take one, and cancelling a user's ``await client.get()`` leaks nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from redis import exceptions as rex
from redis.asyncio import Redis

from aioredispatterns import connect, pipeline_stats
from aioredispatterns._client import AutoPipelinedRedis
from aioredispatterns._connection import state_of
from aioredispatterns.testing import FaultProxy, RedisServer, borrowed_connections

pytestmark = [
    pytest.mark.standalone_only(
        reason="the standalone drop-in (the cluster one runs on the harness's own cluster, below)"
    ),
    pytest.mark.budget_kinds("valkey-9.1", "redis-6.2"),
]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url, max_connections=8)
    try:
        yield client
    finally:
        await client.aclose()


async def _eventually(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        for _ in iter(int, 1):  # until the deadline
            if condition():
                return
            await asyncio.sleep(0.005)


def _stats_commands(client: Redis) -> int:
    stats = pipeline_stats(client)
    return stats.commands if stats is not None else 0


async def test_connect_returns_a_redis_client_and_a_plain_one_when_off(redis_url: str) -> None:
    dropin = connect(redis_url)
    plain = connect(redis_url, auto_pipeline=False)
    try:
        assert isinstance(dropin, Redis)
        assert isinstance(dropin, AutoPipelinedRedis)
        assert type(plain) is Redis
        assert await plain.set("arp:dropin:off", 1) is True
        assert pipeline_stats(plain) is None  # nothing of plain redis-py's path is ours
    finally:
        await dropin.aclose()
        await plain.aclose()


async def test_the_users_own_commands_ride_the_pipeline(client: Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:ride"
    await client.set(key, "v")
    before = _stats_commands(client)
    replies = await asyncio.gather(
        *(client.get(key) for _ in range(100)),
        *(client.incr(f"{key}:n") for _ in range(100)),
    )
    assert replies[:100] == [b"v"] * 100
    assert sorted(replies[100:]) == list(range(1, 101))
    stats = pipeline_stats(client)
    assert stats is not None
    assert stats.commands - before == 200  # all counted by the pipeline
    assert stats.mean_batch_size > 1  # and they shared round trips
    # One connection carried them all: nothing else was borrowed from the pool.
    assert borrowed_connections(client) == []
    assert len(client.connection_pool._in_use_connections) == 1  # type: ignore[attr-defined]


# Each case runs a sequence of commands under its own key prefix and returns every reply.
Case = Callable[[Redis, str], Awaitable[list[Any]]]


async def _strings(r: Redis, p: str) -> list[Any]:
    return [
        await r.set(f"{p}s", "hello"),
        await r.set(f"{p}s", "x", nx=True),
        await r.get(f"{p}s"),
        await r.getrange(f"{p}s", 1, 3),
        await r.append(f"{p}s", " world"),
        await r.strlen(f"{p}s"),
        await r.mset({f"{p}a": 1, f"{p}b": 2.5}),
        await r.mget(f"{p}a", f"{p}b", f"{p}missing"),
        await r.mget([]),  # EMPTY_RESPONSE: redis-py answers [] for the server's error
        await r.incr(f"{p}n"),
        await r.incrbyfloat(f"{p}f", 1.5),
        await r.getset(f"{p}s", "new"),
        await r.setrange(f"{p}s", 1, "EW"),
        await r.exists(f"{p}s", f"{p}missing"),
        await r.type(f"{p}s"),
        await r.expire(f"{p}s", 100),
        await r.ttl(f"{p}s"),
        await r.persist(f"{p}s"),
        await r.delete(f"{p}a", f"{p}missing"),
        await r.get(f"{p}missing"),
        await r.setbit(f"{p}bits", 7, 1),
        await r.bitcount(f"{p}bits"),
        await r.dump(f"{p}s") is not None,  # NEVER_DECODE: bytes even when decoding
        type(await r.dump(f"{p}s")).__name__,
    ]


async def _containers(r: Redis, p: str) -> list[Any]:
    return [
        await r.hset(f"{p}h", mapping={"a": 1, "b": "two"}),
        await r.hgetall(f"{p}h"),
        await r.hmget(f"{p}h", ["a", "zz"]),
        await r.hincrbyfloat(f"{p}h", "a", 0.5),
        sorted(await r.hkeys(f"{p}h")),
        await r.hexists(f"{p}h", "a"),
        await r.rpush(f"{p}l", 1, 2, 3),
        await r.lrange(f"{p}l", 0, -1),
        await r.lpop(f"{p}l", 2),
        await r.sadd(f"{p}set", "x", "y"),
        await r.smembers(f"{p}set"),
        await r.sismember(f"{p}set", "x"),
        await r.zadd(f"{p}z", {"m1": 1.5, "m2": 2}),
        await r.zrange(f"{p}z", 0, -1, withscores=True),
        await r.zrangebyscore(f"{p}z", 0, 10, withscores=True),
        await r.zscore(f"{p}z", "m1"),
        await r.zincrby(f"{p}z", 1, "m1"),
        await r.zmscore(f"{p}z", ["m1", "nope"]),
        await r.zpopmin(f"{p}z"),
        await r.pfadd(f"{p}hll", "a", "b"),
        await r.pfcount(f"{p}hll"),
        await r.geoadd(f"{p}g", (13.361389, 38.115556, "Palermo")),
        [[round(c, 4) for c in pos] for pos in await r.geopos(f"{p}g", "Palermo")],
        await r.xlen(f"{p}x"),
        await r.xadd(f"{p}x", {"f": "v"}, id="1-1"),
        await r.xrange(f"{p}x"),
        await r.xread({f"{p}x": "0-0"}, count=1),  # no BLOCK: rides the pipeline
        sorted((await r.scan(0, match=f"{p}h*", count=1000))[1]),
    ]


async def _server(r: Redis, p: str) -> list[Any]:
    info = await r.info("server")
    return [
        await r.ping(),
        await r.echo("e"),
        sorted(info)[:5],
        await r.config_get("maxmemory-policy"),
        await r.eval("return {1, 'two', KEYS[1]}", 1, f"{p}k"),
        await r.script_exists("0" * 40),
        await r.memory_usage(f"{p}nope"),
        await r.execute_command("PING", "raw"),
    ]


async def _errors(r: Redis, p: str) -> list[Any]:
    await r.hset(f"{p}h", "a", 1)
    found = []
    for call in (
        lambda: r.get(f"{p}h"),  # WRONGTYPE
        lambda: r.execute_command("NOSUCHCOMMAND"),
        lambda: r.evalsha("0" * 40, 0),  # NOSCRIPT
        lambda: r.set(f"{p}bad", None),  # type: ignore[arg-type]  # DataError, nothing sent
    ):
        try:
            await call()
        except rex.RedisError as exc:
            found.append(type(exc).__name__)
    return found


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decoded"])
@pytest.mark.parametrize("case", [_strings, _containers, _server, _errors])
async def test_replies_are_redis_pys(
    redis_url: str, key_prefix: str, protocol: int, decode: bool, case: Case
) -> None:
    dropin = connect(redis_url, protocol=protocol, decode_responses=decode)
    plain = connect(redis_url, protocol=protocol, decode_responses=decode, auto_pipeline=False)
    try:
        before = _stats_commands(dropin)
        mine = await case(dropin, f"{key_prefix}:d:")
        theirs = await case(plain, f"{key_prefix}:p:")
        assert mine == [_renamed(v, key_prefix) for v in theirs]
        assert _stats_commands(dropin) > before
    finally:
        await dropin.aclose()
        await plain.aclose()


def _renamed(value: Any, key_prefix: str) -> Any:
    """A reply of the plain client's keys, as the drop-in's keys would read."""
    old, new = f"{key_prefix}:p:", f"{key_prefix}:d:"
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, bytes):
        return value.replace(old.encode(), new.encode())
    if isinstance(value, list | tuple):
        return type(value)(_renamed(v, key_prefix) for v in value)
    if isinstance(value, dict):
        return {_renamed(k, key_prefix): _renamed(v, key_prefix) for k, v in value.items()}
    return value


async def test_callbacks_set_by_the_user_apply_sync_and_async(
    client: Redis, key_prefix: str
) -> None:
    await client.set(f"{key_prefix}:k", "v")
    client.set_response_callback("GET", lambda reply, **_: ("sync", reply))
    assert await client.get(f"{key_prefix}:k") == ("sync", b"v")

    async def later(reply: Any, **_: Any) -> Any:
        await asyncio.sleep(0)
        return ("async", reply)

    client.set_response_callback("GET", later)
    assert await client.get(f"{key_prefix}:k") == ("async", b"v")


async def test_commands_that_need_their_own_connection_take_a_pooled_one(
    client: Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:own"
    await client.set(key, "v")
    # A blocking command holds a pooled connection of its own; the pipeline is not
    # stalled behind it.
    blpop = asyncio.ensure_future(client.blpop([f"{key}:list"], timeout=5))
    await _eventually(lambda: len(borrowed_connections(client)) == 1)
    with anyio.fail_after(5):
        assert await client.get(key) == b"v"
        assert not blpop.done()
        await client.rpush(f"{key}:list", "x")
        assert tuple(await blpop) == (f"{key}:list".encode(), b"x")
    # Connection state: the name is set and read on a pooled connection, as redis-py does.
    assert await client.client_setname("arp-dropin") is True
    assert await client.client_getname() == "arp-dropin"  # redis-py decodes it
    # Transactions and WATCH are redis-py's pipeline objects.
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        pipe.multi()
        pipe.set(key, "w").get(key)
        assert await pipe.execute() == [True, b"w"]
    # Pub/sub: a subscription of its own.
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(f"{key}:ch")
        assert await client.publish(f"{key}:ch", "hi") == 1
        with anyio.fail_after(5):
            while (message := await pubsub.get_message(timeout=1)) is None or message[
                "type"
            ] != "message":
                pass
        assert message["data"] == b"hi"
    # redis-py's Lock: SET NX and scripts, which ride the pipeline.
    async with client.lock(f"{key}:lock", timeout=5):
        assert await client.exists(f"{key}:lock") == 1
    # A single-connection client keeps redis-py's path whole.
    single = client.client()
    try:
        assert await single.get(key) == b"w"
    finally:
        await single.aclose()
    assert borrowed_connections(client) == []


async def test_a_cut_command_is_retried_as_redis_py_retries_it(
    proxy: FaultProxy, redis_server: RedisServer, key_prefix: str
) -> None:
    """redis-py's rule for the user's own commands: a command whose connection broke
    after it was written is sent again (``retries``), so it may run twice; with
    ``retries=0`` the ConnectionError comes out. The library's own commands never are."""
    admin = connect(redis_server.url)
    key = f"{key_prefix}:retried"
    for retries, expected in ((2, 2), (0, None)):
        client = connect(proxy.url, socket_timeout=5, retries=retries)
        try:
            await admin.delete(key)
            await client.ping()  # connected and through the handshake
            proxy.cut_after_bytes(0)  # the connection drops as the INCR's reply starts
            with anyio.fail_after(20):
                if expected is None:
                    with pytest.raises(rex.ConnectionError):
                        await client.incr(key)
                    assert await admin.get(key) == b"1"  # it ran once, not re-sent
                else:
                    assert await client.incr(key) == expected  # ran, then ran again
            proxy.heal()
            assert await client.incr(key) == (expected or 1) + 1
        finally:
            proxy.heal()
            await client.aclose()
    await admin.aclose()


@pytest.mark.parametrize("how", ["native", "anyio"])
async def test_a_cancelled_user_command_leaks_nothing(
    client: Redis, key_prefix: str, how: str
) -> None:
    """Cancelled after any number of loop steps (queued, written, reply on its way):
    later replies never shift, no connection is held, no task is left, and the kept
    connection is not thrown away for it."""
    key = f"{key_prefix}:cancel"
    await client.set(key, "v")
    await client.set(f"{key}:other", "o")
    tasks_before = len(asyncio.all_tasks())
    for steps in range(12):
        if how == "native":
            task = asyncio.ensure_future(client.get(key))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait({task})
        else:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.get, key)
                    for _ in range(steps):
                        await asyncio.sleep(0)
                    scope.cancel()
        with anyio.fail_after(5):
            assert await client.get(f"{key}:other") == b"o"
            assert await asyncio.gather(*(client.get(key) for _ in range(5))) == [b"v"] * 5
    assert borrowed_connections(client) == []
    assert len(asyncio.all_tasks()) == tasks_before
    stats = pipeline_stats(client)
    assert stats is not None
    assert stats.connection_errors == 0


@pytest.mark.parametrize("retries", [0, 3])
async def test_replies_owed_on_a_closed_connection_never_shift(
    own_server: RedisServer, key_prefix: str, retries: int
) -> None:
    """Replies held back by the server (CLIENT PAUSE) when redis-py closes every
    connection: the callers owed them fail (``retries=0``) or, by redis-py's rule, are
    sent again; either way nobody ever gets another caller's reply."""
    client = connect(own_server.url, socket_timeout=5, retries=retries)
    admin = connect(own_server.url, auto_pipeline=False)
    keys = [f"{key_prefix}:{n}" for n in range(4)]
    try:
        for key in keys:
            await client.set(key, key)
        await admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        owed = [asyncio.ensure_future(client.get(key)) for key in keys[:3]]
        pipeline = state_of(client).pipeline
        assert pipeline is not None
        await _eventually(lambda: len(pipeline._in_flight) == 3)
        await client.connection_pool.disconnect()  # redis-py's public API
        with anyio.fail_after(10):
            results = await asyncio.gather(*owed, return_exceptions=True)
            if retries:
                assert results == [key.encode() for key in keys[:3]]
            else:
                assert all(isinstance(r, rex.ConnectionError) for r in results), results
            replies = await asyncio.gather(*(client.get(key) for key in keys))
        assert replies == [key.encode() for key in keys]
    finally:
        await client.aclose()
        await admin.aclose()


async def test_closing_the_client_gives_the_connection_back(redis_url: str) -> None:
    pool_owner = connect(redis_url, max_connections=2)
    shared = AutoPipelinedRedis(connection_pool=pool_owner.connection_pool)
    try:
        assert await shared.ping() is True
        assert len(pool_owner.connection_pool._in_use_connections) == 1  # type: ignore[attr-defined]
        await shared.aclose()  # a client that does not own its pool
        assert len(pool_owner.connection_pool._in_use_connections) == 0  # type: ignore[attr-defined]
        assert await shared.ping() is True  # and it works again afterwards
    finally:
        await shared.aclose()
        await pool_owner.aclose()


async def test_an_instrument_hook_sees_the_pipelines_traffic(
    client: Redis, key_prefix: str
) -> None:
    """OpenTelemetry: a span per batch (names and count) for the library's own traffic
    and the user's, and a span per command (a child of the caller's) when asked."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from aioredispatterns import GCRA, RateLimiter
    from aioredispatterns._tracing import instrument, uninstrument

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    await client.ping()  # connected before tracing starts
    instrument(provider)
    try:
        limiter = RateLimiter(client, GCRA(10, 1.0), name="traced", prefix=key_prefix)
        with tracer.start_as_current_span("request") as request:
            await limiter.hit("someone")  # the library's own traffic (EVALSHA)
            await asyncio.gather(*(client.incr(f"{key_prefix}:n") for _ in range(10)))
        batches = [s for s in exporter.get_finished_spans() if s.name == "PIPELINE"]
        assert batches
        assert sum(s.attributes["db.operation.batch.size"] for s in batches) >= 11
        names = [n for s in batches for n in s.attributes["aioredispatterns.commands"]]
        assert names.count("INCRBY") == 10  # redis-py sends incr() as INCRBY
        assert "EVALSHA" in names
        assert any(
            link.context.trace_id == request.get_span_context().trace_id
            for s in batches
            for link in s.links
        )
        exporter.clear()
        instrument(provider, per_command=True)
        with tracer.start_as_current_span("request") as request:
            await client.get(f"{key_prefix}:n")
            with pytest.raises(rex.ResponseError):
                await client.hget(f"{key_prefix}:n", "f")  # WRONGTYPE
        spans = {s.name: s for s in exporter.get_finished_spans()}
        get, hget = spans["GET"], spans["HGET"]
        assert get.parent is not None
        assert get.parent.span_id == request.get_span_context().span_id
        assert get.attributes["db.operation.name"] == "GET"
        assert not hget.status.is_ok
    finally:
        uninstrument()
    exporter.clear()
    await client.get(f"{key_prefix}:n")
    assert exporter.get_finished_spans() == ()


# ---------------------------------------------------------------------------- cluster


async def _cluster_case(r: Any, p: str) -> list[Any]:
    tag = "{" + p + "}"
    return [
        await r.set(f"{p}s", "v"),
        await r.get(f"{p}s"),
        await r.set(f"{p}s", "w", get=True),
        await r.incr(f"{p}n"),
        await r.incrbyfloat(f"{p}f", 0.5),
        await r.hset(f"{p}h", mapping={"a": 1, "b": "two"}),
        await r.hgetall(f"{p}h"),
        await r.zadd(f"{p}z", {"m1": 1.5, "m2": 2}),
        await r.zrange(f"{p}z", 0, -1, withscores=True),
        await r.rpush(f"{p}l", 1, 2),
        await r.lrange(f"{p}l", 0, -1),
        await r.expire(f"{p}s", 100),
        await r.ttl(f"{p}s"),
        await r.exists(f"{p}s"),
        await r.delete(f"{p}l"),
        # Several keys (one slot): redis-py's cluster path.
        await r.mset({f"{tag}a": 1, f"{tag}b": 2}),
        await r.mget(f"{tag}a", f"{tag}b"),
        await r.delete(f"{tag}a", f"{tag}b"),
        await r.exists(f"{p}s", f"{p}n"),
    ]


@pytest.mark.cluster
async def test_cluster_single_key_commands_ride_the_node_pipelines(
    cluster_client: Any, redis_cluster: Any, key_prefix: str
) -> None:
    from redis.asyncio.cluster import RedisCluster

    from aioredispatterns._client import AutoPipelinedRedisCluster

    assert isinstance(cluster_client, RedisCluster)
    assert isinstance(cluster_client, AutoPipelinedRedisCluster)
    plain = connect(redis_cluster.url, cluster=True, auto_pipeline=False)
    try:
        assert not isinstance(plain, AutoPipelinedRedisCluster)
        before = _stats_commands(cluster_client)
        mine = await _cluster_case(cluster_client, f"{key_prefix}:d:")
        theirs = await _cluster_case(plain, f"{key_prefix}:p:")
        assert mine == theirs
        carried = _stats_commands(cluster_client) - before
        # The single-key ones (redis-py's delete() and exists() split keys by slot on a
        # cluster pipeline of their own); the several-key ones took redis-py's path.
        assert 13 <= carried <= 15
        assert pipeline_stats(plain) is None
        keys = [f"{key_prefix}:c{n}" for n in range(300)]
        assert await asyncio.gather(*(cluster_client.incr(key) for key in keys)) == [1] * 300
        stats = pipeline_stats(cluster_client)
        assert stats is not None
        assert stats.commands - before - carried == 300  # spread over the nodes' pipelines
        assert stats.mean_batch_size > 1
    finally:
        await plain.aclose()


@pytest.mark.cluster
async def test_redis_pys_own_cluster_reset_leaves_the_library_working(
    redis_cluster: Any, key_prefix: str
) -> None:
    """redis-py calls ``aclose()`` on its cluster client in the middle of a command to
    reset its own view of the cluster (on CLUSTERDOWN, a slot not covered, MOVED every
    ``reinitialize_steps``); that used to close the library's slot router for good."""
    from aioredispatterns._commands import execute

    client = connect(redis_cluster.url, cluster=True)
    key = f"{key_prefix}:reset"
    try:
        await execute(client, "SET", key, "v")  # the library's router is up
        run_on_node = client._execute_command
        resets: list[None] = []

        async def resetting(*args: Any, **kwargs: Any) -> Any:
            # What redis-py's own _execute_command does on CLUSTERDOWN (once here):
            # reset itself, re-raise, and let its retry loop initialize again.
            if not resets:
                resets.append(None)
                await client.aclose()
                raise rex.ClusterDownError("CLUSTERDOWN (simulated)")
            return await run_on_node(*args, **kwargs)

        client._execute_command = resetting  # type: ignore[method-assign]
        router = state_of(client).router
        assert router is not None
        assert await client.mget([key]) == [b"v"]  # redis-py's own path (several keys)
        assert resets
        # redis-py reset its own nodes only: the library's router (and the commands in
        # flight on its node pipelines) carried on.
        assert state_of(client).router is router
        assert await execute(client, "GET", key) == b"v"
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()
    # Closed by its user, it works again when used again (a new router), as redis-py does.
    assert await execute(client, "GET", key) == b"v"
    await client.aclose()
