"""Streams end to end: produce + consume + ack, one producer, a handler that does nothing.

Every row runs one producer that appends BATCH messages per operation (one pipelined
round trip) and then waits until the consumer is at most AHEAD batches behind, so
producing and consuming overlap and the row measures sustained messages per second.

Rows (group "streams e2e"):
* raw redis-py, XACK per message (baseline): XREADGROUP COUNT 100, then one XACK per id;
* raw redis-py, batched XACK: XREADGROUP COUNT 100, then one XACK for the whole batch;
* ConsumerGroup: aioredispatterns (JSON-encoded fields via StreamProducer);
* FastStream: its Redis stream subscriber with a consumer group (when installed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ...streams import ConsumerGroup, ConsumerPolicy, StreamMessage, StreamProducer
from ..redis_py import Redis, redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, load

GROUP = "streams e2e"
BATCH = 100  # messages one operation appends (one pipelined round trip)
AHEAD = 4  # batches the producer may be ahead of the consumer
READ_COUNT = 100
# A row of FastStream handles ~5k msgs/s: 20 ms per operation. A longer window keeps
# the count of operations per round (and so the figure's granularity) reasonable.
MIN_SECONDS = 0.2

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


class _Progress:
    """How many messages the consumer handled; lets the producer wait for a mark."""

    def __init__(self) -> None:
        self.count = 0
        self._target = 0
        self._reached: anyio.Event | None = None

    def add(self, n: int = 1) -> None:
        self.count += n
        if self._reached is not None and self.count >= self._target:
            self._reached.set()
            self._reached = None

    async def wait_for(self, target: int) -> None:
        if self.count >= target:
            return
        self._target = target
        self._reached = anyio.Event()
        await self._reached.wait()


def _producer_op(produce: Callable[[], Awaitable[Any]], progress: _Progress) -> Operation:
    produced = 0

    async def operation() -> None:
        nonlocal produced
        await produce()
        produced += BATCH
        # Stay a few batches ahead: the consumer works while the producer appends.
        await progress.wait_for(produced - AHEAD * BATCH)

    return operation


def _raw_producer(client: Redis, key: str) -> Callable[[], Awaitable[Any]]:
    async def produce() -> None:
        pipe = client.pipeline(transaction=False)
        for n in range(BATCH):
            pipe.xadd(key, {"n": str(n)})
        await pipe.execute()

    return produce


def _raw_loop(batched_ack: bool) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url)
        key = f"{env.prefix}:raw:{'batched' if batched_ack else 'naive'}"
        await client.delete(key)
        await client.xgroup_create(key, "g", id="0", mkstream=True)
        progress = _Progress()

        async def consume() -> None:
            while True:
                reply: Any = await client.xreadgroup(
                    "g", "c", {key: ">"}, count=READ_COUNT, block=1000
                )
                for _stream, entries in reply:
                    ids = [entry_id for entry_id, _fields in entries]
                    if batched_ack:
                        progress.add(len(ids))
                        await client.xack(key, "g", *ids)
                    else:
                        for entry_id in ids:
                            progress.add()
                            await client.xack(key, "g", entry_id)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                yield _producer_op(_raw_producer(client, key), progress)
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(5, shield=True):
                await client.delete(key)
                await client.aclose()

    return setup


@asynccontextmanager
async def _consumer_group(env: BenchEnv) -> AsyncIterator[Operation]:
    client = env.client()
    producer = StreamProducer(client, "bench", prefix=env.prefix)
    await client.delete(producer.key)
    progress = _Progress()

    async def handle(message: StreamMessage) -> None:
        progress.add()

    async def produce() -> None:
        await producer.add_many({"n": n} for n in range(BATCH))

    policy = ConsumerPolicy(batch_size=READ_COUNT, max_in_flight=4 * READ_COUNT)
    try:
        async with ConsumerGroup(
            client, "bench", "g", handler=handle, prefix=env.prefix, policy=policy
        ):
            yield _producer_op(produce, progress)
    finally:
        with anyio.move_on_after(5, shield=True):
            await client.delete(producer.key)
            await client.aclose()


@asynccontextmanager
async def _faststream(env: BenchEnv) -> AsyncIterator[Operation]:
    faststream_redis = load("faststream.redis")
    key = f"{env.prefix}:faststream"
    client = redis_py(env.url)
    await client.delete(key)
    progress = _Progress()
    broker = faststream_redis.RedisBroker(env.url, logger=None)

    async def handle(body: Any) -> None:
        progress.add()

    stream = faststream_redis.StreamSub(key, group="g", consumer="c", max_records=READ_COUNT)
    broker.subscriber(stream=stream)(handle)
    logging.getLogger("faststream").setLevel(logging.ERROR)
    await broker.start()
    try:
        yield _producer_op(_raw_producer(client, key), progress)
    finally:
        with anyio.move_on_after(5, shield=True):
            await broker.stop()
        with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
            await client.delete(key)
        await client.aclose()


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Naive and batched raw loops, ConsumerGroup, FastStream."""
    rows = [
        Scenario(GROUP, "raw redis-py, XACK per message", 1, _raw_loop(False), baseline=True,
                 ops_per_call=BATCH, unit="msgs", min_seconds=MIN_SECONDS),
        Scenario(GROUP, "raw redis-py, batched XACK", 1, _raw_loop(True), ops_per_call=BATCH,
                 unit="msgs", min_seconds=MIN_SECONDS, role="reference"),
        Scenario(GROUP, "aioredispatterns ConsumerGroup", 1, _consumer_group, ops_per_call=BATCH,
                 unit="msgs", min_seconds=MIN_SECONDS),
    ]  # fmt: skip
    if has("faststream"):
        rows.append(
            Scenario(GROUP, "FastStream stream subscriber", 1, _faststream, ops_per_call=BATCH,
                     unit="msgs", min_seconds=MIN_SECONDS, role="competitor")
        )  # fmt: skip
    return rows
