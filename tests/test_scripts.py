"""Lua registry: EVALSHA with a transparent NOSCRIPT fallback, cluster routing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aioredispatterns import ScriptError, connect, server_info
from aioredispatterns._connection import state_of
from aioredispatterns._scripts import Script, delete_if_equal
from aioredispatterns.testing import RedisServer, on_every_node

COMPARE_AND_DELETE = Script.load("compare_and_delete")


@pytest.fixture
def own_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A server of the current kind that this test alone may kill and restart."""
    if not redis_server.owned:
        pytest.skip("kills and restarts a server: needs one this suite started")
    with RedisServer(redis_server.binary, name=f"{redis_server.name}-own") as server:
        yield server


async def _cached_anywhere(client: Redis | RedisCluster, sha: str) -> bool:
    replies = await on_every_node(client, "SCRIPT", "EXISTS", sha)
    return any(int(reply[0]) for reply in replies)


def test_script_files_have_headers() -> None:
    from importlib.resources import files

    for resource in files("aioredispatterns").joinpath("_lua").iterdir():
        if resource.name.endswith(".lua"):
            text = resource.read_text()
            for word in ("KEYS", "ARGV", "returns"):
                assert word in text.split("\n\n")[0], f"{resource.name} header lacks {word}"


async def test_script_survives_script_flush(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url)
    key = f"{key_prefix}:k"
    try:
        await client.set(key, "me")
        assert await COMPARE_AND_DELETE.run(client, [key], ["other"]) == 0
        await on_every_node(client, "SCRIPT", "FLUSH")
        assert not await _cached_anywhere(client, COMPARE_AND_DELETE.sha)
        assert await COMPARE_AND_DELETE.run(client, [key], ["me"]) == 1
        # Cached again (on a cluster: by the node that ran it, the owner of the key).
        assert await _cached_anywhere(client, COMPARE_AND_DELETE.sha)
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


async def test_script_survives_server_restart(own_server: RedisServer) -> None:
    client = connect(own_server.url, retries=5, backoff_base=0.05)
    try:
        await client.set("k", "v")
        assert await COMPARE_AND_DELETE.run(client, ["k"], ["v"]) == 1
        own_server.kill()
        own_server.restart()  # same port, empty, no scripts cached
        await client.set("k", "v2")
        assert await COMPARE_AND_DELETE.run(client, ["k"], ["v2"]) == 1
    finally:
        await client.aclose()


async def test_script_error_is_typed(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url)
    broken = Script(name="broken", source=b"return redis.call('NOPE')", sha="0" * 40)
    try:
        with pytest.raises(ScriptError):
            await broken.run(client, [f"{key_prefix}:k"])
    finally:
        await client.aclose()


def test_unknown_script_name_is_a_configuration_error() -> None:
    from aioredispatterns import ConfigurationError

    with pytest.raises(ConfigurationError):
        Script.load("no_such_script")


@pytest.mark.parametrize("native", [True, False], ids=["native", "lua"])
async def test_delete_if_equal(redis_client: Redis, key_prefix: str, native: bool) -> None:
    client = redis_client
    info = await server_info(client)
    if native and not info.delifeq:
        pytest.skip(f"{info} has no DELIFEQ")
    if not native and info.delifeq:
        # Force the Lua path on a server that has DELIFEQ too.
        state_of(client).info = replace(info, delifeq=False)
    key = f"{key_prefix}:owner"
    await client.set(key, "a")
    assert await delete_if_equal(client, key, "b") is False
    assert await client.get(key) == b"a"
    assert await delete_if_equal(client, key, "a") is True
    assert await client.exists(key) == 0
    assert await delete_if_equal(client, key, "a") is False


@pytest.mark.cluster
async def test_script_runs_on_the_node_owning_its_keys(cluster_client: RedisCluster) -> None:
    keys = [f"k{index}" for index in range(30)]
    for key in keys:
        await cluster_client.set(key, "v")
    for key in keys:
        assert await COMPARE_AND_DELETE.run(cluster_client, [key], ["v"]) == 1
    assert sum([await cluster_client.exists(key) for key in keys]) == 0
