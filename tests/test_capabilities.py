"""Server capabilities: detected once per client, matching what each server really has."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aioredispatterns import server_info
from aioredispatterns.testing import RedisServer, key_count


async def test_capabilities_match_the_server(
    redis_client: Redis, redis_server: RedisServer
) -> None:
    info = await server_info(redis_client)
    assert info is await server_info(redis_client)  # cached per client
    assert info.version >= (6, 2)
    expected = {
        "valkey-9.1": ("valkey", (9, 1)),
        "valkey-8.1": ("valkey", (8, 1)),
        "redis-6.2": ("redis", (6, 2)),
        "redis-7": ("redis", (7,)),
        "cluster": ("valkey", (9, 1)),
    }.get(redis_server.name)
    if expected is None:
        pytest.skip("external server: nothing to compare against")
    name, version = expected
    assert info.name == name
    assert info.version[: len(version)] == version
    is_valkey = info.name == "valkey"
    assert info.delifeq == (is_valkey and info.version >= (9,))
    assert info.set_ifeq == (is_valkey and info.version >= (8, 1))
    assert info.hexpire == (info.version >= (9,) if is_valkey else info.version >= (7, 4))
    assert info.sharded_pubsub == (info.version >= (7,))
    assert info.xautoclaim
    assert info.blmove


async def test_set_ifeq_probe_writes_nothing(redis_client: Redis) -> None:
    before = await key_count(redis_client)  # an external server may hold keys of its own
    await server_info(redis_client)
    assert await key_count(redis_client) == before


@pytest.mark.cluster
async def test_capabilities_on_a_cluster(cluster_client: RedisCluster) -> None:
    info = await server_info(cluster_client)
    assert info.name == "valkey"
    assert info.delifeq
