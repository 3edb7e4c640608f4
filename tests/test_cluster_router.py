"""The slot router's promises on a healthy local cluster (faults: test_cluster_faults.py).

A timed-out command is never re-sent, an exhausted node pool is a PoolTimeout, the first
call of a fresh client may be anything (capability detection, a sharded publish, a
consumer group's entry), pipeline statistics sum over the nodes, and closing the client
closes every node's pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from aioredispatterns import (
    CommandTimeout,
    ConsumerGroup,
    PoolTimeout,
    StreamMessage,
    StreamProducer,
    connect,
    pipeline_stats,
    publish,
    server_info,
)
from aioredispatterns._commands import dedicated, execute
from aioredispatterns.testing import ClusterServers

pytestmark = pytest.mark.cluster


@pytest.fixture
async def fresh(redis_cluster: ClusterServers) -> AsyncIterator[Any]:
    """A cluster client that has sent nothing yet."""
    client = connect(redis_cluster.url, socket_timeout=0.5)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_timed_out_command_is_not_resent(
    redis_cluster: ClusterServers, fresh: Any, key_prefix: str
) -> None:
    key = f"{{{key_prefix}}}:counter"
    await execute(fresh, "DEL", key)
    node = redis_cluster.node_for_key(key)
    node.pause()
    try:
        with pytest.raises(CommandTimeout):
            await execute(fresh, "INCR", key)
    finally:
        node.resume()
    # The server ran the INCR it had buffered once it woke; nobody sent it again.
    with anyio.fail_after(10):
        while await execute(fresh, "GET", key) is None:  # noqa: ASYNC110 - server state
            await anyio.sleep(0.05)
    await anyio.sleep(0.3)
    assert await execute(fresh, "GET", key) == b"1"
    stats = pipeline_stats(fresh)
    assert stats is not None
    assert stats.connection_errors >= 1  # the timed-out connection was dropped and counted


async def test_an_exhausted_node_pool_is_a_pool_timeout(
    redis_cluster: ClusterServers, key_prefix: str
) -> None:
    client = connect(redis_cluster.url, max_connections=1, pool_timeout=0.2)
    try:
        async with dedicated(client, key=f"{{{key_prefix}}}"):
            with pytest.raises(PoolTimeout):
                async with dedicated(client, key=f"{{{key_prefix}}}"):
                    pass
    finally:
        await client.aclose()


async def test_server_info_is_a_fine_first_call(fresh: Any) -> None:
    info = await server_info(fresh)
    assert info.name in ("valkey", "redis")
    assert info.version >= (6, 2)


async def test_a_sharded_publish_is_a_fine_first_call(fresh: Any, key_prefix: str) -> None:
    assert await publish(fresh, f"{{{key_prefix}}}news", "hello", sharded=True) == 0


async def test_a_consumer_group_is_a_fine_first_call(fresh: Any, key_prefix: str) -> None:
    producer = StreamProducer(fresh, "orders", prefix=key_prefix)
    seen: list[str] = []
    done = anyio.Event()

    async def handle(message: StreamMessage) -> None:
        seen.append(message.id)
        if len(seen) == 10:
            done.set()

    async with ConsumerGroup(fresh, "orders", "billing", handler=handle, prefix=key_prefix):
        for index in range(10):
            await producer.add({"n": index})
        with anyio.fail_after(10):
            await done.wait()
    assert len(set(seen)) == 10


async def test_statistics_sum_over_the_nodes(redis_cluster: ClusterServers, fresh: Any) -> None:
    keys = [f"key:{index}" for index in range(90)]
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(execute, fresh, "SET", key, "v")
    stats = pipeline_stats(fresh)
    assert stats is not None
    assert stats.commands == len(keys)
    owners = {redis_cluster.node_for_key(key).port for key in keys}
    assert len(owners) == len(redis_cluster.primaries())  # the batch did span every node


async def test_closing_the_client_closes_every_node_pool(
    redis_cluster: ClusterServers, key_prefix: str
) -> None:
    client = connect(redis_cluster.url)
    keys = [f"{key_prefix}:{index}" for index in range(30)]
    for key in keys:
        await execute(client, "SET", key, "v")
    router = client.__dict__["_aioredispatterns_state"].router
    pools = [node.connection_pool for node in router.nodes]
    assert len(pools) == len(redis_cluster.primaries())
    await client.aclose()
    for pool in pools:
        connections = [*pool._available_connections, *pool._in_use_connections]  # type: ignore[attr-defined]
        assert connections  # each node was used
        assert not [c for c in connections if c.is_connected]
