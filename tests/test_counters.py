"""Counters against real servers: exact counts, TTLs on every write, time buckets by the
server's clock, range reads against a pure-Python model, HyperLogLog accuracy, cluster."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioredispatterns import (
    CommandError,
    ConfigurationError,
    ConnectionFailed,
    InvalidKeyError,
    connect,
)
from aioredispatterns.counters import (
    Bucket,
    BucketedCounter,
    Counter,
    CounterError,
    HashCounter,
    Series,
    UniqueCounter,
)
from aioredispatterns.errors import ScriptError
from aioredispatterns.testing import borrowed_connections

DAY = 86400
INT64 = 2**63 - 1
#: The issue's bound for HyperLogLog estimates (the standard error is 0.81%).
HLL_TOLERANCE = 0.02
#: The most buckets one read covers (documented on BucketedCounter.last / UniqueCounter.last).
MAX_READ_BUCKETS = 100_000
MAX_UNIQUE_BUCKETS = 1024

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")


async def server_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def server_seconds(client: Any) -> int:
    return await server_ms(client) // 1000


async def assert_every_key_has_ttl(client: Any, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    assert keys, "expected some keys"
    ttls = [await client.pttl(k) for k in keys]
    # -2: the key expired between SCAN and PTTL (fine); -1 would be a key without a TTL.
    assert all(t > 0 or t == -2 for t in ttls), dict(zip(keys, ttls, strict=True))


def bucket_key(prefix: str, kind: str, name: str, start: int) -> str:
    return f"{prefix}:{kind}:{{{name}}}:{start}"


# --- bad input, before any command --------------------------------------------------------

# Nothing listens on port 1: a call that got as far as sending would fail with
# ConnectionFailed, so ConfigurationError here proves the input was refused first.
OFFLINE = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    "make",
    [
        lambda c: Counter(c, ""),
        lambda c: Counter(c, 42),  # type: ignore[arg-type]
        lambda c: Counter(c, "x", ttl=0),
        lambda c: Counter(c, "x", ttl=float("nan")),
        lambda c: Counter(c, "x", prefix="a{b}"),
        lambda c: HashCounter(c, "x", ttl=-1),
        lambda c: BucketedCounter(c, "x", width=0, retention=60),
        lambda c: BucketedCounter(c, "x", width=1.5, retention=60),  # type: ignore[arg-type]
        lambda c: BucketedCounter(c, "x", width=60, retention=0),
        lambda c: BucketedCounter(c, "x", width=60, retention=float("inf")),
        lambda c: UniqueCounter(c, "x", width=True, retention=60),
        lambda c: UniqueCounter(c, b"", width=60, retention=60),
    ],
)
def test_bad_construction_is_refused(make: Callable[[Any], object]) -> None:
    client = connect(OFFLINE)
    with pytest.raises(ConfigurationError):
        make(client)


CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("incr float", lambda c: Counter(c, "x").incr(1.5)),  # type: ignore[arg-type]
    ("incr bool", lambda c: Counter(c, "x").incr(True)),
    ("incr > int64", lambda c: Counter(c, "x").incr(2**63)),
    ("decr < -int64", lambda c: Counter(c, "x").decr(2**63)),
    ("incr_float nan", lambda c: Counter(c, "x").incr_float(float("nan"))),
    ("incr_float str", lambda c: Counter(c, "x").incr_float("1")),  # type: ignore[arg-type]
    ("field empty", lambda c: HashCounter(c, "x").incr("")),
    ("field bytes", lambda c: HashCounter(c, "x").incr(b"f")),  # type: ignore[arg-type]
    ("field amount", lambda c: HashCounter(c, "x").incr("f", 0.5)),  # type: ignore[arg-type]
    ("get_many str", lambda c: HashCounter(c, "x").get_many("abc")),
    ("remove none", lambda c: HashCounter(c, "x").remove()),
    ("bucket amount", lambda c: BucketedCounter(c, "x", width=60, retention=60).incr(2**53 + 1)),
    ("bucket at <0", lambda c: BucketedCounter(c, "x", width=60, retention=60).incr(at=-1)),
    ("bucket at inf", lambda c: BucketedCounter(c, "x", width=60, retention=60).incr(at=1e300)),
    ("last 0", lambda c: BucketedCounter(c, "x", width=60, retention=60).last(0)),
    (
        "last too many",
        lambda c: BucketedCounter(c, "x", width=60, retention=60).last(MAX_READ_BUCKETS + 1),
    ),
    ("range reversed", lambda c: BucketedCounter(c, "x", width=60, retention=60).range(120, 0)),
    (
        "range too long",
        lambda c: BucketedCounter(c, "x", width=1, retention=60).range(0, MAX_READ_BUCKETS),
    ),
    ("add nothing", lambda c: UniqueCounter(c, "x", width=60, retention=60).add()),
    ("add float", lambda c: UniqueCounter(c, "x", width=60, retention=60).add(1.5)),  # type: ignore[arg-type]
    ("add None", lambda c: UniqueCounter(c, "x", width=60, retention=60).add("a", None)),  # type: ignore[arg-type]
    (
        "unique too many",
        lambda c: UniqueCounter(c, "x", width=60, retention=60).last(MAX_UNIQUE_BUCKETS + 1),
    ),
    (
        "cache_ttl 0",
        lambda c: UniqueCounter(c, "x", width=60, retention=60).last(2, cache_ttl=0),
    ),
]


@pytest.mark.parametrize("call", [call for _, call in CALLS], ids=[name for name, _ in CALLS])
async def test_bad_input_is_refused_before_any_command(call: Callable[[Any], Any]) -> None:
    client = connect(OFFLINE)
    try:
        with pytest.raises(ConfigurationError):
            await call(client)
        # The same client does reach for the server (and fails) on a valid call.
        with pytest.raises(ConnectionFailed):
            await Counter(client, "x").get()
    finally:
        await client.aclose()


def test_invalid_names_are_key_errors() -> None:
    client = connect(OFFLINE)
    with pytest.raises(InvalidKeyError):
        BucketedCounter(client, "", width=60, retention=60)
    with pytest.raises(InvalidKeyError):
        HashCounter(client, "x" * 2000)


# --- Counter ---------------------------------------------------------------------------


async def test_counter_counts_exactly_over_64_bits(redis_client: Any, key_prefix: str) -> None:
    counter = Counter(redis_client, "hits", prefix=key_prefix)
    assert await counter.get() == 0  # absent reads as 0
    assert await counter.incr() == 1
    assert await counter.incr(41) == 42
    assert await counter.decr() == 41
    assert await counter.decr(50) == -9
    assert await counter.get() == -9
    await counter.reset()
    assert await counter.get() == 0
    assert await redis_client.exists(f"{key_prefix}:counter:{{hits}}") == 0
    # The whole signed 64-bit range, exactly (no float on the way).
    assert await counter.incr(INT64) == INT64
    with pytest.raises(CommandError):  # overflow: the server refuses, nothing changes
        await counter.incr()
    assert await counter.get() == INT64
    assert await counter.decr(INT64) == 0
    assert await counter.decr(INT64) == -INT64


async def test_counter_is_one_plain_key_without_ttl(redis_client: Any, key_prefix: str) -> None:
    counter = Counter(redis_client, "pageview:home:2026-04-25", prefix=key_prefix)
    await counter.incr()
    key = f"{key_prefix}:counter:{{pageview:home:2026-04-25}}"
    assert await redis_client.get(key) == b"1"
    assert await redis_client.pttl(key) == -1
    # Same name and prefix: the same counter; another name: another one.
    assert await Counter(redis_client, "pageview:home:2026-04-25", prefix=key_prefix).get() == 1
    assert await Counter(redis_client, "pageview:about", prefix=key_prefix).get() == 0


async def test_concurrent_increments_all_count(redis_client: Any, key_prefix: str) -> None:
    counter = Counter(redis_client, "c", prefix=key_prefix)
    hashed = HashCounter(redis_client, "h", prefix=key_prefix, ttl=60)
    buckets = BucketedCounter(redis_client, "b", width=3600, retention=DAY, prefix=key_prefix)
    at = float(await server_seconds(redis_client))

    async def worker() -> None:
        for _ in range(25):
            await counter.incr()
            await hashed.incr("f", 2)
            await buckets.incr(at=at)

    async with anyio.create_task_group() as tg:
        for _ in range(64):
            tg.start_soon(worker)
    assert await counter.get() == 64 * 25
    assert await hashed.get("f") == 64 * 25 * 2
    assert (await buckets.last(1, at=at)).total == 64 * 25


async def test_float_counter(redis_client: Any, key_prefix: str) -> None:
    revenue = Counter(redis_client, "revenue:total", prefix=key_prefix)
    assert await revenue.get_float() == 0.0
    assert await revenue.incr_float(19.99) == pytest.approx(19.99)
    for _ in range(10):
        await revenue.incr_float(0.1)
    assert await revenue.get_float() == pytest.approx(20.99)
    assert await revenue.incr_float(-0.99) == pytest.approx(20.0)
    await revenue.incr_float(0.5)
    with pytest.raises(CounterError, match="not an integer"):
        await revenue.get()  # a fraction: get() cannot say it as an int
    with pytest.raises(CommandError):
        await revenue.incr()  # INCRBY refuses a fractional value; nothing changes
    assert await revenue.get_float() == pytest.approx(20.5)


async def test_reading_a_foreign_value_is_a_counter_error(
    redis_client: Any, key_prefix: str
) -> None:
    counter = Counter(redis_client, "x", prefix=key_prefix)
    await redis_client.set(f"{key_prefix}:counter:{{x}}", "hello")
    with pytest.raises(CounterError):
        await counter.get()
    with pytest.raises(CounterError):
        await counter.get_float()
    with pytest.raises(CommandError):
        await counter.incr()


@pytest.mark.parametrize("kind", ["counter", "hashcounter"])
async def test_ttl_is_set_on_every_write(redis_client: Any, key_prefix: str, kind: str) -> None:
    make = Counter if kind == "counter" else HashCounter
    counter: Any = make(redis_client, "n", ttl=30, prefix=key_prefix)
    key = f"{key_prefix}:{kind}:{{n}}"

    async def write() -> int:
        return int(await (counter.incr() if kind == "counter" else counter.incr("f")))

    assert await write() == 1
    assert 0 < await redis_client.pttl(key) <= 30_000
    # A TTL removed (or a key that existed without one) comes back with the next write.
    await redis_client.persist(key)
    assert await redis_client.pttl(key) == -1
    assert await write() == 2
    assert 0 < await redis_client.pttl(key) <= 30_000
    if kind == "counter":
        assert await counter.incr(2**62) == 2**62 + 2  # exact through the script
        assert await counter.incr_float(0.5) == pytest.approx(2**62 + 2.5)
    else:
        assert await counter.incr("f", 2**62) == 2**62 + 2
        assert await counter.decr("g", 5) == -5


async def test_ttl_counter_disappears_when_idle(redis_client: Any, key_prefix: str) -> None:
    counter = Counter(redis_client, "idle", ttl=0.2, prefix=key_prefix)
    await counter.incr(5)
    with anyio.fail_after(10):
        while await counter.get() != 0:  # noqa: ASYNC110 - the server expires it
            await anyio.sleep(0.05)


async def test_hash_counter(redis_client: Any, key_prefix: str) -> None:
    counters = HashCounter(redis_client, "user:42", prefix=key_prefix)
    assert await counters.get_all() == {}
    assert await counters.incr("orders") == 1
    assert await counters.incr("orders", 2) == 3
    assert await counters.decr("credits", 7) == -7
    assert await counters.incr("héllo") == 1
    assert await counters.get("orders") == 3
    assert await counters.get("missing") == 0
    assert await counters.get_many(["orders", "missing", "credits"]) == {
        "orders": 3,
        "missing": 0,
        "credits": -7,
    }
    assert await counters.get_many([]) == {}
    assert await counters.get_all() == {"orders": 3, "credits": -7, "héllo": 1}
    # Many counters, one key: a hash.
    key = f"{key_prefix}:hashcounter:{{user:42}}"
    assert await redis_client.type(key) == b"hash"
    assert [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")] == [key.encode()]
    assert await counters.remove("orders", "missing") == 1
    assert await counters.get_all() == {"credits": -7, "héllo": 1}
    await counters.reset()
    assert await redis_client.exists(key) == 0
    assert await counters.incr("f", INT64) == INT64
    with pytest.raises(CommandError):  # overflow: refused, nothing changes
        await counters.incr("f")
    assert await counters.get("f") == INT64


async def test_hash_counter_rejects_a_foreign_field(redis_client: Any, key_prefix: str) -> None:
    counters = HashCounter(redis_client, "h", prefix=key_prefix, ttl=60)
    await redis_client.hset(f"{key_prefix}:hashcounter:{{h}}", "f", "text")
    with pytest.raises(CounterError):
        await counters.get("f")
    with pytest.raises(CounterError):
        await counters.get_all()
    with pytest.raises(ScriptError):  # the TTL path is a script
        await counters.incr("f")


# --- BucketedCounter ------------------------------------------------------------------------


async def test_buckets_split_at_their_boundaries(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=60, retention=DAY, prefix=key_prefix)
    t0 = (await server_seconds(redis_client)) // 3600 * 3600  # a whole hour, in the past
    assert await counter.incr(at=t0) == 1
    assert await counter.incr(at=t0 + 59.999) == 2  # still the first minute
    assert await counter.incr(5, at=t0 + 60) == 5  # the next one starts exactly here
    assert await counter.incr(at=t0 + 179.5) == 1
    series = await counter.range(t0, t0 + 179)
    assert series.buckets == (Bucket(t0, 2), Bucket(t0 + 60, 5), Bucket(t0 + 120, 1))
    assert series.total == 8
    # Both ends inclusive, by the buckets that hold them; empty buckets count 0.
    assert (await counter.range(t0 + 30, t0 + 30)).buckets == (Bucket(t0, 2),)
    assert (await counter.range(t0 + 59, t0 + 60)).total == 7
    around = await counter.range(t0 - 60, t0 + 240)
    assert [b.value for b in around.buckets] == [0, 2, 5, 1, 0, 0]
    assert (await counter.last(3, at=t0 + 150)).buckets == series.buckets
    assert counter.bucket_start(t0 + 119.9) == t0 + 60
    keys = sorted([k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")])
    assert keys == sorted(bucket_key(key_prefix, "bucketed", "pv", t0 + 60 * i).encode()
                          for i in range(3))  # fmt: skip


async def test_every_bucket_expires_at_its_end_plus_retention(
    redis_client: Any, key_prefix: str
) -> None:
    retention = 600
    counter = BucketedCounter(redis_client, "pv", width=60, retention=retention,
                              prefix=key_prefix)  # fmt: skip
    now = await server_seconds(redis_client)
    for at in (now - 200, now - 61, now):
        await counter.incr(at=at)
    await counter.incr()  # the server's clock
    keys = [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")]
    assert len(keys) in (3, 4)  # the last two may share a bucket
    for key in keys:
        start = int(key.rsplit(b":", 1)[1])
        expire_at_ms = (start + 60 + retention) * 1000
        before = await server_ms(redis_client)
        pttl = await redis_client.pttl(key)
        after = await server_ms(redis_client)
        assert expire_at_ms - after - 2 <= pttl <= expire_at_ms - before + 2, (key, pttl)


async def test_ttl_is_set_again_by_every_write(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=60, retention=600, prefix=key_prefix)
    uniques = UniqueCounter(redis_client, "uv", width=60, retention=600, prefix=key_prefix)
    at = await server_seconds(redis_client)
    start = counter.bucket_start(at)
    await counter.incr(at=at)
    await uniques.add("a", at=at)
    keys = [bucket_key(key_prefix, kind, name, start) for kind, name in
            (("bucketed", "pv"), ("unique", "uv"))]  # fmt: skip
    for key in keys:
        await redis_client.persist(key)
        assert await redis_client.pttl(key) == -1
    await counter.incr(at=at)
    await uniques.add("a", at=at)  # a write that changes nothing still sets the TTL
    for key in keys:
        assert await redis_client.pttl(key) > 0


async def test_buckets_really_expire(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=1, retention=0.2, prefix=key_prefix)
    uniques = UniqueCounter(redis_client, "uv", width=1, retention=0.2, prefix=key_prefix)
    at = await server_seconds(redis_client)
    assert await counter.incr(3, at=at) == 3
    assert await uniques.add("a", "b", at=at)
    # Gone at most 1.2 s later (the bucket's end plus retention), without anyone deleting.
    with anyio.fail_after(15):
        while (await counter.last(1, at=at)).total or (await uniques.last(1, at=at)).total:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert not [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")]


async def test_a_write_past_retention_writes_nothing(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=60, retention=60, prefix=key_prefix)
    uniques = UniqueCounter(redis_client, "uv", width=60, retention=60, prefix=key_prefix)
    old = await server_seconds(redis_client) - 3600
    assert await counter.incr(5, at=old) == 0
    assert await uniques.add("a", at=old) is False
    assert await counter.incr(5, at=0) == 0
    assert not [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")]


async def test_the_server_clock_picks_the_bucket(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=3600, retention=DAY, prefix=key_prefix)
    before = await server_seconds(redis_client)
    assert await counter.incr(4) == 4
    series = await counter.last(2)
    after = await server_seconds(redis_client)
    current = series.buckets[-1].start
    assert before // 3600 * 3600 <= current <= after // 3600 * 3600
    if before // 3600 == after // 3600:  # no hour boundary in between (almost always)
        assert series.buckets == (Bucket(current - 3600, 0), Bucket(current, 4))
        assert (await counter.last(1, at=before)).total == 4


async def test_day_buckets_start_at_midnight_utc(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=DAY, retention=DAY, prefix=key_prefix)
    midnight = (await server_seconds(redis_client)) // DAY * DAY
    await counter.incr(at=midnight - 0.001)  # yesterday, 23:59:59.999
    await counter.incr(2, at=midnight)
    series = await counter.last(2, at=midnight + 3600)
    assert series.buckets == (Bucket(midnight - DAY, 1), Bucket(midnight, 2))


async def test_a_foreign_bucket_value_is_an_error(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=60, retention=DAY, prefix=key_prefix)
    at = await server_seconds(redis_client)
    await redis_client.set(bucket_key(key_prefix, "bucketed", "pv", counter.bucket_start(at)), "x")
    with pytest.raises(CounterError):
        await counter.last(1, at=at)
    with pytest.raises(ScriptError):
        await counter.incr(at=at)


# The model: exact integer milliseconds, so a moment exactly on a boundary, or one
# millisecond before it, is placed by arithmetic that cannot round.
WIDTHS = st.sampled_from([1, 7, 60])


@st.composite
def moments(draw: st.DrawFn, width: int, span: int) -> int:
    """A moment as milliseconds after t0, often on or next to a bucket boundary."""
    boundary = draw(st.integers(0, span)) * width * 1000
    return draw(
        st.sampled_from([boundary, boundary + 1, max(0, boundary - 1)])
        | st.integers(0, span * width * 1000)
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), width=WIDTHS)
async def test_range_reads_match_a_model(redis_url: str, data: st.DataObject, width: int) -> None:
    span = 12  # buckets the moments are drawn from
    client = connect(redis_url)
    try:
        counter = BucketedCounter(
            client, "s", width=width, retention=DAY, prefix=f"h{uuid.uuid4().hex[:10]}"
        )
        # t0: a bucket boundary a little in the past, so every bucket is within retention.
        t0 = ((await server_seconds(client)) - 2 * span * width) // width * width
        model: dict[int, int] = defaultdict(int)

        def bucket(ms: int) -> int:
            return (t0 * 1000 + ms) // (width * 1000) * width

        writes = data.draw(
            st.lists(st.tuples(moments(width, span), st.integers(-3, 50)), max_size=30),
            label="writes",
        )
        for ms, amount in writes:
            model[bucket(ms)] += amount
            assert await counter.incr(amount, at=t0 + ms / 1000) == model[bucket(ms)]
        for _ in range(data.draw(st.integers(1, 6), label="reads")):
            a, b = sorted([data.draw(moments(width, span)), data.draw(moments(width, span))])
            starts = range(bucket(a), bucket(b) + 1, width)
            expected = tuple(Bucket(s, model[s]) for s in starts)
            assert await counter.range(t0 + a / 1000, t0 + b / 1000) == Series(
                expected, sum(model[s] for s in starts)
            )
            # The same buckets, named by their count and last moment.
            assert await counter.last(len(expected), at=t0 + b / 1000) == Series(
                expected, sum(model[s] for s in starts)
            )
    finally:
        await client.aclose()


async def test_cancelled_writes_leak_nothing(redis_client: Any, key_prefix: str) -> None:
    counter = BucketedCounter(redis_client, "pv", width=60, retention=DAY, prefix=key_prefix)
    uniques = UniqueCounter(redis_client, "uv", width=60, retention=DAY, prefix=key_prefix)
    at = float(await server_seconds(redis_client))
    # Open the pool's connections first (see test_ratelimit's twin of this test).
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(counter.last, 1)
    assert await counter.incr(at=at) == 1  # a key, whether or not a cancelled write ran
    done = 0

    async def write(i: int) -> None:
        nonlocal done
        await counter.incr(at=at + i % 120)
        await uniques.add(f"u{i}", at=at + i % 120)
        done += 1

    with anyio.move_on_after(0.002):
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(write, i)
    assert not borrowed_connections(redis_client)
    await assert_every_key_has_ttl(redis_client, key_prefix)
    total = (await counter.range(at, at + 120)).total
    assert 1 + done <= total <= 1 + 300
    assert await counter.incr(at=at) >= 1  # the client still works


# --- UniqueCounter ------------------------------------------------------------------------


def within(estimate: int, true: int, tolerance: float = HLL_TOLERANCE) -> bool:
    return abs(estimate - true) <= tolerance * true


async def test_hyperloglog_estimates_100k_within_2_percent(
    redis_client: Any, key_prefix: str
) -> None:
    uniques = UniqueCounter(redis_client, "visitors", width=DAY, retention=DAY,
                            prefix=key_prefix)  # fmt: skip
    at = await server_seconds(redis_client)
    items = [f"user:{i}" for i in range(100_000)]
    changed = [await uniques.add(*items[i : i + 5000], at=at) for i in range(0, 100_000, 5000)]
    assert all(changed)
    estimate = (await uniques.last(1, at=at)).total
    assert within(estimate, 100_000), estimate
    # The same items again (and in one call of 20,000, past Lua's unpack() cap): no change.
    assert await uniques.add(*items[:20_000], at=at) is False
    assert (await uniques.last(1, at=at)).total == estimate
    # At most 12 KB, whatever the count.
    key = bucket_key(key_prefix, "unique", "visitors", uniques.bucket_start(at))
    assert await redis_client.strlen(key) <= 12 * 1024 + 16


async def test_union_across_7_daily_buckets_within_2_percent(
    redis_client: Any, key_prefix: str
) -> None:
    uniques = UniqueCounter(redis_client, "dau", width=DAY, retention=30 * DAY,
                            prefix=key_prefix)  # fmt: skip
    today = (await server_seconds(redis_client)) // DAY * DAY
    # Day d sees users [10,000 d, 10,000 d + 30,000): 30,000 a day, overlapping, so the
    # week has 90,000 distinct users although the days add up to 210,000.
    for d in range(7):
        users = [f"u{n}" for n in range(10_000 * d, 10_000 * d + 30_000)]
        for i in range(0, len(users), 10_000):
            await uniques.add(*users[i : i + 10_000], at=today - (6 - d) * DAY + 3600)
    week = await uniques.last(7, at=today + 1)
    assert [b.start for b in week.buckets] == [today - (6 - d) * DAY for d in range(7)]
    assert all(within(b.value, 30_000) for b in week.buckets), week.buckets
    assert within(week.total, 90_000), week.total
    assert await uniques.range(today - 6 * DAY, today + DAY - 1) == week
    # Any run of days: days 2..4 saw users [20,000, 70,000).
    assert within((await uniques.range(today - 4 * DAY, today - 2 * DAY)).total, 50_000)
    # A single day's union is its own estimate.
    one = await uniques.last(1, at=today)
    assert one.total == one.buckets[0].value


async def test_small_sets_are_counted_nearly_exactly(redis_client: Any, key_prefix: str) -> None:
    uniques = UniqueCounter(redis_client, "u", width=60, retention=600, prefix=key_prefix)
    at = await server_seconds(redis_client)
    assert await uniques.add("alice", "bob", "alice", b"carol", 42, at=at)
    assert await uniques.add("42", at=at) is False  # 42 and "42" are one item
    assert (await uniques.last(1, at=at)).total == 4
    assert (await uniques.last(3, at=at)) == Series(
        (
            Bucket(uniques.bucket_start(at) - 120, 0),
            Bucket(uniques.bucket_start(at) - 60, 0),
            Bucket(uniques.bucket_start(at), 4),
        ),
        4,
    )


async def test_cached_union_is_merged_once_with_a_ttl(redis_client: Any, key_prefix: str) -> None:
    uniques = UniqueCounter(redis_client, "u", width=60, retention=DAY, prefix=key_prefix)
    at = await server_seconds(redis_client)
    start = uniques.bucket_start(at)
    await uniques.add(*[f"a{i}" for i in range(100)], at=at - 60)
    await uniques.add(*[f"a{i}" for i in range(50, 150)], at=at)
    fresh = await uniques.last(2, at=at)
    cached = await uniques.last(2, at=at, cache_ttl=30)
    assert fresh == cached
    assert within(cached.total, 150)
    cache_key = f"{key_prefix}:unique:{{u}}:union:{start - 60}:{start}"
    assert 0 < await redis_client.pttl(cache_key) <= 30_000
    # New items: the per-bucket estimates and an uncached union see them at once; the
    # cached union does not until its TTL runs out.
    await uniques.add(*[f"b{i}" for i in range(100)], at=at)
    later = await uniques.last(2, at=at, cache_ttl=30)
    assert later.total == cached.total
    assert later.buckets[1].value > cached.buckets[1].value
    assert within((await uniques.last(2, at=at)).total, 250)
    await redis_client.delete(cache_key)
    assert within((await uniques.range(at - 60, at, cache_ttl=30)).total, 250)


async def test_a_foreign_key_is_a_script_error(redis_client: Any, key_prefix: str) -> None:
    uniques = UniqueCounter(redis_client, "u", width=60, retention=DAY, prefix=key_prefix)
    at = await server_seconds(redis_client)
    await redis_client.set(bucket_key(key_prefix, "unique", "u", uniques.bucket_start(at)), "x")
    with pytest.raises(ScriptError):
        await uniques.add("a", at=at)
    with pytest.raises(ScriptError):
        await uniques.last(1, at=at)


# --- cluster -------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_every_counter_works_on_a_cluster(cluster_client: Any, key_prefix: str) -> None:
    counter = Counter(cluster_client, "c", prefix=key_prefix, ttl=60)
    hashed = HashCounter(cluster_client, "h", prefix=key_prefix)
    buckets = BucketedCounter(cluster_client, "b", width=60, retention=DAY, prefix=key_prefix)
    uniques = UniqueCounter(cluster_client, "u", width=60, retention=DAY, prefix=key_prefix)
    assert await counter.incr(3) == 3
    assert await hashed.incr("f", 2) == 2
    assert await hashed.get_all() == {"f": 2}
    now = int((await cluster_client.time())[0])
    for i in range(5):  # five buckets, built by the script inside the base key's slot
        assert await buckets.incr(i + 1, at=now - 60 * i) == i + 1
        await uniques.add(*[f"x{n}" for n in range(i * 10, i * 10 + 20)], at=now - 60 * i)
    assert (await buckets.last(5, at=now)).total == 15
    assert (await buckets.last(5)).buckets[-1].value in (0, 1)  # the server's clock
    week = await uniques.last(5, at=now)
    assert week.total == 60  # small sets: exact
    assert (await uniques.last(5, at=now, cache_ttl=10)).total == 60
    # Every key of one series in one slot: the slot of its hash tag.
    for kind, name in (("bucketed", "b"), ("unique", "u")):
        slots = set()
        for i in range(5):
            key = bucket_key(key_prefix, kind, name, buckets.bucket_start(now - 60 * i))
            assert await cluster_client.exists(key) == 1
            slots.add(await cluster_client.cluster_keyslot(key))
        assert slots == {await cluster_client.cluster_keyslot(name)}


# --- client options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"protocol": 3}, {"decode_responses": True}, {"auto_pipeline": False}],
    ids=["resp3", "decoded", "no-autopipeline"],
)
async def test_replies_parse_under_every_client_option(
    redis_url: str, key_prefix: str, options: dict[str, Any]
) -> None:
    async with connect(redis_url, **options) as client:
        counter = Counter(client, "c", prefix=key_prefix)
        assert await counter.incr(2) == 2
        assert await counter.get() == 2
        assert await Counter(client, "f", prefix=key_prefix, ttl=9).incr_float(1.5) == 1.5
        hashed = HashCounter(client, "h", prefix=key_prefix, ttl=9)
        assert await hashed.incr("a", 3) == 3
        assert await hashed.get_all() == {"a": 3}
        assert await hashed.get_many(["a", "b"]) == {"a": 3, "b": 0}
        at = await server_seconds(client)
        buckets = BucketedCounter(client, "b", width=60, retention=600, prefix=key_prefix)
        assert await buckets.incr(4, at=at) == 4
        assert (await buckets.last(2, at=at)).buckets[-1] == Bucket(at // 60 * 60, 4)
        uniques = UniqueCounter(client, "u", width=60, retention=600, prefix=key_prefix)
        assert await uniques.add("x", "y", at=at)
        assert (await uniques.last(2, at=at)).total == 2
