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
from .pubsub import (
    Broadcast,
    BufferPolicy,
    Gap,
    Message,
    PubSubError,
    PubSubOverflow,
    ReconnectPolicy,
    Subscription,
    SubscriptionStats,
    publish,
    subscribe,
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
    "Broadcast",
    "BufferPolicy",
    "CommandError",
    "CommandTimeout",
    "ConfigurationError",
    "ConnectionFailed",
    "Gap",
    "InvalidKeyError",
    "JsonSerializer",
    "Message",
    "MsgpackSerializer",
    "PickleSerializer",
    "PoolTimeout",
    "PubSubError",
    "PubSubOverflow",
    "RawSerializer",
    "ReconnectPolicy",
    "RedisPatternsError",
    "ScriptError",
    "SerializationError",
    "Serializer",
    "ServerInfo",
    "Subscription",
    "SubscriptionStats",
    "UnsupportedServerError",
    "__version__",
    "connect",
    "publish",
    "server_info",
    "subscribe",
)
