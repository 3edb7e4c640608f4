"""redis-py errors are translated to ours at one boundary, keeping the cause."""

from __future__ import annotations

import pytest
from redis import exceptions as rex
from redis.asyncio import Redis

from aioredispatterns import (
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    PoolTimeout,
    RedisPatternsError,
    ScriptError,
)
from aioredispatterns._commands import execute
from aioredispatterns._translate import map_redis_errors, translate


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


def test_every_redis_py_error_is_translated() -> None:
    """The table leaves no redis-py exception class unmapped (httpx's rule)."""
    import inspect

    for name, cls in inspect.getmembers(rex, inspect.isclass):
        if not issubclass(cls, Exception) or cls.__module__ != rex.__name__:
            continue
        try:
            instance = cls("boom 127.0.0.1:1") if "Ask" in name or "Moved" in name else cls("boom")
        except (TypeError, ValueError):
            continue  # needs other arguments; its base classes are covered
        assert isinstance(translate(instance), RedisPatternsError), name


def test_data_error_is_bad_input() -> None:
    with pytest.raises(ConfigurationError), map_redis_errors():
        raise rex.DataError("Invalid input of type: 'NoneType'")


def test_foreign_errors_from_redis_py_internals_are_connection_failures() -> None:
    """redis-py closing a connection mid-command raised this AttributeError at callers."""
    raised = AttributeError("'NoneType' object has no attribute 'writelines'")
    with pytest.raises(ConnectionFailed) as info, map_redis_errors():
        raise raised
    assert info.value.__cause__ is raised


def test_cancellation_and_interrupts_pass_untouched() -> None:
    import asyncio

    with pytest.raises(asyncio.CancelledError), map_redis_errors():
        raise asyncio.CancelledError
    assert translate(KeyboardInterrupt()) is None


async def test_server_error_reply_is_command_error(redis_client: Redis, key_prefix: str) -> None:
    await redis_client.set(f"{key_prefix}:s", "text")
    with pytest.raises(CommandError, match="WRONGTYPE"):
        await execute(redis_client, "LPUSH", f"{key_prefix}:s", "x")
