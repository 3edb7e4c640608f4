"""Redlock over five servers of our own: majority, failures, fencing across servers."""

from __future__ import annotations

import logging
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
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ConfigurationError):
            Redlock(five_clients, "job", release_timeout=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ slow servers


async def _pause(clients: list[Redis], ms: int) -> None:
    """Freeze the servers behind ``clients`` for ``ms`` (commands queue, then run)."""
    for client in clients:
        await client.execute_command("CLIENT", "PAUSE", str(ms), "ALL")


async def test_a_release_slower_than_node_timeout_still_deletes_every_key(
    five_clients: list[Redis],
) -> None:
    # The release used to share the 50 ms node deadline (and run capability detection
    # inside it): servers slower than that kept the keys for a whole TTL, and the
    # unanswered deletes read as "not held": a false LockLost.
    redlock = Redlock(five_clients, "job", ttl=30, node_timeout=0.05)
    with anyio.fail_after(20):
        async with redlock as lease:
            await _pause(five_clients, 400)
    assert not lease.lost.is_set()
    assert await _holders(five_clients, list(range(5))) == 0


async def test_capabilities_are_detected_before_the_acquire_not_in_the_release(
    five_clients: list[Redis],
) -> None:
    async def hellos() -> list[int]:
        counts = []
        for client in five_clients:
            stats = await client.info("commandstats")
            counts.append(int(stats.get("cmdstat_hello", {}).get("calls", 0)))
        return counts

    lease = await Redlock(five_clients, "job", ttl=5).acquire()
    detected = await hellos()
    assert all(count >= 1 for count in detected), detected
    await lease.release()
    assert await hellos() == detected  # the release is one command per server
    assert await _holders(five_clients, list(range(5))) == 0


async def test_servers_that_do_not_answer_are_unknown_not_a_no(
    five_clients: list[Redis],
) -> None:
    # A majority freezes for 0.6 s, well inside the lease's validity (1.5 s): the
    # renewals in between get no answer, which must not read as "not yours".
    redlock = Redlock(five_clients, "job", ttl=1.5, cancel_on_loss=True)
    with anyio.fail_after(20):
        async with redlock as lease:
            await _pause(five_clients[:3], 600)
            await anyio.sleep(2.0)  # past the validity the acquire gave
            assert lease.held
    assert not lease.lost.is_set()
    assert await _holders(five_clients, list(range(5))) == 0


async def test_a_minority_of_denials_is_not_a_loss(five_clients: list[Redis]) -> None:
    # Four servers, quorum three: two answer "not yours" (their key vanished), two
    # confirm. Neither side is a majority, so the renewal is unknown and retried until
    # the validity runs out, not lost at once; here the keys come back in time.
    clients = five_clients[:4]
    redlock = Redlock(clients, "job", ttl=3)
    assert redlock.quorum == 3
    with anyio.fail_after(20):
        async with redlock as lease:
            for client in clients[:2]:
                await client.delete(OWNER_KEY)
            await anyio.sleep(1.5)  # the first renewal (at 1 s) saw two denials
            assert not lease.lost.is_set()
            for client in clients[:2]:
                await client.set(OWNER_KEY, lease.owner, px=3000)
            await anyio.sleep(1.5)  # past the validity of the acquire (~2.97 s)
            assert lease.held
    assert not lease.lost.is_set()


async def test_a_majority_refusing_the_renewal_loses_the_lease_at_once(
    five_clients: list[Redis], caplog: pytest.LogCaptureFixture
) -> None:
    # An error reply (WRONGTYPE here, NOPERM under an ACL) will not go away by waiting:
    # with a majority refusing, the lease is lost at the first renewal (2 s), not
    # retried until its validity runs out (5.9 s).
    redlock = Redlock(five_clients, "job", ttl=6)
    caplog.set_level(logging.WARNING, logger="aioredispatterns.lock")
    with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
        async with redlock as lease:
            for client in five_clients[:3]:
                await client.delete(OWNER_KEY)
                await client.rpush(OWNER_KEY, lease.owner)
            with anyio.fail_after(4.5):
                await lease.lost.wait()
    warnings = [r for r in caplog.records if r.name == "aioredispatterns.lock"]
    assert len(warnings) == 1
    assert "WRONGTYPE" in warnings[0].getMessage()
    assert await _holders(five_clients, [3, 4]) == 0


# ----------------------------------------------------------------- one server twice


async def test_two_clients_to_one_server_are_refused(five_servers: list[RedisServer]) -> None:
    # Two connections to one server give a "majority" of one crash, and the second
    # grant of the same owner always fails (SET NX): the acquire waited forever.
    first, second = five_servers[0], five_servers[1]
    clients = [
        connect(first.url),
        connect(first.url),  # the same server again, through another pool
        connect(second.url),
        connect(f"redis://localhost:{first.port}/1"),  # another db: another keyspace
    ]
    try:
        with pytest.raises(ConfigurationError, match="both talk to"):
            Redlock(clients[:3], "job")
        Redlock([clients[0], clients[2], clients[3]], "job")
    finally:
        for client in clients:
            await client.aclose()


async def test_cluster_and_unix_clients_sharing_a_server_are_refused() -> None:
    # No server is contacted: the check reads the clients' settings.
    clients = [
        connect("redis+cluster://127.0.0.1:7000"),
        connect("redis://127.0.0.1:7000/0"),  # a node of that cluster
        connect("redis+cluster://127.0.0.1:7000"),
        connect("unix:///tmp/arp-redlock.sock?db=0"),
        connect("unix:///tmp/arp-redlock.sock?db=0"),
        connect("redis://127.0.0.1:7001/0"),
    ]
    try:
        for pair in ((0, 1), (0, 2), (3, 4)):
            with pytest.raises(ConfigurationError, match="both talk to"):
                Redlock([clients[i] for i in pair], "job")
        Redlock([clients[0], clients[3], clients[5]], "job")
    finally:
        for client in clients:
            await client.aclose()


async def test_the_refusal_says_why_when_no_server_answers() -> None:
    from aioredispatterns import LockNotAcquired, Redlock, connect
    from aioredispatterns.testing import free_port

    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0, connect_timeout=0.2)
    try:
        with pytest.raises(LockNotAcquired, match="0 granted, 0 held by someone else, 1 did"):
            await Redlock([client], "r", ttl=1).acquire(blocking=False)
    finally:
        await client.aclose()


async def test_a_redlock_of_one_deployment_locks_renews_and_fences(
    redis_client: Redis, key_prefix: str
) -> None:
    """Redlock over the matrix server alone (a cluster is one instance, quorum 1): the
    five-server behaviour above runs on valkey-9.1 only."""
    owner_key = f"{key_prefix}:lock:{{job}}:owner"
    redlock = Redlock([redis_client], "job", ttl=1, prefix=key_prefix)
    assert redlock.quorum == 1
    async with redlock as lease:
        with pytest.raises(LockNotAcquired):
            await Redlock([redis_client], "job", ttl=5, prefix=key_prefix).acquire(blocking=False)
        await anyio.sleep(1.5)  # past the TTL: only the renewals (every ttl / 3) keep it
        assert lease.held
        assert await redis_client.exists(owner_key) == 1
        first = lease.token
    assert await redis_client.exists(owner_key) == 0
    second = await redlock.acquire()
    assert second.token > first
    await second.release()
