"""Property tests: cache keys are deterministic and injective; values round-trip."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from redis.asyncio import Redis

from aioredispatterns import MsgpackSerializer, connect
from aioredispatterns._cache_keys import call_key, encode_value
from aioredispatterns.cache import Cache

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner), max_leaves=4)
arguments = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=8,
)


def canonical(value: Any) -> str:
    """A reference model of "the same argument": same type and same value, recursively."""
    if isinstance(value, dict):
        return "d" + repr(sorted((canonical(k), canonical(v)) for k, v in value.items()))
    if isinstance(value, frozenset | set):
        return "e" + repr(sorted(canonical(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value).__name__ + repr([canonical(v) for v in value])
    return f"{type(value).__name__}:{value!r}"


async def target(a: object, b: object = None, *rest: object, **extra: object) -> None:
    """A function whose calls the key builder keys."""


SIGNATURE = inspect.signature(target)


def key(*args: Any, **kwargs: Any) -> str:
    return call_key("tests.target", SIGNATURE, args, kwargs)


@settings(max_examples=300, deadline=None)
@given(arguments, arguments)
def test_key_builder_is_injective(a: Any, b: Any) -> None:
    assert (encode_value(a) == encode_value(b)) == (canonical(a) == canonical(b))
    assert (key(a, b) == key(b, a)) == (canonical(a) == canonical(b))


@settings(max_examples=200, deadline=None)
@given(arguments, arguments, st.lists(arguments, max_size=2))
def test_key_builder_is_deterministic_and_binds_arguments(a: Any, b: Any, rest: list[Any]) -> None:
    assert key(a, b, *rest) == key(a, b, *rest)
    assert key(a, b) == key(a=a, b=b) == key(b=b, a=a)
    assert key(a) == key(a, None)  # the default, bound
    if rest:
        assert key(a, b, *rest) != key(a, b)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
async def test_values_round_trip_through_redis(redis_client: Redis, value: Any) -> None:
    prefix = f"h{uuid.uuid4().hex[:10]}"  # a fresh key space per example
    async with Cache(redis_client, ttl=60, prefix=prefix, negative_ttl=60) as cache:
        await cache.set("k", value)
        assert await cache.get("k", default="MISSING") == (
            value if value is not None else "MISSING"
        )
        assert await cache.get_or_load("k", _unreachable) == value


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=20)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=msgpack_values)
async def test_msgpack_values_round_trip_through_redis(redis_client: Redis, value: Any) -> None:
    prefix = f"h{uuid.uuid4().hex[:10]}"
    async with Cache(
        redis_client, ttl=60, prefix=prefix, serializer=MsgpackSerializer(), negative_ttl=60
    ) as cache:
        await cache.set_many({"k": value})
        assert await cache.get_or_load("k", _unreachable) == value


async def _unreachable() -> Any:
    raise AssertionError("the value was cached: the loader must not run")


KEYS = st.sampled_from(["a", "b", "c{x}", "d:1"])
SMALL_INTS = st.integers(min_value=-(2**62), max_value=2**62)
VALUES = SMALL_INTS | st.text(max_size=6) | st.lists(SMALL_INTS, max_size=3)


def test_cache_matches_a_dict_model(redis_url: str) -> None:
    """Without expiry, the cache behaves like a dict with write-through and invalidation."""

    class CacheModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.runner = asyncio.Runner()
            self.client = connect(redis_url)
            self.prefix = f"m{uuid.uuid4().hex[:10]}"  # fresh key space per example
            self.model: dict[str, Any] = {}

        def run(self, operation: Callable[[Cache], Awaitable[Any]]) -> Any:
            async def with_cache() -> Any:
                async with Cache(self.client, ttl=600, prefix=self.prefix) as cache:
                    return await operation(cache)

            return self.runner.run(with_cache())

        @rule(key=KEYS, value=VALUES)
        def set(self, key: str, value: Any) -> None:
            self.run(lambda cache: cache.set(key, value))
            self.model[key] = value

        @rule(keys=st.lists(KEYS, max_size=3))
        def invalidate(self, keys: list[str]) -> None:
            self.run(lambda cache: cache.invalidate(*keys))
            for key in keys:
                self.model.pop(key, None)

        @rule(key=KEYS, value=VALUES)
        def get_or_load(self, key: str, value: Any) -> None:
            calls: list[str] = []

            async def loader() -> Any:
                calls.append(key)
                return value

            got = self.run(lambda cache: cache.get_or_load(key, loader))
            if key in self.model:
                assert got == self.model[key]
                assert calls == []
            else:
                assert got == value
                assert calls == [key]
                self.model[key] = value

        @rule(items=st.dictionaries(KEYS, VALUES, max_size=3))
        def warm(self, items: dict[str, Any]) -> None:
            written = self.run(lambda cache: cache.warm(items))
            assert written == sum(1 for key in items if key not in self.model)
            for key, value in items.items():
                self.model.setdefault(key, value)

        @invariant()
        def every_key_reads_as_modelled(self) -> None:
            keys = ["a", "b", "c{x}", "d:1"]
            assert self.run(lambda cache: cache.get_many(keys)) == self.model

        def teardown(self) -> None:
            self.runner.run(self.client.aclose())
            self.runner.close()

    run_state_machine_as_test(
        CacheModel,
        settings=settings(max_examples=20, stateful_step_count=15, deadline=None),
    )
