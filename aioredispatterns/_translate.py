"""The one table where redis-py's (and the socket's) errors become ours.

Every exception that leaves the command layer (``_commands``) passes through
:func:`translate`: redis-py's error types map to the library's tree; an exception that
is not redis-py's own but came out of its internals (an ``AttributeError`` on a
connection closed mid-command, say) is a connection failure too, never a foreign error
for the caller to guess at. Cancellation is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from redis import exceptions as rex

from .errors import (
    ClusterUnavailable,
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    PoolTimeout,
    RedisPatternsError,
    ScriptError,
)

__all__ = ("NoScriptReply", "map_redis_errors", "reraise", "translate")

# redis-py reports an exhausted BlockingConnectionPool as a plain ConnectionError
# with this text (its cause is the asyncio.TimeoutError of the wait).
_POOL_EXHAUSTED = "No connection available"
_TOO_MANY = "Too many connections"


class NoScriptReply(CommandError):
    """NOSCRIPT: the server does not have the script (the caller re-sends it as EVAL)."""


def translate(exc: BaseException) -> RedisPatternsError | None:
    """Our error for ``exc``; None for one of ours already (or a non-Exception)."""
    if isinstance(exc, RedisPatternsError) or not isinstance(exc, Exception):
        return None
    message = str(exc)
    if isinstance(exc, rex.ConnectionError | rex.MaxConnectionsError):
        if (
            _POOL_EXHAUSTED in message
            or _TOO_MANY in message
            or isinstance(exc, rex.MaxConnectionsError)
        ):
            return PoolTimeout(f"no pooled connection became free in time ({message})")
        return ConnectionFailed(message or type(exc).__name__)
    if isinstance(exc, rex.TimeoutError | TimeoutError):
        return CommandTimeout(message or "the server did not answer in time")
    if isinstance(exc, rex.TryAgainError | rex.ClusterDownError | rex.AskError):
        # The cluster refused the command (a slot migrating, moved, or not served):
        # it did not run. The slot router retries these; one that gets here is spent.
        return ClusterUnavailable(message or type(exc).__name__)
    if isinstance(exc, rex.NoScriptError):
        return NoScriptReply(message)
    if isinstance(exc, rex.ResponseError):
        # Script errors are told apart where scripts run (execute_script); here only the
        # reply's own words can say so.
        if message.startswith("Error running script") or "user_script:" in message:
            return ScriptError(message)
        return CommandError(message)
    if isinstance(exc, rex.DataError):
        # The encoder refused an argument: nothing was sent.
        return ConfigurationError(f"a command argument cannot be sent: {message}")
    if isinstance(exc, rex.RedisError):
        return CommandError(message or type(exc).__name__)
    if isinstance(exc, rex.RedisClusterException):
        if "not enabled" in message.lower():
            # cluster=True (or a redis+cluster:// URL) against a standalone server.
            return ConfigurationError(f"the server is not a cluster node: {message}")
        return ConnectionFailed(message or "the cluster could not be reached")
    if isinstance(exc, ConnectionError | OSError):
        return ConnectionFailed(message or type(exc).__name__)
    # Anything else came out of redis-py's internals mid-command (a connection closed
    # under it, a parser in a state it did not expect): whether the command ran is
    # unknown, which is what ConnectionFailed says.
    return ConnectionFailed(f"{type(exc).__name__} inside redis-py: {message}")


def reraise(exc: Exception) -> NoReturn:
    """Raise our error for ``exc`` (keeping it as the cause), or ``exc`` if it is ours."""
    ours = translate(exc)
    if ours is None:
        raise exc
    raise ours from exc


@contextmanager
def map_redis_errors() -> Iterator[None]:
    """Re-raise every error of the block as one of :mod:`aioredispatterns.errors`.

    For code inside the command layer only. Cancellation passes through untouched.
    """
    try:
        yield
    except Exception as exc:
        reraise(exc)
