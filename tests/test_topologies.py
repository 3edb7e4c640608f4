"""The matrix's ``cluster`` kind, and the checks that hold on one server and on a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from aioredispatterns import connect
from aioredispatterns.testing import CLUSTER_KIND, key_count, on_every_node

pytest_plugins = ["pytester"]

INNER_TIMEOUT = 120.0


async def test_redis_client_starts_empty_on_every_primary(
    redis_server: Any, redis_client: Any, key_prefix: str
) -> None:
    if not redis_server.owned:
        pytest.skip("an external server is flushed only if allowed")
    assert await key_count(redis_client) == 0
    keys = [f"{key_prefix}:{index}" for index in range(30)]
    for key in keys:
        await redis_client.set(key, 1)
    assert await key_count(redis_client) == len(keys)
    if redis_server.name == CLUSTER_KIND:
        assert isinstance(redis_client, RedisCluster)
        assert redis_server.url.startswith("redis+cluster://")
        assert len(redis_server.cluster.primaries()) == 3
        # The keys really are spread: key_count summed every primary's DBSIZE.
        assert len({redis_server.cluster.node_for_key(key).port for key in keys}) == 3
    else:
        assert isinstance(redis_client, Redis)


async def test_on_every_node_reaches_every_node_from_a_fresh_client(
    redis_server: Any, redis_url: str
) -> None:
    # A fresh cluster client knows only its startup node until it is initialized.
    client = connect(redis_url)
    try:
        replies = await on_every_node(client, "PING")
    finally:
        await client.aclose()
    nodes = 3 if redis_server.name == CLUSTER_KIND else 1
    assert replies == [True] * nodes


def _inner_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ARP_TEST_REDIS_URL", "ARP_TEST_ALLOW_FLUSH", "ARP_REDIS_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest('pytest_plugins = ["aioredispatterns.testing"]')
    pytester.makepyfile(
        test_inner="""
        import pytest

        @pytest.mark.standalone_only(reason="pauses the server")
        def test_one_process(redis_server):
            assert redis_server.name != "cluster"
        """
    )


@pytest.mark.parametrize(
    "where",
    [("--redis-servers", "cluster"), ("--redis-url", "redis+cluster://127.0.0.1:1/0")],
    ids=["cluster-kind", "external-cluster-url"],
)
def test_a_standalone_only_test_is_skipped_on_a_cluster_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: tuple[str, str]
) -> None:
    _inner_project(pytester, monkeypatch)
    # Skipped before any fixture runs: no cluster is started, none is contacted.
    result = pytester.runpytest_subprocess(*where, "-rs", timeout=INNER_TIMEOUT)
    assert result.parseoutcomes() == {"skipped": 1}, result.stdout.str()
    result.stdout.fnmatch_lines(["*standalone only: pauses the server*"])
