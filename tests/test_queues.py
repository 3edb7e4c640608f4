"""Queues: the lossy list queue, and the reliable queue's leases, retries, delays,
priorities, dead letters, worker pool, shutdown and cancellation."""

from __future__ import annotations

import asyncio
import functools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from aioredispatterns import ConfigurationError, connect
from aioredispatterns.errors import CommandError, SerializationError
from aioredispatterns.queues import (
    DeadJob,
    Job,
    JobLost,
    ListQueue,
    QueueConsumer,
    QueueError,
    QueuePolicy,
    ReliableQueue,
)
from aioredispatterns.testing import FaultProxy, borrowed_connections

# Fast timings for tests: leases run out quickly, failed jobs retry almost at once.
FAST = QueuePolicy(
    visibility_timeout=0.5,
    retry_base=0.01,
    retry_cap=0.05,
    block=0.2,
    drain_timeout=2.0,
    ack_timeout=2.0,
)

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")


def fast(**changes: Any) -> QueuePolicy:
    fields = {
        "visibility_timeout": 0.5,
        "retry_base": 0.01,
        "retry_cap": 0.05,
        "block": 0.2,
        "drain_timeout": 2.0,
        "ack_timeout": 2.0,
    }
    return QueuePolicy(**(fields | changes))


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], within: float = 20) -> None:
    with anyio.fail_after(within):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# One atomic snapshot of a queue (a cancelled caller's script may still be on its way).
SNAPSHOT = """
return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('ZRANGE', KEYS[2], 0, -1),
    redis.call('ZRANGE', KEYS[3], 0, -1), redis.call('ZRANGE', KEYS[4], 0, -1),
    redis.call('LRANGE', KEYS[5], 0, -1), redis.call('HKEYS', KEYS[6]),
    redis.call('HKEYS', KEYS[7])}
"""


async def places(client: Redis, queue: ReliableQueue) -> dict[str, str]:
    """Where each job is: every job the queue knows is in exactly one place."""
    keys = queue._keys
    snapshot = [keys.ready, keys.prio, keys.delayed, keys.leases, keys.dead, keys.jobs]
    ready, prio, delayed, leased, dead, known, owners = await client.eval(  # type: ignore[misc]
        SNAPSHOT, 7, *snapshot, keys.owners
    )
    where: dict[str, str] = {}
    for ids, place in [
        (ready, "waiting"),
        (prio, "waiting"),
        (delayed, "delayed"),
        (leased, "leased"),
        (dead, "dead"),
    ]:
        for raw in ids:
            job_id = _text(raw)
            assert job_id not in where, f"job {job_id} in {where[job_id]} and in {place}"
            where[job_id] = place
    known_ids = {_text(i) for i in known}
    lost = known_ids - set(where)
    assert set(where) == known_ids, f"stranded: {lost}; unknown: {set(where) - known_ids}"
    assert {_text(i) for i in owners} == {i for i, p in where.items() if p == "leased"}
    return where


async def processing(client: Redis, queue: ReliableQueue, consumer: str) -> list[str]:
    return [_text(i) for i in await client.lrange(queue._keys.processing(consumer), 0, -1)]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "options",
    [
        {"visibility_timeout": 0},
        {"visibility_timeout": 0.001},
        {"max_deliveries": 0},
        {"retry_base": -1},
        {"concurrency": 0},
        {"max_in_flight": True},
        {"batch_size": 1001},
        {"block": 0.0001},
        {"drain_timeout": math.inf},
        {"dead_letter_maxlen": 0},
    ],
)
def test_bad_policy_is_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        QueuePolicy(**options)


async def test_bad_arguments_fail_before_any_command() -> None:
    client = connect("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        with pytest.raises(ConfigurationError):
            ReliableQueue(client, "")
        with pytest.raises(ConfigurationError):
            ListQueue(client, "q", prefix="a{b")
        queue = ReliableQueue(client, "q")
        for bad in (
            {"delay": -1},
            {"delay": math.nan},
            {"priority": 1.5},
            {"priority": 10**7},
            {"job_id": ""},
            {"job_id": 5},
        ):
            with pytest.raises(ConfigurationError):
                await queue.push("x", **bad)
        with pytest.raises(ConfigurationError):
            await queue.push_many(["a", "b"], job_ids=["only one"])
        with pytest.raises(ConfigurationError):
            await queue.push_many("not a list of payloads")
        with pytest.raises(SerializationError):
            await queue.push(object())
        with pytest.raises(ConfigurationError):
            queue.consumer(name="")
        with pytest.raises(ConfigurationError):
            queue.consumer("not callable")  # type: ignore[arg-type]
        consumer = queue.consumer()
        with pytest.raises(QueueError):
            await consumer.pop()  # not running
        with pytest.raises(QueueError):
            await consumer.ack("x")
        assert queue.stats.pushed == queue.stats.failed == 0
    finally:
        await client.aclose()


async def test_every_key_of_a_queue_shares_one_hash_tag(redis_client: Redis) -> None:
    queue = ReliableQueue(redis_client, "mail", prefix="p")
    keys = queue._keys
    assert queue.key == "p:queue:{mail}"
    for key in [*keys.all_fixed(), keys.processing("worker-1")]:
        assert _text(key).startswith("p:queue:{mail}:")
    assert ListQueue(redis_client, "mail", prefix="p").key == "p:listqueue:{mail}"


# --------------------------------------------------------------------------- list queue


async def test_list_queue_is_first_in_first_out(redis_client: Redis, key_prefix: str) -> None:
    queue = ListQueue(redis_client, "jobs", prefix=key_prefix)
    assert await queue.push({"n": 0}) == 1
    assert await queue.push_many({"n": n} for n in range(1, 2500)) == 2500
    assert await queue.length() == 2500
    got = [await queue.pop(timeout=1) for _ in range(3)]
    assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
    async for payload in queue.jobs():
        if payload["n"] == 2499:
            break
    assert await queue.length() == 0
    assert await queue.pop(timeout=0) is None
    started = anyio.current_time()
    assert await queue.pop(timeout=0.2) is None
    assert anyio.current_time() - started >= 0.19
    assert queue.stats.pushed == queue.stats.popped == 2500


async def test_list_queue_pop_waits_for_a_push(redis_client: Redis, key_prefix: str) -> None:
    queue = ListQueue(redis_client, "jobs", prefix=key_prefix)
    async with anyio.create_task_group() as tg:

        async def push_later() -> None:
            await anyio.sleep(0.2)
            await queue.push("late")

        tg.start_soon(push_later)
        with anyio.fail_after(10):
            assert await queue.pop() == "late"


async def test_a_popped_list_job_is_gone_if_its_worker_dies(
    redis_client: Redis, key_prefix: str
) -> None:
    # The pattern's documented loss: the worker pops, then dies before finishing.
    queue = ListQueue(redis_client, "jobs", prefix=key_prefix)
    await queue.push("important")
    assert await queue.pop(timeout=1) == "important"  # ... and the worker dies here
    assert await queue.length() == 0
    assert await queue.pop(timeout=0) is None  # nobody will ever see it again


# --------------------------------------------------------------------------- reliable queue


async def test_handler_sees_every_job_once_and_nothing_is_left(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    ids = await queue.push_many({"n": n} for n in range(1200))
    seen: list[Job] = []

    async def handle(job: Job) -> None:
        seen.append(job)

    async with queue.consumer(handle) as consumer:
        await wait_until(lambda: consumer.stats.acked == len(ids))
        assert (await queue.info()).in_flight == 0
    assert sorted(job.id for job in seen) == sorted(ids)
    assert sorted(job.payload["n"] for job in seen) == list(range(1200))
    assert {job.deliveries for job in seen} == {1}
    assert consumer.stats.processed == 1200
    assert await places(redis_client, queue) == {}
    info = await queue.info()
    assert (info.waiting, info.delayed, info.in_flight, info.dead, info.consumers) == (0,) * 5
    assert await processing(redis_client, queue, consumer.name) == []
    assert not borrowed_connections(redis_client)


async def test_jobs_are_spread_over_consumers_and_each_runs_once(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast(batch_size=10))
    runs: dict[str, list[str]] = {}

    def handler(name: str) -> Callable[[Job], Coroutine[Any, Any, None]]:
        async def handle(job: Job) -> None:
            runs.setdefault(job.id, []).append(name)
            await anyio.sleep(0.001)

        return handle

    async with queue.consumer(handler("a"), name="a"), queue.consumer(handler("b"), name="b"):
        ids = await queue.push_many(range(400))
        await wait_until(lambda: len(runs) == 400)
        await wait_until(lambda: _info_is(queue, in_flight=0, waiting=0))
    assert set(runs) == set(ids)
    assert all(len(names) == 1 for names in runs.values())
    assert {names[0] for names in runs.values()} == {"a", "b"}


async def _info_is(queue: ReliableQueue, **expected: int) -> bool:
    info = await queue.info()
    return all(getattr(info, name) == value for name, value in expected.items())


async def test_manual_pop_ack_nack_and_extend(redis_client: Redis, key_prefix: str) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    first, second = await queue.push_many(["a", "b"])
    async with queue.consumer(name="me") as consumer:
        job = await consumer.pop(timeout=5)
        assert job is not None
        assert (job.id, job.payload, job.deliveries, job.last_error) == (first, "a", 1, None)
        # Taken by our loop: it is ours until settled (no renewal), so extend it.
        await anyio.sleep(0.3)
        await consumer.extend(job)
        await anyio.sleep(0.3)  # 0.6 s after the pop, 0.3 s after the extension
        assert (await places(redis_client, queue))[first] == "leased"
        assert await consumer.ack(job) == 1
        assert await consumer.ack(job) == 0  # acking twice is harmless
        with pytest.raises(JobLost):
            await consumer.extend(job)
        job = await consumer.pop(timeout=5)
        assert job is not None
        assert job.id == second
        assert await consumer.nack(job, ValueError("nope"), retry_in=0)
        again = await consumer.pop(timeout=5)
        assert again is not None
        assert (again.id, again.deliveries, again.last_error) == (second, 2, "ValueError: nope")
        assert await consumer.ack(again) == 1
        assert not await consumer.nack(again)  # settled already: nothing to fail
    assert await places(redis_client, queue) == {}
    assert consumer.stats.acked == 2


async def test_a_job_taken_by_your_loop_comes_back_after_the_visibility_timeout(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    [job_id] = await queue.push_many(["slow"])
    async with queue.consumer(name="a") as consumer:
        taken = await consumer.pop(timeout=5)
        assert taken is not None
        assert taken.id == job_id
        begin = anyio.current_time()
        # Neither settled nor extended: the reaper returns it, and it comes again.
        again = await consumer.pop(timeout=10)
        assert anyio.current_time() - begin >= 0.45
        assert again is not None
        assert again.id == job_id
        assert again.deliveries == 2
        assert again.last_error == "lease expired on consumer a"
        assert await consumer.ack(again) == 1
    assert consumer.stats.reaped == 1


async def test_a_late_ack_never_deletes_another_consumers_delivery(
    redis_client: Redis, key_prefix: str
) -> None:
    from aioredispatterns import _queue_redis as _q

    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    [job_id] = await queue.push_many(["x"])
    assert await _ghost_takes(redis_client, queue, 1, consumer="a") == [job_id]
    async with queue.consumer(name="b") as b:
        again = await b.pop(timeout=10)  # a stalled: its lease ran out
        assert again is not None
        assert again.id == job_id
        assert again.deliveries == 2
        # a wakes up and acknowledges its (first) delivery: b's is left alone.
        assert await _q.ack(redis_client, queue._keys, "a", [job_id]) == 0
        assert await processing(redis_client, queue, "a") == []
        assert (await places(redis_client, queue))[job_id] == "leased"
        assert await b.ack(again) == 1


async def test_failed_jobs_retry_with_backoff_then_are_dead_lettered(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(
        redis_client,
        "jobs",
        prefix=key_prefix,
        policy=fast(max_deliveries=3, retry_base=0.05, retry_cap=0.2),
    )
    ids = await queue.push_many(["ok", "flaky", "poison"])
    calls: dict[str, list[float]] = {i: [] for i in ids}

    async def handle(job: Job) -> None:
        calls[job.id].append(anyio.current_time())
        if job.payload == "poison" or (job.payload == "flaky" and job.deliveries == 1):
            raise RuntimeError(job.payload)

    async with queue.consumer(handle) as consumer:
        await wait_until(lambda: consumer.stats.acked == 2)
        await wait_until(lambda: consumer.stats.dead_lettered == 1)
    assert [len(calls[i]) for i in ids] == [1, 2, 3]
    [letter] = await queue.dead_letters()
    assert letter == DeadJob(id=ids[2], raw=b'"poison"', deliveries=3, error="RuntimeError: poison")
    assert await places(redis_client, queue) == {ids[2]: "dead"}
    assert consumer.stats.failed == 4
    assert consumer.stats.retried == 3
    # Requeued with a fresh delivery count; this time it succeeds.
    assert await queue.requeue_dead(ids[2]) == 1
    seen: list[Job] = []

    async def accept(job: Job) -> None:
        seen.append(job)

    async with queue.consumer(accept):
        await wait_until(lambda: len(seen) == 1)
    assert seen[0].deliveries == 1
    assert seen[0].last_error == "RuntimeError: poison"
    await wait_until(lambda: _no_jobs(redis_client, queue))


async def _no_jobs(client: Redis, queue: ReliableQueue) -> bool:
    return await places(client, queue) == {}


async def test_dead_letter_list_is_bounded(redis_client: Redis, key_prefix: str) -> None:
    policy = fast(max_deliveries=1, dead_letter_maxlen=3)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = await queue.push_many(range(5))

    async def fail(job: Job) -> None:
        raise KeyError(job.payload)

    async with queue.consumer(fail) as consumer:
        await wait_until(lambda: consumer.stats.dead_lettered == 5)
    letters = await queue.dead_letters()
    assert [letter.id for letter in letters] == ids[:1:-1]  # the newest three
    assert await places(redis_client, queue) == {i: "dead" for i in ids[2:]}


async def test_an_explicit_job_id_makes_a_push_idempotent(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    assert await queue.push("first", job_id="order-42") == "order-42"
    assert await queue.push("second", job_id="order-42") == "order-42"
    assert await queue.push_many(["x", "y"], job_ids=["order-42", "order-43"]) == [
        "order-42",
        "order-43",
    ]
    assert queue.stats.pushed == 2
    assert queue.stats.duplicates == 2
    assert (await queue.info()).waiting == 2
    seen: list[Any] = []

    async def handle(job: Job) -> None:
        seen.append(job.payload)

    async with queue.consumer(handle):
        await wait_until(lambda: len(seen) == 2)
    assert seen == ["first", "y"]


# --------------------------------------------------------------------------- delays, priorities


async def test_delayed_jobs_never_run_early_and_run_on_time_under_load(
    redis_client: Redis, key_prefix: str
) -> None:
    # Consumers busy with a steady stream of immediate jobs while 100 delayed ones come
    # due. "Never early" is strict (the server's clock decides, same host); lateness is
    # bounded with room for a loaded CI machine (the figure is printed).
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast(block=1.0))
    started: dict[str, float] = {}
    due_after: dict[str, tuple[float, float]] = {}

    async def handle(job: Job) -> None:
        if job.payload != "filler":
            started[job.id] = time.time()
        await anyio.sleep(0.001)

    async def filler(stop: anyio.Event) -> None:
        while not stop.is_set():
            await queue.push_many(["filler"] * 20)
            await anyio.sleep(0.01)

    async with queue.consumer(handle), queue.consumer(handle):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(filler, stop)
            for n in range(100):
                delay = 0.05 + (n % 20) * 0.05
                before = time.time()
                job_id = await queue.push(n, delay=delay)
                due_after[job_id] = (before + delay, time.time() + delay)
                await anyio.sleep(0.005)
            await wait_until(lambda: len(started) == 100, within=30)
            stop.set()
    early = [i for i in started if started[i] < due_after[i][0]]
    assert not early, f"{len(early)} delayed jobs ran before they were due"
    # Upper bound: measured from the moment the push was sent.
    lateness = sorted(started[i] - due_after[i][0] for i in started)
    p99 = lateness[98]
    print(f"delayed jobs under load: p50 {lateness[49] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    # The goal is 50 ms (about 10 ms on an idle machine); a CI machine with a CPU hog
    # on each core (and other suites) gets twenty times that.
    assert p99 < 1.0, f"p99 lateness {p99 * 1000:.0f} ms"


async def test_a_new_earlier_delayed_job_wakes_a_blocked_consumer(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast(block=10.0))
    ran: dict[str, float] = {}

    async def handle(job: Job) -> None:
        ran[job.payload] = time.time()

    await queue.push("late", delay=30)
    async with queue.consumer(handle):
        await anyio.sleep(0.2)  # the consumer blocks (up to 10 s, the later job 30 s away)
        before = time.time()
        await queue.push("soon", delay=0.3)
        await wait_until(lambda: "soon" in ran, within=5)
    assert ran["soon"] >= before + 0.3
    assert ran["soon"] - before < 3.0  # not the 10 s block, nor the 30 s job
    assert "late" not in ran


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(
        st.tuples(st.sampled_from([None, 0, 1, 2, 7, -1, -3, 1_000_000, -1_000_000]),
                  st.integers(1, 5)),
        min_size=1,
        max_size=12,
    ),
    batch_size=st.integers(1, 7),
)  # fmt: skip
async def test_priorities_are_honoured_as_the_model_says(
    redis_client: Redis, batches: list[tuple[int | None, int]], batch_size: int
) -> None:
    # The model: higher priority first; first in, first out within a priority; no
    # priority is priority 0.
    prefix = f"h{uuid.uuid4().hex[:12]}"
    queue = ReliableQueue(redis_client, "jobs", prefix=prefix, policy=fast(batch_size=batch_size))
    pushed: list[tuple[int, str]] = []
    for priority, count in batches:
        ids = await queue.push_many(range(count), priority=priority)
        pushed += [(priority or 0, job_id) for job_id in ids]
    expected = [job_id for _, job_id in sorted(pushed, key=lambda p: -p[0])]  # stable sort
    got: list[str] = []
    async with queue.consumer() as consumer:
        while len(got) < len(pushed):
            job = await consumer.pop(timeout=10)
            assert job is not None
            assert job.priority == dict((i, p) for p, i in pushed)[job.id]
            got.append(job.id)
            await consumer.ack(job)
    assert got == expected


# --------------------------------------------------------------------------- leases, reaper


async def _ghost_takes(
    client: Redis, queue: ReliableQueue, count: int, consumer: str = "ghost"
) -> list[str]:
    """A consumer that takes jobs and dies at once (its leases are never renewed)."""
    from aioredispatterns import _queue_redis as _q

    taken, _ = await _q.pop(
        client,
        queue._keys,
        consumer=consumer,
        count=count,
        lease_ms=int(queue.policy.visibility_timeout * 1000),
        max_deliveries=queue.policy.max_deliveries,
        dead_max=0,
    )
    return [job[0] for job in taken]


@pytest.mark.parametrize("visibility_timeout", [0.3, 1.5])
async def test_a_dead_consumers_jobs_come_back_after_the_visibility_timeout(
    redis_client: Redis, key_prefix: str, visibility_timeout: float
) -> None:
    policy = fast(visibility_timeout=visibility_timeout)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = await queue.push_many(range(10))
    died = anyio.current_time()
    assert await _ghost_takes(redis_client, queue, 4) == ids[:4]
    seen: dict[str, tuple[float, Job]] = {}

    async def handle(job: Job) -> None:
        seen[job.id] = (anyio.current_time(), job)

    async with queue.consumer(handle) as consumer:
        await wait_until(lambda: len(seen) == 10, within=visibility_timeout + 20)
        await wait_until(lambda: consumer.stats.acked == 10)
    for job_id in ids[:4]:
        at, job = seen[job_id]
        assert job.deliveries == 2
        assert job.last_error == "lease expired on consumer ghost"
        assert at - died >= visibility_timeout - 0.01  # never before the lease ran out
    redelivered = max(seen[i][0] for i in ids[:4]) - died
    print(f"visibility_timeout={visibility_timeout}: redelivered after {redelivered:.2f} s")
    assert consumer.stats.reaped == 4
    assert await places(redis_client, queue) == {}


async def test_a_silent_consumer_is_forgotten(redis_client: Redis, key_prefix: str) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    await queue.push_many(range(3))
    await _ghost_takes(redis_client, queue, 3)
    async with queue.consumer(name="live") as consumer:
        await wait_until(lambda: _info_is(queue, consumers=1), within=20)
        assert await processing(redis_client, queue, "ghost") == []
        assert consumer.stats.reaped == 3


async def test_a_job_that_keeps_killing_its_consumers_is_dead_lettered(
    redis_client: Redis, key_prefix: str
) -> None:
    from aioredispatterns import _queue_redis as _q

    policy = fast(visibility_timeout=0.05)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    [job_id] = await queue.push_many(["crash"])
    for delivery in range(1, 6):
        # A consumer takes it and dies, each time; the reaper (a script, here called
        # directly) returns it once the lease ran out, with its delivery count.
        assert await _ghost_takes(redis_client, queue, 1, consumer=f"c{delivery}") == [job_id]
        assert int(await redis_client.hget(queue._keys.deliveries, job_id)) == delivery
        await anyio.sleep(0.1)
        returned, dead, _, _ = await _q.reap(
            redis_client, queue._keys, count=10, max_deliveries=5, dead_max=0, silent_ms=10**6
        )
        assert (returned, dead) == ((1, 0) if delivery < 5 else (0, 1))
    [letter] = await queue.dead_letters()
    assert letter.deliveries == 5
    assert letter.error == "lease expired on consumer c5 after 5 deliveries"
    assert await places(redis_client, queue) == {job_id: "dead"}


async def test_a_slow_handler_keeps_its_job_past_the_visibility_timeout(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    [job_id] = await queue.push_many(["slow"])
    runs: list[int] = []

    async def slow(job: Job) -> None:
        runs.append(job.deliveries)
        await anyio.sleep(2.0)  # four visibility timeouts

    async with queue.consumer(slow) as a, queue.consumer(slow, name="b") as b:
        await wait_until(lambda: a.stats.acked + b.stats.acked == 1, within=20)
    assert runs == [1]
    assert a.stats.refreshed + b.stats.refreshed >= 3
    assert a.stats.reaped == b.stats.reaped == 0
    assert job_id


async def test_a_restarted_consumer_gets_back_what_its_previous_run_held(
    redis_client: Redis, key_prefix: str
) -> None:
    policy = fast(visibility_timeout=60.0)  # the reaper would wait a minute
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = await queue.push_many(range(5))
    from aioredispatterns import _queue_redis as _q

    await _q.pop(
        redis_client,
        queue._keys,
        consumer="pod-7",
        count=3,
        lease_ms=60_000,
        max_deliveries=5,
        dead_max=0,
    )  # ... and pod-7 was SIGKILLed
    seen: list[Job] = []

    async def handle(job: Job) -> None:
        seen.append(job)

    async with queue.consumer(handle, name="pod-7") as consumer:
        await wait_until(lambda: len(seen) == 5, within=5)
    assert [job.id for job in seen] == ids  # back at the front, in order
    assert [job.deliveries for job in seen] == [2, 2, 2, 1, 1]
    assert consumer.stats.released == 3


# --------------------------------------------------------------------------- backpressure


async def test_backpressure_bounds_the_jobs_in_flight(redis_client: Redis, key_prefix: str) -> None:
    policy = fast(concurrency=4, max_in_flight=10, batch_size=8)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    await queue.push_many(range(200))
    gate = anyio.Event()
    peak = 0

    async def handle(job: Job) -> None:
        await gate.wait()

    async with queue.consumer(handle) as consumer:
        with anyio.move_on_after(0.5):
            while True:
                info = await queue.info()
                peak = max(peak, info.in_flight, consumer.stats.in_flight)
                await anyio.sleep(0.01)
        assert peak <= 10
        assert (await queue.info()).waiting >= 190
        gate.set()
        await wait_until(lambda: consumer.stats.acked == 200)


# --------------------------------------------------------------------------- shutdown


async def test_stopping_returns_unstarted_jobs_without_counting_a_delivery(
    redis_client: Redis, key_prefix: str
) -> None:
    policy = fast(concurrency=2, max_in_flight=20, batch_size=20, visibility_timeout=60.0)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = await queue.push_many(range(30))
    running = 0
    finished: list[str] = []

    async def handle(job: Job) -> None:
        nonlocal running
        running += 1
        await anyio.sleep(0.3)
        finished.append(job.id)

    async with queue.consumer(handle) as consumer:
        await wait_until(lambda: running == 2 and consumer.stats.in_flight == 20)
    # The two running handlers finished (drain) and were acknowledged; the 18 buffered
    # jobs went back at once (not after the 60 s lease) and in order, uncounted.
    assert len(finished) == 2
    assert consumer.stats.acked == 2
    assert consumer.stats.released == 18
    where = await places(redis_client, queue)
    assert set(where) == set(ids) - set(finished)
    assert set(where.values()) == {"waiting"}
    waiting = [_text(i) for i in await redis_client.lrange(queue._keys.ready, 0, -1)]
    assert waiting[::-1] == [i for i in ids if i not in finished]
    assert await redis_client.hlen(queue._keys.deliveries) == 0
    assert await processing(redis_client, queue, consumer.name) == []


async def test_drain_timeout_cancels_slow_handlers_and_returns_their_jobs(
    redis_client: Redis, key_prefix: str
) -> None:
    policy = fast(concurrency=3, drain_timeout=0.2, visibility_timeout=60.0)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = await queue.push_many(range(3))
    running = 0

    async def stuck(job: Job) -> None:
        nonlocal running
        running += 1
        await anyio.sleep_forever()

    begin = anyio.current_time()
    async with queue.consumer(stuck) as consumer:
        await wait_until(lambda: running == 3)
    assert anyio.current_time() - begin < 10
    assert consumer.stats.released == 3
    assert consumer.stats.acked == 0
    assert await places(redis_client, queue) == dict.fromkeys(ids, "waiting")
    deliveries = await redis_client.hmget(queue._keys.deliveries, ids)
    assert [int(n) for n in deliveries] == [1, 1, 1]  # they did start: counted


async def test_a_job_your_loop_took_and_did_not_settle_goes_back_on_stop(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(
        redis_client, "jobs", prefix=key_prefix, policy=fast(visibility_timeout=60)
    )
    ids = await queue.push_many(["a", "b"])
    async with queue.consumer() as consumer:
        job = await consumer.pop(timeout=5)
        assert job is not None
    assert await places(redis_client, queue) == dict.fromkeys(ids, "waiting")
    assert int(await redis_client.hget(queue._keys.deliveries, ids[0])) == 1
    assert await redis_client.hget(queue._keys.deliveries, ids[1]) is None


# --------------------------------------------------------------------------- cancellation


async def _cancel_after(steps: int, work: Callable[[], Awaitable[object]]) -> bool:
    """Run ``work()`` and cancel it after ``steps`` event-loop turns; True if it finished."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await work()
        finished = True

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
    return finished


async def test_a_push_cancelled_at_any_await_is_all_or_nothing(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    finished_in_a_row = 0
    # Every loop turn at first, then ever longer: the server's reply takes many turns.
    schedule = [*range(40), *(int(40 * 1.2**k) for k in range(1, 60))]
    outcomes: set[int] = set()
    for steps in schedule:
        ids = [f"{steps}-{n}" for n in range(700)]  # two scripts: 500 + 200
        push = functools.partial(queue.push_many, range(700), job_ids=ids)
        finished = await _cancel_after(steps, push)
        where = await places(redis_client, queue)
        present = [i for i in ids if i in where]
        # Each chunk is one script: a prefix of whole chunks is in, nothing half-written.
        assert len(present) in (0, 500, 700)
        assert present == ids[: len(present)]
        outcomes.add(len(present))
        assert not borrowed_connections(redis_client)
        finished_in_a_row = finished_in_a_row + 1 if finished else 0
        if finished_in_a_row == 3:
            break
    assert finished_in_a_row == 3
    assert 700 in outcomes
    assert len(outcomes) > 1  # and some were cut short


async def test_fetch_and_ack_cancelled_at_any_await_lose_nothing(
    redis_client: Redis, key_prefix: str
) -> None:
    policy = fast(visibility_timeout=60.0, batch_size=5, max_in_flight=5)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    total = 60
    ids = set(await queue.push_many(range(total)))
    acked: set[str] = set()
    steps = 0
    attempted: set[str] = set()
    where = await places(redis_client, queue)
    while where and steps < 1000:
        steps += 1

        async def take_and_ack(n: int = steps) -> None:
            async with queue.consumer(name=f"c{n % 3}") as consumer:
                job = await consumer.pop(timeout=5)
                if job is not None:
                    attempted.add(job.id)
                    if await consumer.ack(job):
                        acked.add(job.id)

        await _cancel_after(steps % 40, take_and_ack)
        where = await places(redis_client, queue)
        # Whatever was cut short (the start, a fetch, a pop, an ack, the stop), each job
        # is in exactly one place (places() checks) or was acknowledged, and none stays
        # leased to a consumer that is gone.
        assert "leased" not in where.values(), where
        assert not set(where) & acked
        assert ids - set(where) <= attempted  # gone only through an ack
        assert not borrowed_connections(redis_client)
    assert not where
    assert acked <= ids


async def test_a_cancelled_worker_pool_loses_no_job(redis_client: Redis, key_prefix: str) -> None:
    policy = fast(visibility_timeout=60.0, concurrency=4, max_in_flight=8, batch_size=4)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    total = 300
    ids = set(await queue.push_many(range(total)))
    done: set[str] = set()

    async def handle(job: Job) -> None:
        await anyio.sleep(0.002)
        done.add(job.id)

    async def run_briefly(steps: int) -> None:
        async with queue.consumer(handle):
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            await anyio.sleep(0.01)

    for steps in range(0, 400, 7):
        await _cancel_after(steps, functools.partial(run_briefly, steps))
        where = await places(redis_client, queue)
        assert "leased" not in where.values()
        assert set(where) | done == ids  # nothing lost
        assert not borrowed_connections(redis_client)
        if not where:
            break
    async with queue.consumer(handle):
        await wait_until(lambda: done == ids)
        await wait_until(lambda: _no_jobs(redis_client, queue))


# --------------------------------------------------------------------------- async-with contract


async def test_body_exception_comes_out_as_itself(redis_client: Redis, key_prefix: str) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    with anyio.fail_after(30), pytest.raises(KeyError, match="from the body"):
        async with queue.consumer():
            raise KeyError("from the body")
    assert not borrowed_connections(redis_client)


async def test_background_failure_comes_out_as_one_library_error(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())

    async def run_until_it_fails() -> None:
        async with queue.consumer():
            # The ready list becomes a string: every fetch now fails with WRONGTYPE.
            await redis_client.set(queue._keys.ready, "not a list")
            await queue.push("x", priority=1)  # wakes the consumer
            await anyio.sleep_forever()

    with anyio.fail_after(30), pytest.raises(CommandError):  # not an ExceptionGroup
        await run_until_it_fails()


async def test_run_starts_in_a_task_group_and_stops_gracefully(
    redis_client: Redis, key_prefix: str
) -> None:
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=fast())
    seen: list[str] = []

    async def handle(job: Job) -> None:
        seen.append(job.id)

    async with anyio.create_task_group() as tg:
        consumer: QueueConsumer = await tg.start(queue.consumer(handle).run)
        ids = await queue.push_many(range(5))
        await wait_until(lambda: consumer.stats.acked == 5)
        tg.cancel_scope.cancel()
    assert seen == ids
    assert (await queue.info()).consumers == 0  # left the registry on stop


async def test_works_over_resp3(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url, protocol=3)
    try:
        queue = ReliableQueue(client, "jobs", prefix=key_prefix, policy=fast(max_deliveries=1))
        ids = await queue.push_many(["ok", "bad"])
        await queue.push("later", delay=0.05, priority=3)

        async def handle(job: Job) -> None:
            if job.payload == "bad":
                raise ValueError("bad")

        async with queue.consumer(handle) as consumer:
            await wait_until(lambda: consumer.stats.acked == 2)
            await wait_until(lambda: consumer.stats.dead_lettered == 1)
        [letter] = await queue.dead_letters()
        assert letter.id == ids[1]
        assert letter.error == "ValueError: bad"
    finally:
        await client.aclose()


async def test_a_natively_cancelled_consumer_loses_nothing(
    redis_client: Redis, key_prefix: str
) -> None:
    # asyncio's own Task.cancel() (a timeout, a server shutting down) goes through the
    # shields its task awaits in; the stop runs in a task of the consumer's own, so
    # whenever the cancel lands, the jobs it held are back in the queue at once.
    policy = fast(concurrency=2, max_in_flight=6, batch_size=3)
    queue = ReliableQueue(redis_client, "jobs", prefix=key_prefix, policy=policy)
    ids = set(await queue.push_many(range(40)))
    done: set[str] = set()

    async def handle(job: Job) -> None:
        await anyio.sleep(0.001)
        done.add(job.id)

    async def run() -> None:
        async with queue.consumer(handle):
            await anyio.sleep_forever()

    for steps in range(0, 60, 3):
        task = asyncio.get_running_loop().create_task(run())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with anyio.fail_after(30):
            await asyncio.wait({task})
        where = await places(redis_client, queue)
        assert "leased" not in where.values(), f"after {steps} steps: {where}"
        assert set(where) | done == ids
    async with queue.consumer(handle):
        await wait_until(lambda: done == ids)
        await wait_until(lambda: _no_jobs(redis_client, queue))
    assert not borrowed_connections(redis_client)


async def test_a_consumer_rides_out_a_lost_server(redis_server: Any, key_prefix: str) -> None:
    if redis_server.name == "cluster" or not redis_server.owned:
        pytest.skip("a FaultProxy in front of one server this suite started")
    with FaultProxy(redis_server.port) as proxy:
        await _ride_out_a_lost_server(proxy, key_prefix)


async def _ride_out_a_lost_server(proxy: FaultProxy, key_prefix: str) -> None:
    client = connect(proxy.url, socket_timeout=1, connect_timeout=1)
    queue = ReliableQueue(client, "jobs", prefix=key_prefix, policy=fast())
    seen: set[str] = set()

    async def handle(job: Job) -> None:
        seen.add(job.id)

    try:
        with anyio.fail_after(60):
            async with queue.consumer(handle) as consumer:
                first = await queue.push_many(range(10))
                await wait_until(lambda: seen == set(first))
                proxy.stop()  # every connection cut, new ones refused
                # Blocked waits, fetches, renewals and the reaper fail and back off.
                await wait_until(lambda: consumer.stats.read_errors > 0)
                await anyio.sleep(1.0)
                proxy.start()  # same port
                later = await queue.push_many(range(10))
                await wait_until(lambda: seen == {*first, *later}, within=30)
                await wait_until(lambda: consumer.stats.acked == 20, within=30)
    finally:
        await client.aclose()
