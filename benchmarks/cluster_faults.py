"""The cluster fault table (issue 13): every primitive under a primary kill, a live slot
migration and a paused primary (not a throughput scenario: the runner skips it).

    .venv/bin/python benchmarks/cluster_faults.py [--kind valkey-9.1] [--socket-timeout 1.0]
        [--markdown FILE] [--only cache,lock,...] [--faults kill,migrate,pause]

It starts a 3-primary + 3-replica cluster (cluster-node-timeout 2 s, a fresh one per fault
kind; every node stopped by pid) and, for each primitive x fault, runs the primitive's
workload with 8 concurrent callers (each call under ``anyio.move_on_after``), plus 4
control callers on keys of a *healthy* primary, injects the fault into the node serving the
primitive, keeps going until the primitive works again (plus 1 s), and prints one row:

* **kill**: SIGKILL of the primitive's primary until its replica is promoted
  (``ClusterServers.kill_primary``); "works again" counts from the promotion.
* **migrate**: the primitive's slot moved to another primary while the callers run, 400
  filler keys in 20-key steps 0.1 s apart (the ASK window stays open ~2 s); "works again"
  counts from the end of the migration.
* **pause**: the primitive's primary SIGSTOPped for 2 x socket_timeout; "works again"
  counts from the resume.

Columns: errors the callers saw by type (goal: every one a ``RedisPatternsError``; any other
is counted as *foreign* and shown in the details), errors and missed deadlines on the
control keys (goal 0), when the primitive works again (goal: node timeout + 1 s), the
primitive's own invariants (pub/sub: Gap reported and delivery resumed, no silent loss;
streams: the ConsumerGroup never exits and no acknowledged XADD goes unhandled; lock:
fencing tokens strictly increasing), the slowest call past its deadline (goal <= 50 ms)
and how long cancelled callers took to return (goal <= socket_timeout). A cell that misses
its goal ends with a cross. The event loop's worst lag is printed per row: an overrun no
larger than it is the machine, not the library.
"""

from __future__ import annotations

import abc
import argparse
import collections
import contextlib
import itertools
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import redis

import aioredispatterns as arp
from aioredispatterns.testing import (
    ClusterServers,
    RedisServer,
    find_server_binary,
    start_cluster,
)

CALLERS = 8
CONTROL_CALLERS = 4
WARMUP = 1.0
# How long a primitive may take to work again before the row says "never".
RECOVERY_LIMIT = 20.0
LINGER = 1.0
OVERRUN_GOAL = 0.050
FILLER_KEYS = 400
MIGRATION_BATCH = 20
MIGRATION_STEP_DELAY = 0.1
PAUSE_FACTOR = 2.0
PUBSUB_POLICY = arp.ReconnectPolicy(initial_delay=0.05, max_delay=1.0)
MISS = " ✗"
FAULTS = ("kill", "migrate", "pause")


# ------------------------------------------------------------------------------ calls


@dataclass(frozen=True, slots=True)
class Call:
    """One caller's operation: when it ran, its deadline and how it ended."""

    started: float
    ended: float
    deadline: float
    outcome: str  # "ok", "deadline" (the caller's move_on_after fired), or an error type
    cancelled: bool  # the caller's deadline passed while the call ran
    foreign: bool  # raised something that is not a RedisPatternsError

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class CallLog:
    """Every call of one group of callers (the primitive's, or the control's)."""

    calls: list[Call] = field(default_factory=list)
    foreign_examples: list[str] = field(default_factory=list)
    # The first error of each type, with its cause: what the details print.
    examples: dict[str, str] = field(default_factory=dict)

    async def timed(self, deadline: float, operation: Callable[[], Awaitable[object]]) -> bool:
        """Run ``operation`` under ``move_on_after(deadline)``; record and return success."""
        started = time.monotonic()
        outcome = "ok"
        foreign = False
        with anyio.move_on_after(deadline) as scope:
            try:
                await operation()
            except arp.RedisPatternsError as exc:
                outcome = type(exc).__name__
                self._example(outcome, exc)
            except Exception as exc:  # what the table exists to catch: counted loudly
                outcome = type(exc).__name__
                foreign = True
                self._example(outcome, exc)
                if len(self.foreign_examples) < 5:
                    self.foreign_examples.append(repr(exc)[:240])
        ended = time.monotonic()
        if scope.cancelled_caught and outcome == "ok":
            outcome = "deadline"
        cancelled = scope.cancel_called
        self.calls.append(Call(started, ended, deadline, outcome, cancelled, foreign))
        return outcome == "ok"

    def _example(self, outcome: str, exc: Exception) -> None:
        if outcome not in self.examples:
            cause = f" from {exc.__cause__!r}" if exc.__cause__ is not None else ""
            self.examples[outcome] = f"{exc!r}{cause}"[:200]

    def ok_after(self, moment: float) -> bool:
        """Whether a call that started after ``moment`` succeeded."""
        return any(call.ok and call.started >= moment for call in self.calls)

    def last_failure(self, since: float) -> float:
        """When the last failed call that ended after ``since`` ended (``since`` if none)."""
        return max((c.ended for c in self.calls if not c.ok and c.ended >= since), default=since)


class Flag:
    """A switch the caller loops poll between calls."""

    def __init__(self) -> None:
        self.on = True


async def _caller_loop(
    log: CallLog,
    operation: Callable[[int], Awaitable[object]],
    index: int,
    deadline: float,
    running: Flag,
) -> None:
    while running.on:
        ok = await log.timed(deadline, lambda: operation(index))
        # Paced, so 8 callers x 7 rows leave CPU for six servers on a small machine.
        await anyio.sleep(0.01 if ok else 0.05)


async def _watch_loop_lag(running: Flag, worst: list[float]) -> None:
    while running.on:
        began = time.monotonic()
        await anyio.sleep(0.01)
        worst[0] = max(worst[0], time.monotonic() - began - 0.01)


# ------------------------------------------------------------------------------ slots


def _slot(tag: str) -> int:
    return ClusterServers.slot_of("{" + tag + "}")


def tags_in_slot(stem: str, slot: int, count: int) -> list[str]:
    """``count`` hash-tag contents (``<stem>-<n>``) whose slot is ``slot``."""
    found: list[str] = []
    number = 0
    while len(found) < count:
        candidate = f"{stem}-{number}"
        if _slot(candidate) == slot:
            found.append(candidate)
        number += 1
    return found


def tag_on_node(cluster: ClusterServers, make: Callable[[int], str], node: RedisServer) -> int:
    """The first ``n`` for which the tag ``make(n)`` lives on ``node``."""
    number = 0
    while cluster.owner_of_slot(_slot(make(number))).port != node.port:
        number += 1
    return number


def write_fillers(node: RedisServer, tag: str) -> None:
    """Keys in ``tag``'s slot, written on its owner, so a migration of it takes a while."""
    with redis.Redis(port=node.port, socket_timeout=10) as direct:
        pipe = direct.pipeline(transaction=False)
        for number in range(FILLER_KEYS):
            pipe.set(f"{{{tag}}}:filler:{number}", "x" * 64)
        pipe.execute()


def subscriber_node(cluster: ClusterServers, channel: str) -> RedisServer:
    """The primary holding a plain subscription to ``channel``."""
    for node in cluster.primaries():
        with redis.Redis(port=node.port, socket_timeout=5) as direct:
            if dict(direct.pubsub_numsub(channel)).get(channel.encode(), 0) > 0:
                return node
    raise RuntimeError(f"no primary has a subscriber of {channel!r}")


# ------------------------------------------------------------------------------ workloads


class Workload(abc.ABC):
    """One primitive under test: its resources, one caller operation, its invariants."""

    title: str
    # The hash-tag content that decides the primitive's slot (None: it has no slot).
    tag: str | None

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        self.client = client
        self.stem = stem
        self.socket_timeout = socket_timeout
        self.deadline = socket_timeout

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The primitive's resources for the whole scenario (a cache, a group ...)."""
        yield

    @abc.abstractmethod
    async def call(self, caller: int) -> None:
        """One operation of caller ``caller`` (the scenario adds the deadline)."""

    async def victim(self, cluster: ClusterServers) -> RedisServer:
        """The primary serving the primitive."""
        assert self.tag is not None
        return await anyio.to_thread.run_sync(cluster.owner_of_slot, _slot(self.tag))

    def delivered_after(self, moment: float) -> bool:
        """Beyond a successful call: the primitive's output flows again (pub/sub)."""
        return True

    async def finish(self, cluster: ClusterServers) -> None:  # noqa: B027 - optional hook
        """After the callers stopped, before the resources close (streams: drain)."""

    def cells(self) -> tuple[str, bool]:
        """The primitive's own invariants for the table, and whether they hold."""
        return "", True

    def details(self) -> list[str]:
        return []


class CacheWorkload(Workload):
    title = "Cache.get_or_load"

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        super().__init__(client, stem, socket_timeout)
        self.keys = tags_in_slot(stem, _slot(f"{stem}-0"), CALLERS)
        self.tag = self.keys[0]
        self.cache: arp.Cache[Any] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        # A short TTL: entries expire during the scenario, so loads and fills happen too.
        async with arp.Cache(self.client, ttl=1.0, jitter=0.0) as cache:
            self.cache = cache
            yield

    async def call(self, caller: int) -> None:
        assert self.cache is not None

        async def load() -> dict[str, int]:
            await anyio.sleep(0.005)
            return {"caller": caller}

        await self.cache.get_or_load(self.keys[caller % len(self.keys)], load)

    def details(self) -> list[str]:
        assert self.cache is not None
        s = self.cache.stats
        return [
            f"cache stats: hits {s.hits}, misses {s.misses}, loads {s.loads}, coalesced "
            f"{s.coalesced}, fill_errors {s.fill_errors}, load_errors {s.load_errors}"
        ]


class LockWorkload(Workload):
    title = "Lock acquire+release"

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        super().__init__(client, stem, socket_timeout)
        self.tag = stem
        # A lease outlives a failed release by at most one socket_timeout.
        self.lock = arp.Lock(client, stem, ttl=socket_timeout)
        self.deadline = 2 * socket_timeout  # acquire (timeout=socket_timeout) + release
        self.tokens: list[int] = []

    async def call(self, caller: int) -> None:
        lease = await self.lock.acquire(timeout=self.socket_timeout)
        self.tokens.append(lease.token)
        await anyio.sleep(0.005)
        await lease.release()

    def cells(self) -> tuple[str, bool]:
        tokens = self.tokens
        backwards = sum(1 for a, b in itertools.pairwise(tokens) if b <= a)
        if backwards:
            return f"tokens NOT increasing: {backwards} of {len(tokens)}", False
        return f"tokens strictly increasing ({len(tokens)})", True

    def details(self) -> list[str]:
        return [f"lock stats: {self.lock.stats}"]


class SemaphoreWorkload(Workload):
    title = "Semaphore(3) acquire+release"

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        super().__init__(client, stem, socket_timeout)
        self.tag = stem
        self.semaphore = arp.Semaphore(client, stem, 3, ttl=socket_timeout)
        self.deadline = 2 * socket_timeout
        self.holding = 0
        self.most_holding = 0

    async def call(self, caller: int) -> None:
        lease = await self.semaphore.acquire(timeout=self.socket_timeout)
        self.holding += 1
        self.most_holding = max(self.most_holding, self.holding)
        try:
            await anyio.sleep(0.005)
        finally:
            self.holding -= 1
        await lease.release()

    def cells(self) -> tuple[str, bool]:
        return f"most holders at once {self.most_holding}/3", True

    def details(self) -> list[str]:
        return [f"semaphore stats: {self.semaphore.stats}"]


class RateLimitWorkload(Workload):
    title = "RateLimiter.hit"

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        super().__init__(client, stem, socket_timeout)
        name = "faults"
        self.identity = stem
        self.tag = f"{len(name)}:{name}:{stem}"
        self.limiter = arp.RateLimiter(client, arp.GCRA(1_000_000, 1.0), name=name)

    async def call(self, caller: int) -> None:
        await self.limiter.hit(self.identity)

    def details(self) -> list[str]:
        return [f"limiter stats: {self.limiter.stats}"]


class StreamWorkload(Workload):
    title = "StreamProducer.add + ConsumerGroup"

    def __init__(self, client: Any, stem: str, socket_timeout: float) -> None:
        super().__init__(client, stem, socket_timeout)
        self.tag = stem
        self.producer = arp.StreamProducer(client, stem)
        policy = arp.ConsumerPolicy(
            concurrency=16,
            block=0.5,
            claim_idle=2.0,
            claim_interval=0.5,
            drain_timeout=2.0,
            ack_timeout=2.0,
            consumer_idle=None,
        )
        self.group = arp.ConsumerGroup(client, stem, "g", handler=self._handle, policy=policy)
        self.sequence = 0
        self.acked: set[str] = set()
        self.handled: collections.Counter[str] = collections.Counter()
        self.alive_at_end = False
        self.exit_error: BaseException | None = None
        self.lost: list[str] = []
        self.absent: int = 0
        self._stop = anyio.Event()

    async def _handle(self, message: arp.StreamMessage) -> None:
        self.handled[str(message.fields["p"])] += 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(self._run_group)
            try:
                yield
            finally:
                self._stop.set()

    async def _run_group(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            async with self.group:
                task_status.started()
                started = True
                await self._stop.wait()
                self.alive_at_end = True
        except Exception as exc:
            if not started:
                raise
            self.exit_error = exc

    async def call(self, caller: int) -> None:
        self.sequence += 1
        payload = f"{caller}:{self.sequence}"
        await self.producer.add({"p": payload})
        self.acked.add(payload)

    async def finish(self, cluster: ClusterServers) -> None:
        # Messages a lost read delivered stay pending: reclaimed after claim_idle.
        with anyio.move_on_after(RECOVERY_LIMIT):
            while not self.acked <= self.handled.keys() and self.exit_error is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        self.lost = sorted(self.acked - self.handled.keys())
        if self.lost:
            owner = await anyio.to_thread.run_sync(cluster.owner_of_slot, _slot(self.stem))
            stored = await anyio.to_thread.run_sync(self._stored, owner)
            self.absent = sum(1 for payload in self.lost if payload not in stored)

    def _stored(self, owner: RedisServer) -> set[str]:
        with redis.Redis(port=owner.port, socket_timeout=10) as direct:
            entries = direct.xrange(f"arp:stream:{{{self.stem}}}")
        return {fields[b"p"].decode().strip('"') for _, fields in entries}

    def cells(self) -> tuple[str, bool]:
        if self.exit_error is not None:
            alive = f"group EXITED ({type(self.exit_error).__name__})"
        else:
            alive = "group alive" if self.alive_at_end else "group EXITED"
        lost = f"lost {len(self.lost)}/{len(self.acked)}"
        if self.lost:
            lost += f" ({self.absent} not in the stream)"
        holds = self.exit_error is None and self.alive_at_end and not self.lost
        return f"{alive}; {lost}", holds

    def details(self) -> list[str]:
        duplicates = sum(count - 1 for count in self.handled.values())
        lines = [f"group stats: {self.group.stats}; handled twice or more: {duplicates}"]
        if self.exit_error is not None:
            lines.append(f"group exit: {self.exit_error!r}"[:300])
        if self.lost:
            lines.append(f"lost payloads (first 10): {self.lost[:10]}")
        return lines


class PubSubWorkload(Workload):
    """Publishers and one subscriber; plain channels (any node) or a sharded one."""

    def __init__(self, client: Any, stem: str, socket_timeout: float, *, sharded: bool) -> None:
        super().__init__(client, stem, socket_timeout)
        self.sharded = sharded
        self.title = "pub/sub sharded" if sharded else "pub/sub plain"
        self.tag = stem if sharded else None
        self.channel = f"{{{stem}}}updates" if sharded else stem
        self.sequence = 0
        self.published_at: dict[str, float] = {}
        self.published: set[str] = set()
        self.received: dict[str, float] = {}
        self.gaps: list[tuple[float, arp.Gap]] = []
        self.error: BaseException | None = None
        self.fault_reference: float = 0.0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        subscription = arp.subscribe(
            self.client, self.channel, sharded=self.sharded, reconnect=PUBSUB_POLICY
        )
        async with subscription as messages, anyio.create_task_group() as tg:
            tg.start_soon(self._consume, messages)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _consume(self, messages: arp.Subscription) -> None:
        try:
            async for item in messages:
                if isinstance(item, arp.Gap):
                    self.gaps.append((time.monotonic(), item))
                else:
                    self.received[str(item.payload)] = time.monotonic()
        except Exception as exc:
            self.error = exc

    async def victim(self, cluster: ClusterServers) -> RedisServer:
        if self.sharded:
            return await super().victim(cluster)
        return await anyio.to_thread.run_sync(subscriber_node, cluster, self.channel)

    async def call(self, caller: int) -> None:
        self.sequence += 1
        payload = f"{caller}:{self.sequence}"
        self.published_at[payload] = time.monotonic()
        await arp.publish(self.client, self.channel, payload, sharded=self.sharded)
        self.published.add(payload)

    def delivered_after(self, moment: float) -> bool:
        return self._first_delivery_after(moment) is not None

    def _first_delivery_after(self, moment: float) -> float | None:
        return min(
            (
                at
                for payload, at in self.received.items()
                if self.published_at.get(payload, 0.0) >= moment
            ),
            default=None,
        )

    async def finish(self, cluster: ClusterServers) -> None:
        await anyio.sleep(0.5)  # messages still on their way

    def cells(self) -> tuple[str, bool]:
        resumed_at = self._first_delivery_after(self.fault_reference)
        resumed = (
            "no" if resumed_at is None else f"yes (+{resumed_at - self.fault_reference:.2f} s)"
        )
        lost = len(self.published - self.received.keys())
        text = f"Gap {'yes' if self.gaps else 'no'}; resumed {resumed}; lost {lost}"
        holds = resumed_at is not None and self.error is None
        if lost and not self.gaps:
            text += " SILENTLY"
            holds = False
        if self.error is not None:
            text += f"; subscription ended: {type(self.error).__name__}"
        return text, holds

    def details(self) -> list[str]:
        lines = [
            f"published ok {len(self.published)}, received {len(self.received)}, gaps "
            + ", ".join(f"{gap.duration:.2f} s ({gap.cause[:80]})" for _, gap in self.gaps)
        ]
        if self.error is not None:
            lines.append(f"subscription error: {self.error!r}"[:300])
        return lines


WORKLOADS: dict[str, Callable[[Any, str, float], Workload]] = {
    "cache": CacheWorkload,
    "lock": LockWorkload,
    "ratelimit": RateLimitWorkload,
    "streams": StreamWorkload,
    "pubsub": lambda c, s, t: PubSubWorkload(c, s, t, sharded=False),
    "spubsub": lambda c, s, t: PubSubWorkload(c, s, t, sharded=True),
    "semaphore": SemaphoreWorkload,
}


# ------------------------------------------------------------------------------ control


class Control:
    """Rate-limit hits and cache reads on keys of a healthy primary."""

    def __init__(self, client: Any, cluster: ClusterServers, node: RedisServer, stem: str):
        name = "control"
        head = f"{len(name)}:{name}:"  # a limiter's hash tag is "<len>:<name>:<identity>"
        self.identity = f"{stem}-{tag_on_node(cluster, lambda n: f'{head}{stem}-{n}', node)}"
        self.key = f"{stem}-{tag_on_node(cluster, lambda n: f'{stem}-{n}', node)}"
        self.client = client
        self.limiter = arp.RateLimiter(client, arp.GCRA(1_000_000, 1.0), name=name)
        self.cache: arp.Cache[Any] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with arp.Cache(self.client, ttl=60, prefix="control") as cache:
            self.cache = cache
            yield

    async def call(self, caller: int) -> None:
        assert self.cache is not None
        if caller % 2:
            await self.limiter.hit(self.identity)
        else:
            await self.cache.get_or_load(self.key, _control_value)


async def _control_value() -> str:
    return "control"


# ------------------------------------------------------------------------------ a row


@dataclass
class Row:
    primitive: str
    fault: str
    cells: dict[str, str] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _error_cells(log: CallLog) -> tuple[str, str]:
    counts = collections.Counter(c.outcome for c in log.calls if not c.ok)
    total = len(log.calls)
    shown = ", ".join(f"{name} {count}" for name, count in counts.most_common()) or "none"
    foreign = sum(1 for c in log.calls if c.foreign)
    errors = f"{shown} (of {total})"
    return errors, ("0" if foreign == 0 else f"{foreign} FOREIGN{MISS}")


def _recovery_cell(log: CallLog, fault_at: float, reference: float, goal: float) -> str:
    """When the primitive works again: the first success after its last failure."""
    failures = [c for c in log.calls if not c.ok and c.ended >= fault_at]
    if not failures:
        return "no outage"
    last = max(c.ended for c in failures)
    back = min((c.ended for c in log.calls if c.ok and c.ended >= last), default=None)
    if back is None:
        return f"never{MISS}"
    after = back - reference
    outage = back - min(c.started for c in failures)
    cell = f"{after:+.2f} s (outage {outage:.2f} s)"
    return cell + (MISS if after > goal else "")


def _deadline_cells(log: CallLog, socket_timeout: float, lag: float) -> tuple[str, str]:
    if not log.calls:
        return "no calls", "no calls"
    slowest = max(log.calls, key=lambda c: c.ended - c.started)
    overrun = max(c.ended - c.started - c.deadline for c in log.calls)
    took = slowest.ended - slowest.started
    cell = f"{_ms(max(overrun, 0.0))} ({took:.2f}/{slowest.deadline:g} s; loop lag {_ms(lag)})"
    if overrun > OVERRUN_GOAL:
        cell += MISS
    cancelled = [c.ended - c.started - c.deadline for c in log.calls if c.cancelled]
    if not cancelled:
        return cell, "none cancelled"
    worst = max(cancelled)
    late = MISS if worst > socket_timeout else ""
    return cell, f"{_ms(max(worst, 0.0))} ({len(cancelled)} cancelled){late}"


# ------------------------------------------------------------------------------ a scenario


@dataclass
class Settings:
    socket_timeout: float
    node_timeout: float


@dataclass
class FaultRecord:
    """What the fault did, for the reference time and the restore."""

    fault_at: float = 0.0
    reference: float = 0.0
    killed: RedisServer | None = None
    paused: RedisServer | None = None
    notes: list[str] = field(default_factory=list)


async def _inject(
    fault: str,
    cluster: ClusterServers,
    victim: RedisServer,
    target: RedisServer | None,
    tag: str | None,
    settings: Settings,
    record: FaultRecord,
) -> None:
    record.fault_at = time.monotonic()
    if fault == "kill":
        record.killed = victim
        failover = await anyio.to_thread.run_sync(cluster.kill_primary, victim)
        record.reference = time.monotonic()
        new = failover.new_primary
        record.notes.append(
            f"killed :{victim.port}, :{new.port if new else '?'} promoted in "
            f"{failover.seconds or 0.0:.2f} s"
        )
    elif fault == "pause":
        record.paused = victim
        victim.pause()
        try:
            await anyio.sleep(PAUSE_FACTOR * settings.socket_timeout)
        finally:
            victim.resume()
        record.reference = time.monotonic()
        record.notes.append(
            f"paused :{victim.port} for {PAUSE_FACTOR * settings.socket_timeout:g} s"
        )
    else:
        assert target is not None
        assert tag is not None
        migration = await anyio.to_thread.run_sync(
            lambda: cluster.start_migration(
                _slot(tag), target, batch=MIGRATION_BATCH, step_delay=MIGRATION_STEP_DELAY
            )
        )
        await anyio.to_thread.run_sync(migration.join)
        record.reference = time.monotonic()
        record.notes.append(
            f"slot {migration.slot} :{victim.port} -> :{target.port}, {migration.keys_moved} "
            f"keys in {migration.seconds:.2f} s"
        )


async def _wait_until_working(log: CallLog, workload: Workload, reference: float) -> None:
    with anyio.move_on_after(RECOVERY_LIMIT):
        while True:
            moment = max(reference, log.last_failure(reference))
            if log.ok_after(moment) and workload.delivered_after(reference):
                break
            await anyio.sleep(0.05)
    await anyio.sleep(LINGER)


async def _restore(cluster: ClusterServers, record: FaultRecord) -> None:
    if record.paused is not None:
        record.paused.resume()
    if record.killed is not None:
        await anyio.to_thread.run_sync(cluster.restart, record.killed)
    await anyio.to_thread.run_sync(cluster.settle)
    if record.paused is not None:
        primaries = await anyio.to_thread.run_sync(cluster.primaries)
        if record.paused.port not in {node.port for node in primaries}:
            record.notes.append(f"the pause failed :{record.paused.port} over (now a replica)")


async def run_scenario(
    cluster: ClusterServers, primitive: str, fault: str, settings: Settings
) -> Row:
    row = Row(primitive, fault)
    stem = f"{primitive}-{fault}-{uuid.uuid4().hex[:6]}"
    st = settings.socket_timeout
    client = arp.connect(cluster.url, socket_timeout=st)
    record = FaultRecord()
    primitive_log, control_log = CallLog(), CallLog()
    lag = [0.0]
    try:
        workload = WORKLOADS[primitive](client, stem, st)
        row.primitive = workload.title
        if fault == "migrate" and workload.tag is None:
            row.cells["errors"] = "n/a: plain channels have no slot"
            return row
        async with workload.running():
            victim = await workload.victim(cluster)
            primaries = await anyio.to_thread.run_sync(cluster.primaries)
            others = [node for node in primaries if node.port != victim.port]
            target = others[0] if fault == "migrate" else None
            healthy = others[-1]
            if fault == "migrate":
                assert workload.tag is not None
                await anyio.to_thread.run_sync(write_fillers, victim, workload.tag)
            control = await anyio.to_thread.run_sync(Control, client, cluster, healthy, stem)
            row.details.append(f"primitive on :{victim.port}, control on :{healthy.port}")
            running = Flag()
            async with control.running(), anyio.create_task_group() as tg:
                for index in range(CALLERS):
                    tg.start_soon(
                        _caller_loop,
                        primitive_log,
                        workload.call,
                        index,
                        workload.deadline,
                        running,
                    )
                for index in range(CONTROL_CALLERS):
                    tg.start_soon(_caller_loop, control_log, control.call, index, st, running)
                tg.start_soon(_watch_loop_lag, running, lag)
                await anyio.sleep(WARMUP)
                if not primitive_log.ok_after(0.0):
                    row.details.append("the primitive never worked before the fault")
                try:
                    await _inject(fault, cluster, victim, target, workload.tag, settings, record)
                    if isinstance(workload, PubSubWorkload):
                        workload.fault_reference = record.reference
                    await _wait_until_working(primitive_log, workload, record.reference)
                finally:
                    running.on = False
            await workload.finish(cluster)
        _fill_row(row, workload, primitive_log, control_log, record, settings, lag[0])
    except Exception as exc:
        row.cells.setdefault("errors", f"scenario failed: {type(exc).__name__}{MISS}")
        row.details.append(f"scenario failed: {exc!r}"[:400])
    finally:
        with anyio.move_on_after(10, shield=True):
            await client.aclose()
        try:
            await _restore(cluster, record)
        except Exception as exc:
            row.details.append(f"restore failed: {exc!r}"[:300])
            raise
    return row


def _fill_row(
    row: Row,
    workload: Workload,
    log: CallLog,
    control: CallLog,
    record: FaultRecord,
    settings: Settings,
    lag: float,
) -> None:
    st = settings.socket_timeout
    errors, foreign = _error_cells(log)
    control_errors = sum(1 for c in control.calls if not c.ok)
    own, holds = workload.cells()
    overrun, cancel = _deadline_cells(log, st, lag)
    goal = settings.node_timeout + 1.0
    row.cells = {
        "errors": errors,
        "foreign": foreign,
        "control errors": f"{control_errors} (of {len(control.calls)})"
        + ("" if control_errors == 0 else MISS),
        "works again": _recovery_cell(log, record.fault_at, record.reference, goal),
        "invariants": (own + ("" if holds else MISS)) if own else "",
        "max overrun": overrun,
        "cancel -> return": cancel,
    }
    control_overrun, _ = _deadline_cells(control, st, lag)
    control_kinds = collections.Counter(c.outcome for c in control.calls if not c.ok)
    row.details += record.notes
    row.details.append(
        f"loop lag max {_ms(lag)}; control overrun {control_overrun}; control errors "
        f"{dict(control_kinds) or 'none'}"
    )
    row.details += workload.details()
    row.details += [f"first {name}: {text}" for name, text in log.examples.items()]
    row.details += [f"control's first {name}: {text}" for name, text in control.examples.items()]
    row.details += [f"FOREIGN: {text}" for text in log.foreign_examples]
    row.details += [f"FOREIGN (control): {text}" for text in control.foreign_examples]


# ------------------------------------------------------------------------------ the table

COLUMNS = (
    "errors",
    "foreign",
    "control errors",
    "works again",
    "invariants",
    "max overrun",
    "cancel -> return",
)


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append("| primitive | fault | " + " | ".join(COLUMNS) + " |")
    lines.append("|" + " --- |" * (len(COLUMNS) + 2))
    for row in rows:
        cells = [row.cells.get(column, "") for column in COLUMNS]
        lines.append(f"| {row.primitive} | {row.fault} | " + " | ".join(cells) + " |")
    lines += ["", "Details:", ""]
    for row in rows:
        lines.append(f"- **{row.primitive} / {row.fault}**: " + "; ".join(row.details))
    return "\n".join(lines) + "\n"


async def _start(binary: Path, fault: str) -> ClusterServers:
    return await anyio.to_thread.run_sync(
        lambda: start_cluster(binary, replicas=1, name=f"faults-{fault}")
    )


async def _describe(cluster: ClusterServers, socket_timeout: float) -> arp.ServerInfo:
    probe = arp.connect(cluster.url, socket_timeout=socket_timeout)
    try:
        return await arp.server_info(probe)
    finally:
        await probe.aclose()


async def main(args: argparse.Namespace) -> str:
    binary = find_server_binary(args.kind)
    settings = Settings(args.socket_timeout, 2.0)
    primitives = [name for name in WORKLOADS if not args.only or name in args.only]
    faults = [fault for fault in FAULTS if not args.faults or fault in args.faults]
    rows: list[Row] = []
    server = "?"
    for fault in faults:
        # A fresh cluster per fault kind; a scenario whose restore failed gets a new one.
        cluster = await _start(binary, fault)
        settings.node_timeout = cluster.node_timeout_ms / 1000
        try:
            info = await _describe(cluster, settings.socket_timeout)
            server = str(info)
            for primitive in primitives:
                if primitive == "spubsub" and not info.sharded_pubsub:
                    rows.append(Row("pub/sub sharded", fault, {"errors": f"n/a on {server}"}))
                    continue
                try:
                    row = await run_scenario(cluster, primitive, fault, settings)
                except Exception as exc:
                    row = Row(primitive, fault, {"errors": f"restore failed{MISS}"}, [repr(exc)])
                    await anyio.to_thread.run_sync(cluster.stop)
                    cluster = await _start(binary, fault)
                rows.append(row)
                print(f"{row.primitive} / {fault}: {row.cells}", flush=True)
                for line in row.details:
                    print(f"    {line}", flush=True)
        finally:
            await anyio.to_thread.run_sync(cluster.stop)
    header = [
        f"Cluster fault table: {server} ({args.kind}), 3 primaries + 3 replicas, "
        f"cluster-node-timeout {settings.node_timeout:g} s, socket_timeout "
        f"{settings.socket_timeout:g} s, {CALLERS} callers + {CONTROL_CALLERS} control "
        f"callers, {os.cpu_count()} CPUs, aioredispatterns {arp.__version__}.",
        f"Goals: foreign 0; control errors 0; works again <= {settings.node_timeout + 1:g} s "
        f"after the promotion / migration end / resume; overrun <= {_ms(OVERRUN_GOAL)}; "
        f"cancel -> return <= socket_timeout. {MISS.strip()} marks a miss.",
    ]
    return markdown(rows, header)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kind", default="valkey-9.1")
    parser.add_argument("--socket-timeout", type=float, default=1.0)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--only", type=lambda text: text.split(","), default=None)
    parser.add_argument("--faults", type=lambda text: text.split(","), default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = _parse(sys.argv[1:])
    table = anyio.run(main, arguments)
    print()
    print(table)
    if arguments.markdown is not None:
        arguments.markdown.write_text(table)
