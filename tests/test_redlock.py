"""Redlock over five servers of our own: majority, failures, fencing across servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    ConfigurationError,
    LockLost,
    LockNotAcquired,
    Redlock,
    connect,
)
from aioredispatterns.testing import RedisServer

OWNER_KEY = "arp:lock:{job}:owner"
FENCE_KEY = "arp:lock:{job}:fence"


@pytest.fixture
def five_servers(redis_server: Any) -> Iterator[list[RedisServer]]:
    if not redis_server.owned or redis_server.name != "valkey-9.1":
        pytest.skip("starts five servers: runs on valkey-9.1 only")
    servers: list[RedisServer] = []
    try:
        for index in range(5):
            servers.append(RedisServer(redis_server.binary, name=f"redlock-{index}").start())
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def five_clients(five_servers: list[RedisServer]) -> AsyncIterator[list[Redis]]:
    # A dead server must fail fast: no retries, a short connect timeout.
    clients = [connect(s.url, retries=0, connect_timeout=0.2) for s in five_servers]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


async def _holders(clients: list[Redis], alive: list[int]) -> int:
    return sum([await clients[i].exists(OWNER_KEY) for i in alive])


async def test_majority_acquire_release_and_exclusion(five_clients: list[Redis]) -> None:
    redlock = Redlock(five_clients, "job", ttl=5)
    assert redlock.quorum == 3
    async with redlock as lease:
        assert await _holders(five_clients, list(range(5))) == 5
        with pytest.raises(LockNotAcquired):
            await Redlock(five_clients, "job", ttl=5).acquire(blocking=False)
        first = lease.token
    assert await _holders(five_clients, list(range(5))) == 0
    async with redlock as lease:
        assert lease.token > first


async def test_two_dead_servers_still_lock_three_dead_fail_cleanly(
    five_servers: list[RedisServer], five_clients: list[Redis]
) -> None:
    five_servers[0].kill()
    five_servers[1].kill()
    redlock = Redlock(five_clients, "job", ttl=2)
    async with redlock as lease:
        assert await _holders(five_clients, [2, 3, 4]) == 3
        await anyio.sleep(1.0)  # renewal on the surviving majority
        assert lease.held
    assert await _holders(five_clients, [2, 3, 4]) == 0

    five_servers[2].kill()
    started = anyio.current_time()
    with pytest.raises(LockNotAcquired):
        await redlock.acquire(timeout=1.0)
    elapsed = anyio.current_time() - started
    assert elapsed < 1.0 + 0.2
    # Every partial grant was given back: no key left on the two survivors.
    assert await _holders(five_clients, [3, 4]) == 0


async def test_a_minority_cannot_keep_the_lock(
    five_servers: list[RedisServer], five_clients: list[Redis]
) -> None:
    redlock = Redlock(five_clients, "job", ttl=0.6, cancel_on_loss=True)
    with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
        async with redlock as lease:
            for server in five_servers[:3]:
                server.kill()
            with anyio.fail_after(1.5):
                await lease.lost.wait()
            await anyio.sleep(5)  # cancelled at once
    assert await _holders(five_clients, [3, 4]) == 0


async def test_tokens_increase_even_when_server_counters_disagree(
    five_servers: list[RedisServer], five_clients: list[Redis]
) -> None:
    # One server's counter runs far ahead (its clock was wrong, say).
    seconds, micros = await five_clients[0].time()
    ahead = (seconds + 86_400) * 1_000_000 + micros
    await five_clients[0].set(FENCE_KEY, ahead)
    redlock = Redlock(five_clients, "job", ttl=5)
    lease = await redlock.acquire()
    assert lease.token >= ahead
    await lease.release()
    # That server is gone; the next majority has never seen its counter directly, but
    # the token was written back to a majority, which the next majority overlaps.
    five_servers[0].kill()
    lease2 = await redlock.acquire()
    assert lease2.token > lease.token
    await lease2.release()


async def test_redlock_arguments_are_checked(five_clients: list[Redis]) -> None:
    with pytest.raises(ConfigurationError):
        Redlock([], "job")
    with pytest.raises(ConfigurationError):
        Redlock([five_clients[0], five_clients[0]], "job")
    with pytest.raises(ConfigurationError):
        Redlock(five_clients, "job", drift_factor=0.7)
    with pytest.raises(ConfigurationError):
        Redlock(five_clients, "job", ttl=0.1, node_timeout=0.2)
