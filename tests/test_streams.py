"""Streams: producer, consumer group, reclaim, dead letters, backpressure, drain, restart."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from aioredispatterns import ConfigurationError, connect
from aioredispatterns.streams import (
    ConsumerGroup,
    ConsumerPolicy,
    DeadLetter,
    StreamError,
    StreamMessage,
    StreamProducer,
    StreamRetention,
)
from aioredispatterns.testing import RedisServer, borrowed_connections

WORKER = Path(__file__).with_name("_streams_worker.py")

# Fast timings for tests: reclaim quickly, never wait long for a blocking read.
FAST = {"block": 0.1, "claim_idle": 0.2, "claim_interval": 0.05, "drain_timeout": 2.0}


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], within: float = 10) -> None:
    with anyio.fail_after(within):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)


def by_id(message_id: str) -> tuple[int, int]:
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


async def pending_ids(client: Redis, key: Any, group: str, consumer: str | None = None) -> set[str]:
    rows = await client.xpending_range(key, group, "-", "+", 100_000, consumername=consumer)
    return {row["message_id"].decode() for row in rows}


async def produce(client: Redis, key_prefix: str, count: int, stream: str = "jobs") -> list[str]:
    producer = StreamProducer(client, stream, prefix=key_prefix)
    ids: list[str] = []
    for start in range(0, count, 1000):
        ids += await producer.add_many({"n": n} for n in range(start, min(count, start + 1000)))
    return ids


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "options",
    [
        {"concurrency": 0},
        {"max_in_flight": -1},
        {"batch_size": True},
        {"block": 0},
        {"claim_idle": float("inf")},
        {"claim_interval": -1.0},
        {"max_deliveries": 0},
        {"start_id": ""},
        {"dead_letter_maxlen": 0},
    ],
)
def test_bad_policy_is_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ConsumerPolicy(**options)


def test_bad_retention_is_rejected() -> None:
    for bad in ({}, {"maxlen": 10, "max_age": 5.0}, {"maxlen": 0}, {"max_age": -1.0}):
        with pytest.raises(ConfigurationError):
            StreamRetention(**bad)  # type: ignore[arg-type]


async def test_bad_arguments_fail_before_any_command() -> None:
    client = connect("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        with pytest.raises(ConfigurationError):
            ConsumerGroup(client, "", "g")
        with pytest.raises(ConfigurationError):
            ConsumerGroup(client, "s", "")
        with pytest.raises(ConfigurationError):
            StreamProducer(client, "s", prefix="a{b")
        producer = StreamProducer(client, "s")
        with pytest.raises(ConfigurationError):
            await producer.add({})
        with pytest.raises(ConfigurationError):
            ConsumerGroup(object(), "s", "g")  # type: ignore[arg-type]
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- producer


async def test_stream_and_dead_letter_share_one_hash_tag(redis_client: Redis) -> None:
    producer = StreamProducer(redis_client, "orders", prefix="p")
    group = ConsumerGroup(redis_client, "orders", "billing", prefix="p")
    assert producer.key == group.key == "p:stream:{orders}"
    assert group.dead_letter_key == "p:stream:{orders}:dead"


async def test_producer_encodes_fields_and_trims(redis_client: Redis, key_prefix: str) -> None:
    producer = StreamProducer(
        redis_client, "events", prefix=key_prefix, retention=StreamRetention(maxlen=10, exact=True)
    )
    first = await producer.add({"user": {"id": 7}, "tags": ["a", "b"]})
    ids = await producer.add_many({"n": n} for n in range(30))
    assert len(ids) == 30
    assert ids == sorted(ids, key=by_id)
    assert by_id(first) < by_id(ids[0])
    assert await redis_client.xlen(producer.key) == 10  # exact MAXLEN keeps the newest 10
    entries = await redis_client.xrange(producer.key)
    assert [e[0].decode() for e in entries] == ids[-10:]
    assert entries[-1][1] == {b"n": b"29"}  # JSON on the wire
    assert await producer.add_many([]) == []


async def test_max_age_retention_drops_old_entries(redis_client: Redis, key_prefix: str) -> None:
    producer = StreamProducer(
        redis_client, "events", prefix=key_prefix, retention=StreamRetention(max_age=60, exact=True)
    )
    old_ms = int((time.time() - 3600) * 1000)
    await redis_client.xadd(producer.key, {"n": "old"}, id=f"{old_ms}-0")
    await producer.add({"n": "new"})
    assert [e[1][b"n"] for e in await redis_client.xrange(producer.key)] == [b'"new"']


# --------------------------------------------------------------------------- consuming


async def test_handler_sees_every_message_and_acks_in_batches(
    redis_client: Redis, key_prefix: str
) -> None:
    ids = await produce(redis_client, key_prefix, 500)
    await redis_client.config_resetstat()
    seen: list[StreamMessage] = []

    async def handle(message: StreamMessage) -> None:
        seen.append(message)

    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.acked == 500)
        assert group.stats.processed == 500
    assert sorted((m.id for m in seen), key=by_id) == ids
    assert {m.deliveries for m in seen} == {1}
    assert sorted(m.fields["n"] for m in seen) == list(range(500))
    assert await pending_ids(redis_client, group.key, "g") == set()
    stats = await redis_client.info("commandstats")
    xack_calls = stats["cmdstat_xack"]["calls"]
    assert xack_calls < 100, f"{xack_calls} XACKs for 500 messages: acks are not batched"


async def test_messages_iterator_with_explicit_ack(redis_client: Redis, key_prefix: str) -> None:
    ids = await produce(redis_client, key_prefix, 20)
    policy = ConsumerPolicy(block=0.1, claim_idle=60)
    got: list[str] = []
    async with ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix, policy=policy) as group:
        async for message in group.messages():
            got.append(message.id)
            if message.fields["n"] % 2 == 0:
                group.ack(message)
            if len(got) == 20:
                break
    assert got == ids
    # Acked on exit (the final flush); the odd ones stay pending for a retry.
    assert await pending_ids(redis_client, group.key, "g") == set(ids[1::2])
    assert group.stats.acked == 10
    with pytest.raises(StreamError):
        group.ack(ids[1])  # no longer running


async def test_rejected_message_is_retried_then_dead_lettered(
    redis_client: Redis, key_prefix: str
) -> None:
    [message_id] = await produce(redis_client, key_prefix, 1)
    deliveries: list[int] = []
    policy = ConsumerPolicy(max_deliveries=2, **FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix, policy=policy) as group:
        async for message in group.messages():
            deliveries.append(message.deliveries)
            await group.reject(message, ValueError("bad payload"))
            if message.deliveries == 2:
                break
        [letter] = await group.dead_letters()
        assert group.stats.failed == 2
        assert group.stats.dead_lettered == 1
    assert deliveries == [1, 2]
    assert letter.message_id == message_id
    assert letter.error == "ValueError: bad payload"
    assert await pending_ids(redis_client, group.key, "g") == set()


async def test_messages_needs_a_group_without_handler(redis_client: Redis, key_prefix: str) -> None:
    async def handle(message: StreamMessage) -> None:
        return None

    group = ConsumerGroup(redis_client, "jobs", "g", handler=handle, prefix=key_prefix)
    with pytest.raises(StreamError):
        group.messages()
    async with group:
        with pytest.raises(StreamError):
            group.messages()


async def test_reclaims_messages_of_a_dead_consumer(redis_client: Redis, key_prefix: str) -> None:
    ids = await produce(redis_client, key_prefix, 30)
    group = ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix)
    await redis_client.xgroup_create(group.key, "g", id="0")
    # A consumer that reads ten messages and dies without acknowledging them.
    await redis_client.xreadgroup("g", "dead", {group.key: ">"}, count=10)
    seen: dict[str, int] = {}

    async def handle(message: StreamMessage) -> None:
        seen[message.id] = message.deliveries

    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: len(seen) == 30)
        await wait_until(lambda: group.stats.acked == 30)
        assert group.stats.claimed == 10
        assert group.stats.retried == 10
    assert sorted(seen, key=by_id) == ids
    assert {seen[i] for i in ids[:10]} == {2}  # reclaimed: second delivery
    assert {seen[i] for i in ids[10:]} == {1}
    assert await pending_ids(redis_client, group.key, "g") == set()


async def test_poison_message_goes_to_dead_letters(redis_client: Redis, key_prefix: str) -> None:
    ids = await produce(redis_client, key_prefix, 50)
    poison = ids[17]
    calls: dict[str, int] = {}

    async def handle(message: StreamMessage) -> None:
        calls[message.id] = calls.get(message.id, 0) + 1
        if message.id == poison:
            raise ValueError(f"cannot handle n={message.fields['n']}")

    policy = ConsumerPolicy(max_deliveries=3, **FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.dead_lettered == 1)
        await wait_until(lambda: group.stats.acked == 49)
        info = await group.info()
        letters = await group.dead_letters()
        stats = group.stats
    assert calls[poison] == 3
    assert all(calls[i] == 1 for i in ids if i != poison)  # the others flowed on
    assert stats.processed == 49
    assert stats.failed == 3
    assert stats.retried == 2
    assert info.pending == 0
    assert info.dead_letters == 1
    [letter] = letters
    assert letter.message_id == poison
    assert letter.deliveries == 3
    assert letter.group == "g"
    assert letter.error == "ValueError: cannot handle n=17"
    assert letter.raw_fields == {b"n": b"17"}


async def test_reclaim_dead_letters_a_message_that_keeps_killing_workers(
    redis_client: Redis, key_prefix: str
) -> None:
    [message_id] = await produce(redis_client, key_prefix, 1)
    group = ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix)
    await redis_client.xgroup_create(group.key, "g", id="0")
    await redis_client.xreadgroup("g", "dead-1", {group.key: ">"})
    for dead in ("dead-2", "dead-3"):  # each "worker" takes it over and dies too
        await redis_client.xclaim(group.key, "g", dead, 0, [message_id])
    seen: list[StreamMessage] = []

    async def handle(message: StreamMessage) -> None:
        seen.append(message)

    policy = ConsumerPolicy(max_deliveries=3, **FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.dead_lettered == 1)
        [letter] = await group.dead_letters()
    assert seen == []
    assert letter.message_id == message_id
    assert letter.deliveries == 3
    assert "not acknowledged after 3 deliveries" in letter.error
    assert await pending_ids(redis_client, group.key, "g") == set()


async def test_backpressure_bounds_messages_in_flight(redis_client: Redis, key_prefix: str) -> None:
    await produce(redis_client, key_prefix, 200)
    release = anyio.Event()
    started = 0

    async def handle(message: StreamMessage) -> None:
        nonlocal started
        started += 1
        await release.wait()

    policy = ConsumerPolicy(concurrency=4, max_in_flight=10, batch_size=8, block=0.1)
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: started == 4)
        await anyio.sleep(0.3)  # give the reader every chance to overrun the bound
        info = await group.info()
        assert started == 4  # concurrency bound
        assert group.stats.in_flight == 10
        assert info.pending == 10  # read from the server: no more than max_in_flight
        release.set()
        await wait_until(lambda: group.stats.acked == 200)
    assert (await group.info()).pending == 0


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    outcomes=st.lists(st.sampled_from(["ok", "flaky", "poison"]), min_size=1, max_size=25),
    concurrency=st.integers(1, 6),
    max_in_flight=st.integers(1, 12),
)
async def test_every_message_settles_as_the_model_says(
    redis_client: Redis, outcomes: list[str], concurrency: int, max_in_flight: int
) -> None:
    # The model: "ok" is handled once; "flaky" fails its first delivery and succeeds on
    # the second; "poison" fails both allowed deliveries and is dead-lettered. Whatever
    # the concurrency and in-flight bound, nothing is left pending.
    prefix = f"h{uuid.uuid4().hex[:12]}"
    producer = StreamProducer(redis_client, "jobs", prefix=prefix)
    ids = await producer.add_many({"i": i} for i in range(len(outcomes)))
    kind = dict(zip(ids, outcomes, strict=True))
    calls: dict[str, int] = dict.fromkeys(ids, 0)

    async def handle(message: StreamMessage) -> None:
        calls[message.id] += 1
        if kind[message.id] == "poison" or (
            kind[message.id] == "flaky" and message.deliveries == 1
        ):
            raise RuntimeError(kind[message.id])

    policy = ConsumerPolicy(
        concurrency=concurrency,
        max_in_flight=max_in_flight,
        max_deliveries=2,
        block=0.05,
        claim_idle=0.05,
        claim_interval=0.02,
    )
    poison = {i for i in ids if kind[i] == "poison"}
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.acked == len(ids) - len(poison))
        await wait_until(lambda: group.stats.dead_lettered == len(poison))
        letters: list[DeadLetter] = await group.dead_letters()
        assert (await group.info()).pending == 0
    assert calls == {i: 1 if kind[i] == "ok" else 2 for i in ids}
    assert {letter.message_id for letter in letters} == poison
    assert all(letter.error == "RuntimeError: poison" for letter in letters)


# --------------------------------------------------------------------------- shutdown


async def test_cancel_during_processing_loses_nothing(redis_client: Redis, key_prefix: str) -> None:
    ids = await produce(redis_client, key_prefix, 40)
    started: set[str] = set()
    finished: set[str] = set()

    async def handle(message: StreamMessage) -> None:
        started.add(message.id)
        await anyio.sleep(0.2)
        finished.add(message.id)

    tasks_before = len(asyncio.all_tasks())
    policy = ConsumerPolicy(concurrency=8, max_in_flight=20, block=0.1, claim_idle=60)
    group = ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    )
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(group.run)
            await wait_until(lambda: len(started) == 8)
            scope.cancel()  # while eight handlers sleep
    assert len(asyncio.all_tasks()) == tasks_before  # no task left behind
    # The blocking read's connection went back to the pool (closed, not leaked).
    assert not borrowed_connections(redis_client)
    assert started == finished  # running handlers were allowed to finish
    pending = await pending_ids(redis_client, group.key, "g")
    last = by_id((await group.info()).last_delivered_id)
    delivered = {i for i in ids if by_id(i) <= last}
    acked = delivered - pending
    assert acked == finished  # every finished message acked, nothing unprocessed acked
    assert group.stats.acked == len(finished)
    # None lost: another consumer gets exactly the messages that did not finish.
    rest: set[str] = set()

    async def handle_rest(message: StreamMessage) -> None:
        rest.add(message.id)

    fast = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle_rest, prefix=key_prefix, policy=fast
    ) as other:
        await wait_until(lambda: len(rest) == len(ids) - len(finished))
        await wait_until(lambda: _no_pending(other))
    assert rest | finished == set(ids)
    assert not rest & finished


async def test_drain_timeout_cancels_slow_handlers_and_leaves_them_pending(
    redis_client: Redis, key_prefix: str
) -> None:
    ids = await produce(redis_client, key_prefix, 5)
    cancelled = 0

    async def handle(message: StreamMessage) -> None:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise

    policy = ConsumerPolicy(concurrency=5, block=0.1, claim_idle=60, drain_timeout=0.2)
    started = anyio.current_time()
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.in_flight == 5)
    assert anyio.current_time() - started < 3
    assert cancelled == 5
    assert group.stats.acked == 0
    assert await pending_ids(redis_client, group.key, "g") == set(ids)


# --------------------------------------------------------------------------- hygiene, info


async def test_idle_consumers_without_pending_are_removed(
    redis_client: Redis, key_prefix: str
) -> None:
    await produce(redis_client, key_prefix, 1)
    group = ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix)
    await redis_client.xgroup_create(group.key, "g", id="0")
    await redis_client.xgroup_createconsumer(group.key, "g", "idle-empty")
    await redis_client.xreadgroup("g", "idle-busy", {group.key: ">"})  # owns one entry
    await anyio.sleep(0.3)

    async def handle(message: StreamMessage) -> None:
        return None

    policy = ConsumerPolicy(block=0.1, claim_idle=60, consumer_idle=0.2)
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.consumers_removed == 1)
        names = {c["name"].decode() for c in await redis_client.xinfo_consumers(group.key, "g")}
    assert "idle-empty" not in names
    assert "idle-busy" in names  # never the one that owns an entry


async def test_info_reports_pending_and_lag(redis_client: Redis, key_prefix: str) -> None:
    await produce(redis_client, key_prefix, 12)
    policy = ConsumerPolicy(max_in_flight=5, batch_size=5, block=0.1, claim_idle=60)
    async with ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix, policy=policy) as group:
        await wait_until(lambda: group.stats.in_flight == 5)
        info = await group.info()
    assert info.length == 12
    assert info.pending == 5
    assert info.consumers == 1
    if info.lag is not None:  # Redis >= 7
        assert info.lag == 7
    with pytest.raises(StreamError):
        await ConsumerGroup(redis_client, "jobs", "nope", prefix=key_prefix).info()


# --------------------------------------------------------------------------- failures


async def test_group_recreated_after_server_restart(
    redis_server: RedisServer, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not redis_server.owned:
        pytest.skip("restarts a server: needs one this suite started")
    caplog.set_level(logging.WARNING, logger="aioredispatterns.streams")
    seen: list[int] = []

    async def handle(message: StreamMessage) -> None:
        seen.append(message.fields["n"])

    with RedisServer(redis_server.binary, name=f"{redis_server.name}-own") as server:
        client = connect(server.url)
        try:
            producer = StreamProducer(client, "jobs", prefix=key_prefix)
            policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
            async with ConsumerGroup(
                client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
            ) as group:
                await producer.add_many({"n": n} for n in range(5))
                await wait_until(lambda: len(seen) == 5)
                await anyio.to_thread.run_sync(server.restart)  # comes back empty
                await wait_until(lambda: group.stats.recreated == 1)
                await producer.add_many({"n": n} for n in range(5, 10))
                await wait_until(lambda: len(seen) == 10)
                await wait_until(lambda: group.stats.acked == 10)
                assert (await group.info()).pending == 0
                # Lost connections were retried with backoff, not in a tight loop.
                assert group.stats.read_errors <= 10
        finally:
            await client.aclose()
    assert sorted(seen) == list(range(10))
    assert any("was missing" in r.getMessage() for r in caplog.records)


async def test_worker_killed_mid_batch_loses_nothing(
    redis_server: RedisServer, redis_client: Redis, key_prefix: str
) -> None:
    if redis_server.name != "valkey-9.1":
        pytest.skip("10,000 messages and a subprocess: run on valkey-9.1 only (CI budget)")
    total = 10_000
    ids = await produce(redis_client, key_prefix, total)
    done_a = f"{key_prefix}:done:a"
    group_key = StreamProducer(redis_client, "jobs", prefix=key_prefix).key
    command = [sys.executable, str(WORKER), redis_server.url, key_prefix, "jobs", "g", "a", done_a]
    async with await anyio.open_process(command, stdout=None, stderr=None) as worker:
        try:
            await wait_until(lambda: _list_at_least(redis_client, done_a, 2500), within=30)
            worker.send_signal(signal.SIGKILL)  # by its pid, mid-batch
            assert await worker.wait() == -signal.SIGKILL
        finally:
            if worker.returncode is None:
                worker.kill()
    in_flight_of_a = await pending_ids(redis_client, group_key, "g", "a")
    processed_a = [i.decode() for i in await redis_client.lrange(done_a, 0, -1)]
    assert in_flight_of_a, "the worker should have been killed with messages in flight"
    assert len(processed_a) < total

    processed_b: list[str] = []

    async def handle(message: StreamMessage) -> None:
        processed_b.append(message.id)

    policy = ConsumerPolicy(block=0.1, claim_idle=0.5, claim_interval=0.1)
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, consumer="b", prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: len(set(processed_a) | set(processed_b)) == total, within=60)
        await wait_until(lambda: _no_pending(group))
        assert group.stats.claimed == len(in_flight_of_a)
    assert set(processed_a) | set(processed_b) == set(ids)  # none lost
    assert len(processed_b) == len(set(processed_b))
    duplicates = set(processed_a) & set(processed_b)
    assert duplicates <= in_flight_of_a  # only what the killed worker had in flight
    print(
        f"killed worker: {len(processed_a)} handled, {len(in_flight_of_a)} in flight; "
        f"survivor: {len(processed_b)} handled, {len(duplicates)} duplicates"
    )


async def _list_at_least(client: Redis, key: str, count: int) -> bool:
    return bool(await client.llen(key) >= count)


async def _no_pending(group: ConsumerGroup) -> bool:
    return (await group.info()).pending == 0


async def test_stopping_while_messages_stream_in_loses_nothing(
    redis_client: Redis, key_prefix: str
) -> None:
    # Reads that complete just as shutdown begins must leave their entries pending,
    # not fail or get acked: start and stop a consumer again and again under load.
    producer = StreamProducer(redis_client, "jobs", prefix=key_prefix)
    handled: set[str] = set()

    async def handle(message: StreamMessage) -> None:
        handled.add(message.id)

    produced: list[str] = []
    policy = ConsumerPolicy(batch_size=50, **FAST)  # type: ignore[arg-type]
    for _ in range(20):
        async with ConsumerGroup(
            redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
        ):
            await anyio.sleep(0.01)  # the reader is blocked in XREADGROUP now
            # Its reply arrives together with this one; leave before it is taken.
            produced.append(await producer.add({"n": 1}))
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: handled == set(produced))
        await wait_until(lambda: _no_pending(group))


async def flow_with_one_poison(client: Any, key_prefix: str, total: int, poison: int) -> None:
    """Produce ``total`` messages, fail message ``poison`` always; check where all land."""
    producer = StreamProducer(client, "jobs", prefix=key_prefix)
    ids = await producer.add_many({"n": n} for n in range(total))
    seen: list[StreamMessage] = []

    async def handle(message: StreamMessage) -> None:
        seen.append(message)
        if message.fields["n"] == poison:
            raise KeyError("poison")

    policy = ConsumerPolicy(max_deliveries=2, **FAST)  # type: ignore[arg-type]
    async with ConsumerGroup(
        client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: group.stats.acked == total - 1)
        await wait_until(lambda: group.stats.dead_lettered == 1)
        info = await group.info()
        [letter] = await group.dead_letters()
    assert {m.id for m in seen} == set(ids)
    assert info.pending == 0
    assert info.length == total
    assert letter.message_id == ids[poison]
    assert letter.error == "KeyError: 'poison'"


@pytest.mark.cluster
async def test_consumer_group_on_a_cluster(cluster_client: Any, key_prefix: str) -> None:
    await flow_with_one_poison(cluster_client, key_prefix, 100, 3)


async def test_works_over_resp3(redis_url: str, key_prefix: str) -> None:
    client = connect(redis_url, protocol=3)
    try:
        await flow_with_one_poison(client, key_prefix, 20, 5)
    finally:
        await client.aclose()
