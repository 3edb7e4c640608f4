"""The one boundary where redis-py's errors become ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from redis import exceptions as rex

from .errors import (
    CommandError,
    CommandTimeout,
    ConnectionFailed,
    PoolTimeout,
    RedisPatternsError,
    ScriptError,
)

# redis-py reports an exhausted BlockingConnectionPool as a plain ConnectionError
# with this text (its cause is the asyncio.TimeoutError of the wait).
_POOL_EXHAUSTED = "No connection available"
_TOO_MANY = "Too many connections"


def translate(exc: BaseException) -> RedisPatternsError | None:
    """Return our error for a redis-py (or socket) error, or None to let it pass."""
    if isinstance(exc, RedisPatternsError):
        return None
    message = str(exc)
    if isinstance(exc, rex.ConnectionError | rex.MaxConnectionsError):
        if _POOL_EXHAUSTED in message or _TOO_MANY in message:
            return PoolTimeout(f"no pooled connection became free in time ({message})")
        return ConnectionFailed(message or type(exc).__name__)
    if isinstance(exc, rex.TimeoutError):
        return CommandTimeout(message or "the server did not answer in time")
    if isinstance(exc, rex.ResponseError):
        # Script errors are told apart where scripts run (Script.run); here only the
        # reply's own words can say so.
        if message.startswith("Error running script") or "user_script:" in message:
            return ScriptError(message)
        return CommandError(message)
    if isinstance(exc, rex.RedisError):
        return CommandError(message or type(exc).__name__)
    if isinstance(exc, ConnectionError | OSError):
        return ConnectionFailed(message or type(exc).__name__)
    return None


def reraise(exc: Exception) -> NoReturn:
    """Raise our error for ``exc`` (keeping it as the cause), or ``exc`` itself when it
    is not a Redis or socket error."""
    ours = translate(exc)
    if ours is None:
        raise exc
    raise ours from exc


@contextmanager
def map_redis_errors() -> Iterator[None]:
    """Re-raise redis-py errors as :mod:`aioredispatterns.errors` types.

    Cancellation and anything that is not a Redis/socket error pass through untouched.
    """
    try:
        yield
    except Exception as exc:
        reraise(exc)
