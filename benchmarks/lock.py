"""Lock benchmarks: ours against redis-py's asyncio Lock.

* ``lock uncontended c1``: acquire + release, one task. Also our lock without renewal
  (``acquire()``/``release()``), with the fencing counter taken out of the acquire
  script (what the token costs), and on the plain ``Redis.from_url`` client the redis-py
  row uses (what ``connect()``'s blocking pool costs).
* ``lock contended 16 waiters``: 16 tasks acquire + release one lock; an op ends when its
  task took the lock from another task, so ops/s is hand-offs between tasks per second
  (re-taking one's own lock, which an unfair lock does while its waiters sleep, does not
  count) and an op's latency is a task's wait for its next turn. The critical section is
  empty, which flatters polling: a burst of pollers can pass an empty section along.
  ``..., 1 ms held`` does 1 ms of work (a sleep) inside, as real critical sections do.
* ``lock hand-off``: one holder releases while one waiter is blocked (2 ms after it
  started waiting); each op is one such cycle. The release-to-acquired latency of every
  hand-off is printed after the run (p50/p99), since an op also holds the 2 ms.

redis-py's Lock polls every ``sleep`` seconds (0.1 s by default) while it waits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from aioredispatterns import Lock
from aioredispatterns._bench import BenchEnv, Operation, Scenario
from aioredispatterns.lock import _RELEASE

try:
    from redis.asyncio import Redis
    from redis.asyncio.lock import Lock as RedisPyLock
except ImportError:  # pragma: no cover - redis-py is a dependency, but stay graceful
    RedisPyLock = None

WAITERS = 16
# The acquire script without the fencing counter, for the cost of the token.
_NO_FENCE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {0, redis.call('PTTL', KEYS[1])}
end
return {1, 0}
"""


def _redis_py(env: BenchEnv) -> Any:
    return Redis.from_url(env.url, max_connections=WAITERS + 8)


@asynccontextmanager
async def _ours_hold(env: BenchEnv) -> AsyncIterator[Operation]:
    client = env.client(max_connections=WAITERS + 8)
    lock = Lock(client, "bench-uncontended", prefix=env.prefix)

    async def op() -> None:
        async with lock:
            pass

    try:
        yield op
    finally:
        await client.aclose()


def _ours_acquire(
    plain_client: bool,
) -> Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # plain_client: the same client redis-py's row uses, to separate our lock from
        # connect()'s pool.
        client = _redis_py(env) if plain_client else env.client()
        name = "bench-uncontended-plain" if plain_client else "bench-uncontended"
        lock = Lock(client, name, prefix=env.prefix)

        async def op() -> None:
            lease = await lock.acquire()
            await lease.release()

        try:
            yield op
        finally:
            await client.aclose()

    return setup


@asynccontextmanager
async def _ours_no_fence(env: BenchEnv) -> AsyncIterator[Operation]:
    client = env.client()
    lock = Lock(client, "bench-uncontended", prefix=env.prefix)
    script = client.register_script(_NO_FENCE)
    keys = [lock._owner_key, lock._wake_key, lock._waiting_key]

    async def op() -> None:
        owner = "bench-owner"
        taken, _ = await script(keys=keys[:1], args=[owner, 10_000])
        assert taken
        await _RELEASE.run(client, keys, [owner, 10_000])

    try:
        yield op
    finally:
        await client.aclose()


@asynccontextmanager
async def _redis_py_uncontended(env: BenchEnv) -> AsyncIterator[Operation]:
    client = _redis_py(env)
    lock = RedisPyLock(client, f"{env.prefix}:rp-uncontended", timeout=10, thread_local=False)

    async def op() -> None:
        await lock.acquire()
        await lock.release()

    try:
        yield op
    finally:
        await client.aclose()


class _Holder:
    """Counts hand-offs, not acquisitions: an op ends only when its task took the lock
    from *another* task. A task that re-takes the lock it just released (an unfair lock
    does, while its waiters sleep) stays inside the same op."""

    def __init__(self) -> None:
        self.last: object = None
        self.inside = 0  # tasks inside an op; alone (a slice ending), any take counts

    def took(self, me: object) -> bool:
        previous, self.last = self.last, me
        return previous != me or self.inside <= 1

    async def hand_off(
        self, lock: Callable[[], AbstractAsyncContextManager[Any]], hold: float
    ) -> None:
        """One op: take ``lock()`` until this task took it from another, holding ``hold`` s."""
        me = anyio.get_current_task().id
        self.inside += 1
        try:
            handed_off = False
            while not handed_off:
                async with lock():
                    handed_off = self.took(me)
                    if hold:
                        await anyio.sleep(hold)
        finally:
            self.inside -= 1


def _ours_contended(hold: float) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = env.client(max_connections=WAITERS + 8)
        lock = Lock(client, f"bench-contended-{hold}", prefix=env.prefix)
        holder = _Holder()

        async def op() -> None:
            await holder.hand_off(lambda: lock, hold)

        try:
            yield op
        finally:
            await client.aclose()

    return setup


def _redis_py_contended(hold: float) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = _redis_py(env)
        name = f"{env.prefix}:rp-contended-{hold}"
        holder = _Holder()

        def new_lock() -> RedisPyLock:
            # One Lock object per acquisition: redis-py keeps the token on the object.
            return RedisPyLock(client, name, timeout=10, sleep=0.1, thread_local=False)

        async def op() -> None:
            await holder.hand_off(new_lock, hold)

        try:
            yield op
        finally:
            await client.aclose()

    return setup


def _handoff(
    label: str,
    make: Callable[[Any, BenchEnv], tuple[Callable[[], Awaitable[Any]], Any]],
    client_of: Callable[[BenchEnv], Any],
) -> Any:
    """One hand-off per op: the holder releases while a waiter is blocked."""

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = client_of(env)
        acquire, _ = make(client, env)
        samples: list[float] = []
        held = await acquire()

        async def op() -> None:
            nonlocal held
            acquired_at = 0.0
            lease: Any = None

            async def waiter() -> None:
                nonlocal acquired_at, lease
                lease = await acquire()
                acquired_at = time.perf_counter()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.002)  # the waiter is blocked by now
                released_at = time.perf_counter()
                await held.release()
            samples.append(acquired_at - released_at)
            held = lease

        try:
            yield op
        finally:
            await held.release()
            await client.aclose()
            if samples:
                ordered = sorted(samples)
                p50 = statistics.median(ordered) * 1e3
                p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
                print(
                    f"  hand-off latency, {label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
                    f"({len(ordered)} hand-offs)"
                )

    return setup


def _ours_handoff(client: Any, env: BenchEnv) -> tuple[Callable[[], Awaitable[Any]], Any]:
    lock = Lock(client, "bench-handoff", prefix=env.prefix)
    return lock.acquire, lock


def _redis_py_handoff(client: Any, env: BenchEnv) -> tuple[Callable[[], Awaitable[Any]], Any]:
    name = f"{env.prefix}:rp-handoff"

    async def acquire() -> Any:
        lock = RedisPyLock(client, name, timeout=10, sleep=0.1, thread_local=False)
        await lock.acquire()
        return lock

    return acquire, None


def scenarios(env: BenchEnv) -> list[Scenario]:
    rows: list[Scenario] = []
    uncontended = "lock uncontended c1"
    contended = f"lock contended {WAITERS} waiters"
    working = f"lock contended {WAITERS} waiters, 1 ms held"
    handoff = "lock hand-off"
    if RedisPyLock is not None:
        rows += [
            Scenario(uncontended, "redis-py asyncio Lock", 1, _redis_py_uncontended, True),
            Scenario(contended, "redis-py asyncio Lock", WAITERS, _redis_py_contended(0.0), True),
            Scenario(working, "redis-py asyncio Lock", WAITERS, _redis_py_contended(0.001), True),
            Scenario(
                handoff,
                "redis-py asyncio Lock",
                1,
                _handoff("redis-py", _redis_py_handoff, _redis_py),
                True,
            ),
        ]
    rows += [
        Scenario(uncontended, "Lock async with (renewing)", 1, _ours_hold),
        Scenario(uncontended, "Lock acquire()+release()", 1, _ours_acquire(plain_client=False)),
        Scenario(uncontended, "same, no fencing counter", 1, _ours_no_fence),
        Scenario(
            uncontended,
            "Lock acquire()+release(), plain client",
            1,
            _ours_acquire(plain_client=True),
        ),
        Scenario(contended, "Lock async with", WAITERS, _ours_contended(0.0)),
        Scenario(working, "Lock async with", WAITERS, _ours_contended(0.001)),
        Scenario(
            handoff,
            "Lock",
            1,
            _handoff("ours", _ours_handoff, lambda env: env.client(max_connections=8)),
        ),
    ]
    return rows
