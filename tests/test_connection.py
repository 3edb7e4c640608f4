"""connect(): pool bounds, timeouts, options, cluster."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aioredispatterns import ConfigurationError, ConnectionFailed, PoolTimeout, connect
from aioredispatterns._commands import execute, execute_blocking
from aioredispatterns.testing import RedisServer, node_clients, on_every_node


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": 0},
        {"max_connections": True},
        {"pool_timeout": -1},
        {"socket_timeout": 0},
        {"connect_timeout": "1"},
        {"retries": -1},
        {"protocol": 4},
        {"health_check_interval": 0},
    ],
)
def test_bad_options_fail_before_connecting(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        connect("redis://127.0.0.1:1/0", **options)


@pytest.mark.parametrize("url", ["", "http://localhost", "memcached://x"])
def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        connect(url)


def test_cluster_urls_build_a_cluster_client() -> None:
    for url in ("redis+cluster://127.0.0.1:1/0", "redis://127.0.0.1:1/0?cluster=true"):
        client = connect(url)
        assert isinstance(client, RedisCluster)
    assert isinstance(connect("redis://127.0.0.1:1/0"), Redis)


async def test_third_caller_gets_pool_timeout_in_time(redis_url: str, key_prefix: str) -> None:
    """Pool of 2, two callers blocked for 2 s: the third fails after ~pool_timeout."""
    pool_timeout = 0.5
    client = connect(redis_url, max_connections=2, pool_timeout=pool_timeout)
    outcomes: dict[int, float | BaseException] = {}

    async def blocked(index: int) -> None:
        started = anyio.current_time()
        try:
            await execute_blocking(client, "BLPOP", f"{key_prefix}:nothing", 2, block=2)
            outcomes[index] = anyio.current_time() - started
        except PoolTimeout as exc:
            outcomes[index] = exc
            outcomes[-1] = anyio.current_time() - started

    try:
        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(blocked, index)
                await anyio.sleep(0.05)  # the third really is the third
    finally:
        await client.aclose()
    failed = [i for i, v in outcomes.items() if isinstance(v, PoolTimeout)]
    assert failed == [2]
    waited = outcomes[-1]
    assert isinstance(waited, float)
    assert abs(waited - pool_timeout) <= 0.5
    assert isinstance(outcomes[2], TimeoutError)  # PoolTimeout is a TimeoutError too


async def test_unreachable_server_is_connection_failed() -> None:
    client = connect(
        f"redis://127.0.0.1:{_closed_port()}/0", retries=1, backoff_base=0.01, backoff_cap=0.02
    )
    started = time.monotonic()
    with pytest.raises(ConnectionFailed):
        await execute(client, "PING")
    assert time.monotonic() - started < 5
    await client.aclose()


def _closed_port() -> int:
    from aioredispatterns.testing import free_port

    return free_port()


async def test_resp3_opt_in(redis_url: str) -> None:
    client = connect(redis_url, protocol=3)
    try:
        assert await execute(client, "PING") in (True, b"PONG", "PONG")
        # The pools the library's commands use (one per node of a cluster).
        pools = [node.connection_pool for node in node_clients(client)]
        assert pools
        assert all(pool.connection_kwargs["protocol"] == 3 for pool in pools)
        for hello in await on_every_node(client, "HELLO", 3):
            assert hello[b"proto"] == 3 if b"proto" in hello else hello["proto"] == 3
    finally:
        await client.aclose()


async def test_the_users_own_commands_never_close_the_librarys_connections(
    redis_url: str, key_prefix: str
) -> None:
    """More of the user's own commands at once than the pool holds, on redis-py's own path
    (no auto-pipeline): they wait or are retried, and the library's next command works (a
    cluster client's redis-py resets itself with aclose() when a node pool runs out; that
    closed the slot router for good)."""
    client = connect(redis_url, auto_pipeline=False)  # max_connections=32
    try:
        assert await execute(client, "SET", f"{key_prefix}:k", "v") is True
        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(client.rpush, f"{key_prefix}:list", n)
        # At least once each: redis-py retries the user's own commands (documented).
        assert await client.llen(f"{key_prefix}:list") >= 64
        assert await execute(client, "GET", f"{key_prefix}:k") == b"v"
    finally:
        await client.aclose()


async def test_acl_username_password(redis_server: RedisServer, key_prefix: str) -> None:
    if not redis_server.owned:
        pytest.skip("does not create ACL users on an external server")
    admin = connect(redis_server.url)
    user = f"{key_prefix}-user"
    # ACL users are per node: on a cluster, every node gets the user.
    await on_every_node(admin, "ACL", "SETUSER", user, "on", ">s3cret", "~*", "+@all")
    try:
        client = connect(redis_server.url, username=user, password="s3cret")
        whoami = await on_every_node(client, "ACL", "WHOAMI")
        assert whoami
        assert set(whoami) == {user.encode()}
        await client.aclose()
        wrong = connect(redis_server.url, username=user, password="wrong", retries=0)
        with pytest.raises(ConnectionFailed):
            await execute(wrong, "PING")
        await wrong.aclose()
    finally:
        await on_every_node(admin, "ACL", "DELUSER", user)
        await admin.aclose()


async def test_tls_url_builds_ssl_connections() -> None:
    from redis.asyncio.connection import SSLConnection

    client = connect("rediss://127.0.0.1:1/0")
    assert client.connection_pool.connection_class is SSLConnection
    await client.aclose()


@pytest.mark.cluster
async def test_cluster_client_routes_commands(cluster_client: RedisCluster) -> None:
    for index in range(50):
        await execute(cluster_client, "SET", f"key-{index}", index)
    values = [await execute(cluster_client, "GET", f"key-{index}") for index in range(50)]
    assert values == [str(index).encode() for index in range(50)]
    owners = {cluster_client.get_node_from_key(f"key-{i}").name for i in range(50)}
    assert len(owners) == 3  # the keys really are spread over the three primaries
