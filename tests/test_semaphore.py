"""Semaphore: N holders, per-holder TTL, renewal, wake-ups, cancellation (real servers)."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    ConfigurationError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    Semaphore,
)


def _holders_key(prefix: str) -> str:
    return f"{prefix}:semaphore:{{pool}}:holders"


async def test_at_most_limit_holders(redis_client: Redis, key_prefix: str) -> None:
    sem = Semaphore(redis_client, "pool", 2, ttl=5, prefix=key_prefix)
    first = await sem.acquire()
    second = await sem.acquire()
    assert await sem.holders() == 2
    with pytest.raises(LockNotAcquired):
        await sem.acquire(blocking=False)
    await first.release()
    third = await sem.acquire(blocking=False)
    assert first.token < second.token < third.token
    await second.release()
    await third.release()
    assert await redis_client.exists(_holders_key(key_prefix)) == 0
    with pytest.raises(LockNotOwned):
        await third.release()


async def test_concurrent_users_never_exceed_the_limit(
    redis_client: Redis, key_prefix: str
) -> None:
    sem = Semaphore(redis_client, "pool", 3, ttl=30, prefix=key_prefix)
    inside = 0
    most = 0

    async def user() -> None:
        nonlocal inside, most
        async with sem:
            inside += 1
            most = max(most, inside)
            await anyio.sleep(0.02)
            inside -= 1

    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(user)
    assert most == 3
    # Woken by releases, not by the 30 s TTL fallback.
    assert anyio.current_time() - started < 2.0


async def test_a_crashed_holder_frees_its_slot_at_its_ttl(
    redis_client: Redis, key_prefix: str
) -> None:
    sem = Semaphore(redis_client, "pool", 1, ttl=0.3, prefix=key_prefix)
    await sem.acquire()  # never released
    started = anyio.current_time()
    lease = await sem.acquire(timeout=3)
    assert 0.2 <= anyio.current_time() - started < 0.7
    await lease.release()


async def test_renewal_and_loss(redis_client: Redis, key_prefix: str) -> None:
    sem = Semaphore(redis_client, "pool", 1, ttl=0.3, cancel_on_loss=True, prefix=key_prefix)
    async with sem as lease:
        await anyio.sleep(0.8)  # renewed past its TTL
        assert lease.held
        with pytest.raises(LockNotAcquired):
            await sem.acquire(blocking=False)
    cancelled = False
    with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
        async with sem as lease:
            await redis_client.zrem(_holders_key(key_prefix), lease.owner)  # slot taken away
            try:
                await anyio.sleep(5)
            except anyio.get_cancelled_exc_class():
                cancelled = True
                raise
    assert cancelled


@pytest.mark.parametrize("delay_ms", [0, 0.3, 1, 2, 5])
async def test_cancelled_holder_and_waiter_leave_nothing(
    redis_client: Redis, key_prefix: str, delay_ms: float
) -> None:
    sem = Semaphore(redis_client, "pool", 1, ttl=5, prefix=key_prefix)
    with anyio.move_on_after(delay_ms / 1000):
        async with sem:
            await anyio.sleep(0.002)
    assert await sem.holders() == 0
    holder = await sem.acquire()
    with anyio.move_on_after(delay_ms / 1000):
        await sem.acquire()
    assert await sem.holders() == 1
    await holder.release()
    assert await redis_client.exists(_holders_key(key_prefix)) == 0


async def test_semaphore_arguments_are_checked(redis_client: Redis) -> None:
    with pytest.raises(ConfigurationError):
        Semaphore(redis_client, "pool", 0)
    with pytest.raises(ConfigurationError):
        Semaphore(redis_client, "pool", True)
    with pytest.raises(ConfigurationError):
        Semaphore(redis_client, "pool", 2, ttl=-1)
