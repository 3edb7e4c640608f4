"""aioredispatterns: the Redis patterns backend teams reach for, async-first.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.
"""

from ._capabilities import ServerInfo, server_info
from ._commands import pipeline_stats
from ._connection import connect
from ._pipeline import PipelineStats
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
from .ratelimit import (
    GCRA,
    FixedWindow,
    RateLimitDecision,
    RateLimiter,
    RateLimitError,
    RateLimitExceeded,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
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
from .streams import (
    ConsumerGroup,
    ConsumerPolicy,
    DeadLetter,
    GroupInfo,
    GroupStats,
    StreamError,
    StreamMessage,
    StreamProducer,
    StreamRetention,
)

__version__ = "0.1.0.dev0"

__all__ = (
    "Broadcast",
    "BufferPolicy",
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
    "ConsumerGroup",
    "ConsumerPolicy",
    "DeadLetter",
    "FencedValue",
    "FixedWindow",
    "GCRA",
    "Gap",
    "GroupInfo",
    "GroupStats",
    "InvalidKeyError",
    "JsonSerializer",
    "Lease",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "Message",
    "MsgpackSerializer",
    "PickleSerializer",
    "PipelineStats",
    "PoolTimeout",
    "PubSubError",
    "PubSubOverflow",
    "RateLimitDecision",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimiter",
    "RawSerializer",
    "ReconnectPolicy",
    "RedisPatternsError",
    "Redlock",
    "ScriptError",
    "Semaphore",
    "SerializationError",
    "Serializer",
    "ServerInfo",
    "SlidingWindowCounter",
    "SlidingWindowLog",
    "StreamError",
    "StreamMessage",
    "StreamProducer",
    "StreamRetention",
    "Subscription",
    "SubscriptionStats",
    "TokenBucket",
    "UnsupportedServerError",
    "ValueTooLarge",
    "__version__",
    "connect",
    "fenced_get",
    "fenced_set",
    "pipeline_stats",
    "publish",
    "server_info",
    "subscribe",
)
