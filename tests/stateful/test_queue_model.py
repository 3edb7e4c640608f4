"""Hypothesis state machine: the reliable queue's scripts against a pure-Python model.

Producers push (with priorities, with delays, with job ids that repeat), three consumers
take, acknowledge, fail, renew, lose their leases to the reaper, stop and restart, and
dead jobs are requeued. After every step the whole queue as stored in Redis (every list
in order, every sorted set in order, every hash) equals the model's, so:

* priorities are honoured: the highest first, first in first out within a priority;
* a job is in exactly one place (waiting, delayed, leased to one consumer, dead) or
  acknowledged and gone, and delivery counts, owners and last errors are exact;
* an explicit job id makes a push idempotent; a late acknowledgement never deletes
  another consumer's delivery; dead letters are bounded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from aioredispatterns import _queue_redis as _q
from aioredispatterns import connect
from aioredispatterns.queues import ReliableQueue

T = TypeVar("T")

CONSUMERS = ("c0", "c1", "c2")
MAX_DELIVERIES = 3
DEAD_MAX = 4
SHORT_MS = 1  # a lease that runs out at once (its consumer "died")
LONG_MS = 600_000
PRIORITIES = st.sampled_from([0, 0, 0, 1, 2, -1, 5])
JOB_IDS = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))
SNAPSHOT = """
local out = {}
for i = 1, #KEYS do
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t == 'list' then
        out[i] = redis.call('LRANGE', KEYS[i], 0, -1)
    elseif t == 'zset' then
        out[i] = redis.call('ZRANGE', KEYS[i], 0, -1)
    elseif t == 'hash' then
        out[i] = redis.call('HGETALL', KEYS[i])
    else
        out[i] = {}
    end
end
return out
"""

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "cluster")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Model:
    """The queue as plain Python, mirroring each script step by step."""

    ready: list[str] = field(default_factory=list)  # LRANGE order: head first
    prio: dict[str, int] = field(default_factory=dict)  # id -> score
    delayed: set[str] = field(default_factory=set)
    leases: dict[str, int] = field(default_factory=dict)  # id -> lease ms at its start
    jobs: dict[str, str] = field(default_factory=dict)  # id -> payload
    deliveries: dict[str, int] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)  # head = newest
    seq: int = 0
    processing: dict[str, list[str]] = field(default_factory=dict)

    def prio_order(self) -> list[str]:
        return sorted(self.prio, key=lambda i: (self.prio[i], i))

    def add_prio(self, job_id: str, priority: int) -> None:
        self.seq += 1
        self.prio[job_id] = -priority * 2**32 + self.seq % 2**32

    def make_ready(self, job_id: str, *, front: bool) -> None:
        if job_id in self.priorities:
            self.add_prio(job_id, self.priorities[job_id])
        elif front:
            self.ready.append(job_id)  # RPUSH: popped next
        else:
            self.ready.insert(0, job_id)  # LPUSH

    def lrem_last(self, consumer: str, job_id: str) -> None:
        held = self.processing.get(consumer, [])
        for i in range(len(held) - 1, -1, -1):
            if held[i] == job_id:
                del held[i]
                return

    def forget(self, job_id: str) -> None:
        for table in (self.jobs, self.deliveries, self.errors, self.priorities):
            table.pop(job_id, None)

    def dead_letter(self, job_id: str, error: str) -> None:
        self.errors[job_id] = error
        self.dead.insert(0, job_id)
        while len(self.dead) > DEAD_MAX:
            self.forget(self.dead.pop())

    def release_lease(self, job_id: str) -> None:
        self.leases.pop(job_id, None)
        self.owners.pop(job_id, None)


def _machine(url: str) -> type[RuleBasedStateMachine]:
    class QueueMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.redis = connect(url)
            self.queue = ReliableQueue(self.redis, "jobs", prefix=f"qm{uuid.uuid4().hex[:10]}")
            self.keys = self.queue._keys
            self.model = Model()
            self.counter = 0

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def call(self, method: Callable[..., Awaitable[T]], *args: Any, **options: Any) -> T:
            """A redis-py method of the client (it needs the loop running to be called)."""

            async def run() -> T:
                return await method(*args, **options)

            return self.run(run())

        def teardown(self) -> None:
            self.run(self.redis.aclose())
            self.loop.close()

        # ------------------------------------------------------------------ producers

        @initialize(jobs=st.lists(st.tuples(PRIORITIES, JOB_IDS, st.just(False)), min_size=6))
        def start_with_jobs(self, jobs: list[tuple[int, str | None, bool]]) -> None:
            self.push(jobs)

        @rule(jobs=st.lists(st.tuples(PRIORITIES, JOB_IDS, st.booleans()), min_size=1, max_size=5))
        def push(self, jobs: list[tuple[int, str | None, bool]]) -> None:
            args = []
            for priority, job_id, delayed in jobs:
                self.counter += 1
                delay_us = 3600 * 10**6 if delayed else 0
                args.append([job_id or f"j{self.counter}", f"p{self.counter}", priority, delay_us])
            added = self.run(_q.push(self.redis, self.keys, args))
            m = self.model
            expected, plain = [], []
            for job_id, payload, priority, delay in args:
                if job_id in m.jobs:
                    expected.append(False)
                    continue
                expected.append(True)
                m.jobs[job_id] = payload
                if priority:
                    m.priorities[job_id] = priority
                if delay:
                    m.delayed.add(job_id)
                elif priority:
                    m.add_prio(job_id, priority)
                else:
                    plain.append(job_id)
            m.ready[:0] = plain[::-1]  # one LPUSH of them all
            assert added == expected

        # ------------------------------------------------------------------ consumers

        @rule(consumer=st.sampled_from(CONSUMERS), count=st.integers(1, 4), dies=st.booleans())
        def pop(self, consumer: str, count: int, dies: bool) -> None:
            lease_ms = SHORT_MS if dies else LONG_MS
            taken, wait_ms = self.run(
                _q.pop(
                    self.redis,
                    self.keys,
                    consumer=consumer,
                    count=count,
                    lease_ms=lease_ms,
                    max_deliveries=MAX_DELIVERIES,
                    dead_max=DEAD_MAX,
                )
            )
            m = self.model
            high = [i for i in m.prio_order() if m.prio[i] < 0][:count]
            order = list(high)
            while len(order) < count and m.ready:
                order.append(m.ready.pop())
            low = [i for i in m.prio_order() if m.prio[i] >= 0][: count - len(order)]
            order += low
            for job_id in high + low:
                del m.prio[job_id]
            expected, held = [], []
            for job_id in order:
                n = m.deliveries.get(job_id, 0) + 1
                m.deliveries[job_id] = n
                if n > MAX_DELIVERIES:
                    m.dead_letter(
                        job_id, f"delivered more than max_deliveries={MAX_DELIVERIES} times"
                    )
                    continue
                expected.append(
                    (job_id, m.jobs[job_id], n, m.priorities.get(job_id, 0), m.errors.get(job_id))
                )
                m.leases[job_id] = lease_ms
                m.owners[job_id] = consumer
                held.append(job_id)
            m.processing[consumer] = held[::-1] + m.processing.get(consumer, [])
            got = [(i, _text(p), n, prio, e) for i, p, n, prio, e in taken]
            assert got == [(i, f"{p}", n, prio, e) for i, p, n, prio, e in expected]
            assert wait_ms == (-1 if not m.delayed else wait_ms)
            if m.delayed:
                assert wait_ms > 3_000_000

        def _held_by(self, consumer: str) -> list[str]:
            return sorted(i for i, owner in self.model.owners.items() if owner == consumer)

        @rule(consumer=st.sampled_from(CONSUMERS), data=st.data())
        def ack(self, consumer: str, data: st.DataObject) -> None:
            m = self.model
            candidates = sorted(set(m.jobs) | {"nope"})
            ids = data.draw(st.lists(st.sampled_from(candidates), max_size=4))
            done = self.run(_q.ack(self.redis, self.keys, consumer, ids))
            mine = [i for i in ids if m.owners.get(i) == consumer]
            for job_id in ids:
                m.lrem_last(consumer, job_id)
            for job_id in dict.fromkeys(mine):
                m.release_lease(job_id)
                m.forget(job_id)
            assert done == len(mine)

        @rule(
            consumer=st.sampled_from(CONSUMERS),
            data=st.data(),
            retry=st.sampled_from(["now", "later", "dead"]),
        )
        def nack(self, consumer: str, data: st.DataObject, retry: str) -> None:
            m = self.model
            job_id = data.draw(st.sampled_from([*self._held_by(consumer), "nope"]))
            retry_us = {"now": 0, "later": 3600 * 10**6, "dead": -1}[retry]
            outcome = self.run(
                _q.nack(
                    self.redis,
                    self.keys,
                    consumer=consumer,
                    job_id=job_id,
                    error=f"E{self.counter}",
                    retry_us=retry_us,
                    max_deliveries=MAX_DELIVERIES,
                    dead_max=DEAD_MAX,
                )
            )
            m.lrem_last(consumer, job_id)
            if m.owners.get(job_id) != consumer:
                assert outcome == 0
                return
            m.release_lease(job_id)
            m.errors[job_id] = f"E{self.counter}"
            if retry == "dead" or m.deliveries.get(job_id, 0) >= MAX_DELIVERIES:
                m.dead_letter(job_id, f"E{self.counter}")
                assert outcome == 2
            elif retry == "later":
                m.delayed.add(job_id)
                assert outcome == 1
            else:
                m.make_ready(job_id, front=False)
                assert outcome == 1

        @rule(consumer=st.sampled_from(CONSUMERS), data=st.data())
        def renew(self, consumer: str, data: st.DataObject) -> None:
            m = self.model
            ids = data.draw(st.lists(st.sampled_from([*m.processing.get(consumer, []), "x"])))
            lost = self.run(
                _q.renew(self.redis, self.keys, consumer=consumer, lease_ms=LONG_MS, ids=ids)
            )
            expected = []
            for job_id in ids:
                if m.owners.get(job_id) == consumer:
                    m.leases[job_id] = LONG_MS
                else:
                    expected.append(job_id)
                    m.lrem_last(consumer, job_id)
            assert lost == expected

        @rule()
        def reap(self) -> None:
            m = self.model
            scores = {
                _text(k): v
                for k, v in self.call(self.redis.zrange, self.keys.leases, 0, -1, withscores=True)
            }
            self.run(asyncio.sleep(0.003))  # short leases have run out by now
            returned, dead, _, _ = self.run(
                _q.reap(
                    self.redis,
                    self.keys,
                    count=100,
                    max_deliveries=MAX_DELIVERIES,
                    dead_max=DEAD_MAX,
                    silent_ms=10**9,
                )
            )
            expired = sorted(
                (i for i, ms in m.leases.items() if ms == SHORT_MS), key=lambda i: (scores[i], i)
            )
            expect_returned = expect_dead = 0
            for job_id in reversed(expired):
                owner = m.owners[job_id]
                m.release_lease(job_id)
                n = m.deliveries.get(job_id, 0)
                if n >= MAX_DELIVERIES:
                    m.errors[job_id] = f"lease expired on consumer {owner} after {n} deliveries"
                    m.dead.insert(0, job_id)
                    expect_dead += 1
                else:
                    m.errors[job_id] = f"lease expired on consumer {owner}"
                    m.make_ready(job_id, front=True)
                    expect_returned += 1
            while len(m.dead) > DEAD_MAX:
                m.forget(m.dead.pop())
            assert (returned, dead) == (expect_returned, expect_dead)

        @rule(consumer=st.sampled_from(CONSUMERS), stopping=st.booleans(), data=st.data())
        def release(self, consumer: str, stopping: bool, data: st.DataObject) -> None:
            m = self.model
            held = list(m.processing.get(consumer, []))
            started = data.draw(st.lists(st.sampled_from([*held, "x"]), max_size=3))
            returned, dead = self.run(
                _q.release(
                    self.redis,
                    self.keys,
                    consumer=consumer,
                    max_deliveries=MAX_DELIVERIES,
                    dead_max=DEAD_MAX,
                    stopping=stopping,
                    why="stopped",
                    started=started,
                )
            )
            expect_returned = expect_dead = 0
            for job_id in held:
                if m.owners.get(job_id) != consumer:
                    continue
                m.release_lease(job_id)
                n = m.deliveries.get(job_id, 0)
                if stopping and job_id not in started and n > 0:
                    n -= 1
                    if n == 0:
                        del m.deliveries[job_id]
                    else:
                        m.deliveries[job_id] = n
                if n >= MAX_DELIVERIES:
                    m.errors[job_id] = f"stopped after {n} deliveries"
                    m.dead.insert(0, job_id)
                    expect_dead += 1
                else:
                    m.make_ready(job_id, front=True)
                    expect_returned += 1
            m.processing.pop(consumer, None)
            while len(m.dead) > DEAD_MAX:
                m.forget(m.dead.pop())
            assert (returned, dead) == (expect_returned, expect_dead)

        @rule(data=st.data())
        def requeue_dead(self, data: st.DataObject) -> None:
            m = self.model
            ids = data.draw(st.lists(st.sampled_from([*m.dead, "x"]), max_size=2, unique=True))
            requeued = self.run(_q.requeue_dead(self.redis, self.keys, ids=ids, oldest=2))
            # Named ones where dead; none named: the two oldest, oldest first.
            chosen = [i for i in ids if i in m.dead] if ids else m.dead[-2:][::-1]
            for job_id in chosen:
                m.dead.remove(job_id)
                m.deliveries.pop(job_id, None)
                m.make_ready(job_id, front=False)
            assert requeued == len(chosen)

        # ------------------------------------------------------------------ the check

        @invariant()
        def redis_holds_what_the_model_says(self) -> None:
            k, m = self.keys, self.model
            names = [k.ready, k.prio, k.delayed, k.leases, k.jobs, k.deliveries, k.owners]
            names += [k.errors, k.priorities, k.dead]
            names += [k.processing(c) for c in CONSUMERS]
            raw = self.call(self.redis.eval, SNAPSHOT, len(names), *names)
            lists = [[_text(v) for v in part] for part in raw]

            def table(flat: list[str]) -> dict[str, str]:
                return dict(zip(flat[::2], flat[1::2], strict=True))

            assert lists[0] == m.ready
            assert lists[1] == m.prio_order()
            assert set(lists[2]) == m.delayed
            assert set(lists[3]) == set(m.leases)
            assert table(lists[4]) == m.jobs
            assert table(lists[5]) == {i: str(n) for i, n in m.deliveries.items()}
            assert table(lists[6]) == m.owners
            assert table(lists[7]) == m.errors
            assert table(lists[8]) == {i: str(p) for i, p in m.priorities.items()}
            assert lists[9] == m.dead
            for consumer, held in zip(CONSUMERS, lists[10:], strict=True):
                assert held == m.processing.get(consumer, [])
            # Every job the queue knows is in exactly one place.
            places = [*m.ready, *m.prio, *m.delayed, *m.leases, *m.dead]
            assert sorted(places) == sorted(m.jobs)

    return QueueMachine


def test_queue_state_machine(redis_url: str) -> None:
    machine = _machine(redis_url)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
