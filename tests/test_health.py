"""health(): a PING with a deadline, pool usage and auto-pipeline counters, never a raise."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from aioredispatterns import ConfigurationError, connect, subscribe
from aioredispatterns.health import HealthReport, PoolUsage, health
from aioredispatterns.testing import RedisServer, free_port

pytestmark = pytest.mark.budget_kinds("valkey-9.1", "cluster")


async def test_a_healthy_server(redis_client: Any) -> None:
    await redis_client.set("health-check-warmup", 1)
    report = await health(redis_client, timeout=5)
    assert report.ok, report
    assert report.error is None
    assert report.latency is not None
    assert 0 < report.latency < 5
    assert report.pool is not None
    assert report.pool.max_connections >= 32
    assert not report.pool.exhausted
    assert report.pipeline is not None
    assert report.pipeline.commands >= 1
    assert report.warnings == ()
    body = json.loads(json.dumps(report.as_dict()))
    assert body["ok"] is True
    assert body["pool"]["exhausted"] is False


async def test_a_paused_server_fails_within_the_deadline(own_server: RedisServer) -> None:
    async with connect(own_server.url) as client:
        assert (await health(client)).ok
        with own_server.paused():
            started = anyio.current_time()
            report = await health(client, timeout=0.3)
            took = anyio.current_time() - started
        assert not report.ok
        assert report.latency is None
        assert report.error is not None
        assert report.error.startswith("CommandTimeout")
        assert took < 5  # the deadline, with room for a busy machine
        assert report.as_dict()["ok"] is False
        # Back by itself: the paused PING's reply is discarded, the next one answers.
        with anyio.fail_after(20):
            while not (await health(client, timeout=1)).ok:  # noqa: ASYNC110
                await anyio.sleep(0.05)


async def test_an_unreachable_server_and_bad_input() -> None:
    async with connect(f"redis://127.0.0.1:{free_port()}/0", retries=0) as client:
        report = await health(client, timeout=2)
        assert not report.ok
        assert report.error is not None
        assert report.error.startswith("ConnectionFailed")
        for timeout in (0, -1, float("nan")):
            with pytest.raises(ConfigurationError):
                await health(client, timeout=timeout)
    with pytest.raises(ConfigurationError):
        await health("redis://localhost", timeout=1)  # type: ignore[arg-type]


@pytest.mark.standalone_only(reason="counts one pool's connections")
async def test_a_crowded_pool_is_reported(redis_url: str) -> None:
    async with connect(redis_url, max_connections=2) as client:
        await client.ping()
        # A subscription holds a connection of its own: with the auto-pipeline's, the pool
        # of two is full.
        async with subscribe(client, "health-crowded"):
            report = await health(client, timeout=5)
        assert report.ok
        assert report.pool == PoolUsage(in_use=2, idle=0, max_connections=2)
        assert report.pool.exhausted
        assert len(report.warnings) == 1
        assert "Broadcast" in report.warnings[0]
        assert isinstance(report, HealthReport)
