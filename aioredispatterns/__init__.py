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
from .lock import (
    FencedValue,
    Lease,
    Lock,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    fenced_get,
    fenced_set,
)
from .redlock import Redlock
from .semaphore import Semaphore
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
    "FencedValue",
    "InvalidKeyError",
    "JsonSerializer",
    "Lease",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "MsgpackSerializer",
    "PickleSerializer",
    "PoolTimeout",
    "RawSerializer",
    "RedisPatternsError",
    "Redlock",
    "ScriptError",
    "Semaphore",
    "SerializationError",
    "Serializer",
    "ServerInfo",
    "UnsupportedServerError",
    "__version__",
    "connect",
    "fenced_get",
    "fenced_set",
    "server_info",
)
