"""The fault matrix: every primitive under every fault, each cell on a server of its own.

Rows are primitives (``CASES``: how to open one, run one operation, and what must hold
afterwards), columns are faults (``FAULTS``: how to inject one around that operation and
heal it). Every cell starts a private server (and, for faults on the wire, a
:class:`FaultProxy` in front of it), so killing, pausing or cutting never touches a server
another test uses. It runs on two server kinds only (``KINDS``), to keep the wall time
reasonable. In every cell the promises of the README are asserted:

1. **typed errors**: what a caller sees is a :class:`RedisPatternsError`, or the
   cancellation the test caused; never a redis-py error, an ExceptionGroup or a foreign
   builtin;
2. **bounded**: no operation outlives a deadline derived from the client's settings
   (socket, connect and pool timeouts, retries, backoff) plus slack for a loaded machine;
3. **recovery, no leaks**: once healed, the primitive works again; no pooled connection is
   left borrowed, no asyncio task is left running, no lease key outlives its TTL;
4. **streams**: every message produced is handled at least once (counted by id), the
   library's own retries never append an entry twice, an interrupted message stays
   pending and is reclaimed;
5. **pub/sub**: after a lost connection the iterator yields a :class:`Gap` and delivery
   resumes.

Each cell records what it measured (seconds per phase, the outcome under the fault) as
user properties, which ``--junitxml`` writes out; nothing is printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    GCRA,
    Broadcast,
    Cache,
    ConsumerGroup,
    ConsumerPolicy,
    Gap,
    Lock,
    LockNotAcquired,
    Message,
    PoolTimeout,
    RateLimiter,
    ReconnectPolicy,
    RedisPatternsError,
    Redlock,
    Semaphore,
    StreamMessage,
    StreamProducer,
    Subscription,
    connect,
    fenced_set,
    publish,
    subscribe,
)
from aioredispatterns._commands import dedicated, execute
from aioredispatterns.testing import FaultProxy, RedisServer, borrowed_connections

pytestmark = pytest.mark.slow

#: The server kinds the matrix runs on (the plugin parametrizes over all it finds).
KINDS = ("valkey-9.1", "redis-6.2")
#: What a loaded 2-core CI machine may add to any bound (scheduling, a slow fork).
SLACK = 2.0
#: A backstop for a whole cell, under the suite's 120 s per-test timeout.
CELL_LIMIT = 100.0
PREFIX = "fm"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The client settings of a cell; every deadline below is derived from them."""

    socket_timeout: float = 0.5
    connect_timeout: float = 0.5
    pool_timeout: float = 0.5
    retries: int = 1
    backoff_cap: float = 0.2
    max_connections: int = 8

    def connect(self, url: str) -> Redis:
        return connect_standalone(
            url,
            socket_timeout=self.socket_timeout,
            connect_timeout=self.connect_timeout,
            pool_timeout=self.pool_timeout,
            retries=self.retries,
            backoff_cap=self.backoff_cap,
            max_connections=self.max_connections,
        )

    @property
    def reconnect(self) -> float:
        """A fresh connection, worst case: every attempt's connect and handshake time out."""
        attempts = self.retries + 1
        return attempts * (self.connect_timeout + self.socket_timeout) + (
            self.retries * self.backoff_cap
        )


DEFAULT = Settings()
SMALL_POOL = Settings(max_connections=3)


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """How one measured call ended."""

    seconds: float
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def label(self) -> str:
        if self.cancelled:
            return "cancelled"
        return "ok" if self.error is None else type(self.error).__name__

    def fact(self) -> dict[str, Any]:
        return {"s": round(self.seconds, 3), "outcome": self.label}


def assert_typed(error: BaseException, what: str) -> None:
    """Promise 1: a library error, never redis-py's, a group, or a foreign builtin."""
    if isinstance(error, RedisPatternsError) and not isinstance(error, BaseExceptionGroup):
        return
    kind = f"{type(error).__module__}.{type(error).__qualname__}"
    raise AssertionError(f"{what}: untyped error {kind}: {error!r}") from error


def connect_standalone(url: str, **options: Any) -> Redis:
    """:func:`connect` for a ``redis://`` URL (typed as the standalone client it returns)."""
    client = connect(url, **options)
    assert isinstance(client, Redis)
    return client


def stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


# --------------------------------------------------------------------------- the cell


@dataclass
class Env:
    """One cell: its own server, maybe a proxy, the client under test and a side client.

    The side client goes straight to the server with a pool of its own and is never
    faulted (a paused or killed server still stops it): checks and producers use it.
    """

    server: RedisServer
    proxy: FaultProxy | None
    url: str
    client: Redis
    side: Redis
    settings: Settings
    facts: dict[str, Any] = field(default_factory=dict)
    baseline_tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def measure(
        self,
        what: str,
        call: Callable[[], Awaitable[object]],
        bound: float,
        *,
        must_succeed: bool = False,
    ) -> Outcome:
        """Run ``call`` under a deadline of ``bound + SLACK`` and check promises 1 and 2."""
        deadline = bound + SLACK
        error: BaseException | None = None
        started = time.monotonic()
        with anyio.move_on_after(deadline) as scope:
            try:
                await call()
            except Exception as exc:
                error = exc
        outcome = Outcome(time.monotonic() - started, error)
        self.facts[what] = outcome.fact()
        if scope.cancelled_caught or outcome.seconds > deadline + 0.5:
            pytest.fail(
                f"{what}: still running after {outcome.seconds:.2f} s "
                f"(deadline {deadline:.2f} s = bound {bound:.2f} s + slack {SLACK} s)"
            )
        if error is not None:
            assert_typed(error, what)
            if must_succeed:
                raise AssertionError(f"{what}: failed after healing: {error!r}") from error
        return outcome

    async def no_leaks(self, client: Redis | None = None, *, tasks: bool = True) -> None:
        """Promise 3: no connection left borrowed, no task left running (after a settle)."""
        borrowed: list[Any] = []
        extra: set[asyncio.Task[Any]] = set()
        with anyio.move_on_after(3.0):
            while True:
                borrowed = borrowed_connections(client or self.client)
                if tasks:
                    extra = {t for t in asyncio.all_tasks() if not t.done()}
                    extra -= self.baseline_tasks
                if not borrowed and not extra:
                    break
                await anyio.sleep(0.02)
        assert borrowed == [], f"connections still borrowed: {borrowed}"
        assert not extra, f"tasks left running: {[t.get_coro() for t in extra]}"

    @asynccontextmanager
    async def fresh_client(self, fresh: bool = True) -> AsyncIterator[None]:
        """Swap in a client that has not connected yet (when ``fresh``) for the block;
        after it, that client must work and hold no borrowed connection, then it is closed."""
        if not fresh:
            yield
            return
        original, client = self.client, self.settings.connect(self.url)
        self.client = client
        try:
            yield
        finally:
            self.client = original
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(self.settings.socket_timeout + SLACK):
                        assert await execute(client, "PING") is True
                    await self.no_leaks(client, tasks=False)
                finally:
                    await client.aclose()

    async def hold_free_connections(self, stack: AsyncExitStack, count: int | None) -> int:
        """Check out ``count`` connections of the client (None: every one left free)."""
        held = 0
        while count is None or held < count:
            try:
                await stack.enter_async_context(dedicated(self.client))
            except PoolTimeout:
                if count is not None:
                    raise
                break
            held += 1
        return held


@asynccontextmanager
async def cell(redis_server: RedisServer, fault: Fault) -> AsyncIterator[Env]:
    extra_args: list[str] = []
    if fault.persistent:
        # A crash then loses nothing the server acknowledged (an fsync per write).
        extra_args = ["--appendonly", "yes", "--appendfsync", "always"]
    server = RedisServer(redis_server.binary, name=f"matrix-{fault.id}", extra_args=extra_args)
    await anyio.to_thread.run_sync(server.start)
    proxy: FaultProxy | None = None
    client: Redis | None = None
    side: Redis | None = None
    try:
        if fault.proxy:
            proxy = FaultProxy(server.port).start()
        url = proxy.url if proxy else server.url
        client = fault.settings.connect(url)
        side = connect_standalone(server.url, socket_timeout=5.0, retries=5, backoff_cap=0.2)
        yield Env(server, proxy, url, client, side, fault.settings)
    finally:
        server.resume()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for opened in (client, side):
                if opened is not None:
                    await opened.aclose()
        if proxy is not None:
            proxy.stop()
        server.stop()


# --------------------------------------------------------------------------- rows


class Case:
    """One row: a primitive, its operation and what must hold after each fault.

    ``commands`` is how many commands its operation may send one after another on its
    worst failure path (cleanup included); ``extra`` the library's own waits on top
    (a lock's wait for the key, a cache's wait for a fill lease).
    """

    id: ClassVar[str]
    commands: ClassVar[int] = 1
    extra: ClassVar[float] = 0.0
    service: ClassVar[bool] = False
    #: What an operation on a pool the test holds entirely may raise.
    pool_errors: ClassVar[tuple[type[Exception], ...]] = (PoolTimeout,)

    def __init__(self, env: Env) -> None:
        self.env = env

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        yield

    async def op(self) -> None:
        raise NotImplementedError

    async def before(self, fault: Fault) -> None:
        """Called just before the fault is injected (after the warm-up)."""

    async def during(self, fault: Fault) -> None:
        """What runs while the fault is active: the operation itself by default."""
        await self.op()

    async def verify(self, fault: Fault) -> None:
        """After healing: the primitive works again."""
        await self.op()

    async def after_cancel(self) -> None:
        """Right after a cancelled operation on a healthy server."""

    async def settled(self, fault: Fault) -> None:
        """Once closed: what the server holds (keys, entries, pending)."""

    def healthy_bound(self) -> float:
        return self.commands * self.env.settings.socket_timeout + self.extra


async def assert_expires(side: Redis, keys: list[str], ttl: float) -> None:
    """Promise 3 for leases: each key is gone, or has a TTL within ``ttl`` and then goes."""
    for key in keys:
        pttl = await side.pttl(key)
        assert pttl == -2 or 0 < pttl <= ttl * 1000 + 50, f"{key}: PTTL {pttl} (ttl {ttl} s)"
    with anyio.move_on_after(ttl + 1.0):
        while await side.exists(*keys):  # noqa: ASYNC110 - server state, no event announces it
            await anyio.sleep(0.02)
    assert not await side.exists(*keys), f"{keys} outlived their TTL of {ttl} s"


class CacheCase(Case):
    """``Cache.get_or_load`` on a miss (GET, fill script), a new key each time."""

    id = "cache"
    distributed: ClassVar[bool] = False
    commands = 3  # GET, fill (and the shared GET of a waiter)
    lease_ttl: ClassVar[float] = 1.0

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.n = 0
        self.cache: Cache | None = None
        self.faulted_keys: list[str] = []

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with Cache(
            self.env.client,
            ttl=30,
            prefix=PREFIX,
            distributed=self.distributed,
            lease_ttl=self.lease_ttl,
        ) as cache:
            self.cache = cache
            yield

    async def load(self, key: str) -> Any:
        assert self.cache is not None

        async def loader() -> dict[str, str]:
            return {"key": key}

        value = await self.cache.get_or_load(key, loader)
        assert value == {"key": key}
        return value

    async def op(self) -> None:
        self.n += 1
        await self.load(f"k{self.n}")

    async def during(self, fault: Fault) -> None:
        self.n += 1
        self.faulted_keys.append(f"k{self.n}")
        await self.load(self.faulted_keys[-1])

    async def verify(self, fault: Fault) -> None:
        await self.op()  # a new key: a miss
        await self.load("k1")  # a hit (or a miss after a restart that lost it)
        slowest = 0.0
        for key in self.faulted_keys:  # the keys a fault hit load again
            started = time.monotonic()
            await self.load(key)
            slowest = max(slowest, time.monotonic() - started)
        self.env.facts["faulted_keys_again_s"] = round(slowest, 3)

    async def settled(self, fault: Fault) -> None:
        # Every entry, lease and wake-up list expires: nothing without a TTL.
        async for key in self.env.side.scan_iter(match=f"{PREFIX}:*"):
            pttl = await self.env.side.pttl(key)
            assert pttl != -1, f"{key!r} has no TTL"


class DistributedCacheCase(CacheCase):
    """``Cache(distributed=True).get_or_load``: GET, lease script, fill script."""

    id = "cache_distributed"
    distributed = True
    commands = 4  # GET, acquire lease, fill, release lease
    extra = CacheCase.lease_ttl  # a lease whose acquire reply was lost is waited out


class LockCase(Case):
    """``async with Lock(...) as lease`` whose short body is ``fenced_set(..., lease.token)``."""

    id = "lock"
    commands = 3  # acquire (or its undo), fenced_set, release
    ttl: ClassVar[float] = 1.0
    wait: ClassVar[float] = 1.5  # > ttl: a lease left by a failed undo is waited out
    extra = wait

    def manager(self) -> Lock | Redlock | Semaphore:
        return Lock(self.env.client, "L", ttl=self.ttl, timeout=self.wait, prefix=PREFIX)

    def lease_keys(self) -> list[str]:
        return [f"{PREFIX}:lock:{{L}}:owner"]

    async def op(self) -> None:
        async with self.manager() as lease:
            await self.body(lease.token)

    async def body(self, token: int) -> None:
        assert await fenced_set(self.env.client, "resource", b"v", token, prefix=PREFIX)

    async def after_cancel(self) -> None:
        # A cancelled acquire or body leaves no holder behind: the undo is shielded.
        found = await self.env.side.exists(*self.lease_keys())
        assert not found, f"a cancelled operation left {self.lease_keys()} behind"

    async def settled(self, fault: Fault) -> None:
        await assert_expires(self.env.side, self.lease_keys(), self.ttl)


class RedlockCase(LockCase):
    """``async with Redlock([client], name)`` on one server, with a short body."""

    id = "redlock"
    release_timeout: ClassVar[float] = 2.0
    # A server that cannot be asked is "unknown", no vote: no majority within timeout.
    pool_errors = (PoolTimeout, LockNotAcquired)
    extra = LockCase.wait + release_timeout

    def manager(self) -> Redlock:
        return Redlock(
            [self.env.client],
            "RL",
            ttl=self.ttl,
            timeout=self.wait,
            node_timeout=0.2,
            prefix=PREFIX,
        )

    def lease_keys(self) -> list[str]:
        return [f"{PREFIX}:lock:{{RL}}:owner"]

    async def body(self, token: int) -> None:
        await anyio.lowlevel.checkpoint()


class SemaphoreCase(LockCase):
    """``async with Semaphore(client, name, 2)`` with a short body."""

    id = "semaphore"

    def manager(self) -> Semaphore:
        return Semaphore(self.env.client, "S", 2, ttl=self.ttl, timeout=self.wait, prefix=PREFIX)

    def lease_keys(self) -> list[str]:
        return [f"{PREFIX}:semaphore:{{S}}:holders"]

    async def body(self, token: int) -> None:
        await anyio.lowlevel.checkpoint()


class RateLimitCase(Case):
    """``RateLimiter([GCRA])``.hit(identity): one script per decision."""

    id = "ratelimit"
    # Slow enough that no unit is regained during a test: consumed units count hits.
    policy = GCRA(10_000, 3600.0 * 24 * 365)

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.attempts = 0
        self.successes = 0
        self.faulted_attempt = False

    async def op(self) -> None:
        self.attempts += 1
        limiter = RateLimiter(self.env.client, self.policy, name="api", prefix=PREFIX)
        decision = await limiter.hit("user")
        assert decision.allowed
        self.successes += 1

    async def during(self, fault: Fault) -> None:
        self.faulted_attempt = True
        await self.op()

    async def settled(self, fault: Fault) -> None:
        peek = await RateLimiter(self.env.side, self.policy, name="api", prefix=PREFIX).peek("user")
        consumed = self.policy.limit - peek.remaining
        self.env.facts["units"] = {"consumed": consumed, "attempts": self.attempts}
        # The library never re-sends a decision: at most one unit per attempt.
        assert self.successes <= consumed <= self.attempts, (consumed, self.attempts)
        if fault.reply_lost and self.faulted_attempt:
            assert consumed == self.attempts, "the decision whose reply was lost did not run"


class ProducerAddCase(Case):
    """``StreamProducer.add``: one XADD per message, never re-sent."""

    id = "producer_add"
    batch: ClassVar[int] = 1  # messages per operation

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.attempted: list[int] = []
        self.acked: set[int] = set()
        self.faulted: list[int] = []

    def producer(self) -> StreamProducer:
        return StreamProducer(self.env.client, "events", prefix=PREFIX)

    async def add(self, numbers: list[int]) -> None:
        self.attempted += numbers
        await self.producer().add({"n": numbers[0]})
        self.acked.update(numbers)

    async def op(self) -> None:
        await self.add([len(self.attempted)])

    async def during(self, fault: Fault) -> None:
        start = len(self.attempted)
        self.faulted = list(range(start, start + self.batch))
        await self.add(self.faulted)

    async def settled(self, fault: Fault) -> None:
        entries: list[Any] = await self.env.side.xrange(self.producer().key) or []
        counts = Counter(int(fields[b"n"]) for _, fields in entries)
        self.env.facts["entries"] = {"xlen": len(entries), "attempted": len(self.attempted)}
        twice = sorted(n for n, count in counts.items() if count > 1)
        assert not twice, f"appended more than once: {twice}"
        lost = sorted(self.acked - set(counts))
        assert not lost, f"acknowledged by the server but missing: {lost}"
        assert set(counts) <= set(self.attempted)
        if fault.reply_lost and self.faulted:
            # The reply was lost, the append was not: exactly one entry each.
            missing = [n for n in self.faulted if counts[n] != 1]
            assert not missing, f"entries whose reply was lost: counts {counts}"


class ProducerAddManyCase(ProducerAddCase):
    """``StreamProducer.add_many``: one pipelined batch, never re-sent."""

    id = "producer_add_many"
    batch = 5

    async def add(self, numbers: list[int]) -> None:
        self.attempted += numbers
        ids = await self.producer().add_many({"n": n} for n in numbers)
        assert len(ids) == len(numbers)
        self.acked.update(numbers)

    async def op(self) -> None:
        start = len(self.attempted)
        await self.add(list(range(start, start + self.batch)))


class PipelineCase(Case):
    """The auto-pipeline itself: ``execute(client, "INCR", key)``."""

    id = "pipeline"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.attempts = 0
        self.successes = 0
        self.faulted_attempt = False

    async def op(self) -> None:
        self.attempts += 1
        value = await execute(self.env.client, "INCR", "counter")
        assert isinstance(value, int)
        self.successes += 1

    async def during(self, fault: Fault) -> None:
        self.faulted_attempt = True
        await self.op()

    async def settled(self, fault: Fault) -> None:
        value = int(await self.env.side.get("counter") or 0)
        self.env.facts["counter"] = {"value": value, "attempts": self.attempts}
        assert self.successes <= value <= self.attempts, "an INCR ran more often than it was sent"
        if fault.reply_lost and self.faulted_attempt:
            assert value == self.attempts, "the INCR whose reply was lost did not run"


# --------------------------------------------------------------------------- rows: services


class SubscribeCase(Case):
    """``subscribe()`` with the default ReconnectPolicy, iterated while the fault hits."""

    id = "subscribe"
    service = True
    policy = ReconnectPolicy()

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.channel = "news"
        self.messages: Subscription | None = None
        self.gaps: list[Gap] = []
        self.marker = 0

    def subscription(self) -> AbstractAsyncContextManager[Subscription]:
        return subscribe(self.env.client, self.channel)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with self.subscription() as messages:
            self.messages = messages
            try:
                yield
            finally:
                self.messages = None

    async def publish(self, client: Redis | None = None) -> dict[str, int]:
        self.marker += 1
        payload = {"m": self.marker}
        await publish(client or self.env.client, self.channel, payload)
        return payload

    async def receive(self, until: Callable[[Message | Gap], bool], bound: float) -> None:
        """Iterate until ``until(item)``; Gaps seen on the way are kept."""
        assert self.messages is not None
        with anyio.move_on_after(bound) as scope:
            async for item in self.messages:
                if isinstance(item, Gap):
                    self.gaps.append(item)
                if until(item):
                    return
        if scope.cancelled_caught:
            pytest.fail(f"{self.id}: nothing expected arrived within {bound:.1f} s")

    async def round_trip(self, client: Redis | None = None) -> None:
        payload = await self.publish(client)
        await self.receive(lambda item: isinstance(item, Message) and item.payload == payload, 5.0)

    async def op(self) -> None:
        await self.round_trip()

    def healthy_bound(self) -> float:
        return 5.0

    def reconnect_bound(self) -> float:
        # Noticing the loss is immediate (EOF); then one backoff (at most max_delay) and
        # one attempt (connect and confirm) once the server is back.
        settings = self.env.settings
        return self.policy.max_delay + settings.connect_timeout + settings.socket_timeout

    async def during(self, fault: Fault) -> None:
        if fault.id == "pool_exhausted":
            await self.during_pool_exhausted()
            return
        if fault.id != "kill_restart":
            # Through the faulted client: typed error or success (a pause: a timeout).
            try:
                await self.publish()
            except RedisPatternsError as exc:
                self.env.facts["publish_under_fault"] = type(exc).__name__
        if fault.loses_connections:
            started = time.monotonic()
            await self.receive(lambda item: isinstance(item, Gap), self.reconnect_bound())
            self.env.facts["gap"] = {
                "after_s": round(time.monotonic() - started, 3),
                "duration_s": round(self.gaps[-1].duration, 3),
                "attempts": self.gaps[-1].attempts,
            }

    async def during_pool_exhausted(self) -> None:
        # The running subscription holds its connection: delivery goes on (published by
        # the side client) ...
        await self.round_trip(self.env.side)

        # ... while a new one cannot get a connection: PoolTimeout within pool_timeout.
        async def enter() -> None:
            async with self.second_entry():
                pass

        outcome = await self.env.measure("second_entry", enter, self.env.settings.pool_timeout)
        assert isinstance(outcome.error, PoolTimeout), f"entering on an exhausted pool: {outcome}"

    def second_entry(self) -> AbstractAsyncContextManager[object]:
        return subscribe(self.env.client, "other")

    async def verify(self, fault: Fault) -> None:
        await self.round_trip()
        if fault.loses_connections:
            assert self.gaps, "the connection was lost but the iterator yielded no Gap"

    async def after_cancel(self) -> None:
        # Leaving (even by cancellation) ends the subscription on the server.
        with anyio.move_on_after(3.0):
            while await self.numsub():  # noqa: ASYNC110 - server state
                await anyio.sleep(0.01)
        assert await self.numsub() == 0, "a cancelled subscription is still subscribed"

    async def numsub(self) -> int:
        ((_, count),) = await self.env.side.pubsub_numsub(self.channel)
        return int(count)


class BroadcastCase(SubscribeCase):
    """``Broadcast`` with one local subscriber, iterated while the fault hits."""

    id = "broadcast"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.hub: Broadcast | None = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with Broadcast(self.env.client) as hub, hub.subscribe(self.channel) as messages:
            self.hub, self.messages = hub, messages
            try:
                yield
            finally:
                self.hub = self.messages = None

    def second_entry(self) -> AbstractAsyncContextManager[object]:
        return Broadcast(self.env.client)

    async def during_pool_exhausted(self) -> None:
        await super().during_pool_exhausted()
        # Another local subscriber shares the hub's connection: no pool needed.
        assert self.hub is not None
        async with self.hub.subscribe("local"):
            pass


class ConsumerGroupCase(Case):
    """``ConsumerGroup`` in handler mode, running while the fault hits; messages are
    produced (by the side client) before the fault and after healing."""

    id = "consumer_group"
    service = True
    policy = ConsumerPolicy(
        concurrency=4,
        batch_size=10,
        block=0.2,
        claim_idle=0.5,
        claim_interval=0.25,
        drain_timeout=1.0,
        ack_timeout=1.0,
        consumer_idle=None,
    )

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.handled: Counter[str] = Counter()
        self.produced: list[str] = []
        self.group: ConsumerGroup | None = None
        self.key = f"{PREFIX}:stream:{{jobs}}"

    async def handle(self, message: StreamMessage) -> None:
        await anyio.sleep(0.005)
        self.handled[message.id] += 1

    def make_group(self) -> ConsumerGroup:
        return ConsumerGroup(
            self.env.client,
            "jobs",
            "g",
            handler=self.handle,
            consumer="c1",
            policy=self.policy,
            prefix=PREFIX,
        )

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        async with self.make_group() as group:
            self.group = group
            try:
                yield
            finally:
                stats = dataclasses.asdict(group.stats)
                self.env.facts.setdefault("stats", []).append({k: v for k, v in stats.items() if v})
                self.group = None

    async def produce(self, count: int) -> None:
        # Through the library (the side client is never faulted): a cancelled round may
        # interrupt this too, and redis-py's own calls may swallow a native cancellation.
        producer = StreamProducer(self.env.side, "jobs", prefix=PREFIX)
        first = len(self.produced)
        self.produced += await producer.add_many({"n": first + i} for i in range(count))

    def all_bound(self) -> float:
        # A read cut short is noticed within block + socket_timeout (+1 s); its messages
        # are reclaimed once idle for claim_idle, on a scan every claim_interval; the
        # loops back off at most 1 s between attempts.
        policy, settings = self.policy, self.env.settings
        read = policy.block + settings.socket_timeout + 1.0
        return read + policy.claim_idle + policy.reclaim_every + 1.0 + settings.reconnect

    async def all_handled(self) -> None:
        with anyio.move_on_after(self.all_bound() + SLACK):
            while not set(self.produced) <= set(self.handled):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        missing = sorted(set(self.produced) - set(self.handled), key=stream_id)
        assert not missing, f"{len(missing)} produced messages never handled: {missing[:5]}"

    async def op(self) -> None:
        await self.produce(1)
        await self.all_handled()

    async def before(self, fault: Fault) -> None:
        if fault.stops_server:
            await self.produce(20)  # in flight when the server dies or stops

    async def during(self, fault: Fault) -> None:
        if not fault.stops_server:
            await self.produce(20)  # read through the fault
        with anyio.move_on_after(fault.hold):
            while not fault.bitten(self.env):  # noqa: ASYNC110 - the proxy's counters
                await anyio.sleep(0.01)

    async def nothing_pending(self) -> None:
        """Wait (bounded) until the group has no pending entry: the reclaim loop took over
        what cancelled runs left (``settled`` then asserts it)."""
        with anyio.move_on_after(self.all_bound() + SLACK):
            while (await self.env.side.xpending(self.key, "g"))["pending"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)

    def healthy_bound(self) -> float:
        return self.all_bound()

    async def verify(self, fault: Fault) -> None:
        await self.produce(10)
        await self.all_handled()

    async def settled(self, fault: Fault) -> None:
        self.env.facts["handled"] = {
            "produced": len(self.produced),
            "deliveries": sum(self.handled.values()),
        }
        pending = await self.env.side.xpending(self.key, "g")
        assert pending["pending"] == 0, f"left pending after a clean exit: {pending}"

    def min_pause(self) -> float:
        # Long enough that the blocked read times out too, not only the short commands.
        return self.policy.block + self.env.settings.socket_timeout + 1.0 + 0.3

    async def acked_unhandled(self) -> list[str]:
        """Ids the group acknowledged without a handler finishing them (must be none)."""
        groups: list[Any] = await self.env.side.xinfo_groups(self.key)
        if not groups:
            return []
        last = stream_id(bytes(groups[0]["last-delivered-id"]).decode())
        pending: list[Any] = await self.env.side.xpending_range(self.key, "g", "-", "+", 10_000)
        pending_ids = {bytes(entry["message_id"]).decode() for entry in pending}
        return [
            entry_id
            for entry_id in self.produced
            if stream_id(entry_id) <= last
            and entry_id not in pending_ids
            and entry_id not in self.handled
        ]


CASES: list[type[Case]] = [
    CacheCase,
    DistributedCacheCase,
    LockCase,
    RedlockCase,
    SemaphoreCase,
    RateLimitCase,
    ProducerAddCase,
    ProducerAddManyCase,
    ConsumerGroupCase,
    SubscribeCase,
    BroadcastCase,
    PipelineCase,
]


# --------------------------------------------------------------------------- columns


class Fault:
    """One column: inject a fault around a case's operation, heal it, check recovery."""

    id: ClassVar[str]
    settings: ClassVar[Settings] = DEFAULT
    proxy: ClassVar[bool] = False
    persistent: ClassVar[bool] = False
    #: A subscribed connection is lost: pub/sub must report a Gap.
    loses_connections: ClassVar[bool] = False
    #: The faulted command surely ran on the server: only its reply was lost.
    reply_lost: ClassVar[bool] = False
    #: The server is stopped or dead: the side client cannot produce meanwhile either.
    stops_server: ClassVar[bool] = False
    #: How long a service is left under the fault.
    hold: ClassVar[float] = 0.5

    def bound(self, case: Case) -> float:
        """How long the case's operation may take under this fault (before slack)."""
        raise NotImplementedError

    def bitten(self, env: Env) -> bool:
        """Whether a service under this fault has felt it yet."""
        return True

    async def run(self, env: Env, case: Case) -> None:
        async with case.open():
            await env.measure("warm", case.op, case.healthy_bound(), must_succeed=True)
            await case.before(self)
            await self.inject(env, case)
            await env.measure(
                "verify", lambda: case.verify(self), self.verify_bound(case), must_succeed=True
            )

    async def inject(self, env: Env, case: Case) -> None:
        raise NotImplementedError

    def verify_bound(self, case: Case) -> float:
        if isinstance(case, ConsumerGroupCase):
            return case.all_bound()
        if isinstance(case, SubscribeCase):
            return 5.0
        # Waits the fault may have left behind (an orphaned lease) are in ``extra``.
        return case.healthy_bound() + case.env.settings.reconnect


class KillRestart(Fault):
    """SIGKILL the server, then start it again on the same port (AOF: nothing it
    acknowledged is lost). A call runs while it is down; a service rides over it."""

    id = "kill_restart"
    persistent = True
    stops_server = True
    loses_connections = True

    def bound(self, case: Case) -> float:
        # Connection refused at once: each command's connect is retried after a backoff.
        s = case.env.settings
        return case.commands * (s.retries * s.backoff_cap + s.connect_timeout) + case.extra

    async def inject(self, env: Env, case: Case) -> None:
        env.server.kill()
        if case.service:
            started = time.monotonic()
            await anyio.to_thread.run_sync(env.server.restart)
            env.facts["down_s"] = round(time.monotonic() - started, 3)
            bound = case.reconnect_bound() if isinstance(case, SubscribeCase) else self.hold
            await env.measure("fault", lambda: case.during(self), bound)
            return
        outcome = await env.measure("fault", lambda: case.during(self), self.bound(case))
        assert outcome.error is not None, "an operation succeeded on a dead server"
        await anyio.to_thread.run_sync(env.server.restart)


class Pause(Fault):
    """SIGSTOP the server for longer than socket_timeout (the kernel still accepts
    connections and buffers commands, which run on SIGCONT)."""

    id = "pause"
    stops_server = True

    def bound(self, case: Case) -> float:
        # Each command: its reply times out; a fresh connection's handshake too.
        s = case.env.settings
        per_command = (s.retries + 2) * s.socket_timeout + s.retries * s.backoff_cap
        return case.commands * per_command + case.extra

    def pause_for(self, case: Case) -> float:
        seconds = 1.6 * case.env.settings.socket_timeout
        if isinstance(case, ConsumerGroupCase):
            seconds = max(seconds, case.min_pause())
        return seconds

    async def inject(self, env: Env, case: Case) -> None:
        seconds = self.pause_for(case)
        env.facts["paused_s"] = seconds
        env.facts["socket_timeout"] = env.settings.socket_timeout
        started = time.monotonic()
        with env.server.paused(seconds):  # a timer resumes it even while the call runs
            await env.measure("fault", lambda: case.during(self), self.bound(case))
            # Keep it stopped for the whole pause, however early the call gave up.
            await anyio.sleep(max(0.0, started + seconds - time.monotonic()))


class DropReply(Fault):
    """FaultProxy.drop_replies(1): the next reply never arrives (the command ran)."""

    id = "drop_reply"
    proxy = True
    reply_lost = True
    hold = 3.0

    def bound(self, case: Case) -> float:
        # One reply is lost (socket_timeout); the commands after it take a fresh
        # connection, which may need a backoff.
        s = case.env.settings
        return s.socket_timeout + case.commands * s.retries * s.backoff_cap + case.extra

    def bitten(self, env: Env) -> bool:
        return env.proxy is not None and env.proxy.dropped_replies >= 1

    async def inject(self, env: Env, case: Case) -> None:
        assert env.proxy is not None
        env.proxy.drop_replies(1)
        try:
            await env.measure("fault", lambda: case.during(self), self.bound(case))
        finally:
            env.facts["dropped"] = env.proxy.dropped_replies
            env.proxy.heal()
        # The operation's first reply is the next one on any connection: it was lost.
        assert env.proxy.dropped_replies == 1, "the fault never hit"


class CutMidReply(Fault):
    """FaultProxy.cut_after_bytes(n): every connection cut n bytes into the replies, for
    a spread of n (inside the first reply, inside a later one); healed after each."""

    id = "cut_mid_reply"
    proxy = True
    loses_connections = True
    cuts = (1, 3, 7, 20, 60)

    def bound(self, case: Case) -> float:
        # EOF at once; each later command takes a fresh connection (maybe after a backoff).
        s = case.env.settings
        return case.commands * s.retries * s.backoff_cap + case.extra

    def bitten(self, env: Env) -> bool:
        # The cut has happened once the client had to connect again.
        return env.proxy is not None and env.proxy.connections > env.facts["connections_before"]

    async def inject(self, env: Env, case: Case) -> None:
        assert env.proxy is not None
        cuts = (self.cuts[1],) if case.service else self.cuts
        results = []
        for n in cuts:
            env.facts["connections_before"] = env.proxy.connections
            env.proxy.cut_after_bytes(n)
            try:
                outcome = await env.measure("fault", lambda: case.during(self), self.bound(case))
            finally:
                env.proxy.heal()
            results.append({"n": n, **outcome.fact()})
            if not case.service:  # works again after each cut
                await env.measure("after_cut", case.op, self.verify_bound(case), must_succeed=True)
        env.facts["fault"] = results


class PoolExhausted(Fault):
    """A pool of 3 whose connections the test checks out (``dedicated()`` contexts held
    open): every one of a fresh client (cold), then every one left free once the
    auto-pipeline keeps its own (warm). A service runs while the free ones are held."""

    id = "pool_exhausted"
    settings = SMALL_POOL
    hold = 1.0

    def bound(self, case: Case) -> float:
        s = case.env.settings
        return case.commands * s.pool_timeout + case.extra

    async def run(self, env: Env, case: Case) -> None:
        if isinstance(case, ConsumerGroupCase):
            await self.run_group(env, case)
            return
        if case.service:
            await super().run(env, case)
            return
        # Cold: nothing of the client is connected yet, and the test holds it all.
        async with AsyncExitStack() as stack:
            await env.hold_free_connections(stack, env.settings.max_connections)
            async with case.open():
                outcome = await env.measure("fault", lambda: case.during(self), self.bound(case))
                assert isinstance(outcome.error, case.pool_errors), outcome
                await stack.aclose()
                await env.measure(
                    "verify", lambda: case.verify(self), self.verify_bound(case), must_succeed=True
                )
                # Warm: the auto-pipeline keeps a connection; the test holds the rest.
                held = await env.hold_free_connections(stack, None)
                env.facts["held_warm"] = held
                await env.measure("fault_warm", case.op, self.bound(case))
                await stack.aclose()
                await env.measure("after", case.op, case.healthy_bound(), must_succeed=True)

    async def run_group(self, env: Env, case: ConsumerGroupCase) -> None:
        # A running group gives its read connection back after every read and takes it
        # again at once: the test cannot win it. So the group starts on a client whose
        # auto-pipeline keeps its connection and whose other connections the test holds,
        # runs so (every read waits pool_timeout, then backs off) while messages come
        # in, and the test lets go while it runs.
        async with case.open():
            await env.measure("warm", case.op, case.healthy_bound(), must_succeed=True)
        async with AsyncExitStack() as stack:
            env.facts["held"] = await env.hold_free_connections(stack, None)
            async with case.open():
                await env.measure("fault", lambda: case.during(self), self.hold + SLACK)
                await anyio.sleep(self.hold)
                await stack.aclose()
                await env.measure(
                    "verify", lambda: case.verify(self), self.verify_bound(case), must_succeed=True
                )

    async def inject(self, env: Env, case: Case) -> None:
        # A service: it runs while every connection it does not hold is checked out.
        async with AsyncExitStack() as stack:
            env.facts["held"] = await env.hold_free_connections(stack, None)
            await env.measure("fault", lambda: case.during(self), self.hold + SLACK)
            await anyio.sleep(max(0.0, self.hold - env.facts["fault"]["s"]))


class CancelScopes(Fault):
    """``anyio.move_on_after(d)`` around the operation, for 25 values of d from 0 to twice
    what the operation takes when healthy (a service: around opening and running it)."""

    id = "cancel_scope"
    rounds = 25

    def bound(self, case: Case) -> float:
        # A cancelled writer or reader finishes its batch first (bounded by
        # socket_timeout); shielded cleanup (an undo, a release, a drain) comes on top.
        return case.env.settings.socket_timeout + case.healthy_bound()

    @staticmethod
    def target(case: Case, *, forever: bool, cold: bool) -> Callable[[], Awaitable[None]]:
        """The operation; opening the case around it where cold (a client that has not
        connected yet) or a service (then one round trip, then running on)."""
        if not case.service and not cold:
            return case.op

        async def call() -> None:
            async with case.open():
                await case.op()
                if forever and case.service:
                    await anyio.sleep_forever()

        return call

    @staticmethod
    async def calibrate(
        env: Env, call: Callable[[], Awaitable[None]], *, cold: bool
    ) -> tuple[float, int]:
        """Seconds and event-loop iterations one healthy run takes (second of two runs)."""
        seconds, steps = 0.0, 0
        for _ in range(2):
            async with env.fresh_client(cold):
                started = time.monotonic()
                task = asyncio.get_running_loop().create_task(_run(call))
                steps = 0
                while not task.done():
                    await asyncio.sleep(0)
                    steps += 1
                task.result()
                seconds = time.monotonic() - started
        return seconds, steps

    async def run(self, env: Env, case: Case) -> None:
        if isinstance(case, ConsumerGroupCase):
            await case.produce(40)
        # Warm: the client is connected (and a call-shaped case open) before each round.
        # Cold: each round gets a client that has not connected yet, so the round also
        # opens the case and connects, with the handshake.
        for temperature in ("warm", "cold"):
            cold = temperature == "cold"
            async with AsyncExitStack() as stack:
                if not case.service and not cold:
                    await stack.enter_async_context(case.open())
                    await env.measure("warm", case.op, case.healthy_bound(), must_succeed=True)
                once = self.target(case, forever=False, cold=cold)
                seconds, steps = await self.calibrate(env, once, cold=cold)
                outcomes: Counter[str] = Counter()
                slowest = 0.0
                for point in self.points(env, seconds, steps):
                    async with env.fresh_client(cold):
                        call = self.target(case, forever=True, cold=cold)
                        outcome = await self.cancel_at(env, call, point, self.bound(case) + SLACK)
                        outcomes[outcome.label] += 1
                        slowest = max(slowest, outcome.seconds)
                        await case.after_cancel()
                env.facts[temperature] = {
                    "healthy_s": round(seconds, 4),
                    "loop_iterations": steps,
                    **outcomes,
                    "slowest_s": round(slowest, 4),
                }
        await self.after(env, case)

    def points(self, env: Env, seconds: float, steps: int) -> list[float]:
        span = max(2 * seconds, 0.0005)
        return [span * i / (self.rounds - 1) for i in range(self.rounds)]

    async def cancel_at(
        self, env: Env, call: Callable[[], Awaitable[None]], delay: float, limit: float
    ) -> Outcome:
        started = time.monotonic()
        error: Exception | None = None
        with anyio.move_on_after(delay + limit) as outer:
            with anyio.move_on_after(delay) as scope:
                try:
                    await call()
                except Exception as exc:
                    error = exc
        seconds = time.monotonic() - started
        if outer.cancelled_caught:
            pytest.fail(f"d={delay * 1000:.2f} ms: still running {limit:.2f} s after d")
        if error is not None:
            raise AssertionError(f"d={delay * 1000:.2f} ms: no fault, yet {error!r}") from error
        return Outcome(seconds - delay, cancelled=scope.cancelled_caught)

    async def after(self, env: Env, case: Case) -> None:
        if isinstance(case, ConsumerGroupCase):
            unhandled = await case.acked_unhandled()
            assert not unhandled, f"acknowledged but never handled: {unhandled}"
            # Whatever the cancelled runs left pending is reclaimed and handled now. Its
            # ids may all count as handled already (a run cancelled between handling and
            # acknowledging), so wait for the reclaim itself too: nothing left pending.
            async with case.open():
                await env.measure("verify", case.all_handled, case.all_bound(), must_succeed=True)
                await case.nothing_pending()
            return
        async with case.open():
            await env.measure("verify", case.op, case.healthy_bound(), must_succeed=True)


async def _run(call: Callable[[], Awaitable[None]]) -> None:
    await call()


class CancelTasks(CancelScopes):
    """Native ``Task.cancel()`` after k event-loop iterations, k spread over the whole
    healthy run (a service: its start, first round trip and running on). A cancel
    request the task does not end with (``Task.cancel()`` returned True, yet the task
    completed or runs on) is a swallowed cancellation."""

    id = "cancel_task"
    rounds = 24

    def points(self, env: Env, seconds: float, steps: int) -> list[float]:
        # Half spread evenly, half geometrically (dense at the start: entering a service
        # takes a few iterations, running it thousands).
        last = max(2, int(steps * 1.25))
        n = self.rounds // 2
        even = {round(last * i / (n - 1)) for i in range(n)}
        dense = {round((last + 1) ** (i / (n - 1))) - 1 for i in range(n)}
        return sorted(even | dense)

    async def cancel_at(
        self, env: Env, call: Callable[[], Awaitable[None]], delay: float, limit: float
    ) -> Outcome:
        started = time.monotonic()
        task = asyncio.get_running_loop().create_task(_run(call))
        for _ in range(int(delay)):
            await asyncio.sleep(0)
        where = _suspended_at(task)
        requested = task.cancel()
        done, _ = await asyncio.wait({task}, timeout=limit)
        seconds = time.monotonic() - started
        if not done:
            task.cancel()  # clean up whatever it is stuck in
            await asyncio.wait({task}, timeout=5.0)
            pytest.fail(
                f"k={int(delay)}: Task.cancel() was swallowed, the task still runs "
                f"{limit:.1f} s later; it was cancelled while suspended at:\n  "
                + "\n  ".join(where)
            )
        if task.cancelled():
            return Outcome(seconds, cancelled=True)
        error = task.exception()
        if error is not None:
            raise AssertionError(f"k={int(delay)}: no fault, yet {error!r}") from error
        if requested:
            pytest.fail(
                f"k={int(delay)}: Task.cancel() was swallowed, the task completed normally; "
                "it was cancelled while suspended at:\n  " + "\n  ".join(where)
            )
        return Outcome(seconds)


def _suspended_at(task: asyncio.Task[Any]) -> list[str]:
    """Where ``task`` is suspended, innermost last (through async generators too)."""
    lines: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(lines) < 60:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            path = frame.f_code.co_filename.split("site-packages/")[-1]
            lines.append(f"{path}:{frame.f_lineno} {frame.f_code.co_name}")
        following = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        if type(following).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # No public link from an asend object to its generator.
            referents = gc.get_referents(following)
            following = next((r for r in referents if inspect.isasyncgen(r)), None)
        awaited = following
    return lines


FAULTS: list[Fault] = [
    KillRestart(),
    Pause(),
    DropReply(),
    CutMidReply(),
    PoolExhausted(),
    CancelScopes(),
    CancelTasks(),
]


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("fault", [pytest.param(f, id=f.id) for f in FAULTS])
@pytest.mark.parametrize("case_type", [pytest.param(c, id=c.id) for c in CASES])
async def test_fault_matrix(
    redis_server: RedisServer, case_type: type[Case], fault: Fault, request: pytest.FixtureRequest
) -> None:
    if not redis_server.owned:
        pytest.skip("kills, pauses and proxies servers: needs servers this suite starts")
    if redis_server.name not in KINDS:
        pytest.skip(f"the fault matrix runs on {', '.join(KINDS)} only")
    async with cell(redis_server, fault) as env:
        env.baseline_tasks = set(asyncio.all_tasks())
        case = case_type(env)
        try:
            with anyio.fail_after(CELL_LIMIT):
                await fault.run(env, case)
                await env.no_leaks()
                await case.settled(fault)
        finally:
            request.node.user_properties.append(("matrix", json.dumps(env.facts)))
