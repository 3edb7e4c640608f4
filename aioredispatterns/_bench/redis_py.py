"""The benchmark's one door to raw redis-py.

The baselines are what a redis-py user writes by hand (``Redis.from_url``, its pool, its
asyncio ``Lock``, ``PubSub.listen()``), so they must use redis-py itself rather than the
library's command layer; every scenario gets redis-py from here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock as RedisPyLock
from redis.utils import HIREDIS_AVAILABLE

__all__ = ("HIREDIS_AVAILABLE", "Redis", "RedisCluster", "RedisPyLock", "redis_py")

_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def redis_py(url: str, concurrency: int = 1) -> Any:
    """A plain redis-py client, as its users build it (a pool large enough for the load):
    ``Redis``, or ``RedisCluster`` for a ``redis+cluster://`` URL."""
    for scheme, plain in _CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            return RedisCluster.from_url(
                plain + url[len(scheme) :], max_connections=max(concurrency, 1) + 4
            )
    return Redis.from_url(url, max_connections=max(concurrency, 1) + 4)
