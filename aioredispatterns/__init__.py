"""aioredispatterns: the Redis patterns backend teams reach for, async-first.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.
"""

from ._capabilities import ServerInfo, server_info
from ._connection import connect
from .cache import (
    Cache,
    CacheClosed,
    CachedFunction,
    CacheError,
    CachePolicy,
    CacheStats,
    ValueTooLarge,
)
from .errors import (
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    InvalidKeyError,
    PoolTimeout,
    RedisPatternsError,
    ScriptError,
    SerializationError,
    UnsupportedServerError,
)
from .serializers import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
)

__version__ = "0.1.0.dev0"

__all__ = (
    "Cache",
    "CacheClosed",
    "CacheError",
    "CachePolicy",
    "CacheStats",
    "CachedFunction",
    "CommandError",
    "CommandTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "InvalidKeyError",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "PoolTimeout",
    "RawSerializer",
    "RedisPatternsError",
    "ScriptError",
    "SerializationError",
    "Serializer",
    "ServerInfo",
    "UnsupportedServerError",
    "ValueTooLarge",
    "__version__",
    "connect",
    "server_info",
)
