"""redis-py errors are translated to ours at one boundary, keeping the cause."""

from __future__ import annotations

import pytest
from redis import exceptions as rex
from redis.asyncio import Redis

from aioredispatterns import (
    CommandError,
    CommandTimeout,
    ConnectionFailed,
    PoolTimeout,
    RedisPatternsError,
    ScriptError,
)
from aioredispatterns._commands import execute
from aioredispatterns._translate import map_redis_errors


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (rex.ConnectionError("No connection available."), PoolTimeout),
        (rex.MaxConnectionsError("Too many connections"), PoolTimeout),
        (rex.ConnectionError("Connection reset by peer"), ConnectionFailed),
        (rex.TimeoutError("Timeout reading from socket"), CommandTimeout),
        (rex.ResponseError("WRONGTYPE Operation against a key"), CommandError),
        (rex.ResponseError("Error running script (call to f_0123)"), ScriptError),
        (ConnectionResetError("reset"), ConnectionFailed),
    ],
)
def test_translation(raised: Exception, expected: type[RedisPatternsError]) -> None:
    with pytest.raises(expected) as info, map_redis_errors():
        raise raised
    assert info.value.__cause__ is raised


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), map_redis_errors():
        raise KeyError("x")


async def test_server_error_reply_is_command_error(redis_client: Redis, key_prefix: str) -> None:
    await redis_client.set(f"{key_prefix}:s", "text")
    with pytest.raises(CommandError, match="WRONGTYPE"):
        await execute(redis_client, "LPUSH", f"{key_prefix}:s", "x")
