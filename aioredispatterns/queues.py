"""Job queues on Redis lists: the classic LPUSH/BRPOP queue, and a reliable one.

Which one:

* :class:`ListQueue` is the plain pattern: ``LPUSH`` to add, ``BRPOP`` to take. Fast
  and simple, and **lossy**: a popped job exists only in the worker's memory, so a job
  whose worker dies (crash, SIGKILL, OOM, deploy), or whose pop is cancelled while the
  reply is in flight, is gone. Use it for fire-and-forget work where losing a job now and
  then is fine (cache warming, best-effort notifications).
* :class:`ReliableQueue` is at-least-once: a taken job is *leased* to its consumer (it
  moves, in one script, into that consumer's processing list and gets a lease deadline
  on the server's clock), renewed while the consumer is alive, acknowledged when done.
  A consumer that dies or stalls loses its leases after ``visibility_timeout`` and its
  jobs go back to the queue with their delivery count; failures are retried with backoff
  and dead-lettered (with the last error) after ``max_deliveries``; jobs can be delayed
  (moved when due by the server's clock), prioritized and pushed idempotently with an
  explicit ``job_id``. Handlers must be idempotent: a job can run twice (its consumer
  died after the work but before the acknowledgement).
* A stream with a consumer group (:class:`~aioredispatterns.ConsumerGroup`) when several
  independent groups must each see every message, when the history matters (replay,
  retention), or when order must be kept; a reliable queue when jobs are work items
  taken by whichever worker is free, with priorities, delays and per-job retries.

Keys of a reliable queue named ``jobs`` (one hash tag, one cluster slot):
``<prefix>:queue:{jobs}:ready`` (list of waiting ids), ``...:prio`` (prioritized
waiting ids), ``...:delayed`` (ids by due time), ``...:leases`` (ids by lease deadline),
``...:jobs`` / ``...:deliveries`` / ``...:owners`` / ``...:errors`` / ``...:priorities``
(hashes by job id), ``...:dead`` (dead-lettered ids), ``...:wake`` (wake-up markers for
blocked consumers), ``...:seq``, ``...:consumers`` (heartbeats) and one
``...:processing:<consumer>`` list per consumer. A list queue is the one list
``<prefix>:listqueue:{<name>}``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Self, TypeAlias

import anyio
from anyio.abc import TaskStatus

from . import _queue_redis as _q
from ._backoff import Backoff, full_jitter
from ._capabilities import server_info
from ._commands import Arg, execute, execute_blocking, execute_many
from ._connection import AnyRedis, check_client, state_of
from ._keys import DEFAULT_PREFIX, KeyT, keyspace
from ._scope import background
from ._validate import check_count, check_items, check_name, check_seconds, shown
from ._worker import WorkerPool
from .errors import (
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    RedisPatternsError,
    UnsupportedServerError,
)
from .serializers import Serializer, check_serializer, default_serializer

__all__ = (
    "DeadJob",
    "Job",
    "JobLost",
    "ListQueue",
    "ListQueueStats",
    "PushStats",
    "QueueConsumer",
    "QueueError",
    "QueueInfo",
    "QueuePolicy",
    "QueueStats",
    "ReliableQueue",
)

logger: logging.Logger = logging.getLogger("aioredispatterns.queues")

#: What ``ReliableQueue.consumer(handler)`` takes: awaited once per delivered job.
Handler: TypeAlias = Callable[["Job"], Awaitable[object]]

# Priorities are kept exact in a sorted-set score (-priority * 2**32 + sequence).
_MAX_PRIORITY: Final = 1_000_000
# Concurrency and in-flight bounds: anything above this is a typo, not a plan.
_MAX_COUNT: Final = 1_000_000
# Jobs one script takes, acknowledges or pushes at most (Lua's unpack() has limits).
_MAX_BATCH: Final = 1000
# The longest single blocking call of a pop without a timeout (it is repeated).
_MAX_BLOCK: Final = 5.0
# The reaper looks at least this often, whatever the leases say (mixed policies).
_REAP_EVERY_MAX: Final = 5.0
# A consumer silent this many visibility timeouts is forgotten (its processing list).
_SILENT_TIMEOUTS: Final = 3


class QueueError(RedisPatternsError):
    """Base of the errors raised by the queues."""


class JobLost(QueueError):
    """The consumer no longer holds the job: its lease ran out and it went back to the
    queue (perhaps to another consumer), or it was acknowledged or failed already."""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _us(seconds: float) -> int:
    return math.ceil(seconds * 1_000_000)


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- list queue


@dataclass(slots=True)
class ListQueueStats:
    """Counters of one :class:`ListQueue` in this process (``.stats`` is a copy).

    A plain snapshot in memory: reading it sends nothing, so nothing to cancel.

    Attributes:
        pushed: jobs pushed (replies received).
        popped: jobs popped (and so removed from Redis).
    """

    pushed: int = 0
    popped: int = 0


class ListQueue:
    """The seed's queue: ``LPUSH`` to add a job, ``BRPOP`` to take one, first in first out.

    **A popped job is gone.** There is no acknowledgement and no retry: if the worker
    dies (or its pop is cancelled while the reply is in flight, or the handler raises),
    the job is lost. Nothing is stored but the list itself, so it is as fast as Redis
    lists go, and any client in any language can push to it (``LPUSH <key> <payload>``).
    Use :class:`ReliableQueue` when a job must not be lost.

    Args:
        client: a redis.asyncio client (see :func:`aioredispatterns.connect`). Each
            blocked pop holds one pooled connection.
        name: the queue's name (its key is ``<prefix>:listqueue:{<name>}``).
        prefix: the key namespace.
        serializer: encodes payloads (JSON by default).

    Raises:
        ConfigurationError: bad name, prefix or serializer (before any command).

    Cancellation: a cancelled push may or may not have added its job(s); a cancelled pop
    may have taken a job from the list that then reaches nobody (lost, as above).
    """

    __slots__ = ("__weakref__", "_client", "_counts", "_serializer", "key")

    def __init__(
        self,
        client: AnyRedis,
        name: str | bytes,
        *,
        prefix: str = DEFAULT_PREFIX,
        serializer: Serializer | None = None,
    ) -> None:
        self._client = check_client(client)
        self.key: KeyT = keyspace(prefix, "listqueue", name).key()
        self._serializer = (
            default_serializer() if serializer is None else check_serializer(serializer)
        )
        self._counts = ListQueueStats()

    def __repr__(self) -> str:
        return f"<ListQueue {self.key!r}>"

    @property
    def stats(self) -> ListQueueStats:
        """A snapshot of this object's counters (this process only)."""
        return dataclasses.replace(self._counts)

    async def push(self, payload: Any) -> int:
        """Add one job (``LPUSH``); returns the queue's length after it.

        Raises:
            SerializationError: the payload could not be encoded (nothing was sent).

        Cancellation: the job may or may not have been added.
        """
        length = await execute(self._client, "LPUSH", self.key, self._serializer.dumps(payload))
        self._counts.pushed += 1
        return int(length)

    async def push_many(self, payloads: Iterable[Any]) -> int:
        """Add many jobs, in order, with one ``LPUSH`` per 1000; returns the length after.

        Every payload is encoded before anything is sent. Never re-sent after a broken
        connection (a push is not idempotent): any prefix of the batches may have landed.

        Cancellation: any prefix of the batches may have been added.
        """
        dumps = self._serializer.dumps
        encoded = [dumps(payload) for payload in check_items("payloads", payloads)]
        if not encoded:
            return int(await execute(self._client, "LLEN", self.key))
        commands = [
            ["LPUSH", self.key, *encoded[start : start + _MAX_BATCH]]
            for start in range(0, len(encoded), _MAX_BATCH)
        ]
        replies = await execute_many(self._client, commands, idempotent=False)
        self._counts.pushed += len(encoded)
        return int(replies[-1])

    # ``timeout`` rather than a cancel scope around the call: cutting a BRPOP short
    # can lose the job it is taking; the server's own timeout cannot.
    async def pop(self, timeout: float | None = None) -> Any | None:  # noqa: ASYNC109
        """Take the oldest job (``BRPOP``), waiting up to ``timeout`` seconds for one.

        Args:
            timeout: seconds to wait (``None``: until a job comes; ``0``: do not wait).

        Returns:
            The decoded payload, or None if no job came in time.

        Raises:
            SerializationError: the payload could not be decoded (the job is gone).

        Cancellation: a pop cancelled while blocked closes its connection; a job the
        server handed to it in that instant is lost.
        """
        if timeout is not None:
            check_seconds("timeout", timeout, zero=True)
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            if deadline is None:
                wait = _MAX_BLOCK
            else:
                wait = min(deadline - anyio.current_time(), _MAX_BLOCK)
            if wait < 0.001:
                raw = await execute(self._client, "RPOP", self.key)
            else:
                reply = await execute_blocking(
                    self._client, "BRPOP", self.key, f"{wait:.3f}", block=wait
                )
                raw = None if reply is None else reply[1]
            if raw is not None:
                self._counts.popped += 1
                return self._serializer.loads(raw)
            if deadline is not None and anyio.current_time() >= deadline:
                return None

    def jobs(self) -> AsyncIterator[Any]:
        """Iterate the jobs as they come (``async for payload in queue.jobs()``); endless.

        Cancellation: as :meth:`pop`.
        """
        return _ListJobs(self)

    async def length(self) -> int:
        """How many jobs wait (``LLEN``; stale on return)."""
        return int(await execute(self._client, "LLEN", self.key))


class _ListJobs:
    """The iterator :meth:`ListQueue.jobs` returns (not a generator: no aclose)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: ListQueue) -> None:
        self._queue = queue

    def __aiter__(self) -> _ListJobs:
        return self

    async def __anext__(self) -> Any:
        return await self._queue.pop()


# --------------------------------------------------------------------------- reliable queue


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """How a :class:`ReliableQueue` leases, retries and runs its consumers.

    Attributes:
        visibility_timeout: seconds a job stays leased to its consumer without renewal.
            A live consumer renews what it holds (buffered, or its handler running)
            every third of it, so a slow handler keeps its job; it is how long the jobs
            of a consumer that died or stalled wait before they go back to the queue
            (after a SIGKILL: between two thirds of it and all of it). Keep it above the
            pauses a healthy process may have (GC, a busy event loop, a network blip).
        max_deliveries: deliveries a job gets; a job that fails (or whose lease runs
            out) on its last one goes to the dead-letter list with its error.
        retry_base: the backoff of a failed job before its next delivery: full jitter
            up to ``retry_base * 2 ** (deliveries - 1)`` seconds, at most ``retry_cap``
            (``0``: retry at once).
        retry_cap: the longest backoff, in seconds.
        concurrency: handler calls running at once (handler mode).
        max_in_flight: jobs fetched and not yet settled by this consumer, counting those
            a fetch in progress asked for; fetching pauses at this bound.
        batch_size: jobs one fetch takes at most (one script).
        block: seconds one blocking wait for work lasts before it is renewed.
        drain_timeout: on shutdown, seconds running handlers get to finish.
        ack_timeout: on shutdown, seconds the final acknowledgement may take, and again
            the return of the jobs the consumer still holds.
        dead_letter_maxlen: the most jobs kept in the dead-letter list (the oldest are
            deleted beyond it; ``None``: no bound).
    """

    visibility_timeout: float = 10.0
    max_deliveries: int = 5
    retry_base: float = 1.0
    retry_cap: float = 300.0
    concurrency: int = 16
    max_in_flight: int = 256
    batch_size: int = 100
    block: float = 1.0
    drain_timeout: float = 10.0
    ack_timeout: float = 5.0
    dead_letter_maxlen: int | None = 100_000

    def __post_init__(self) -> None:
        check_seconds("QueuePolicy.visibility_timeout", self.visibility_timeout, minimum=0.03)
        check_count(
            "QueuePolicy.max_deliveries", self.max_deliveries, minimum=1, maximum=_MAX_COUNT
        )
        check_seconds("QueuePolicy.retry_base", self.retry_base, zero=True)
        check_seconds("QueuePolicy.retry_cap", self.retry_cap, zero=True)
        for name in ("concurrency", "max_in_flight"):
            check_count(f"QueuePolicy.{name}", getattr(self, name), minimum=1, maximum=_MAX_COUNT)
        check_count("QueuePolicy.batch_size", self.batch_size, minimum=1, maximum=_MAX_BATCH)
        check_seconds("QueuePolicy.block", self.block, minimum=0.01)
        for name in ("drain_timeout", "ack_timeout"):
            check_seconds(f"QueuePolicy.{name}", getattr(self, name))
        if self.dead_letter_maxlen is not None:
            check_count("QueuePolicy.dead_letter_maxlen", self.dead_letter_maxlen, minimum=1)

    def retry_delay(self, deliveries: int) -> float:
        """The backoff before the next delivery of a job that failed its ``deliveries``-th."""
        return full_jitter(deliveries - 1, base=self.retry_base, cap=self.retry_cap)


class Job:
    """One delivery of a job to this consumer.

    Attributes:
        id: the job's id, unique within its queue (generated, or the ``job_id`` it was
            pushed with): use it to make handlers idempotent.
        raw: the payload as stored (bytes).
        deliveries: how many times it has been delivered (1 on the first delivery).
        priority: the priority it was pushed with (0: none).
        last_error: the error of its previous delivery, if one failed (or its lease ran
            out), else None.
    """

    __slots__ = (
        "_decoded",
        "_payload",
        "_serializer",
        "deliveries",
        "id",
        "last_error",
        "priority",
        "raw",
    )

    id: str
    raw: bytes
    deliveries: int
    priority: int
    last_error: str | None

    def __init__(
        self,
        job_id: str,
        raw: bytes,
        deliveries: int,
        priority: int,
        last_error: str | None,
        serializer: Serializer,
    ) -> None:
        self.id = job_id
        self.raw = raw
        self.deliveries = deliveries
        self.priority = priority
        self.last_error = last_error
        self._serializer = serializer
        self._decoded = False
        self._payload: Any = None

    @property
    def payload(self) -> Any:
        """The payload decoded by the serializer (decoded on first access).

        Raises:
            SerializationError: the stored bytes are not valid for the serializer.
        """
        if not self._decoded:
            self._payload = self._serializer.loads(self.raw)
            self._decoded = True
        return self._payload

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, deliveries={self.deliveries})"


@dataclass(frozen=True, slots=True)
class DeadJob:
    """A job of the dead-letter list.

    Attributes:
        id: the job's id.
        raw: its payload as stored.
        deliveries: how many times it was delivered.
        error: its last error (the handler's, or why its lease ran out).
    """

    id: str
    raw: bytes
    deliveries: int
    error: str | None


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """The queue as the server sees it (a snapshot, stale on return).

    Attributes:
        waiting: jobs ready to be taken (prioritized or not).
        delayed: jobs waiting for their due time (or their retry).
        in_flight: jobs leased to consumers.
        dead: jobs in the dead-letter list.
        consumers: consumers with a recent heartbeat (or not yet forgotten).
    """

    waiting: int
    delayed: int
    in_flight: int
    dead: int
    consumers: int


@dataclass(slots=True)
class PushStats:
    """Counters of one :class:`ReliableQueue`'s pushes in this process (``.stats``).

    A plain snapshot in memory: reading it sends nothing, so nothing to cancel.

    Attributes:
        pushed: jobs added (replies received).
        duplicates: pushes whose ``job_id`` the queue knew already (nothing added).
        failed: push calls that raised after sending (the jobs may or may not be in).
    """

    pushed: int = 0
    duplicates: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What one consumer did since it was created (a snapshot; counters only grow).

    Attributes:
        processed: handler calls that returned (handler mode).
        failed: handler calls that raised.
        retried: jobs delivered to this consumer for the second time or more.
        acked: jobs acknowledged (still held when the acknowledgement landed).
        nacked: jobs failed back to the queue (or dead-lettered) by this consumer.
        dead_lettered: jobs this consumer moved to the dead-letter list.
        reaped: jobs of other (dead or stalled) consumers whose lease ran out, returned
            to the queue by this consumer's reaper.
        released: jobs this consumer returned itself: on a graceful stop (those it held
            and had not finished) and on start (what a previous run of the same
            consumer name held).
        refreshed: lease renewals (one per job per renewal).
        lost: held jobs found no longer leased to this consumer (it stalled past the
            visibility timeout; another consumer may run them).
        read_errors: fetches that failed (connection lost ...) and were retried.
        in_flight: jobs fetched and not yet settled, right now.
    """

    processed: int = 0
    failed: int = 0
    retried: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    reaped: int = 0
    released: int = 0
    refreshed: int = 0
    lost: int = 0
    read_errors: int = 0
    in_flight: int = 0


class _Counters:
    """The live, mutable counterparts of the QueueStats counters."""

    __slots__ = tuple(f.name for f in dataclasses.fields(QueueStats) if f.name != "in_flight")

    processed: int
    failed: int
    retried: int
    acked: int
    nacked: int
    dead_lettered: int
    reaped: int
    released: int
    refreshed: int
    lost: int
    read_errors: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class ReliableQueue:
    """An at-least-once job queue: leases, retries with backoff, delays, priorities,
    dead letters; producers :meth:`push`, workers run a :meth:`consumer`.

    Args:
        client: a redis.asyncio client (see :func:`aioredispatterns.connect`).
        name: the queue's name; all its keys share one cluster hash slot.
        policy: leases, retries and consumer settings (:class:`QueuePolicy`).
        prefix: the key namespace.
        serializer: encodes payloads (JSON by default).

    Raises:
        ConfigurationError: bad name, prefix, policy or serializer (before any command).

    Every change that spans keys is one Lua script, so a job is at every moment in
    exactly one place: waiting, delayed, leased to one consumer, dead, or acknowledged
    and gone. See the module docstring for when to choose it over a list or a stream.
    """

    __slots__ = (
        "__weakref__",
        "_client",
        "_counts",
        "_id_base",
        "_ids",
        "_keys",
        "_serializer",
        "key",
        "policy",
    )

    def __init__(
        self,
        client: AnyRedis,
        name: str | bytes,
        *,
        policy: QueuePolicy | None = None,
        prefix: str = DEFAULT_PREFIX,
        serializer: Serializer | None = None,
    ) -> None:
        self._client = check_client(client)
        space = keyspace(prefix, "queue", name)
        self._keys = _q.QueueKeys.of(space)
        self.key: KeyT = space.key()
        if policy is not None and not isinstance(policy, QueuePolicy):
            raise ConfigurationError("policy must be a QueuePolicy")
        self.policy: QueuePolicy = policy or QueuePolicy()
        self._serializer = (
            default_serializer() if serializer is None else check_serializer(serializer)
        )
        self._counts = PushStats()
        # Generated ids: unique per process and object, cheap (no uuid per job).
        self._id_base = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<ReliableQueue {self.key!r}>"

    @property
    def stats(self) -> PushStats:
        """A snapshot of this object's push counters (this process only)."""
        return dataclasses.replace(self._counts)

    # ------------------------------------------------------------------ producing

    def _job_args(
        self, payload: Any, delay_us: int, priority: int, job_id: str | None
    ) -> list[Arg]:
        if job_id is None:
            job_id = f"{self._id_base}-{next(self._ids)}"
        return [job_id, self._serializer.dumps(payload), priority, delay_us]

    async def push(
        self,
        payload: Any,
        *,
        delay: float | None = None,
        priority: int | None = None,
        job_id: str | None = None,
    ) -> str:
        """Add one job; returns its id.

        Args:
            payload: anything the serializer encodes.
            delay: seconds before it may run (``None``: at once); it becomes due by the
                server's clock and never runs earlier.
            priority: higher runs first (``None`` or 0: none; negative: after the jobs
                without priority); first in, first out within a priority. Between
                -1,000,000 and 1,000,000.
            job_id: an id of your own: pushing the same id again while the queue still
                knows the job (waiting, delayed, in flight or dead) adds nothing, so a
                push can be retried safely. Generated when None.

        Raises:
            ConfigurationError: a bad delay, priority or id (nothing was sent).
            SerializationError: the payload could not be encoded (nothing was sent).

        Cancellation: the push is one script: the job is in the queue or it is not.
        """
        args = self._job_args(payload, *_check_job(delay, priority, job_id))
        await self._push([args])
        return str(args[0])

    async def push_many(
        self,
        payloads: Iterable[Any],
        *,
        delay: float | None = None,
        priority: int | None = None,
        job_ids: Iterable[str] | None = None,
    ) -> list[str]:
        """Add many jobs in order, 500 per script; returns their ids.

        ``delay`` and ``priority`` apply to every job; ``job_ids`` (as many as
        payloads) make the push idempotent as in :meth:`push`. Everything is encoded and
        checked before anything is sent.

        Raises:
            ConfigurationError: bad arguments, or ``job_ids`` of another length.
            SerializationError: a payload could not be encoded (nothing was sent).

        Cancellation: each chunk of 500 is one script: any prefix of the chunks is in.
        """
        items = check_items("payloads", payloads)
        ids: list[str | None] = [None] * len(items)
        if job_ids is not None:
            given = check_items("job_ids", job_ids)
            if len(given) != len(items):
                raise ConfigurationError(f"job_ids has {len(given)} ids for {len(items)} payloads")
            ids = given
        delay_us, level, _ = _check_job(delay, priority, None)
        jobs = [
            self._job_args(payload, delay_us, level, _check_job_id(job_id))
            for payload, job_id in zip(items, ids, strict=True)
        ]
        for start in range(0, len(jobs), _q.CHUNK):
            await self._push(jobs[start : start + _q.CHUNK])
        return [str(job[0]) for job in jobs]

    async def _push(self, jobs: list[list[Arg]]) -> None:
        try:
            added = await _q.push(self._client, self._keys, jobs)
        except RedisPatternsError:
            self._counts.failed += 1
            raise
        new = sum(added)
        self._counts.pushed += new
        self._counts.duplicates += len(added) - new

    # ------------------------------------------------------------------ inspecting

    async def info(self) -> QueueInfo:
        """Waiting, delayed, in-flight and dead jobs, and consumers (one round trip).

        Cancellation: read only; nothing is left behind.
        """
        keys = self._keys
        waiting, prioritized, delayed, leased, dead, consumers = await execute_many(
            self._client,
            [
                ["LLEN", keys.ready],
                ["ZCARD", keys.prio],
                ["ZCARD", keys.delayed],
                ["ZCARD", keys.leases],
                ["LLEN", keys.dead],
                ["ZCARD", keys.consumers],
            ],
            idempotent=True,
        )
        return QueueInfo(
            waiting=int(waiting) + int(prioritized),
            delayed=int(delayed),
            in_flight=int(leased),
            dead=int(dead),
            consumers=int(consumers),
        )

    async def dead_letters(self, count: int = 100) -> list[DeadJob]:
        """The newest ``count`` dead-lettered jobs, newest first (read only).

        Cancellation: read only; nothing is left behind.
        """
        check_count("count", count, minimum=1, maximum=_MAX_COUNT)
        rows = await _q.dead_letters(self._client, self._keys, count)
        return [DeadJob(id=i, raw=raw, deliveries=n, error=error) for i, raw, n, error in rows]

    async def requeue_dead(self, *job_ids: str, oldest: int = 100) -> int:
        """Give dead-lettered jobs another round: back to the queue with a fresh delivery
        count (their last error is kept); returns how many.

        Args:
            job_ids: the jobs to requeue; none: the ``oldest`` ones.
            oldest: how many of the oldest to requeue when no id is given.

        Cancellation: one script: done entirely or not at all.
        """
        ids = [_check_job_id(job_id) for job_id in job_ids]
        check_count("oldest", oldest, minimum=1, maximum=_MAX_BATCH)
        return await _q.requeue_dead(
            self._client, self._keys, ids=[i for i in ids if i is not None], oldest=oldest
        )

    # ------------------------------------------------------------------ consuming

    def consumer(self, handler: Handler | None = None, *, name: str | None = None) -> QueueConsumer:
        """A consumer of this queue, to run with ``async with`` (see :class:`QueueConsumer`).

        Args:
            handler: ``async def handler(job) -> object``: a return acknowledges the
                job, an exception fails it (retried with backoff, dead-lettered after
                ``max_deliveries``). ``None``: take jobs yourself with
                :meth:`QueueConsumer.pop` or :meth:`QueueConsumer.jobs`.
            name: the consumer's name, unique among live consumers (by default one per
                process and call). A fixed name (a pod's name, say) gets back at once,
                on start, what a crashed run of the same name held.

        Raises:
            ConfigurationError: a bad handler or name.
        """
        return QueueConsumer(self, handler, name)


def _check_job_id(job_id: object) -> str | None:
    if job_id is None:
        return None
    if not isinstance(job_id, str):
        raise ConfigurationError(f"job_id must be a str, got {shown(job_id)}")
    check_name("job_id", job_id)
    return job_id


def _check_job(
    delay: float | None, priority: int | None, job_id: str | None
) -> tuple[int, int, str | None]:
    delay_us = 0 if delay is None else _us(check_seconds("delay", delay, zero=True))
    level = 0
    if priority is not None:
        level = check_count("priority", priority, minimum=-_MAX_PRIORITY, maximum=_MAX_PRIORITY)
    return delay_us, level, _check_job_id(job_id)


class QueueConsumer(anyio.AsyncContextManagerMixin):
    """A consumer of a :class:`ReliableQueue`, running its own task group.

    Create it with :meth:`ReliableQueue.consumer` and run it with ``async with`` (or
    start :meth:`run` in your task group). With a handler, jobs are passed to ``await
    handler(job)``, at most ``policy.concurrency`` at once; a return acknowledges the
    job (in batches), an exception fails it: it goes back to the queue after the
    policy's backoff, or to the dead-letter list after ``max_deliveries``. Without a
    handler, take jobs with :meth:`pop` or :meth:`jobs` and settle each with
    :meth:`ack` or :meth:`nack` (:meth:`extend` its lease if it runs long).

    While it runs, the consumer fetches jobs in batches (one script leases up to
    ``batch_size``; blocked consumers are woken by a marker when work arrives or a
    delayed job is due), renews the leases of the jobs it holds (buffered, or with a
    handler running) every ``visibility_timeout / 3``, and returns to the queue the jobs
    of consumers whose lease ran out (the reaper). A job handed to your own loop is yours:
    it is not renewed; settle it (or extend it) within ``visibility_timeout``.

    What leaves the ``async with``: the body's own exception as itself; a failure of the
    consumer's background work (an error reply it cannot handle) as one
    :class:`~aioredispatterns.RedisPatternsError`, after the same graceful shutdown; or
    cancellation. Never an ``ExceptionGroup``.

    Cancellation: cancelling the body (or :meth:`run`) starts the graceful shutdown:
    fetching stops, running handlers get ``drain_timeout`` seconds (shielded; their
    leases are still renewed), finished jobs are acknowledged, and then every job the
    consumer still holds (fetched but not started, cancelled after ``drain_timeout``,
    taken by your loop and not settled, or fetched by a script whose reply the
    cancellation cut off) goes back to the front of the queue in one script; those
    that never started do not count as a delivery. Should the server be unreachable
    then, they come back when their leases run out. No job is ever lost or left
    stranded, and none is acknowledged unprocessed.
    """

    def __init__(self, queue: ReliableQueue, handler: Handler | None, name: str | None) -> None:
        if handler is not None and not callable(handler):
            raise ConfigurationError("handler must be an async callable")
        if name is not None:
            if not isinstance(name, str):
                raise ConfigurationError(f"name must be a non-empty str, got {shown(name)}")
            check_name("consumer name", name)
        self.queue: ReliableQueue = queue
        self.name: str = name or _default_consumer_name()
        self.policy: QueuePolicy = queue.policy
        self._handler = handler
        self._client = queue._client
        self._keys = queue._keys
        self._serializer = queue._serializer
        self._lease_ms = _ms(self.policy.visibility_timeout)
        self._silent_ms = _ms(self.policy.visibility_timeout * _SILENT_TIMEOUTS)
        self._dead_max = self.policy.dead_letter_maxlen or 0
        # A fetch waits for at least this much room: resuming after every single
        # settled job would turn into fetches of one job each.
        self._worthwhile = max(1, self.policy.batch_size // 4)
        self._counts = _Counters()
        self._running = False
        # Jobs whose processing started and is not settled (a handler runs, or your loop
        # took it): on a graceful stop they count as delivered, the others do not.
        self._started: set[str] = set()
        # When the fetch loop, blocked, wants a wake-up marker set (a due delayed job).
        self._wake_deadline: float | None = None
        self._wake_changed = anyio.Event()
        self._pool = self._new_pool()

    def __repr__(self) -> str:
        return f"<QueueConsumer {self.name!r} of {self.queue.key!r}>"

    def _new_pool(self) -> WorkerPool[Job]:
        policy = self.policy
        return WorkerPool(
            name=f"{_q.text(self.queue.key)}/{self.name}",
            logger=logger,
            concurrency=policy.concurrency,
            max_in_flight=policy.max_in_flight,
            drain_timeout=policy.drain_timeout,
            ack_timeout=policy.ack_timeout,
            renew_every=policy.visibility_timeout / 3,
            send_acks=self._send_acks,
            renew=self._renew,
            on_failure=self._failed,
            counts=self._counts,
            new_backoff=self._new_backoff,
            left_behind="those jobs go back to the queue",
        )

    def _new_backoff(self) -> Backoff:
        state = state_of(self._client)
        return Backoff(base=state.backoff_base, cap=state.backoff_cap)

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> QueueStats:
        """A snapshot of this consumer's counters (a plain read: nothing to cancel)."""
        counts = {name: getattr(self._counts, name) for name in _Counters.__slots__}
        return QueueStats(**counts, in_flight=self._pool.window.in_flight)

    def _check_manual(self, what: str) -> None:
        if self._handler is not None:
            raise QueueError(f"{what} is for consumers without a handler")
        if not self._running:
            raise QueueError(f"{what} needs the consumer running (inside its async with)")

    async def pop(self, timeout: float | None = None) -> Job | None:  # noqa: ASYNC109
        """The next job (no handler): waits up to ``timeout`` seconds (``None``: until
        one comes); None on timeout or once the consumer stops.

        Settle it with :meth:`ack` or :meth:`nack` within ``visibility_timeout`` (or
        :meth:`extend` it): from now on its lease is not renewed for you.

        Raises:
            QueueError: the consumer has a handler, or is not running.

        Cancellation: a cancelled wait takes nothing; the next pop gets the job.
        """
        self._check_manual("pop()")
        if timeout is not None:
            check_seconds("timeout", timeout, zero=True)
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            async for job in self.jobs():
                return job
        return None

    def jobs(self) -> AsyncIterator[Job]:
        """Iterate the jobs delivered to this consumer (no handler); it ends when the
        consumer stops. Each job is yours once taken: see :meth:`pop`.

        Raises:
            QueueError: the consumer has a handler, or is not running.

        Cancellation: cancelling a wait for the next job takes nothing.
        """
        self._check_manual("jobs()")
        return _ConsumerJobs(self, self._pool.items())

    async def ack(self, *jobs: Job | str) -> int:
        """Acknowledge finished jobs (or ids): they are deleted; returns how many this
        consumer still held (a job whose lease ran out is left to its new delivery).

        Raises:
            QueueError: the consumer is not running.
            ConfigurationError: something that is neither a Job nor an id.

        Cancellation: the acknowledgement is one script: it landed or it did not; if
        not, the jobs come back after ``visibility_timeout`` (never lost).
        """
        if not self._running:
            raise QueueError("ack() needs the consumer running (inside its async with)")
        ids = list(dict.fromkeys(_job_id(job) for job in jobs))
        if not ids:
            return 0
        done = await _q.ack(self._client, self._keys, self.name, ids)
        self._counts.acked += done
        self._started.difference_update(ids)
        return done

    async def nack(
        self, job: Job, error: BaseException | str | None = None, *, retry_in: float | None = None
    ) -> bool:
        """Fail a job: back to the queue after ``retry_in`` seconds (``None``: the
        policy's backoff; 0: at once), or to the dead-letter list with ``error`` if this
        was its last allowed delivery. Returns False if the consumer no longer held it.

        Raises:
            QueueError: the consumer is not running.

        Cancellation: one script: done entirely or not at all; if not, the job comes
        back after ``visibility_timeout``.
        """
        if not self._running:
            raise QueueError("nack() needs the consumer running (inside its async with)")
        if not isinstance(job, Job):
            raise ConfigurationError(f"nack() takes a Job, got {type(job).__name__}")
        if retry_in is not None:
            check_seconds("retry_in", retry_in, zero=True)
        self._counts.failed += 1
        return await self._nack(job, _error_text(error), retry_in) > 0

    async def extend(self, job: Job) -> None:
        """Renew a job's lease now (a full ``visibility_timeout`` from now).

        Raises:
            JobLost: this consumer no longer holds the job.
            QueueError: the consumer is not running.

        Cancellation: the renewal may or may not have happened; the lease is as valid as
        before either way.
        """
        if not self._running:
            raise QueueError("extend() needs the consumer running (inside its async with)")
        job_id = _job_id(job)
        lost = await _q.renew(
            self._client, self._keys, consumer=self.name, lease_ms=self._lease_ms, ids=[job_id]
        )
        if lost:
            self._counts.lost += 1
            self._started.discard(job_id)
            raise JobLost(f"job {job_id!r} is no longer held by consumer {self.name!r}")
        self._counts.refreshed += 1

    async def run(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: ``await tg.start(consumer.run)`` returns once it consumes.

        Cancellation: the graceful shutdown described on the class.
        """
        async with self:
            task_status.started(self)
            await anyio.sleep_forever()

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._running:
            raise QueueError("this QueueConsumer is already running")
        info = await server_info(self._client)
        # BLMOVE came with RPOP's COUNT and ZADD's LT/GT (Redis 6.2), which the scripts use.
        if not info.blmove:
            raise UnsupportedServerError(f"ReliableQueue needs Redis >= 6.2; {info} is older")
        # What a previous run of this consumer name held (it crashed): back at once.
        await self._release(stopping=False, why="consumer restarted")
        self._pool = pool = self._new_pool()
        self._started = set()
        self._wake_deadline = None
        self._wake_changed = anyio.Event()
        self._running = True
        try:
            async with (
                background("QueueConsumer") as tg,
                pool.running(
                    tg,
                    [self._fetch_loop, self._reap_loop, self._wake_loop],
                    None if self._handler is None else self._handle,
                    on_stopped=self._release_on_stop,
                ),
            ):
                yield self
        finally:
            self._running = False

    async def _release(self, *, stopping: bool, why: str) -> None:
        returned, dead = await _q.release(
            self._client,
            self._keys,
            consumer=self.name,
            max_deliveries=self.policy.max_deliveries,
            dead_max=self._dead_max,
            stopping=stopping,
            why=why,
            started=list(self._started),
        )
        self._counts.released += returned
        self._counts.dead_lettered += dead
        if returned or dead:
            logger.info(
                "%s/%s: returned %d jobs to the queue (%s), dead-lettered %d",
                _q.text(self.queue.key),
                self.name,
                returned,
                why,
                dead,
            )

    async def _release_on_stop(self) -> None:
        try:
            await self._release(stopping=True, why="consumer stopped")
        except RedisPatternsError as exc:
            logger.warning(
                "%s/%s: could not return held jobs on stop (they come back when their "
                "leases run out): %s",
                _q.text(self.queue.key),
                self.name,
                exc,
            )

    # ------------------------------------------------------------------ intake

    async def _fetch_loop(self) -> None:
        policy = self.policy
        pool = self._pool
        serializer = self._serializer
        backoff = self._new_backoff()
        while True:
            failure: RedisPatternsError | None = None
            raw: list[_q.RawJob] = []
            wait_ms = asked = 0
            # Room for COUNT jobs is reserved before asking: what arrives always fits.
            async with pool.window.reserve(policy.batch_size, at_least=self._worthwhile) as room:
                try:
                    raw, wait_ms = await _q.pop(
                        self._client,
                        self._keys,
                        consumer=self.name,
                        count=room.granted,
                        lease_ms=self._lease_ms,
                        max_deliveries=policy.max_deliveries,
                        dead_max=self._dead_max,
                    )
                except (ConnectionFailed, CommandTimeout) as exc:
                    failure = exc
                else:
                    backoff.reset()
                    for entry in raw:
                        # A job refused here (shutting down) stays leased to this
                        # consumer: the release on stop returns it.
                        pool.dispatch(room, Job(*entry, serializer))
                    asked = room.granted
            if failure is not None:
                self._counts.read_errors += 1
                logger.warning("%s: fetch failed, retrying: %s", pool.name, failure)
                await backoff.sleep()
            elif len(raw) < asked and wait_ms != 0:
                # The queue had no more: wait for a marker (a push after this fetch
                # sets one, so no wake-up is missed) or for the next due time.
                try:
                    await self._wait_for_work(wait_ms)
                except (ConnectionFailed, CommandTimeout) as exc:
                    # A lost wake-up only delays: the next fetch looks anyway.
                    self._counts.read_errors += 1
                    logger.warning("%s: wait for work failed: %s", pool.name, exc)
                    await backoff.sleep()

    async def _wait_for_work(self, wait_ms: int) -> None:
        block = self.policy.block
        if 0 < wait_ms < block * 1000:
            # The server times a blocked command out on its own tick (up to 100 ms
            # late): at the due time the wake loop sets a marker instead, which wakes a
            # blocked consumer (this one or another: any of them moves the due job).
            self._set_wake_at(anyio.current_time() + wait_ms / 1000)
        try:
            await execute_blocking(
                self._client, "BZPOPMIN", self._keys.wake, f"{block:.3f}", block=block
            )
        finally:
            self._set_wake_at(None)

    def _set_wake_at(self, deadline: float | None) -> None:
        self._wake_deadline = deadline
        self._wake_changed.set()
        self._wake_changed = anyio.Event()

    async def _wake_loop(self) -> None:
        while True:
            deadline, changed = self._wake_deadline, self._wake_changed
            if deadline is None:
                await changed.wait()
                continue
            with anyio.move_on_after(deadline - anyio.current_time()):
                await changed.wait()
                continue
            self._wake_deadline = None
            try:
                await execute(self._client, "ZADD", self._keys.wake, 0, "r")
            except (ConnectionFailed, CommandTimeout) as exc:
                # The blocked wait ends by its block time and fetches then.
                logger.debug("%s: wake-up marker not set: %s", self._pool.name, exc)

    async def _reap_loop(self) -> None:
        policy = self.policy
        backoff = self._new_backoff()
        while True:
            try:
                returned, dead, next_ms, silent = await _q.reap(
                    self._client,
                    self._keys,
                    count=policy.batch_size,
                    max_deliveries=policy.max_deliveries,
                    dead_max=self._dead_max,
                    silent_ms=self._silent_ms,
                )
                for other in silent:
                    if other != self.name:
                        await _q.forget(
                            self._client, self._keys, consumer=other, silent_ms=self._silent_ms
                        )
            except (ConnectionFailed, CommandTimeout) as exc:
                logger.warning("%s: reaper failed, retrying: %s", self._pool.name, exc)
                await backoff.sleep()
                continue
            backoff.reset()
            if returned or dead:
                self._counts.reaped += returned
                self._counts.dead_lettered += dead
                logger.warning(
                    "%s: %d jobs whose lease ran out went back to the queue, %d dead-lettered",
                    self._pool.name,
                    returned,
                    dead,
                )
            if returned + dead >= policy.batch_size:
                continue  # more leases ran out than one script handles
            # Leases only ever end later than the earliest one known now (a new lease or
            # a renewal ends a full visibility timeout ahead), so sleep until it runs out.
            wait = policy.visibility_timeout if next_ms < 0 else next_ms / 1000
            await anyio.sleep(min(max(wait, 0.001), _REAP_EVERY_MAX))

    # ------------------------------------------------------------------ the pool's hooks

    async def _handle(self, job: Job) -> object:
        handler = self._handler
        assert handler is not None
        # Still "started" if the handler raises (until it is failed) or is cancelled
        # (after drain_timeout: the release on stop counts that delivery).
        self._started.add(job.id)
        result = await handler(job)
        self._started.discard(job.id)
        return result

    async def _send_acks(self, ids: Sequence[str]) -> None:
        self._counts.acked += await _q.ack(self._client, self._keys, self.name, list(ids))

    async def _renew(self, held: list[str]) -> int:
        lost = await _q.renew(
            self._client, self._keys, consumer=self.name, lease_ms=self._lease_ms, ids=held
        )
        if lost:
            self._counts.lost += len(lost)
            logger.warning(
                "%s: %d held jobs were no longer leased to this consumer (it stalled "
                "past visibility_timeout); another consumer may run them",
                self._pool.name,
                len(lost),
            )
        return len(held) - len(lost)

    async def _failed(self, job: Job, exc: Exception) -> None:
        try:
            await self._nack(job, f"{type(exc).__name__}: {exc}", None)
        except RedisPatternsError as error:
            # It stays leased and is no longer renewed: it comes back after the lease.
            logger.warning("%s: could not fail job %s: %s", self._pool.name, job.id, error)

    async def _nack(self, job: Job, error: str, retry_in: float | None) -> int:
        delay = self.policy.retry_delay(job.deliveries) if retry_in is None else retry_in
        outcome = await _q.nack(
            self._client,
            self._keys,
            consumer=self.name,
            job_id=job.id,
            error=error,
            retry_us=_us(delay),
            max_deliveries=self.policy.max_deliveries,
            dead_max=self._dead_max,
        )
        self._started.discard(job.id)
        if outcome:
            self._counts.nacked += 1
        if outcome == 2:
            self._counts.dead_lettered += 1
            logger.warning(
                "%s: job %s dead-lettered after %d deliveries: %s",
                self._pool.name,
                job.id,
                job.deliveries,
                error,
            )
        return outcome


def _job_id(job: object) -> str:
    if isinstance(job, Job):
        return job.id
    if isinstance(job, str) and job:
        return job
    raise ConfigurationError(f"expected a Job or a job id, got {shown(job)}")


def _error_text(error: BaseException | str | None) -> str:
    if error is None:
        return "failed"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


class _ConsumerJobs:
    """The iterator :meth:`QueueConsumer.jobs` returns (not a generator: no aclose)."""

    __slots__ = ("_consumer", "_items")

    def __init__(self, consumer: QueueConsumer, items: AsyncIterator[Job]) -> None:
        self._consumer = consumer
        self._items = items

    def __aiter__(self) -> _ConsumerJobs:
        return self

    async def __anext__(self) -> Job:
        job = await self._items.__anext__()
        # Synchronous from the take to here: a cancellation cannot fall in between.
        self._consumer._started.add(job.id)
        return job
