"""Job queues end to end: push + process + acknowledge, a handler that does nothing.

Every row runs one producer that pushes BATCH jobs per operation and then waits until
the workers are at most AHEAD batches behind, so pushing and processing overlap and the
row measures sustained jobs per second. Workers run WORKERS jobs at once.

Rows (group "queue e2e"):
* raw redis-py LPUSH + BRPOP (baseline): the seed's pattern, WORKERS tasks each blocked
  in BRPOP; unreliable (a popped job dies with its worker);
* raw redis-py BLMOVE + LREM: the classic reliable variant (a processing list), by hand;
* ListQueue: the seed's pattern through the library;
* ReliableQueue: leases, acknowledgements, retries, one consumer with a handler;
* saq and bullmq (the Python port of BullMQ), each in its idiomatic setup, when
  installed (the ``bench`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ...queues import Job, ListQueue, QueuePolicy, ReliableQueue
from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, load
from .streams import _producer_op, _Progress

GROUP = "queue e2e"
BATCH = 100  # jobs one operation pushes
WORKERS = 16  # jobs processed at once, in every row
# A row of bullmq or saq handles a few thousand jobs/s: 20-50 ms per operation.
MIN_SECONDS = 0.2
PAYLOAD = {"user": 42, "task": "noop"}

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


async def _close_quietly(close: Callable[[], Awaitable[Any]]) -> None:
    with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
        await close()


def _raw(reliable: bool) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, WORKERS + 1)
        key = f"{env.prefix}:rawq:{{{uuid.uuid4().hex[:8]}}}"
        progress = _Progress()

        async def worker(n: int) -> None:
            processing = f"{key}:processing:{n}"
            while True:
                if reliable:
                    job = await client.blmove(key, processing, 1, "RIGHT", "LEFT")
                    if job is not None:
                        progress.add()  # the job's work: nothing
                        await client.lrem(processing, -1, job)
                else:
                    reply = await client.brpop([key], timeout=1)
                    if reply is not None:
                        progress.add()

        async def produce() -> None:
            await client.lpush(key, *[json.dumps(PAYLOAD).encode()] * BATCH)

        try:
            async with anyio.create_task_group() as tg:
                for n in range(WORKERS):
                    tg.start_soon(worker, n)
                yield _producer_op(produce, progress)
                tg.cancel_scope.cancel()
        finally:
            await _close_quietly(lambda: _delete_prefix(client, key))
            await client.aclose()

    return setup


async def _delete_prefix(client: Any, key: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{key}*", count=1000)]
    if keys:
        await client.delete(*keys)


@asynccontextmanager
async def _list_queue(env: BenchEnv) -> AsyncIterator[Operation]:
    client = env.client(max_connections=WORKERS + 8)
    queue = ListQueue(client, f"bench-{uuid.uuid4().hex[:8]}", prefix=env.prefix)
    progress = _Progress()

    async def worker() -> None:
        async for _payload in queue.jobs():
            progress.add()

    async def produce() -> None:
        await queue.push_many([PAYLOAD] * BATCH)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(WORKERS):
                tg.start_soon(worker)
            yield _producer_op(produce, progress)
            tg.cancel_scope.cancel()
    finally:
        await _close_quietly(lambda: client.delete(queue.key))
        await client.aclose()


@asynccontextmanager
async def _reliable_queue(env: BenchEnv) -> AsyncIterator[Operation]:
    client = env.client()
    queue = ReliableQueue(
        client,
        f"bench-{uuid.uuid4().hex[:8]}",
        prefix=env.prefix,
        policy=QueuePolicy(concurrency=WORKERS),
    )
    progress = _Progress()

    async def handle(job: Job) -> None:
        progress.add()

    async def produce() -> None:
        await queue.push_many([PAYLOAD] * BATCH)

    try:
        async with queue.consumer(handle):
            yield _producer_op(produce, progress)
    finally:
        # Jobs pushed but not processed when the row ends: dropped with their keys.
        await _close_quietly(lambda: _delete_prefix(client, _text(queue.key)))
        await client.aclose()


def _text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


@asynccontextmanager
async def _saq(env: BenchEnv) -> AsyncIterator[Operation]:
    saq = load("saq")
    queue = saq.Queue.from_url(env.url, name=f"{env.prefix}-saq-{uuid.uuid4().hex[:8]}")
    progress = _Progress()

    async def noop(ctx: Any, **payload: Any) -> None:
        progress.add()

    worker = saq.Worker(queue, functions=[("noop", noop)], concurrency=WORKERS)
    logging.getLogger("saq").setLevel(logging.ERROR)

    async def produce() -> None:
        await asyncio.gather(*(queue.enqueue("noop", payload=PAYLOAD) for _ in range(BATCH)))

    await queue.connect()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.start)
            yield _producer_op(produce, progress)
            await _close_quietly(worker.stop)
            tg.cancel_scope.cancel()
    finally:
        await _close_quietly(lambda: _delete_prefix(queue.redis, f"saq:{queue.name}"))
        await _close_quietly(queue.disconnect)


@asynccontextmanager
async def _bullmq(env: BenchEnv) -> AsyncIterator[Operation]:
    bullmq = load("bullmq")
    name = f"bench-{uuid.uuid4().hex[:8]}"
    options = {"connection": env.url, "prefix": f"{env.prefix}-bull"}
    queue = bullmq.Queue(name, options)
    progress = _Progress()

    async def process(job: Any, token: str) -> None:
        progress.add()

    # Run by this row rather than autorun, so that its teardown can be waited for.
    worker = bullmq.Worker(name, process, {**options, "concurrency": WORKERS, "autorun": False})
    # What a throughput-minded user sets: finished jobs are not kept.
    job = {"name": "noop", "data": PAYLOAD, "opts": {"removeOnComplete": True}}

    async def produce() -> None:
        await queue.addBulk([job] * BATCH)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                yield _producer_op(produce, progress)
            finally:
                await _close_quietly(worker.close)
                tg.cancel_scope.deadline = anyio.current_time() + 5  # run() ends, bounded
        # bullmq 3.4's close() can return with job tasks still running (it waits on a
        # stale set): without this they hold the event loop's shutdown for minutes.
        leftovers = [task for task in worker.processing if not task.done()]
        for task in leftovers:
            task.cancel()
        with anyio.move_on_after(5, shield=True):
            await asyncio.gather(*leftovers, return_exceptions=True)
    finally:
        await _close_quietly(queue.close)
        cleaner = redis_py(env.url)
        await _close_quietly(lambda: _delete_prefix(cleaner, f"{options['prefix']}:{name}"))
        await cleaner.aclose()


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Raw LPUSH/BRPOP (baseline) and BLMOVE/LREM, ListQueue, ReliableQueue, saq, bullmq."""
    common: dict[str, Any] = {"ops_per_call": BATCH, "unit": "jobs", "min_seconds": MIN_SECONDS}
    rows = [
        Scenario(GROUP, "raw redis-py LPUSH + BRPOP", 1, _raw(False), baseline=True, **common),
        Scenario(GROUP, "raw redis-py BLMOVE + LREM", 1, _raw(True), role="reference", **common),
        Scenario(GROUP, "aioredispatterns ListQueue", 1, _list_queue, **common),
        Scenario(GROUP, "aioredispatterns ReliableQueue", 1, _reliable_queue, **common),
    ]
    if has("saq"):
        rows.append(Scenario(GROUP, "saq", 1, _saq, role="competitor", **common))
    if has("bullmq"):
        rows.append(
            Scenario(GROUP, "bullmq (Python port)", 1, _bullmq, role="competitor", **common)
        )
    return rows
