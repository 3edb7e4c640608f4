"""Cache: single flight, cancellation, TTL, races, SWR, XFetch, batches, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from aioredispatterns import ConfigurationError, ConnectionFailed, connect
from aioredispatterns.cache import Cache, CacheClosed, ValueTooLarge, cached
from aioredispatterns.testing import RedisServer, command_calls


class Counter:
    """A loader that counts its calls and can be held open."""

    def __init__(self, value: Any = "v", *, delay: float = 0.0) -> None:
        self.value = value
        self.delay = delay
        self.calls = 0
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()

    async def __call__(self) -> Any:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await anyio.sleep(self.delay)
        return self.value


def _tasks() -> int:
    return len(asyncio.all_tasks())


# ----------------------------------------------------------------------------- config


def test_a_cache_without_ttl_is_refused(redis_client: Redis) -> None:
    with pytest.raises(ConfigurationError, match="TTL"):
        Cache(redis_client)
    Cache(redis_client, ttl=None)  # explicit: allowed


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": "10"},
        {"ttl": 10, "jitter": 1.0},
        {"ttl": 10, "stale_ttl": -1},
        {"ttl": 10, "max_value_size": 3},
        {"ttl": 10, "oversize": "drop"},
        {"ttl": 1, "distributed": True, "lease_ttl": 5},
        {"ttl": 10, "prefix": "a{b}"},
    ],
)
def test_bad_options_fail_before_any_command(options: dict[str, Any]) -> None:
    client = Redis(port=1)  # never contacted
    with pytest.raises(ConfigurationError):
        Cache(client, **options)


async def test_use_outside_async_with_is_refused(redis_client: Redis, key_prefix: str) -> None:
    cache = Cache(redis_client, ttl=10, prefix=key_prefix)
    with pytest.raises(CacheClosed):
        await cache.get_or_load("k", Counter())


# ----------------------------------------------------------------------------- single flight


async def test_10k_concurrent_cold_callers_run_the_loader_once(
    redis_client: Redis, key_prefix: str
) -> None:
    loader = Counter({"id": 1}, delay=0.05)
    results: list[Any] = []
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:

        async def call() -> None:
            results.append(await cache.get_or_load("hot", loader))

        async with anyio.create_task_group() as tg:
            for _ in range(10_000):
                tg.start_soon(call)
        stats = cache.stats
        assert await cache.get_or_load("hot", loader) == {"id": 1}  # now a hit
    assert loader.calls == 1
    assert results == [{"id": 1}] * 10_000
    assert stats.loads == 1
    # Callers whose GET came back after the fill are hits; every miss but one coalesced.
    assert stats.misses + stats.hits == 10_000
    assert stats.coalesced == stats.misses - 1


async def test_loader_error_reaches_every_waiter_and_is_not_cached(
    redis_client: Redis, key_prefix: str
) -> None:
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        raise LookupError("db down")

    errors: list[BaseException] = []
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:

        async def call() -> None:
            try:
                await cache.get_or_load("k", failing)
            except LookupError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)
        assert calls == 1
        assert len(errors) == 50
        assert cache.stats.load_errors == 1
        assert await cache.get("k", "absent") == "absent"  # the error was not cached
        assert await cache.get_or_load("k", Counter("ok")) == "ok"


async def test_cancelling_the_first_caller_does_not_cancel_the_load(
    redis_client: Redis, key_prefix: str
) -> None:
    loader = Counter("value")
    loader.gate = anyio.Event()
    tasks_before = _tasks()
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        got: list[str] = []

        async def other() -> None:
            got.append(await cache.get_or_load("k", loader))

        async with anyio.create_task_group() as tg:
            first = anyio.CancelScope()

            async def first_caller() -> None:
                with first:
                    await cache.get_or_load("k", loader)

            tg.start_soon(first_caller)
            await loader.started.wait()
            for _ in range(5):
                tg.start_soon(other)
            await anyio.sleep(0.02)
            first.cancel()  # the caller that started the load goes away mid-load
            await anyio.sleep(0.02)
            assert not loader.gate.is_set()
            loader.gate.set()
        assert got == ["value"] * 5
        assert loader.calls == 1
        assert first.cancelled_caught
        assert cache._flights == {}
        raw = await redis_client.get(f"{key_prefix}:cache:{{k}}")
        assert raw is not None
        assert raw.endswith(b'"value"')
    assert _tasks() == tasks_before


async def test_load_whose_callers_all_left_still_fills(
    redis_client: Redis, key_prefix: str
) -> None:
    loader = Counter("filled", delay=0.05)
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        with anyio.move_on_after(0.01):
            await cache.get_or_load("k", loader)
        await anyio.sleep(0.2)
        assert await cache.get("k") == "filled"
        assert loader.calls == 1


async def test_closing_cancels_loads_in_flight(redis_client: Redis, key_prefix: str) -> None:
    loader = Counter("never")
    loader.gate = anyio.Event()  # never set
    tasks_before = _tasks()
    errors: list[BaseException] = []
    async with (
        anyio.create_task_group() as outer,
        Cache(redis_client, ttl=60, prefix=key_prefix) as cache,
    ):

        async def waiter() -> None:
            try:
                await cache.get_or_load("k", loader)
            except CacheClosed as exc:
                errors.append(exc)

        outer.start_soon(waiter)
        await loader.started.wait()
    assert len(errors) == 1
    assert await redis_client.exists(f"{key_prefix}:cache:{{k}}") == 0
    assert _tasks() == tasks_before


# ----------------------------------------------------------------------------- TTL


async def test_every_entry_gets_a_jittered_ttl(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=100, jitter=0.2, prefix=key_prefix) as cache:
        for index in range(40):
            await cache.get_or_load(f"k{index}", Counter(index))
    ttls = [await redis_client.pttl(f"{key_prefix}:cache:{{k{i}}}") for i in range(40)]
    assert all(80_000 - 100 <= t <= 100_000 for t in ttls), ttls
    assert len(set(ttls)) > 20  # spread out, not one expiry moment


async def test_explicit_none_ttl_never_expires(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=None, prefix=key_prefix) as cache:
        await cache.get_or_load("k", Counter("forever"))
        assert await redis_client.pttl(f"{key_prefix}:cache:{{k}}") == -1
        assert await cache.get_or_load("k", Counter("other")) == "forever"


async def test_negative_results_are_cached_for_their_own_ttl(
    redis_client: Redis, key_prefix: str
) -> None:
    missing = Counter(None)
    async with Cache(redis_client, ttl=60, negative_ttl=0.2, prefix=key_prefix) as cache:
        assert await cache.get_or_load("k", missing) is None
        assert await cache.get_or_load("k", missing) is None
        assert missing.calls == 1
        assert 0 < await redis_client.pttl(f"{key_prefix}:cache:{{k}}") <= 200
        await anyio.sleep(0.3)
        assert await cache.get_or_load("k", missing) is None
        assert missing.calls == 2


async def test_none_is_not_cached_without_negative_ttl(
    redis_client: Redis, key_prefix: str
) -> None:
    missing = Counter(None)
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        await cache.get_or_load("k", missing)
        await cache.get_or_load("k", missing)
    assert missing.calls == 2


# ----------------------------------------------------------------------------- races


async def test_invalidate_during_a_slow_load_wins_the_race(
    redis_client: Redis, key_prefix: str
) -> None:
    # The loader read the old row, then the row was updated and invalidated, then the
    # loader finishes: its old value must not land in the cache.
    old = Counter("old row")
    old.gate = anyio.Event()
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get_or_load, "k", old)
            await old.started.wait()
            await cache.invalidate("k")
            old.gate.set()
        assert cache.stats.fills_refused == 1
        assert await cache.get("k", "absent") == "absent"
        assert await cache.get_or_load("k", Counter("new row")) == "new row"
        assert await cache.get("k") == "new row"


async def test_set_during_a_slow_load_wins_the_race(redis_client: Redis, key_prefix: str) -> None:
    old = Counter("old")
    old.gate = anyio.Event()
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get_or_load, "k", old)
            await old.started.wait()
            assert await cache.set("k", "written")
            old.gate.set()
        assert await cache.get("k") == "written"
        assert cache.stats.fills_refused == 1


async def test_a_load_longer_than_max_load_time_is_not_written(
    redis_client: Redis, key_prefix: str
) -> None:
    loader = Counter("slow", delay=0.15)
    async with Cache(redis_client, ttl=60, max_load_time=0.1, prefix=key_prefix) as cache:
        assert await cache.get_or_load("k", loader) == "slow"
        assert await cache.get("k") is None
        assert cache.stats.fills_refused == 1


async def test_invalidate_many_and_set_many(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        assert await cache.set_many({f"k{i}": i for i in range(50)}) == 50
        assert await cache.get_many(["k1", "k2", "nope"]) == {"k1": 1, "k2": 2}
        await cache.invalidate(*(f"k{i}" for i in range(25)))
        found = await cache.get_many([f"k{i}" for i in range(50)])
        assert found == {f"k{i}": i for i in range(25, 50)}


async def test_warm_keeps_existing_entries(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        await cache.set("a", "fresh")
        assert await cache.warm([("a", "warm"), ("b", "warm")]) == 1
        assert await cache.get_many(["a", "b"]) == {"a": "fresh", "b": "warm"}


# ----------------------------------------------------------------------------- SWR, XFetch


async def test_stale_value_is_served_at_once_while_one_refresh_runs(
    redis_client: Redis, key_prefix: str
) -> None:
    async with Cache(redis_client, ttl=0.1, stale_ttl=30, jitter=0, prefix=key_prefix) as cache:
        await cache.get_or_load("k", Counter("v1"))
        await anyio.sleep(0.15)  # past the fresh TTL, within the stale TTL
        slow = Counter("v2")
        slow.gate = anyio.Event()
        with anyio.fail_after(0.5):  # never waits for the slow loader
            results = [await cache.get_or_load("k", slow) for _ in range(20)]
        assert results == ["v1"] * 20
        assert slow.calls == 1  # one background refresh, not twenty
        assert cache.stats.stale_served == 20
        slow.gate.set()
        await anyio.sleep(0.1)
        assert await cache.get("k") == "v2"
        assert await cache.get_or_load("k", Counter("v3")) == "v2"  # fresh again


async def test_stale_if_error_keeps_serving_and_counts(
    redis_client: Redis, key_prefix: str
) -> None:
    async def broken() -> str:
        raise ConnectionError("db down")

    async with Cache(
        redis_client, ttl=0.1, stale_ttl=30, jitter=0, refresh_backoff=0.2, prefix=key_prefix
    ) as cache:
        await cache.get_or_load("k", Counter("v1"))
        await anyio.sleep(0.15)
        assert await cache.get_or_load("k", broken) == "v1"
        await anyio.sleep(0.05)
        assert cache.stats.stale_if_error == 1
        # Still served, and not retried on every read during the backoff.
        for _ in range(10):
            assert await cache.get_or_load("k", broken) == "v1"
        await anyio.sleep(0.05)
        assert cache.stats.stale_if_error == 1
        assert await redis_client.pttl(f"{key_prefix}:cache:{{k}}") > 29_000


async def test_stale_entries_expire_with_the_stale_ttl(
    redis_client: Redis, key_prefix: str
) -> None:
    async with Cache(redis_client, ttl=0.1, stale_ttl=0.1, jitter=0, prefix=key_prefix) as cache:
        await cache.get_or_load("k", Counter("v1"))
        await anyio.sleep(0.25)
        loader = Counter("v2")
        assert await cache.get_or_load("k", loader) == "v2"  # a plain miss now
        assert loader.calls == 1


async def test_xfetch_refreshes_before_expiry_under_steady_load(
    redis_client: Redis, key_prefix: str
) -> None:
    # Loads take ~80 ms (delta), the entry is fresh 600 ms and has no stale window: a
    # reader after expiry would see a miss. XFetch must refresh early enough that no
    # reader ever does.
    loader = Counter("v", delay=0.08)
    async with Cache(
        redis_client, ttl=0.6, jitter=0, early_refresh=2.0, prefix=key_prefix
    ) as cache:
        deadline = anyio.current_time() + 1.8
        while anyio.current_time() < deadline:
            assert await cache.get_or_load("k", loader) == "v"
            await anyio.sleep(0.005)
        stats = cache.stats
    assert stats.misses == 1, stats  # only the first, cold read
    assert stats.early_refreshes >= 2, stats
    assert stats.early_refreshes == stats.refreshes  # nothing was ever stale
    assert loader.calls == 1 + stats.refreshes


async def test_without_xfetch_steady_load_sees_expiry(redis_client: Redis, key_prefix: str) -> None:
    # The control for the test above: the same load without early refresh misses.
    loader = Counter("v", delay=0.08)
    async with Cache(redis_client, ttl=0.4, jitter=0, prefix=key_prefix) as cache:
        deadline = anyio.current_time() + 1.0
        while anyio.current_time() < deadline:
            await cache.get_or_load("k", loader)
            await anyio.sleep(0.005)
        assert cache.stats.misses >= 2


# ----------------------------------------------------------------------------- decorator


async def test_cached_decorator_keys_by_bound_arguments(
    redis_client: Redis, key_prefix: str
) -> None:
    calls: list[tuple[int, str]] = []
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:

        @cache.cached()
        async def profile(user_id: int, lang: str = "en") -> dict[str, Any]:
            calls.append((user_id, lang))
            return {"id": user_id, "lang": lang}

        assert await profile(1) == {"id": 1, "lang": "en"}
        assert await profile(user_id=1) == {"id": 1, "lang": "en"}
        assert await profile(1, "en") == {"id": 1, "lang": "en"}
        assert await profile(1, lang="fr") == {"id": 1, "lang": "fr"}
        assert calls == [(1, "en"), (1, "fr")]
        assert profile.key_for(1) == profile.key_for(user_id=1, lang="en")
        assert profile.key_for(1) != profile.key_for(True)
        await profile.invalidate(1)
        await profile(1)
        assert calls[-1] == (1, "en")
        assert len(calls) == 3
        assert profile.__name__ == "profile"


async def test_cached_decorator_with_a_key_template(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:

        @cache.cached(key="user:{user_id}", ttl=5)
        async def user(user_id: int) -> str:
            return f"u{user_id}"

        assert await user(7) == "u7"
        assert await redis_client.exists(f"{key_prefix}:cache:{{user:7}}") == 1
        assert 0 < await redis_client.pttl(f"{key_prefix}:cache:{{user:7}}") <= 5000


async def test_cached_with_a_provider_resolves_the_cache_at_call_time(
    redis_client: Redis, key_prefix: str
) -> None:
    """The decorator is applied at import; the Cache is made later (an app's lifespan)."""

    class State:
        cache: Cache[Any] | None = None

    calls = 0

    @cached(lambda: State.cache, key="item:{item_id}")  # type: ignore[arg-type,return-value]
    async def item(item_id: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"id": item_id}

    with pytest.raises(ConfigurationError, match="not a Cache"):
        await item(1)  # no cache yet: a clear error, not an AttributeError
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as State.cache:
        assert await item(1) == {"id": 1}
        assert await item(1) == {"id": 1}
        assert calls == 1
        await item.invalidate(1)
        assert await item(1) == {"id": 1}
        assert calls == 2
    with pytest.raises(ConfigurationError):
        cached("not a cache")  # type: ignore[arg-type]


def test_cached_refuses_plain_functions_and_unkeyable_arguments(redis_client: Redis) -> None:
    cache = Cache(redis_client, ttl=60)
    with pytest.raises(ConfigurationError):
        cache.cached()(lambda: 1)  # type: ignore[arg-type, return-value]

    @cache.cached()
    async def f(x: object) -> int:
        return 1

    with pytest.raises(ConfigurationError, match="key="):
        f.key_for(object())


# ----------------------------------------------------------------------------- limits, form


async def test_oversize_values_raise_or_are_skipped(redis_client: Redis, key_prefix: str) -> None:
    big = "x" * 2000
    async with Cache(redis_client, ttl=60, max_value_size=1000, prefix=key_prefix) as cache:
        with pytest.raises(ValueTooLarge) as info:
            await cache.get_or_load("k", Counter(big))
        assert info.value.size > 1000
        with pytest.raises(ValueTooLarge):
            await cache.set("k", big)
        assert await redis_client.exists(f"{key_prefix}:cache:{{k}}") == 0
    async with Cache(
        redis_client, ttl=60, max_value_size=1000, oversize="skip", prefix=key_prefix
    ) as cache:
        assert await cache.get_or_load("k", Counter(big)) == big
        assert not await cache.set("k", big)
        assert await cache.set_many({"a": big, "b": "small"}) == 1
        assert cache.stats.oversize_skips == 3
        assert await redis_client.exists(f"{key_prefix}:cache:{{k}}") == 0


async def test_default_limit_is_one_mib(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        assert await cache.set("ok", "x" * (1024 * 1024 - 100))
        with pytest.raises(ValueTooLarge):
            await cache.set("big", "x" * (1024 * 1024))


async def test_stored_form_costs_at_most_ten_percent_over_plain_set(
    redis_client: Redis, key_prefix: str
) -> None:
    value = "v" * 1022  # 1024 bytes once JSON-encoded
    async with Cache(redis_client, ttl=300, prefix=key_prefix) as cache:
        await cache.set("entry", value)
    ours = f"{key_prefix}:cache:{{entry}}"
    plain = f"{key_prefix}:cache:{{entrx}}"  # same key length
    await redis_client.set(plain, f'"{value}"', ex=300)
    ours_bytes = await redis_client.memory_usage(ours)
    plain_bytes = await redis_client.memory_usage(plain)
    assert ours_bytes is not None
    assert plain_bytes is not None
    assert ours_bytes <= 1.1 * plain_bytes, (ours_bytes, plain_bytes)


async def test_foreign_values_are_misses(redis_client: Redis, key_prefix: str) -> None:
    await redis_client.set(f"{key_prefix}:cache:{{k}}", b"not ours", ex=60)
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        assert await cache.get("k", "miss") == "miss"
        assert await cache.get_or_load("k", Counter("loaded")) == "loaded"


async def test_clock_comes_from_the_server(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url)
    try:
        async with Cache(client, ttl=60, prefix=key_prefix) as cache:
            seconds, micros = await client.time()
            assert abs(cache._now_ms() - (seconds * 1000 + micros / 1000)) < 1000
    finally:
        await client.aclose()


def test_stats_start_at_zero(redis_client: Redis) -> None:
    stats = Cache(redis_client, ttl=1).stats
    assert stats.hits == stats.misses == stats.loads == 0


async def test_hit_path_is_one_get(redis_client: Redis, key_prefix: str) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        await cache.get_or_load("k", Counter("v"))
        before = await command_calls(redis_client, "get")
        started = time.perf_counter()
        for _ in range(10):
            assert await cache.get_or_load("k", Counter("other")) == "v"
        assert time.perf_counter() - started < 1
        after = await command_calls(redis_client, "get")
        assert after - before == 10
        assert cache.stats.hits == 10


async def test_concurrent_hits_on_a_hot_key_share_one_get(
    redis_client: Redis, key_prefix: str
) -> None:
    async with Cache(redis_client, ttl=60, prefix=key_prefix) as cache:
        await cache.set("hot", {"v": 1})
        before = await command_calls(redis_client, "get")
        results: list[Any] = []

        async def read() -> None:
            results.append(await cache.get_or_load("hot", Counter("unused")))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(read)
        after = await command_calls(redis_client, "get")
        assert results == [{"v": 1}] * 100
        assert after - before < 100
        assert cache.stats.shared_reads == 100 - (after - before)
        # A read that starts after a write returns sees the write.
        await cache.set("hot", {"v": 2})
        assert await cache.get_or_load("hot", Counter("unused")) == {"v": 2}


async def test_cancelled_reader_does_not_fail_the_readers_sharing_its_get(
    redis_url: str, key_prefix: str
) -> None:
    # Without auto-pipelining a GET is cancelled at once (with it, the coroutine that
    # writes a batch finishes that batch first), so the leader really goes mid-GET.
    client = connect(redis_url, auto_pipeline=False)
    try:
        async with Cache(client, ttl=60, prefix=key_prefix) as cache:
            await cache.set("k", "v")
            results: list[str] = []
            async with anyio.create_task_group() as tg:
                leader = anyio.CancelScope()

                async def lead() -> None:
                    with leader:
                        await cache.get("k")

                async def join() -> None:
                    results.append(await cache.get("k"))

                tg.start_soon(lead)
                await anyio.lowlevel.checkpoint()  # the leader's GET is on its way
                for _ in range(5):
                    tg.start_soon(join)
                await anyio.lowlevel.checkpoint()
                leader.cancel()
            assert leader.cancelled_caught  # cancelled while its GET was in flight
            assert results == ["v"] * 5
            assert cache._reads == {}
    finally:
        await client.aclose()


@pytest.fixture
def own_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A server of the current kind that this test alone may kill and restart."""
    if not redis_server.owned:
        pytest.skip("kills a server: needs one this suite started")
    with RedisServer(redis_server.binary, name=f"{redis_server.name}-cache") as server:
        yield server


async def test_redis_failing_during_the_fill_still_returns_the_value(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url, retries=1, backoff_base=0.01, backoff_cap=0.02)

    async def load_then_lose_redis() -> str:
        own_server.kill()  # Redis dies while the loader works
        return "loaded"

    try:
        async with Cache(client, ttl=60) as cache:
            assert await cache.get_or_load("k", load_then_lose_redis) == "loaded"
            assert cache.stats.fill_errors == 1
            assert cache._flights == {}
            with pytest.raises(ConnectionFailed):  # reads do fail while Redis is down
                await cache.get_or_load("k", Counter())
            own_server.restart()
            assert await cache.get_or_load("k", Counter("again")) == "again"
    finally:
        await client.aclose()
