"""The benchmark's one door to raw redis-py.

The baselines are what a redis-py user writes by hand (``Redis.from_url``, its pool, its
asyncio ``Lock``, ``PubSub.listen()``), so they must use redis-py itself rather than the
library's command layer; every scenario gets redis-py from here and nowhere else.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisPyLock
from redis.utils import HIREDIS_AVAILABLE

__all__ = ("HIREDIS_AVAILABLE", "Redis", "RedisPyLock", "redis_py")


def redis_py(url: str, concurrency: int = 1) -> Redis:
    """A plain redis-py client, as its users build it (a pool large enough for the load)."""
    return Redis.from_url(url, max_connections=max(concurrency, 1) + 4)
