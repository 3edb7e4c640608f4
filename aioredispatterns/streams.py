"""Redis Streams: a producer, and a consumer group that runs a bounded worker pool.

:class:`StreamProducer` appends messages (``XADD``) with retention. :class:`ConsumerGroup`
reads them with ``XREADGROUP`` in batches and either calls your handler for each (at most
``concurrency`` at once) or hands them to your own loop (``async for m in
group.messages()``). Around that it does what a worker pool on streams needs:

* successes are acknowledged in batches (one ``XACK`` for many ids);
* a failed message stays pending; messages left idle longer than ``claim_idle`` by a
  consumer that died or stalled (or that failed them) are taken over with
  ``XAUTOCLAIM`` and retried;
* a message that would be delivered more than ``max_deliveries`` times goes to a
  dead-letter stream (same hash tag, so the move is one atomic script) with its error;
* at most ``max_in_flight`` messages are read and unsettled at once (backpressure): a
  read or a reclaim reserves room for as many messages as it asks the server for;
* the group is re-created when it disappears (a server restart without persistence
  answers ``NOGROUP``), and idle consumers without pending entries are removed;
* leaving the ``async with`` stops reading, lets running handlers finish up to
  ``drain_timeout``, flushes the acks and leaves everything else pending for others.

Held messages are renewed, like a lease. While a message waits in this consumer's
buffer or its handler runs (in :meth:`ConsumerGroup.messages` mode: until your loop takes
it), the consumer resets the message's idle time every ``claim_idle / 3`` (``XCLAIM ...
JUSTID``, which counts no delivery), so no consumer (itself included) claims it and its
delivery count stays put. A handler that outlives ``claim_idle`` therefore keeps its
message for as long as its consumer process is alive and reachable; if the consumer
dies, or stalls or loses the server for longer than ``claim_idle``, another consumer
takes the message over after ``claim_idle``, and the stalled one does not take it back.

Delivery is **at least once**: a handler may see a message again (its worker died or
stalled after the handler ran but before the ack went out, or a message your own loop
took stayed unacknowledged past ``claim_idle``). Every :class:`StreamMessage` carries its
id and delivery count so handlers can be idempotent.

Keys: the stream is ``<prefix>:stream:{<name>}`` and its dead-letter stream
``<prefix>:stream:{<name>}:dead``; one hash tag, one cluster slot.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self, TypeAlias

import anyio
from anyio.abc import TaskStatus

from . import _streams_redis as _r
from ._backoff import Backoff
from ._capabilities import server_info
from ._commands import Arg, execute, execute_blocking, execute_many
from ._connection import AnyRedis, check_client, state_of
from ._keys import DEFAULT_PREFIX, KeySpace, KeyT, keyspace
from ._scope import background
from ._validate import check_count, check_flag, check_items, check_name, check_seconds, shown
from ._worker import Reservation, WorkerPool
from .errors import (
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    RedisPatternsError,
    UnsupportedServerError,
)
from .serializers import Serializer, check_serializer, default_serializer

# Entry counts (MAXLEN) are compared in Lua for the dead-letter stream: keep them exact.
_MAX_LENGTH = 2**53
# Concurrency, batch sizes, in-flight bounds: anything above this is a typo, not a plan.
_MAX_COUNT = 1_000_000
_STREAM_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")

__all__ = (
    "ConsumerGroup",
    "ConsumerPolicy",
    "DeadLetter",
    "GroupInfo",
    "GroupStats",
    "ProducerStats",
    "StreamError",
    "StreamMessage",
    "StreamProducer",
    "StreamRetention",
)

logger: logging.Logger = logging.getLogger("aioredispatterns.streams")

# What ConsumerGroup(handler=...) takes: awaited once per delivered message.
Handler: TypeAlias = Callable[["StreamMessage"], Awaitable[object]]

_NO_PENDING = "0-0"


class StreamError(RedisPatternsError):
    """Base of the errors raised by the streams primitives."""


def _stream_keys(prefix: str, name: object) -> KeySpace:
    return keyspace(prefix, "stream", name)


# --------------------------------------------------------------------------- producer


@dataclass(frozen=True, slots=True)
class StreamRetention:
    """How much of a stream to keep; applied by every ``XADD`` of a producer.

    Attributes:
        maxlen: keep about this many newest entries (``MAXLEN ~``).
        max_age: keep entries younger than this many seconds (``MINID ~``, computed from
            this process's clock: entry ids carry the server's clock, so keep the two
            in sync or leave a margin).
        exact: trim exactly (``=``) instead of approximately (``~``, much cheaper).

    Trimming never looks at consumer groups: an entry trimmed before a group read it is
    gone for that group. Size retention for the slowest consumer.
    """

    maxlen: int | None = None
    max_age: float | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        if (self.maxlen is None) == (self.max_age is None):
            raise ConfigurationError("StreamRetention takes exactly one of maxlen or max_age")
        if self.maxlen is not None:
            check_count("StreamRetention.maxlen", self.maxlen, minimum=1, maximum=_MAX_LENGTH)
        if self.max_age is not None:
            check_seconds("StreamRetention.max_age", self.max_age)
        check_flag("StreamRetention.exact", self.exact)

    def args(self) -> list[Arg]:
        """The XADD trimming arguments."""
        how = "=" if self.exact else "~"
        if self.maxlen is not None:
            return ["MAXLEN", how, self.maxlen]
        assert self.max_age is not None
        oldest_ms = int((time.time() - self.max_age) * 1000)
        return ["MINID", how, f"{max(oldest_ms, 0)}-0"]


@dataclass(slots=True)
class ProducerStats:
    """Counters of one :class:`StreamProducer` in this process (``.stats`` is a copy).

    A plain snapshot in memory: reading it sends nothing, so nothing to cancel.

    Attributes:
        added: entries appended (replies received).
        failed: ``add`` / ``add_many`` calls that raised after sending (the entry may
            or may not have been appended).
    """

    added: int = 0
    failed: int = 0


class StreamProducer:
    """Appends messages to a stream; field values go through the serializer.

    Args:
        client: a redis.asyncio client (see :func:`aioredispatterns.connect`).
        stream: the stream's name (a key inside ``prefix``; validated).
        prefix: the key namespace.
        serializer: encodes each field value (JSON by default).
        retention: trimming applied with every append (none by default).

    Raises:
        ConfigurationError: bad name, prefix, serializer or retention.

    Cancellation: every value is encoded before anything is sent; a cancelled ``add``
    may still have appended its entry (the reply is lost), and a cancelled ``add_many``
    may have appended some of its entries.
    """

    __slots__ = ("__weakref__", "_client", "_counts", "_keys", "_retention", "_serializer", "key")

    def __init__(
        self,
        client: AnyRedis,
        stream: str | bytes,
        *,
        prefix: str = DEFAULT_PREFIX,
        serializer: Serializer | None = None,
        retention: StreamRetention | None = None,
    ) -> None:
        self._client = check_client(client)
        self._keys = _stream_keys(prefix, stream)
        self.key: KeyT = self._keys.key()
        self._serializer = (
            default_serializer() if serializer is None else check_serializer(serializer)
        )
        if retention is not None and not isinstance(retention, StreamRetention):
            raise ConfigurationError("retention must be a StreamRetention")
        self._retention = retention
        self._counts = ProducerStats()

    def _head(self) -> list[Arg]:
        head: list[Arg] = ["XADD", self.key]
        if self._retention is not None:
            head += self._retention.args()
        head.append("*")
        return head

    def _xadd_args(self, head: list[Arg], fields: Mapping[str, Any]) -> list[Arg]:
        if not isinstance(fields, Mapping) or not fields:
            raise ConfigurationError("a message is a non-empty mapping of field names to values")
        args = head.copy()
        dumps = self._serializer.dumps
        for name, value in fields.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError("field names must be non-empty str")
            check_name("field name", name)
            args += [name, dumps(value)]
        return args

    async def add(self, fields: Mapping[str, Any]) -> str:
        """Append one message; returns its id (``"<ms>-<seq>"``, assigned by the server).

        Raises:
            SerializationError: a value could not be encoded (nothing was written).

        Cancellation: the message may or may not have been appended.
        """
        args = self._xadd_args(self._head(), fields)
        try:
            reply = await execute(self._client, *args)
        except RedisPatternsError:
            self._counts.failed += 1
            raise
        self._counts.added += 1
        return _r.text(reply)

    async def add_many(self, messages: Iterable[Mapping[str, Any]]) -> list[str]:
        """Append many messages in one pipelined round trip; returns their ids in order.

        Every message is encoded before anything is sent, so an encoding error writes
        nothing. Not a transaction: if the connection breaks midway, a prefix may have
        been appended. The batch is never re-sent (an append is not idempotent), so no
        message is appended twice.

        Raises:
            SerializationError: a value could not be encoded (nothing was written).
            ConnectionFailed: the connection broke; any prefix of the messages may have
                been appended.
            CommandTimeout: no reply in time; likewise.

        Cancellation: any prefix of the messages may have been appended.
        """
        head = self._head()
        commands = [self._xadd_args(head, fields) for fields in check_items("messages", messages)]
        if not commands:
            return []
        try:
            replies = await execute_many(self._client, commands, idempotent=False)
        except RedisPatternsError:
            self._counts.failed += 1
            raise
        self._counts.added += len(replies)
        return [_r.text(reply) for reply in replies]

    @property
    def stats(self) -> ProducerStats:
        """A snapshot of this producer's counters (this process only)."""
        return dataclasses.replace(self._counts)


# --------------------------------------------------------------------------- consumer side


class StreamMessage:
    """One stream entry delivered to this consumer.

    Attributes:
        id: the entry id (``"<ms>-<seq>"``), unique within the stream: use it to make
            handlers idempotent.
        deliveries: how many times the group has delivered it (1 on the first delivery).
        raw_fields: the field values as stored (bytes).
    """

    __slots__ = ("_fields", "_serializer", "deliveries", "id", "raw_fields")

    id: str
    raw_fields: dict[bytes, bytes]
    deliveries: int

    def __init__(
        self,
        message_id: str,
        raw_fields: dict[bytes, bytes],
        deliveries: int,
        serializer: Serializer,
    ) -> None:
        self.id = message_id
        self.raw_fields = raw_fields
        self.deliveries = deliveries
        self._serializer = serializer
        self._fields: dict[str, Any] | None = None

    @property
    def fields(self) -> dict[str, Any]:
        """The field values decoded by the serializer (decoded on first access).

        Raises:
            SerializationError: a value is not valid for the serializer.
        """
        if self._fields is None:
            loads = self._serializer.loads
            self._fields = {_r.text(k): loads(v) for k, v in self.raw_fields.items()}
        return self._fields

    def __repr__(self) -> str:
        return f"StreamMessage(id={self.id!r}, deliveries={self.deliveries})"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry of the dead-letter stream.

    Attributes:
        id: its id in the dead-letter stream.
        message_id: the id it had in the original stream.
        group: the group that gave up on it.
        consumer: the consumer that dead-lettered it.
        deliveries: how many times it was delivered.
        error: the last handler error (or why it was given up).
        raw_fields: the original field values.
    """

    id: str
    message_id: str
    group: str
    consumer: str
    deliveries: int
    error: str
    raw_fields: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class ConsumerPolicy:
    """How a :class:`ConsumerGroup` reads, retries and shuts down.

    Attributes:
        concurrency: handler calls running at once (handler mode).
        max_in_flight: messages read and not yet settled, counting those a read or
            reclaim in progress has asked for; reading pauses at this bound.
        batch_size: the COUNT of one XREADGROUP / XAUTOCLAIM.
        block: seconds one XREADGROUP waits for new messages.
        claim_idle: seconds a pending message must go without renewal before a
            consumer takes it over. A live consumer renews the messages it holds
            (buffered, or with a handler running) every ``claim_idle / 3``, so a slow
            handler keeps its message; ``claim_idle`` is how long the messages of a
            consumer that died or stalled wait for another one, and about how long a
            failed message waits for its retry. Keep it well above the pauses a
            healthy process may have (GC, a busy event loop, a brief network blip).
        claim_interval: seconds between reclaim scans (default ``claim_idle / 2``).
        max_deliveries: deliveries a message gets before it is dead-lettered.
        drain_timeout: on shutdown, seconds running handlers get to finish.
        ack_timeout: on shutdown, seconds the final XACK may take.
        consumer_idle: remove other consumers idle this many seconds with no pending
            entry (``None``: never).
        start_id: where a newly created group starts (``"0"``: the whole stream,
            ``"$"``: only new messages). Also used when the group is re-created.
        dead_letter_maxlen: approximate bound of the dead-letter stream (``None``: none).
    """

    concurrency: int = 16
    max_in_flight: int = 256
    batch_size: int = 100
    block: float = 1.0
    claim_idle: float = 60.0
    claim_interval: float | None = None
    max_deliveries: int = 5
    drain_timeout: float = 10.0
    ack_timeout: float = 5.0
    consumer_idle: float | None = 3600.0
    start_id: str = "0"
    dead_letter_maxlen: int | None = 100_000

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_in_flight", "batch_size", "max_deliveries"):
            check_count(
                f"ConsumerPolicy.{name}", getattr(self, name), minimum=1, maximum=_MAX_COUNT
            )
        for name in ("block", "claim_idle", "drain_timeout", "ack_timeout"):
            _check_seconds(name, getattr(self, name))
        for name in ("claim_interval", "consumer_idle"):
            if getattr(self, name) is not None:
                _check_seconds(name, getattr(self, name))
        if not isinstance(self.start_id, str) or not _is_start_id(self.start_id):
            raise ConfigurationError(
                "ConsumerPolicy.start_id must be '0', '$' or a stream id like '1700000000000-0',"
                f" got {self.start_id!r}"
            )
        if self.dead_letter_maxlen is not None:
            check_count(
                "ConsumerPolicy.dead_letter_maxlen",
                self.dead_letter_maxlen,
                minimum=1,
                maximum=_MAX_LENGTH,
            )

    @property
    def reclaim_every(self) -> float:
        interval = self.claim_interval if self.claim_interval is not None else self.claim_idle / 2
        return min(max(interval, 0.01), 30.0)


def _check_seconds(name: str, value: object) -> None:
    check_seconds(f"ConsumerPolicy.{name}", value)


def _message_id(message: object) -> str:
    if isinstance(message, StreamMessage):
        return message.id
    if isinstance(message, str) and _STREAM_ID.fullmatch(message):
        return message
    raise ConfigurationError(
        f"ack() takes StreamMessages or ids like '1700000000000-0', got {shown(message)}"
    )


def _is_start_id(value: str) -> bool:
    if value == "$":
        return True
    match = _STREAM_ID.fullmatch(value)
    return match is not None and all(
        int(part) < 2**64 for part in match.groups() if part is not None
    )


@dataclass(frozen=True, slots=True)
class GroupStats:
    """What this consumer did since it started (a snapshot; counters only grow).

    Attributes:
        processed: handler calls that returned (handler mode).
        failed: handler calls that raised.
        retried: messages delivered to this consumer for the second time or more.
        dead_lettered: messages this consumer moved to the dead-letter stream.
        claimed: messages taken over from idle consumers (XAUTOCLAIM).
        acked: message ids acknowledged (XACK replies received).
        recreated: times the group was found missing and created again.
        consumers_removed: idle consumers removed by hygiene.
        read_errors: reads that failed (connection lost ...) and were retried.
        in_flight: messages read and not yet settled, right now (never more than
            ``max_in_flight``).
        refreshed: renewals of held messages (one per message per renewal): each reset
            the message's idle time so that no other consumer claims it.
    """

    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    acked: int = 0
    recreated: int = 0
    consumers_removed: int = 0
    read_errors: int = 0
    in_flight: int = 0
    refreshed: int = 0


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """The group as the server sees it (XINFO GROUPS, XLEN).

    Attributes:
        length: entries in the stream.
        pending: entries delivered and not yet acknowledged, all consumers together.
        lag: entries not yet delivered to the group (``None`` where the server cannot
            tell: Redis < 7, or after deletions).
        consumers: consumers the group knows.
        last_delivered_id: the last id delivered to the group.
        dead_letters: entries in the dead-letter stream.
    """

    length: int
    pending: int
    lag: int | None
    consumers: int
    last_delivered_id: str
    dead_letters: int


class _Counters:
    """The live, mutable counterparts of the GroupStats counters."""

    __slots__ = tuple(f.name for f in dataclasses.fields(GroupStats) if f.name != "in_flight")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    processed: int
    failed: int
    retried: int
    dead_lettered: int
    claimed: int
    acked: int
    recreated: int
    consumers_removed: int
    read_errors: int
    refreshed: int


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ConsumerGroup(anyio.AsyncContextManagerMixin):
    """A consumer of a stream's consumer group, running its own task group.

    Use it with ``async with`` (or start :meth:`run` in your task group). With a
    ``handler``, each message is passed to ``await handler(message)`` (at most
    ``policy.concurrency`` at once); a handler that returns acknowledges the message, one
    that raises leaves it pending for a retry after ``policy.claim_idle``. Without a
    handler, iterate :meth:`messages` and call :meth:`ack` yourself.

    While a message waits in this consumer's buffer or its handler runs, the consumer
    renews it every ``claim_idle / 3`` (its idle time is reset without counting a
    delivery), so nobody claims it, this consumer included: a handler that outlives
    ``claim_idle`` keeps its message as long as this process is alive and reaches the
    server. If it dies, or stalls or loses the server for longer than ``claim_idle``,
    another consumer takes its messages over after ``claim_idle``; renewals never take a
    message back from the consumer that claimed it.

    Args:
        client: a redis.asyncio client (see :func:`aioredispatterns.connect`). Each
            blocking read takes one pooled connection of its own.
        stream: the stream's name (as given to :class:`StreamProducer`).
        group: the consumer group's name.
        handler: ``async def handler(message) -> object``, or ``None`` for
            :meth:`messages`.
        consumer: this consumer's name (unique per process by default; a fixed name
            lets a restarted worker be recognised in ``XINFO CONSUMERS``).
        policy: batching, retries, backpressure and shutdown settings.
        prefix: the key namespace.
        serializer: decodes field values (JSON by default).

    Raises:
        ConfigurationError: bad names, policy or serializer (before any command).

    What leaves the ``async with``: the body's own exception as itself; a failure of the
    group's background work (a reply it cannot handle, a script error) as one
    :class:`~aioredispatterns.RedisPatternsError`, after the same graceful shutdown; or
    cancellation. Never an ``ExceptionGroup``.

    Cancellation: cancelling the ``async with`` body (or :meth:`run`) starts the same
    graceful shutdown as leaving it: reading stops, running handlers get
    ``drain_timeout`` seconds (shielded; their messages are still renewed) to finish,
    finished ones are acknowledged, the rest stay pending for another consumer. A
    blocking read cancelled mid-flight closes its connection; messages the server
    delivered to it stay in this consumer's pending list and are reclaimed after
    ``claim_idle``. Nothing is ever acknowledged unprocessed.
    """

    def __init__(
        self,
        client: AnyRedis,
        stream: str | bytes,
        group: str,
        *,
        handler: Handler | None = None,
        consumer: str | None = None,
        policy: ConsumerPolicy | None = None,
        prefix: str = DEFAULT_PREFIX,
        serializer: Serializer | None = None,
    ) -> None:
        self._client = check_client(client)
        keys = _stream_keys(prefix, stream)
        self.key: KeyT = keys.key()
        self.dead_letter_key: KeyT = keys.key("dead")
        if not isinstance(group, str):
            raise ConfigurationError("group must be a non-empty str")
        check_name("group", group)
        if consumer is not None:
            if not isinstance(consumer, str):
                raise ConfigurationError("consumer must be a non-empty str")
            check_name("consumer", consumer)
        if handler is not None and not callable(handler):
            raise ConfigurationError("handler must be an async callable")
        if policy is not None and not isinstance(policy, ConsumerPolicy):
            raise ConfigurationError("policy must be a ConsumerPolicy")
        self.group: str = group
        self.consumer: str = consumer or _default_consumer_name()
        self.policy: ConsumerPolicy = policy or ConsumerPolicy()
        self._handler = handler
        self._serializer = (
            default_serializer() if serializer is None else check_serializer(serializer)
        )
        self._counts = _Counters()
        self._running = False
        # A read or reclaim waits for at least this much room: resuming after every
        # single settled message would turn into requests of COUNT 1.
        self._worthwhile = max(1, self.policy.batch_size // 4)
        self._pool = self._new_pool()
        self._group_lock = anyio.Lock()

    def _new_pool(self) -> WorkerPool[StreamMessage]:
        # One per run: the buffer, the credit window (room for max_in_flight messages,
        # counting those a read or reclaim asked for), the messages held and renewed
        # every claim_idle / 3, the ack batcher.
        policy = self.policy
        return WorkerPool(
            name=f"{self.group}/{self.consumer}",
            logger=logger,
            concurrency=policy.concurrency,
            max_in_flight=policy.max_in_flight,
            drain_timeout=policy.drain_timeout,
            ack_timeout=policy.ack_timeout,
            renew_every=policy.claim_idle / 3,
            send_acks=self._xack,
            renew=self._refresh,
            on_failure=self._failed,
            counts=self._counts,
            new_backoff=self._new_backoff,
            left_behind="those messages stay pending",
        )

    def _new_backoff(self) -> Backoff:
        state = state_of(self._client)
        return Backoff(base=state.backoff_base, cap=state.backoff_cap)

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> GroupStats:
        """A snapshot of this consumer's counters (a plain read: nothing to cancel)."""
        counts = {name: getattr(self._counts, name) for name in _Counters.__slots__}
        return GroupStats(**counts, in_flight=self._pool.window.in_flight)

    def ack(self, *messages: StreamMessage | str) -> None:
        """Acknowledge messages (or ids): queued and sent in the next batched XACK.

        The batch goes out within one round trip; the final batch is flushed on
        shutdown. Acknowledging twice is harmless. Not a coroutine: nothing to cancel;
        what is queued is sent even if the caller is cancelled right after.

        Raises:
            StreamError: the group is not running.
            ConfigurationError: something that is neither a message nor a stream id.
        """
        if not self._running:
            raise StreamError("ack() needs the group running (inside its async with)")
        ids = [_message_id(message) for message in messages]  # all checked before any is queued
        self._pool.acks.add(ids)

    async def reject(self, message: StreamMessage, error: Exception) -> None:
        """Report that processing ``message`` failed (for :meth:`messages` loops).

        Below ``max_deliveries`` the message stays pending and is retried after
        ``claim_idle``; on its last allowed delivery it moves to the dead-letter stream
        with ``error``, which also acknowledges it. Counted as ``failed``.

        Cancellation: the move to the dead-letter stream is one script: it happened
        entirely or not at all; if not, the reclaim loop dead-letters it later.
        """
        if not self._running:
            raise StreamError("reject() needs the group running (inside its async with)")
        if not isinstance(message, StreamMessage):
            raise ConfigurationError(
                f"reject() takes a StreamMessage, got {type(message).__name__}"
            )
        self._counts.failed += 1
        await self._failed(message, error)

    def messages(self) -> AsyncIterator[StreamMessage]:
        """Iterate the messages delivered to this consumer (when there is no handler).

        Acknowledge each with :meth:`ack` once processed, or :meth:`reject` it. A
        message is renewed (kept from other consumers) while it waits to be taken from
        this iterator; once taken, it is yours: unacknowledged, it is delivered again
        (here or elsewhere) about ``claim_idle`` after it was taken. The iteration ends
        when the group shuts down. Backpressure: reading pauses while ``max_in_flight``
        messages wait to be taken from this iterator.

        Raises:
            StreamError: the group has a handler, or is not running.

        Cancellation: cancelling a wait for the next message takes nothing from the
        buffer; the next iteration gets it.
        """
        if self._handler is not None:
            raise StreamError("messages() is for groups without a handler")
        if not self._running:
            raise StreamError("messages() needs the group running (inside its async with)")
        return self._pool.items()

    async def info(self) -> GroupInfo:
        """The group's pending count, lag and consumers from XINFO GROUPS; stream lengths.

        Raises:
            StreamError: the group does not exist.

        Cancellation: read only; nothing is left behind.
        """
        try:
            groups = await execute(self._client, "XINFO", "GROUPS", self.key)
        except CommandError as exc:
            raise StreamError(f"no stream {self.key!r}: {exc}") from exc
        for raw in groups:
            entry = {_r.text(k): v for k, v in _r.pairs(raw).items()}
            if _r.text(entry.get("name", b"")) == self.group:
                break
        else:
            raise StreamError(f"no group {self.group!r} on {self.key!r}")
        length = await execute(self._client, "XLEN", self.key)
        dead = await execute(self._client, "XLEN", self.dead_letter_key)
        lag = entry.get("lag")
        return GroupInfo(
            length=int(length),
            pending=int(entry["pending"]),
            lag=None if lag is None else int(lag),
            consumers=int(entry["consumers"]),
            last_delivered_id=_r.text(entry["last-delivered-id"]),
            dead_letters=int(dead),
        )

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` entries of the dead-letter stream (read only).

        Cancellation: read only; nothing is left behind.
        """
        check_count("count", count, minimum=1, maximum=_MAX_COUNT)
        reply = await execute(
            self._client, "XRANGE", self.dead_letter_key, "-", "+", "COUNT", count
        )
        letters = []
        for entry_id, raw in reply:
            fields = _r.pairs(raw)
            meta = {k[4:].decode(): v for k, v in fields.items() if k.startswith(b"dlq:")}
            letters.append(
                DeadLetter(
                    id=_r.text(entry_id),
                    message_id=_r.text(meta.get("id", b"")),
                    group=_r.text(meta.get("group", b"")),
                    consumer=_r.text(meta.get("consumer", b"")),
                    deliveries=int(meta.get("deliveries", 0)),
                    error=_r.text(meta.get("error", b"")),
                    raw_fields={k: v for k, v in fields.items() if not k.startswith(b"dlq:")},
                )
            )
        return letters

    async def run(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: ``await tg.start(group.run)`` returns once it consumes.

        Cancellation: the graceful shutdown described on the class.
        """
        async with self:
            task_status.started(self)
            await anyio.sleep_forever()

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._running:
            raise StreamError("this ConsumerGroup is already running")
        info = await server_info(self._client)
        if not info.xautoclaim:
            raise UnsupportedServerError(f"streams need XAUTOCLAIM (Redis >= 6.2); {info} lacks it")
        await _r.create_group(self._client, self.key, self.group, self.policy.start_id)
        self._pool = pool = self._new_pool()
        self._group_lock = anyio.Lock()
        intake = [self._read_loop, self._reclaim_loop]
        if self.policy.consumer_idle is not None:
            intake.append(functools.partial(self._hygiene_loop, self.policy.consumer_idle))
        self._running = True
        try:
            async with (
                background("ConsumerGroup") as tg,
                pool.running(tg, intake, self._handler),
            ):
                yield self
        finally:
            self._running = False

    # ------------------------------------------------------------------ intake

    def _dispatch(
        self, credits: Reservation, message_id: bytes, fields: dict[bytes, bytes], deliveries: int
    ) -> bool:
        """Hand one delivered entry to the workers; False if it was left pending (it is
        reclaimed after claim_idle)."""
        message = StreamMessage(message_id.decode(), fields, deliveries, self._serializer)
        return self._pool.dispatch(credits, message)

    async def _ensure_group(self, cause: BaseException) -> None:
        async with self._group_lock:
            if await _r.create_group(self._client, self.key, self.group, self.policy.start_id):
                self._counts.recreated += 1
                logger.warning(
                    "%s: consumer group %r was missing (%s); re-created it from %r",
                    _r.text(self.key),
                    self.group,
                    cause,
                    self.policy.start_id,
                )

    async def _read_loop(self) -> None:
        policy = self.policy
        block_ms = max(1, int(policy.block * 1000))
        backoff = self._new_backoff()
        while True:
            failure: RedisPatternsError | None = None
            # Room for COUNT messages is reserved before asking: whatever the reclaim
            # loop takes meanwhile, this read's reply fits.
            async with self._pool.window.reserve(
                policy.batch_size, at_least=self._worthwhile
            ) as room:
                try:
                    reply = await execute_blocking(
                        self._client,
                        "XREADGROUP",
                        "GROUP",
                        self.group,
                        self.consumer,
                        "COUNT",
                        room.granted,
                        "BLOCK",
                        block_ms,
                        "STREAMS",
                        self.key,
                        ">",
                        block=policy.block,
                    )
                except (CommandError, ConnectionFailed, CommandTimeout) as exc:
                    failure = exc
                else:
                    backoff.reset()
                    for message_id, fields in _r.read_entries(reply):
                        self._dispatch(room, message_id, fields, 1)
            if failure is not None:
                await self._after_failure(failure, backoff, "read")

    async def _after_failure(
        self, failure: RedisPatternsError, backoff: Backoff, what: str
    ) -> None:
        """Recover from a failed read or reclaim, or raise what cannot be recovered from."""
        if isinstance(failure, CommandError):
            if not _r.is_nogroup(failure):
                raise failure
            try:
                await self._ensure_group(failure)
            except (ConnectionFailed, CommandTimeout) as exc:
                failure = exc
            else:
                return
        if what == "read":
            self._counts.read_errors += 1
        logger.warning("%s/%s: %s failed, retrying: %s", self.group, self.consumer, what, failure)
        await backoff.sleep()

    async def _reclaim_loop(self) -> None:
        policy = self.policy
        min_idle_ms = max(1, int(policy.claim_idle * 1000))
        dead_maxlen = policy.dead_letter_maxlen or 0
        cursor = _NO_PENDING
        backoff = self._new_backoff()
        while True:
            if cursor == _NO_PENDING:
                await anyio.sleep(policy.reclaim_every)
            failure: RedisPatternsError | None = None
            async with self._pool.window.reserve(
                policy.batch_size, at_least=self._worthwhile
            ) as room:
                try:
                    cursor, claimed, dead = await _r.reclaim(
                        self._client,
                        self.key,
                        self.dead_letter_key,
                        group=self.group,
                        consumer=self.consumer,
                        min_idle_ms=min_idle_ms,
                        cursor=cursor,
                        count=room.granted,
                        max_deliveries=policy.max_deliveries,
                        dead_maxlen=dead_maxlen,
                    )
                except (CommandError, ConnectionFailed, CommandTimeout) as exc:
                    cursor = _NO_PENDING
                    failure = exc
                else:
                    backoff.reset()
                    self._count_dead(dead)
                    for message_id, fields, deliveries in claimed:
                        if self._dispatch(room, message_id, fields, deliveries):
                            self._counts.claimed += 1
            if failure is not None:
                await self._after_failure(failure, backoff, "reclaim")

    def _count_dead(self, dead: int) -> None:
        if dead:
            self._counts.dead_lettered += dead
            logger.warning(
                "%s/%s: dead-lettered %d messages that exceeded max_deliveries=%d",
                self.group,
                self.consumer,
                dead,
                self.policy.max_deliveries,
            )

    async def _refresh(self, held: list[str]) -> int:
        # The lease renewal of held messages (the pool calls it every claim_idle / 3):
        # without it their idle time would count from delivery, and once past
        # claim_idle the reclaim (ours or another consumer's) would claim them again
        # while they wait here, each claim counting a delivery towards max_deliveries.
        if not held:
            return 0
        try:
            return await _r.refresh(
                self._client, self.key, group=self.group, consumer=self.consumer, ids=held
            )
        except CommandError as exc:
            if not _r.is_nogroup(exc):
                raise
            # The group is gone, and with it what we held; the read loop re-creates it.
            return 0

    async def _hygiene_loop(self, consumer_idle: float) -> None:
        min_idle_ms = max(1, int(consumer_idle * 1000))
        interval = min(max(consumer_idle / 2, 0.05), 300.0)
        while True:
            try:
                removed = await _r.prune_consumers(
                    self._client,
                    self.key,
                    group=self.group,
                    min_idle_ms=min_idle_ms,
                    keep=self.consumer,
                )
            except (ConnectionFailed, CommandTimeout, CommandError) as exc:
                # NOGROUP and lost connections are the read loop's to handle.
                logger.debug("%s/%s: consumer hygiene skipped: %s", self.group, self.consumer, exc)
            else:
                if removed:
                    self._counts.consumers_removed += len(removed)
                    logger.info("%s: removed idle consumers %s", self.group, removed)
            await anyio.sleep(interval)

    # ------------------------------------------------------------------ failures

    async def _failed(self, message: StreamMessage, exc: Exception) -> None:
        if message.deliveries < self.policy.max_deliveries:
            logger.info(
                "%s/%s: handler failed on %s (delivery %d of %d), left pending: %r",
                self.group,
                self.consumer,
                message.id,
                message.deliveries,
                self.policy.max_deliveries,
                exc,
            )
            return
        try:
            moved = await _r.dead_letter(
                self._client,
                self.key,
                self.dead_letter_key,
                group=self.group,
                consumer=self.consumer,
                message_id=message.id,
                deliveries=message.deliveries,
                error=f"{type(exc).__name__}: {exc}",
                dead_maxlen=self.policy.dead_letter_maxlen or 0,
            )
        except RedisPatternsError as error:
            # It stays pending; the reclaim loop dead-letters it on its next delivery.
            logger.warning("%s: could not dead-letter %s: %s", self.group, message.id, error)
            return
        if moved:
            self._counts.dead_lettered += 1
            logger.warning(
                "%s/%s: message %s dead-lettered after %d deliveries: %r",
                self.group,
                self.consumer,
                message.id,
                message.deliveries,
                exc,
            )

    # ------------------------------------------------------------------ acks

    async def _xack(self, ids: Sequence[str]) -> None:
        """One batch of the ack batcher: XACK is idempotent, so it may be re-sent."""
        try:
            acked = await execute(self._client, "XACK", self.key, self.group, *ids)
        except CommandError as exc:
            if _r.is_nogroup(exc):
                # The group and its pending list are gone (restart): nothing to ack.
                return
            raise
        self._counts.acked += int(acked)
