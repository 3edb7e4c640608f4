"""What comes out of a primitive's ``async with`` is what happened: the body's own
exception as itself, one library error, or cancellation — never an ExceptionGroup."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    Broadcast,
    Cache,
    ConnectionFailed,
    InvalidKeyError,
    RedisPatternsError,
    connect,
    subscribe,
)
from aioredispatterns._scope import background
from aioredispatterns.testing import free_port


async def test_cache_body_errors_come_out_as_themselves(
    redis_client: Redis, key_prefix: str
) -> None:
    with pytest.raises(InvalidKeyError):
        async with Cache(redis_client, ttl=10, prefix=key_prefix) as cache:
            await cache.get("")
    with pytest.raises(KeyError):
        async with Cache(redis_client, ttl=10, prefix=key_prefix):
            raise KeyError("mine")


async def test_cache_cancellation_comes_out_as_cancellation(
    redis_client: Redis, key_prefix: str
) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with Cache(redis_client, ttl=10, prefix=key_prefix) as cache:
            await cache.get_or_load("k", anyio.sleep_forever)  # type: ignore[arg-type]
    assert scope.cancelled_caught


async def test_subscription_body_errors_come_out_as_themselves(
    redis_client: Redis, key_prefix: str
) -> None:
    with pytest.raises(KeyError):
        async with subscribe(redis_client, f"{key_prefix}:c"):
            raise KeyError("mine")
    with pytest.raises(ValueError, match="mine"):
        async with Broadcast(redis_client) as hub, hub.subscribe(f"{key_prefix}:c"):
            raise ValueError("mine")
    with pytest.raises(KeyError):
        async with Broadcast(redis_client):
            raise KeyError("mine")


async def test_subscription_cancellation_comes_out_as_cancellation(
    redis_client: Redis, key_prefix: str
) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with subscribe(redis_client, f"{key_prefix}:c") as messages:
            async for _ in messages:
                pass
    assert scope.cancelled_caught


async def test_entering_a_subscription_on_a_dead_server_is_one_typed_error() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0, connect_timeout=0.5)
    try:
        with anyio.fail_after(10), pytest.raises(ConnectionFailed):
            async with subscribe(client, "c"):
                pass
    finally:
        await client.aclose()


async def test_background_failure_is_one_library_error() -> None:
    async def fail() -> None:
        raise ConnectionFailed("lost")

    with pytest.raises(ConnectionFailed, match="lost"):  # noqa: PT012
        async with background("test") as tg:
            tg.start_soon(fail)
            await anyio.sleep_forever()

    async def bug() -> None:
        raise ZeroDivisionError

    with pytest.raises(RedisPatternsError) as info:  # noqa: PT012
        async with background("test") as tg:
            tg.start_soon(bug)
            await anyio.sleep_forever()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


async def test_body_error_wins_over_a_background_failure() -> None:
    async def fail() -> None:
        raise ConnectionFailed("lost")

    with pytest.raises(KeyError):  # noqa: PT012
        async with background("test") as tg:
            tg.start_soon(fail)
            raise KeyError("mine")
