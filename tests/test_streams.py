"""Streams: producer, consumer group, reclaim, dead letters, backpressure, drain, restart."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from aioredispatterns import ConfigurationError, connect
from aioredispatterns._backoff import Backoff
from aioredispatterns._worker import AckBatcher, CreditWindow
from aioredispatterns.errors import CommandError, CommandTimeout, ConnectionFailed
from aioredispatterns.streams import (
    ConsumerGroup,
    ConsumerPolicy,
    DeadLetter,
    StreamError,
    StreamMessage,
    StreamProducer,
    StreamRetention,
)
from aioredispatterns.testing import (
    FaultProxy,
    RedisServer,
    borrowed_connections,
    command_calls,
    on_every_node,
)

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
    await on_every_node(redis_client, "CONFIG", "RESETSTAT")
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
    xack_calls = await command_calls(redis_client, "xack")
    assert 0 < xack_calls < 100, f"{xack_calls} XACKs for 500 messages: acks are not batched"


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
        await wait_until(lambda: started == 4 and group.stats.in_flight == 10)
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
    running = 0

    async def handle(message: StreamMessage) -> None:
        nonlocal cancelled, running
        running += 1
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
        # in_flight counts dispatched messages; wait until all five handlers really run.
        await wait_until(lambda: group.stats.in_flight == 5 and running == 5)
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


@pytest.mark.standalone_only(reason="restarts a server of its own")
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


# --------------------------------------------------------------------------- async-with contract


async def test_body_exception_comes_out_as_itself(redis_client: Redis, key_prefix: str) -> None:
    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    group = ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix, policy=policy)
    with anyio.fail_after(30), pytest.raises(KeyError, match="from the body"):
        async with group:
            raise KeyError("from the body")
    assert not borrowed_connections(redis_client)


async def test_cancelling_the_body_comes_out_as_cancellation(
    redis_client: Redis, key_prefix: str
) -> None:
    await produce(redis_client, key_prefix, 5)
    handled: list[str] = []

    async def handle(message: StreamMessage) -> None:
        handled.append(message.id)

    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    group = ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    )
    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            async with group:
                await wait_until(lambda: len(handled) == 5)
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        await wait_until(lambda: _no_pending(group))  # the final flush acked them
    assert not borrowed_connections(redis_client)


async def test_background_failure_comes_out_as_one_library_error(
    redis_client: Redis, key_prefix: str
) -> None:
    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    group = ConsumerGroup(redis_client, "jobs", "g", prefix=key_prefix, policy=policy)

    async def run_until_it_fails() -> None:
        async with group:
            # The stream becomes a string: every read now fails with WRONGTYPE.
            await redis_client.delete(group.key)
            await redis_client.set(group.key, "not a stream")
            await anyio.sleep_forever()

    with anyio.fail_after(30), pytest.raises(CommandError):  # not an ExceptionGroup
        await run_until_it_fails()
    assert not borrowed_connections(redis_client)


# --------------------------------------------------------------------------- intake credits


@pytest.mark.parametrize("mode", ["handler", "messages"])
async def test_reads_and_reclaims_together_never_exceed_max_in_flight(
    redis_client: Redis, key_prefix: str, mode: str
) -> None:
    # A blocked XREADGROUP COUNT 100 is outstanding while the reclaim loop takes over a
    # dead consumer's 300 entries; then one message arrives for the read. Both must have
    # reserved what they ask for, or the buffer overflows (and the group dies).
    ids = await produce(redis_client, key_prefix, 300)
    producer = StreamProducer(redis_client, "jobs", prefix=key_prefix)
    await redis_client.xgroup_create(producer.key, "g", id="0")
    await redis_client.xreadgroup("g", "dead", {producer.key: ">"}, count=300)
    release = anyio.Event()
    seen: list[str] = []
    peak = 0

    async def handle(message: StreamMessage) -> None:
        seen.append(message.id)
        await release.wait()

    policy = ConsumerPolicy(block=5, claim_idle=0.2, claim_interval=0.05)
    assert policy.max_in_flight == 256
    assert policy.batch_size == 100
    group = ConsumerGroup(
        redis_client,
        "jobs",
        "g",
        handler=handle if mode == "handler" else None,
        prefix=key_prefix,
        policy=policy,
    )

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, group.stats.in_flight)
            await anyio.sleep(0.001)

    with anyio.fail_after(60):
        async with group, anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await wait_until(lambda: group.stats.claimed >= 156)
            await anyio.sleep(0.3)  # the reclaim loop takes whatever it may
            ids.append(await producer.add({"n": 300}))
            if mode == "handler":
                await anyio.sleep(0.3)
                release.set()
            else:
                async for message in group.messages():
                    seen.append(message.id)
                    group.ack(message)
                    if len(seen) == len(ids):
                        break
            await wait_until(lambda: group.stats.acked == len(ids), within=30)
            tg.cancel_scope.cancel()
    assert peak <= policy.max_in_flight
    assert sorted(seen, key=by_id) == ids  # each exactly once
    assert await pending_ids(redis_client, producer.key, "g") == set()


# --------------------------------------------------------------------------- held messages


async def test_a_healthy_consumer_never_reclaims_what_it_holds(
    redis_client: Redis, key_prefix: str
) -> None:
    # One slow consumer: most messages wait in its own buffer far longer than
    # claim_idle. They must not be claimed again (each claim counts a delivery), let
    # alone dead-lettered while they wait.
    total = 150
    ids = await produce(redis_client, key_prefix, total)
    deliveries: dict[str, list[int]] = {}

    async def handle(message: StreamMessage) -> None:
        deliveries.setdefault(message.id, []).append(message.deliveries)
        await anyio.sleep(0.04)

    policy = ConsumerPolicy(concurrency=1, block=0.1, claim_idle=0.6, max_deliveries=3)
    async with ConsumerGroup(
        redis_client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
    ) as group:
        await wait_until(lambda: len(deliveries) == total, within=90)
        await wait_until(lambda: _no_pending(group), within=30)
        info = await group.info()
        stats = group.stats
    assert info.dead_letters == 0
    assert stats.dead_lettered == 0
    assert stats.claimed == 0
    assert sorted(deliveries, key=by_id) == ids
    assert all(seen == [1] for seen in deliveries.values())  # once each, first delivery
    assert stats.processed == stats.acked == total


async def test_a_handler_that_outlives_claim_idle_keeps_its_message(
    redis_client: Redis, key_prefix: str
) -> None:
    [message_id] = await produce(redis_client, key_prefix, 1)
    started = anyio.Event()
    finish = anyio.Event()
    calls_a: list[StreamMessage] = []
    calls_b: list[StreamMessage] = []

    async def slow(message: StreamMessage) -> None:
        calls_a.append(message)
        started.set()
        await finish.wait()

    async def other(message: StreamMessage) -> None:
        calls_b.append(message)

    policy = ConsumerPolicy(block=0.1, claim_idle=0.5, claim_interval=0.1)
    with anyio.fail_after(30):
        async with ConsumerGroup(
            redis_client, "jobs", "g", handler=slow, consumer="a", prefix=key_prefix, policy=policy
        ) as a:
            await started.wait()
            async with ConsumerGroup(
                redis_client,
                "jobs",
                "g",
                handler=other,
                consumer="b",
                prefix=key_prefix,
                policy=policy,
            ) as b:
                await anyio.sleep(2.0)  # four times claim_idle: "a" is alive and holds it
                assert calls_b == []
                assert b.stats.claimed == 0
                [row] = await redis_client.xpending_range(a.key, "g", "-", "+", 10)
                assert row["consumer"] == b"a"
                assert row["times_delivered"] == 1  # kept without being claimed again
                assert a.stats.claimed == 0
                assert a.stats.refreshed > 0
                finish.set()
                await wait_until(lambda: a.stats.acked == 1)
    assert [(m.id, m.deliveries) for m in calls_a] == [(message_id, 1)]
    assert calls_b == []
    assert await pending_ids(redis_client, a.key, "g") == set()


async def test_a_stalled_consumer_loses_its_messages_after_claim_idle(
    redis_client: Redis, redis_url: str, key_prefix: str
) -> None:
    # Consumer "a" runs in a process of its own; its handlers hold their messages for an
    # hour. While it runs, its renewals keep "b" off them; once it is frozen (SIGSTOP:
    # alive, connected, but renewing nothing) "b" takes them over after claim_idle.
    total = 50
    ids = await produce(redis_client, key_prefix, total)
    key = StreamProducer(redis_client, "jobs", prefix=key_prefix).key
    done_a = f"{key_prefix}:done:a"
    claim_idle = 1.5
    command = [
        sys.executable,
        str(WORKER),
        redis_url,
        key_prefix,
        "jobs",
        "g",
        "a",
        done_a,
        str(claim_idle),
        "3600",
    ]
    got_b: dict[str, int] = {}

    async def handle(message: StreamMessage) -> None:
        got_b[message.id] = message.deliveries

    policy = ConsumerPolicy(block=0.1, claim_idle=claim_idle, claim_interval=0.1)
    async with await anyio.open_process(command, stdout=None, stderr=None) as worker:
        try:
            await wait_until(lambda: _list_at_least(redis_client, done_a, 32), within=30)
            held = await pending_ids(redis_client, key, "g", "a")
            assert held == set(ids)
            async with ConsumerGroup(
                redis_client,
                "jobs",
                "g",
                handler=handle,
                consumer="b",
                prefix=key_prefix,
                policy=policy,
            ) as b:
                await anyio.sleep(3 * claim_idle)
                assert b.stats.claimed == 0  # "a" is alive and renews what it holds
                worker.send_signal(signal.SIGSTOP)
                await wait_until(lambda: len(got_b) == total, within=30)
                await wait_until(lambda: _no_pending(b), within=30)
                assert b.stats.claimed == total
        finally:
            worker.kill()
            await worker.wait()
    assert set(got_b) == set(ids)
    assert set(got_b.values()) == {2}  # a's renewals counted no delivery


# --------------------------------------------------------------------------- producer faults


@pytest.mark.standalone_only(reason="a FaultProxy sits in front of one server's port")
async def test_add_many_is_never_resent_after_a_connection_failure(
    redis_server: RedisServer, redis_client: Redis, key_prefix: str
) -> None:
    if not redis_server.owned:
        pytest.skip("puts a FaultProxy in front of a server this suite started")
    total = 200
    with FaultProxy(redis_server.port) as proxy:
        client = connect(proxy.url)
        try:
            producer = StreamProducer(client, "jobs", prefix=key_prefix)
            await client.ping()  # open the connections before the fault is armed
            await producer.add({"n": -1})
            proxy.cut_after_bytes(1000)  # about 45 XADD replies, then the connection dies
            with anyio.fail_after(30), pytest.raises(ConnectionFailed):
                await producer.add_many({"n": n} for n in range(total))
        finally:
            await client.aclose()
    entries = await redis_client.xrange(producer.key) or []
    values = [fields[b"n"] for _, fields in entries if fields is not None]
    assert len(values) == len(set(values)), "a message of the batch was appended twice"
    assert len(values) <= total + 1


# --------------------------------------------------------------------------- backoff


@pytest.mark.standalone_only(reason="a FaultProxy sits in front of one server's port")
async def test_transient_errors_back_off_through_the_shared_backoff(
    redis_server: RedisServer, redis_client: Redis, key_prefix: str, monkeypatch: Any
) -> None:
    if not redis_server.owned:
        pytest.skip("puts a FaultProxy in front of a server this suite started")
    callers: set[str] = set()
    real_sleep = Backoff.sleep

    async def spy(self: Backoff) -> None:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:  # the chain of awaiting coroutines
            callers.add(frame.f_code.co_qualname)
            frame = frame.f_back
        await real_sleep(self)

    monkeypatch.setattr(Backoff, "sleep", spy)
    ids = await produce(redis_client, key_prefix, 10)
    gate = anyio.Event()

    async def handle(message: StreamMessage) -> None:
        await gate.wait()

    policy = ConsumerPolicy(**FAST)  # type: ignore[arg-type]
    with FaultProxy(redis_server.port) as proxy:
        client = connect(proxy.url, socket_timeout=1, connect_timeout=1)
        try:
            with anyio.fail_after(60):
                async with ConsumerGroup(
                    client, "jobs", "g", handler=handle, prefix=key_prefix, policy=policy
                ) as group:
                    await wait_until(lambda: group.stats.in_flight == len(ids))
                    proxy.stop()  # every connection cut, new ones refused
                    gate.set()  # the handlers finish: their XACK fails too
                    loops = {
                        "ConsumerGroup._read_loop",
                        "ConsumerGroup._reclaim_loop",
                        "AckBatcher.run",
                    }
                    await wait_until(lambda: loops <= callers, within=30)
                    proxy.start()  # same port
                    await wait_until(lambda: group.stats.acked == len(ids), within=30)
        finally:
            await client.aclose()
    assert await pending_ids(redis_client, group.key, "g") == set()


# --------------------------------------------------------------------------- worker machinery


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 12),
    requests=st.lists(
        st.tuples(
            st.integers(1, 20),  # wanted
            st.integers(1, 20),  # at least
            st.integers(0, 20),  # items that arrive
            st.integers(0, 3),  # checkpoints before the reply
            st.integers(0, 4),  # checkpoints an item stays in flight
            st.booleans(),  # cancelled while it waits or holds its credits
        ),
        min_size=1,
        max_size=20,
    ),
)
async def test_credit_window_never_over_admits(
    limit: int, requests: list[tuple[int, int, int, int, int, bool]]
) -> None:
    window = CreditWindow(limit)
    violations: list[str] = []

    def check() -> None:
        if window.in_flight + window.reserved > limit or window.free < 0:
            violations.append(f"in flight {window.in_flight} + reserved {window.reserved}")

    async def steps(n: int) -> None:
        for _ in range(n):
            await anyio.lowlevel.checkpoint()

    async def settle_later(hold: int) -> None:
        await steps(hold)
        window.settle()
        check()

    async def request(
        tg: Any, wanted: int, at_least: int, arriving: int, wait: int, hold: int, cancel: bool
    ) -> None:
        with anyio.CancelScope() as scope:
            if cancel:
                tg.start_soon(cancel_soon, scope, wait)
            async with window.reserve(wanted, at_least=at_least) as room:
                check()
                assert min(at_least, wanted, limit) <= room.granted <= min(wanted, limit)
                await steps(wait)
                for _ in range(arriving):
                    if not room.take():
                        break
                    check()
                    tg.start_soon(settle_later, hold)
            check()

    async def cancel_soon(scope: anyio.CancelScope, after: int) -> None:
        await steps(after)
        scope.cancel()

    with anyio.fail_after(10):  # every request is served eventually
        async with anyio.create_task_group() as tg:
            for wanted, at_least, arriving, wait, hold, cancel in requests:
                tg.start_soon(request, tg, wanted, at_least, arriving, wait, hold, cancel)
    assert violations == []
    assert (window.in_flight, window.reserved, window.free) == (0, 0, limit)


async def test_credit_window_serves_waiters_first_come_first_served() -> None:
    window = CreditWindow(2)
    order: list[str] = []
    release = anyio.Event()

    async def hold() -> None:
        async with window.reserve(2) as room:
            await release.wait()
            assert room.take()  # one credit becomes an item in flight, one goes back

    async def want(name: str, n: int) -> None:
        async with window.reserve(n, at_least=n) as room:
            order.append(f"{name}:{room.granted}")
            await anyio.sleep(0.01)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await wait_until(lambda: window.free == 0)
            tg.start_soon(want, "b", 2)
            await anyio.sleep(0.01)
            tg.start_soon(want, "c", 1)
            await anyio.sleep(0.01)
            release.set()
            await wait_until(lambda: window.in_flight == 1)
            await anyio.sleep(0.01)
            # One credit is free: enough for c, but b came first and needs two.
            assert order == []
            window.settle()
    assert order == ["b:2", "c:1"]
    with pytest.raises(ValueError, match="at least one"):
        window.reserve(0)


async def test_ack_batcher_resends_a_failed_batch_and_flush_waits_for_the_one_in_flight() -> None:
    calls: list[list[str]] = []
    in_flight = anyio.Event()
    proceed = anyio.Event()
    failures = 1

    async def send(ids: Sequence[str]) -> None:
        nonlocal failures
        calls.append(list(ids))
        if failures:
            failures -= 1
            raise ConnectionFailed("lost")
        in_flight.set()
        await proceed.wait()

    batcher = AckBatcher(send, backoff=Backoff(base=0.001, cap=0.01), max_batch=3)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            batcher.add(["1", "2"])
            await in_flight.wait()  # the failed batch went out again
            assert calls == [["1", "2"], ["1", "2"]]
            assert batcher.pending == 0
            flushed = False

            async def flush() -> None:
                nonlocal flushed
                await batcher.flush()
                flushed = True

            tg.start_soon(flush)
            await anyio.sleep(0.05)
            assert not flushed  # nothing queued, but a batch is in flight: wait for it
            batcher.add(["3", "4", "5", "6"])
            proceed.set()
            await wait_until(lambda: flushed)
            tg.cancel_scope.cancel()
    assert calls[2:] == [["3", "4", "5"], ["6"]]  # at most max_batch ids per call
    assert batcher.pending == 0


async def test_ack_batcher_close_is_bounded_and_reports_what_it_could_not_send() -> None:
    async def send(ids: Sequence[str]) -> None:
        raise CommandTimeout("no reply")

    batcher = AckBatcher(send, backoff=Backoff(base=0.001, cap=0.01))
    batcher.add(["1", "2"])
    with anyio.fail_after(10):
        assert await batcher.close(0.2) == 2
