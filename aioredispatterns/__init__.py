"""aioredispatterns: the Redis patterns backend teams reach for, async-first.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.
"""

from ._capabilities import ServerInfo, server_info
from ._connection import connect
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
from .ratelimit import (
    GCRA,
    Decision,
    FixedWindow,
    RateLimiter,
    RateLimitError,
    RateLimitExceeded,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
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
    "CommandError",
    "CommandTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "Decision",
    "FixedWindow",
    "GCRA",
    "InvalidKeyError",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "PoolTimeout",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiter",
    "RawSerializer",
    "RedisPatternsError",
    "ScriptError",
    "SerializationError",
    "Serializer",
    "ServerInfo",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "TokenBucket",
    "UnsupportedServerError",
    "__version__",
    "connect",
    "server_info",
)
