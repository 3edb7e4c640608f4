"""Lock benchmarks: ours against redis-py's asyncio Lock.

* ``lock uncontended c1``: acquire + release, one task. Also our lock without renewal
  (``acquire()``/``release()``), with the fencing counter taken out of the acquire
  script (what the token costs), and on the plain ``Redis.from_url`` client the redis-py
  row uses (what ``connect()``'s blocking pool costs).
* ``lock contended 16 waiters``: 16 tasks acquire + release one lock; an op ends when its
  task took the lock from another task, so ops/s is hand-offs between tasks per second
  (re-taking one's own lock, which an unfair lock does while its waiters sleep, does not
  count). The critical section is empty, which flatters polling: a burst of pollers can
  pass an empty section along. ``..., 1 ms held`` does 1 ms of work (a sleep) inside.
* ``lock hand-off``: one holder releases while one waiter is blocked (2 ms after it
  started waiting); each op is one such cycle, and its latency (p50/p99) is the time from
  the release to the waiter holding the lock.

redis-py's Lock polls every ``sleep`` seconds (0.1 s by default) while it waits, so its
contended rows complete few operations per second: they get a longer window
(``min_seconds``). Each redis-py row uses a lock name of its own per slice: a call
cancelled at the end of a slice may leave its key held until the 10 s timeout.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ...lock import _RELEASE, Lock
from ..redis_py import Redis, RedisPyLock, redis_py
from ..scenario import BenchEnv, Measured, Operation, Scenario

WAITERS = 16
# redis-py's rows complete ~10-50 hand-offs per second (~2 when the holder keeps working:
# its unfair lock lets the holder take it straight back), so they get longer windows.
SLOW_ROW_SECONDS = 0.4
STARVED_ROW_SECONDS = 1.0
# The acquire script without the fencing counter, for the cost of the token.
_NO_FENCE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {0, redis.call('PTTL', KEYS[1])}
end
return {1, 0}
"""

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _unique(env: BenchEnv, what: str) -> str:
    return f"{env.prefix}:{what}:{uuid.uuid4().hex[:8]}"


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


def _ours_acquire(plain_client: bool) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # plain_client: the client redis-py's row uses, to separate our lock from
        # connect()'s pool.
        client: Any = redis_py(env.url, WAITERS) if plain_client else env.client()
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


def _redis_py_lock(client: Redis, name: str) -> RedisPyLock:
    # One Lock object per acquisition: redis-py keeps the token on the object.
    return RedisPyLock(client, name, timeout=10, sleep=0.1, thread_local=False)


@asynccontextmanager
async def _redis_py_uncontended(env: BenchEnv) -> AsyncIterator[Operation]:
    client = redis_py(env.url, WAITERS)
    lock = _redis_py_lock(client, _unique(env, "rp-uncontended"))

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


def _ours_contended(hold: float) -> Setup:
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


def _redis_py_contended(hold: float) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, WAITERS)
        name = _unique(env, "rp-contended")
        holder = _Holder()

        async def op() -> None:
            await holder.hand_off(lambda: _redis_py_lock(client, name), hold)

        try:
            yield op
        finally:
            await client.aclose()

    return setup


Acquire = Callable[[], Awaitable[Any]]


def _handoff(
    make: Callable[[Any, BenchEnv], Acquire], client_of: Callable[[BenchEnv], Any]
) -> Setup:
    """One hand-off per op: the holder releases while a waiter is blocked."""

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = client_of(env)
        acquire = make(client, env)
        held: list[Any] = [await acquire()]

        async def op() -> Measured:
            acquired_at = released_at = 0.0
            taken: list[Any] = []

            async def waiter() -> None:
                nonlocal acquired_at
                taken.append(await acquire())
                acquired_at = time.perf_counter()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.002)  # the waiter is blocked by now
                released_at = time.perf_counter()
                await held.pop().release()
            held.append(taken[0])
            return Measured(acquired_at - released_at)

        try:
            yield op
        finally:
            # A cycle cancelled at the end of the slice may have released already.
            with contextlib.suppress(Exception):
                for lease in held:
                    await lease.release()
            await client.aclose()

    return setup


def _ours_handoff(client: Any, env: BenchEnv) -> Acquire:
    return Lock(client, "bench-handoff", prefix=env.prefix).acquire


def _redis_py_handoff(client: Any, env: BenchEnv) -> Acquire:
    name = _unique(env, "rp-handoff")

    async def acquire() -> Any:
        lock = _redis_py_lock(client, name)
        await lock.acquire()
        return lock

    return acquire


def _redis_py_baseline(
    group: str, concurrency: int, setup: Setup, seconds: float = SLOW_ROW_SECONDS
) -> Scenario:
    return Scenario(
        group,
        "redis-py asyncio Lock",
        concurrency,
        setup,
        baseline=True,
        unit="hand-offs",
        min_seconds=seconds,
    )


def _redis_py_client(env: BenchEnv) -> Redis:
    client: Redis = redis_py(env.url, 8)
    return client


def _ours_client(env: BenchEnv) -> Any:
    return env.client(max_connections=8)


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Uncontended, 16 waiters (empty and 1 ms critical section), one hand-off at a time."""
    uncontended = "lock uncontended c1"
    contended = f"lock contended {WAITERS} waiters"
    working = f"lock contended {WAITERS} waiters, 1 ms held"
    handoff = "lock hand-off"
    return [
        Scenario(uncontended, "redis-py asyncio Lock", 1, _redis_py_uncontended, True),
        Scenario(uncontended, "Lock async with (renewing)", 1, _ours_hold),
        Scenario(uncontended, "Lock acquire()+release()", 1, _ours_acquire(plain_client=False)),
        Scenario(uncontended, "same, no fencing counter", 1, _ours_no_fence),
        Scenario(uncontended, "Lock acquire()+release(), plain client", 1,
                 _ours_acquire(plain_client=True)),
        _redis_py_baseline(contended, WAITERS, _redis_py_contended(0.0)),
        Scenario(contended, "Lock async with", WAITERS, _ours_contended(0.0), unit="hand-offs"),
        _redis_py_baseline(working, WAITERS, _redis_py_contended(0.001), STARVED_ROW_SECONDS),
        Scenario(working, "Lock async with", WAITERS, _ours_contended(0.001), unit="hand-offs"),
        _redis_py_baseline(handoff, 1, _handoff(_redis_py_handoff, _redis_py_client)),
        Scenario(handoff, "Lock", 1, _handoff(_ours_handoff, _ours_client), unit="hand-offs"),
    ]  # fmt: skip
