"""The reliable queue's crash test: worker processes SIGKILLed mid-job lose nothing.

5,000 jobs, three worker processes; two of them are SIGKILLed while their handlers run.
Every job is completed at least once; a job completed twice is one the killed workers
held (leased) when they died; at the end no job is left anywhere, processing lists
included. Also run as a script: it is the worker process
(``python tests/test_queue_crash.py URL CLUSTER PREFIX CONSUMER VISIBILITY``).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from aioredispatterns import connect
from aioredispatterns.queues import Job, ListQueue, QueuePolicy, ReliableQueue
from aioredispatterns.testing import RedisServer

TOTAL = 5000
VISIBILITY = 1.5
HANDLER_SECONDS = 0.02  # a little work, so each worker has many jobs in flight
CONCURRENCY = 16

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "cluster")


def completions(client: Any, prefix: str, consumer: str) -> ListQueue:
    """Where a worker records each job it completed (before the acknowledgement)."""
    return ListQueue(client, f"done-{consumer}", prefix=prefix)


async def worker(argv: list[str]) -> None:
    url, cluster, prefix, consumer, visibility = argv
    client: Any = connect(url, cluster=cluster == "cluster")
    queue = ReliableQueue(
        client,
        "jobs",
        prefix=prefix,
        policy=QueuePolicy(visibility_timeout=float(visibility), concurrency=CONCURRENCY),
    )
    # Through the library (redis-py's own cluster methods re-initialize the client
    # under load, which closes the library's slot router with it).
    done = completions(client, prefix, consumer)

    async def handle(job: Job) -> None:
        await anyio.sleep(HANDLER_SECONDS)
        await done.push(job.id)

    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with queue.consumer(handle, name=consumer):
            async for _ in signals:
                break  # graceful stop: drain, acknowledge, return what is held
    await client.aclose()


@pytest.mark.slow
async def test_workers_killed_mid_job_lose_nothing(
    redis_server: RedisServer, redis_client: Any, key_prefix: str
) -> None:
    if redis_server.name not in ("valkey-9.1", "redis-6.2", "cluster"):
        pytest.skip("three worker processes and 5,000 jobs: newest, oldest and cluster only")
    started = time.monotonic()
    cluster = "cluster" if redis_server.name == "cluster" else "standalone"
    queue = ReliableQueue(
        redis_client, "jobs", prefix=key_prefix, policy=QueuePolicy(visibility_timeout=VISIBILITY)
    )
    ids = await queue.push_many(range(TOTAL))
    names = ["killed-1", "killed-2", "survivor"]

    done = {name: completions(redis_client, key_prefix, name) for name in names}

    async def completed(name: str) -> list[str]:
        return [json.loads(i) for i in await redis_client.lrange(done[name].key, 0, -1)]

    async def total_completed() -> int:
        return sum([await done[name].length() for name in names])

    async def wait_for(predicate: Any, within: float) -> None:
        with anyio.fail_after(within):
            while not await predicate():  # noqa: ASYNC110 - polling the server
                await anyio.sleep(0.02)

    held_when_killed: dict[str, set[str]] = {}
    kill_times: dict[str, float] = {}
    script = [sys.executable, str(Path(__file__))]
    processes = {
        name: await anyio.open_process(
            [*script, redis_server.url, cluster, key_prefix, name, str(VISIBILITY)],
            stdout=None,
            stderr=None,
        )
        for name in names
    }
    try:
        for name, mark in (("killed-1", TOTAL // 5), ("killed-2", TOTAL // 2)):
            await wait_for(lambda mark=mark: _at_least(total_completed, mark), within=40)
            processes[name].send_signal(signal.SIGKILL)  # by its pid, mid-job
            assert await processes[name].wait() == -signal.SIGKILL
            kill_times[name] = time.monotonic()
            owners = await redis_client.hgetall(queue._keys.owners)
            held_when_killed[name] = {k.decode() for k, v in owners.items() if v.decode() == name}
            assert held_when_killed[name], f"{name} should have died holding jobs"
        # The survivor finishes everything, the killed workers' jobs after their leases.
        await wait_for(lambda: _queue_is_empty(queue), within=40)
        redelivered_after = time.monotonic() - kill_times["killed-2"]
        survivor = processes["survivor"]
        survivor.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            assert await survivor.wait() == 0
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.kill()

    runs: Counter[str] = Counter()
    for name in names:
        runs.update(await completed(name))
    assert set(runs) == set(ids)  # every job completed at least once: none lost
    duplicates = {job_id for job_id, count in runs.items() if count > 1}
    held = held_when_killed["killed-1"] | held_when_killed["killed-2"]
    assert duplicates <= held  # only the jobs the killed workers held ran twice
    assert all(count <= 2 for count in runs.values())
    info = await queue.info()
    assert (info.waiting, info.delayed, info.in_flight, info.dead) == (0, 0, 0, 0)
    # Nothing left in processing lists: the survivor stopped (its list went with it)
    # and the killed workers' lists are forgotten once silent for 3 visibility timeouts
    # (checked by the survivor's reaper while it ran, or by the next consumer).
    async with queue.consumer(name="inspector"):
        await wait_for(lambda: _no_processing_lists(redis_client, queue, names), within=30)
    assert await redis_client.hlen(queue._keys.jobs) == 0
    elapsed = time.monotonic() - started
    print(
        f"crash test: {TOTAL} jobs, 2 workers SIGKILLed holding "
        f"{len(held_when_killed['killed-1'])} + {len(held_when_killed['killed-2'])} jobs; "
        f"{len(duplicates)} ran twice, 0 lost; all done {redelivered_after:.1f} s after the "
        f"second kill (visibility_timeout={VISIBILITY}); {elapsed:.1f} s in all"
    )


async def _at_least(count: Any, mark: int) -> bool:
    return bool(await count() >= mark)


async def _queue_is_empty(queue: ReliableQueue) -> bool:
    info = await queue.info()
    return info.waiting == info.delayed == info.in_flight == 0


async def _no_processing_lists(client: Any, queue: ReliableQueue, names: list[str]) -> bool:
    keys = [queue._keys.processing(name) for name in [*names, "inspector"]]
    return not any([await client.exists(key) for key in keys])


if __name__ == "__main__":
    anyio.run(worker, sys.argv[1:])
