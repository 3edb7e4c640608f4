"""Every primitive's counters, one idiom (``.stats``), exported to Prometheus."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio import Redis

from aioredispatterns import (
    GCRA,
    Cache,
    ConfigurationError,
    ConsumerGroup,
    ConsumerPolicy,
    Lock,
    RateLimiter,
    StreamMessage,
    StreamProducer,
    publish,
    subscribe,
)
from aioredispatterns.metrics import PrometheusCollector


async def test_a_scrape_shows_the_library_counters(redis_client: Redis, key_prefix: str) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector()
    registry.register(collector)
    handled = anyio.Event()
    count = 0

    async def handle(message: StreamMessage) -> None:
        nonlocal count
        count += 1
        if count == 3:
            handled.set()

    async with Cache(redis_client, ttl=30, prefix=key_prefix) as cache:
        collector.track("users", cache)
        collector.track("main", redis_client)

        async def load() -> int:
            return 1

        for _ in range(3):
            await cache.get_or_load("k", load)
        producer = StreamProducer(redis_client, "jobs", prefix=key_prefix)
        group = ConsumerGroup(
            redis_client,
            "jobs",
            "workers",
            handler=handle,
            prefix=key_prefix,
            policy=ConsumerPolicy(block=0.1),
        )
        async with group:
            collector.track("workers", group)
            await producer.add_many([{"n": n} for n in range(3)])
            with anyio.fail_after(30):
                await handled.wait()
        async with subscribe(redis_client, f"{key_prefix}:c") as messages:
            collector.track("events", messages)
            await publish(redis_client, f"{key_prefix}:c", {"x": 1})
            with anyio.fail_after(30):
                await messages.__anext__()
        lock = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
        collector.track("job", lock)
        async with lock:
            pass
        limiter = RateLimiter(redis_client, [GCRA(1, 60.0)], name="api", prefix=key_prefix)
        collector.track("api", limiter)
        await limiter.hit("u")
        await limiter.hit("u")
        collector.track("jobs", producer)
        text = generate_latest(registry).decode()
    assert 'aioredispatterns_cache_hits_total{name="users"} 2.0' in text
    assert 'aioredispatterns_cache_loads_total{name="users"} 1.0' in text
    assert 'aioredispatterns_consumer_group_processed_total{name="workers"} 3.0' in text
    assert 'aioredispatterns_consumer_group_in_flight{name="workers"} 0.0' in text
    assert 'aioredispatterns_subscription_delivered_total{name="events"} 1.0' in text
    assert 'aioredispatterns_pipeline_commands_total{name="main"}' in text
    assert "# TYPE aioredispatterns_cache_hits_total counter" in text
    assert 'aioredispatterns_lock_acquired_total{name="job"} 1.0' in text
    assert 'aioredispatterns_lock_released_total{name="job"} 1.0' in text
    assert 'aioredispatterns_rate_limiter_allowed_total{name="api"} 1.0' in text
    assert 'aioredispatterns_rate_limiter_denied_total{name="api"} 1.0' in text
    assert 'aioredispatterns_stream_producer_added_total{name="jobs"} 3.0' in text


def test_tracking_something_without_stats_is_refused() -> None:
    collector = PrometheusCollector()
    with pytest.raises(ConfigurationError):
        collector.track("x", object())
    with pytest.raises(ConfigurationError):
        PrometheusCollector(namespace="not a name")


async def test_a_collected_primitive_leaves_the_scrape(redis_client: Redis) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector()
    registry.register(collector)
    cache = Cache(redis_client, ttl=30)
    collector.track("gone", cache)
    assert 'name="gone"' in generate_latest(registry).decode()
    del cache
    import gc

    gc.collect()
    assert 'name="gone"' not in generate_latest(registry).decode()
