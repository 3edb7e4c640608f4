"""Bad input gets a typed answer before any command: the issue's explicit examples
(the fuzz over every public constructor and method lives in test_fuzz_inputs.py)."""

from __future__ import annotations

import math

import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    BufferPolicy,
    Cache,
    ConfigurationError,
    InvalidKeyError,
    ReconnectPolicy,
    Redlock,
    Semaphore,
    connect,
    publish,
    subscribe,
)
from aioredispatterns._validate import (
    MAX_SECONDS,
    check_count,
    check_flag,
    check_name,
    check_number,
    check_seconds,
)


async def _keys(client: Redis, prefix: str) -> list[bytes]:
    # SCAN, not KEYS: a cluster client sends KEYS to one node, SCAN to every primary.
    return [key async for key in client.scan_iter(match=f"{prefix}*")]


NOT_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", [*NOT_FINITE, True, "1", None, -1, 0, MAX_SECONDS * 2])
def test_a_duration_is_finite_positive_bounded_and_not_a_bool(value: object) -> None:
    with pytest.raises(ConfigurationError):
        check_seconds("t", value)


def test_the_checks_name_the_parameter_and_the_bound() -> None:
    with pytest.raises(ConfigurationError, match=r"ttl must be at most"):
        check_seconds("ttl", 1e300)
    with pytest.raises(ConfigurationError, match=r"limit must be in \[1, 5\]"):
        check_count("limit", 9, minimum=1, maximum=5)
    with pytest.raises(ConfigurationError, match="x must be a number"):
        check_number("x", True)
    with pytest.raises(ConfigurationError, match="flag must be True or False"):
        check_flag("flag", "no")


@pytest.mark.parametrize("value", ["", b"", "\ud800", ["k"], bytearray(b"k"), 7, None, "x" * 2000])
def test_a_name_is_non_empty_utf8_str_or_bytes_and_bounded(value: object) -> None:
    with pytest.raises(InvalidKeyError):
        check_name("key", value)


@pytest.mark.parametrize(
    "options",
    [
        {"socket_timeout": math.nan},
        {"connect_timeout": math.inf},
        {"pool_timeout": -1},
        {"health_check_interval": math.nan},
        {"backoff_base": math.inf},
        {"backoff_cap": "1"},
        {"retries": True},
        {"max_connections": 0},
        {"protocol": 4},
        {"auto_pipeline": "yes"},
        {"cluster": "no"},
    ],
)
def test_connect_options(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        connect("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]


async def test_connect_cluster_query_flag() -> None:
    client = connect("redis://127.0.0.1:1/0?cluster=false")  # used to fail later in redis-py
    await client.aclose()
    with pytest.raises(ConfigurationError):
        connect("redis://127.0.0.1:1/0?cluster=maybe")


@pytest.mark.parametrize(
    "options",
    [
        {"initial_delay": math.nan},
        {"max_delay": math.inf},
        {"confirm_timeout": -1},
        {"multiplier": math.nan},
        {"max_attempts": 0},
    ],
)
def test_reconnect_policy(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(**options)  # type: ignore[arg-type]


async def test_subscription_options(redis_client: Redis) -> None:
    with pytest.raises(ConfigurationError):
        subscribe(redis_client, "c", health_check_interval=math.nan)
    with pytest.raises(InvalidKeyError):
        subscribe(redis_client, "\ud800")
    with pytest.raises(ConfigurationError):
        subscribe(redis_client, "c", patterns="user:*")  # a str, not a list of patterns
    with pytest.raises(ConfigurationError):
        subscribe(redis_client, "c", sharded="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        BufferPolicy(size=2**70)
    with pytest.raises(InvalidKeyError):
        await publish(redis_client, "\udfff", 1)


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 1e300},
        {"ttl": 1e16},
        {"ttl": 10, "stale_ttl": 1e308},
        {"ttl": 10, "negative_ttl": math.nan},
        {"ttl": 10, "jitter": 1},
        {"ttl": 10, "jitter": True},
        {"ttl": 10, "early_refresh": math.inf},
        {"ttl": 10, "distributed": 1},
        {"ttl": 10, "max_value_size": 2**70},
        {"ttl": 10, "oversize": "drop"},
        {"ttl": 10, "max_key_bytes": 0},
    ],
)
def test_cache_options(redis_client: Redis, options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Cache(redis_client, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", [["k"], bytearray(b"k"), "\ud800", "", "k" * 1025])
async def test_cache_keys(redis_client: Redis, key_prefix: str, key: object) -> None:
    async with Cache(redis_client, ttl=10, prefix=key_prefix) as cache:
        with pytest.raises(InvalidKeyError):
            await cache.get(key)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            await cache.set(key, 1)  # type: ignore[arg-type]
    assert await _keys(redis_client, key_prefix) == []


async def test_cache_key_limit_is_configurable(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=10, prefix=key_prefix, max_key_bytes=4096) as cache:
        await cache.set("k" * 3000, 1)
        assert await cache.get("k" * 3000) == 1


@pytest.mark.parametrize("template", ["{", "{missing}", "{}", "{0}", "user:{user_id"])
def test_cached_key_templates_are_checked_at_decoration(redis_client: Redis, template: str) -> None:
    cache = Cache(redis_client, ttl=10)

    async def load(user_id: int) -> int:
        return user_id

    with pytest.raises(ConfigurationError):
        cache.cached(key=template)(load)


def test_cached_ttl_is_checked_at_decoration(redis_client: Redis) -> None:
    cache = Cache(redis_client, ttl=10)

    async def load(user_id: int) -> int:
        return user_id

    with pytest.raises(ConfigurationError):
        cache.cached(ttl=math.nan)(load)


def test_semaphore_and_redlock_arguments(redis_client: Redis) -> None:
    with pytest.raises(ConfigurationError):
        Semaphore(redis_client, "s", limit=2**63)
    with pytest.raises(ConfigurationError):
        Redlock([redis_client], "r", drift_factor="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Redlock([redis_client], "r", drift_factor=math.nan)


@pytest.mark.parametrize(
    "options",
    [{"maxlen": 2**70}, {"maxlen": True}, {"max_age": math.inf}, {"maxlen": 5, "exact": "yes"}],
)
def test_stream_retention(options: dict[str, object]) -> None:
    from aioredispatterns import StreamRetention

    with pytest.raises(ConfigurationError):
        StreamRetention(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"start_id": "garbage"},
        {"start_id": "1-2-3"},
        {"start_id": str(2**64)},
        {"dead_letter_maxlen": 2**70},
        {"claim_idle": math.nan},
        {"block": 1e12},
        {"concurrency": 10**9},
    ],
)
def test_consumer_policy(options: dict[str, object]) -> None:
    from aioredispatterns import ConsumerPolicy

    with pytest.raises(ConfigurationError):
        ConsumerPolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("start_id", ["0", "$", "0-0", "1700000000000-5", str(2**64 - 1)])
def test_consumer_policy_start_ids(start_id: str) -> None:
    from aioredispatterns import ConsumerPolicy

    assert ConsumerPolicy(start_id=start_id).start_id == start_id


def test_stream_names(redis_client: Redis) -> None:
    from aioredispatterns import ConsumerGroup, StreamProducer

    with pytest.raises(InvalidKeyError):
        StreamProducer(redis_client, "\ud800")
    with pytest.raises(InvalidKeyError):
        ConsumerGroup(redis_client, "s", "\ud800")
    with pytest.raises(InvalidKeyError):
        ConsumerGroup(redis_client, "s", "g", consumer="c" * 5000)


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 1e306},
        {"ttl": 1e16},
        {"fence_ttl": 1e16},
        {"ttl": math.nan},
        {"timeout": "1"},
        {"cancel_on_loss": "no"},
        {"cancel_on_loss": 1},
    ],
)
def test_lock_options(redis_client: Redis, options: dict[str, object]) -> None:
    from aioredispatterns import Lock

    with pytest.raises(ConfigurationError):
        Lock(redis_client, "l", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1", math.nan, -1, math.inf])
async def test_lock_acquire_timeout(redis_client: Redis, key_prefix: str, bad: object) -> None:
    from aioredispatterns import Lock

    with pytest.raises(ConfigurationError):
        await Lock(redis_client, "l", prefix=key_prefix).acquire(timeout=bad)  # type: ignore[arg-type]
    assert await _keys(redis_client, key_prefix) == []
