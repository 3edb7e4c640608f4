"""Every error this library raises.

All of them derive from :class:`RedisPatternsError`, so one ``except`` clause catches
anything the library raises. Where the meaning matches a builtin, the error inherits
it too (a pool timeout *is* a ``TimeoutError``; bad input *is* a ``ValueError``), so
code written against the builtins keeps working.

Errors from redis-py are translated at one boundary (``_translate.map_redis_errors``);
the original error is kept as ``__cause__``.

::

    RedisPatternsError
    ├── ConfigurationError (ValueError)      bad input, raised before any command is sent
    │   └── InvalidKeyError                  an empty key, or one that is not str/bytes
    ├── SerializationError (ValueError)      a value could not be encoded or decoded
    ├── ConnectionFailed (ConnectionError)   the server could not be reached or hung up
    │   ├── PoolTimeout (TimeoutError)       no pooled connection became free in time
    │   └── ClusterUnavailable               the cluster could not serve a slot in time
    ├── CommandTimeout (TimeoutError)        the server did not answer within socket_timeout
    ├── CommandError                         the server answered with an error reply
    │   └── ScriptError                      a Lua script failed on the server
    └── UnsupportedServerError               the server lacks a command and there is no fallback

Each primitive adds its own sub-base next to its class (``LockError``, ``CacheError``,
...), always under :class:`RedisPatternsError`.
"""

from __future__ import annotations

__all__ = (
    "ClusterUnavailable",
    "CommandError",
    "CommandTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "InvalidKeyError",
    "PoolTimeout",
    "RedisPatternsError",
    "ScriptError",
    "SerializationError",
    "UnsupportedServerError",
)


class RedisPatternsError(Exception):
    """Root of every error raised by aioredispatterns."""


class ConfigurationError(RedisPatternsError, ValueError):
    """Bad input: a policy, option or argument that cannot work.

    Always raised before any command is sent, so nothing has been written.
    """


class InvalidKeyError(ConfigurationError):
    """A key or name that is empty or neither ``str`` nor ``bytes``."""


class SerializationError(RedisPatternsError, ValueError):
    """A value could not be serialized (before writing) or deserialized (after reading)."""


class ConnectionFailed(RedisPatternsError, ConnectionError):
    """The server could not be reached, or the connection broke mid-command.

    Whether the command ran on the server is unknown: retry only idempotent work.
    """


class PoolTimeout(ConnectionFailed, TimeoutError):
    """No connection of the bounded pool became free within ``pool_timeout`` seconds."""


class ClusterUnavailable(ConnectionFailed):
    """A Redis Cluster could not serve a key's slot in time (``CLUSTERDOWN``, ``TRYAGAIN``
    during a resharding, no node reachable for the slot map, endless redirections).

    Unlike its base class, the command is known not to have run: retrying is safe.
    """


class CommandTimeout(RedisPatternsError, TimeoutError):
    """The server did not answer within ``socket_timeout`` seconds."""


class CommandError(RedisPatternsError):
    """The server answered a command with an error reply (``-ERR ...``)."""


class ScriptError(CommandError):
    """A Lua script raised an error on the server."""


class UnsupportedServerError(RedisPatternsError):
    """The server lacks a command a primitive needs, and no fallback exists."""
