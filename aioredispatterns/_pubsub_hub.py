"""The machinery under :mod:`aioredispatterns.pubsub`: one subscribed connection, its reader
task, reconnection, and the bounded per-consumer buffers it fills.

A :class:`Hub` owns one dedicated connection in subscribed mode and a task group with the
socket reader (and a health check). Consumers attach :class:`Sink` objects, each a bounded
buffer with a drop policy; the reader routes every message to the sinks of its channel or
pattern. ``subscribe()`` is a hub with one sink; ``Broadcast`` is a hub with many.

The reader never raises into the task group: a failure it cannot recover from is stored
in every sink and raised from the consumers' ``__anext__``, so a dead connection never
cancels the body of the user's ``async with`` behind its back.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from ._backoff import full_jitter
from ._commands import Dedicated, dedicated, node_of
from ._connection import AnyRedis
from ._scope import background
from ._validate import (
    check_choice,
    check_count,
    check_items,
    check_name,
    check_number,
    check_seconds,
)
from .errors import CommandTimeout, ConfigurationError, ConnectionFailed, RedisPatternsError

logger = logging.getLogger("aioredispatterns.pubsub")

Overflow = Literal["drop_oldest", "drop_newest", "error"]
_OVERFLOWS = ("drop_oldest", "drop_newest", "error")
_MAX_BUFFER = 100_000_000

# How long the shielded cleanup may take before we give up on it (the socket is closed
# either way, which ends the subscription on the server).
CLOSE_TIMEOUT = 2.0

_MESSAGE = b"message"
_SMESSAGE = b"smessage"
_PMESSAGE = b"pmessage"
_CONFIRMATIONS = {b"subscribe": b"", b"ssubscribe": b"", b"psubscribe": b"p"}
_SUNSUBSCRIBE = b"sunsubscribe"
# A connection that broke or stalled: the reader reconnects (the command layer has
# translated whatever redis-py or the socket raised into one of these).
_CONNECTION_ERRORS = (ConnectionFailed, CommandTimeout)


class PubSubError(RedisPatternsError):
    """Base of the errors raised by :mod:`aioredispatterns.pubsub`."""


class SlotMoved(ConnectionFailed):
    """The cluster moved a sharded channel's slot to another node (a ``sunsubscribe``
    push): the hub resubscribes at the new owner, like after a lost connection."""


class PubSubOverflow(PubSubError):
    """A consumer fell more than ``BufferPolicy.size`` messages behind under ``overflow="error"``.

    The subscription stops delivering: the buffered messages are discarded (counted in
    ``stats.dropped``) and every later ``__anext__`` raises this error again.
    """


@dataclass(frozen=True, slots=True)
class BufferPolicy:
    """The bounded buffer between the socket reader and one consumer.

    Attributes:
        size: at most this many messages wait for the consumer.
        overflow: what happens to a message that arrives while the buffer is full:
            ``"drop_oldest"`` evicts the oldest buffered message (the consumer sees the
            newest ones), ``"drop_newest"`` discards the arriving message, ``"error"``
            stops the subscription with :class:`PubSubOverflow`. Drops are counted in
            ``stats.dropped``; the socket is always drained, so Redis never has to hold
            (or disconnect) a slow subscriber.
    """

    size: int = 10_000
    overflow: Overflow = "drop_oldest"

    def __post_init__(self) -> None:
        check_count("BufferPolicy.size", self.size, minimum=1, maximum=_MAX_BUFFER)
        check_choice("BufferPolicy.overflow", self.overflow, _OVERFLOWS)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a lost subscription connection is re-established.

    Attempt ``n`` (from 1) waits a random time between 0 and
    ``min(max_delay, initial_delay * multiplier ** (n - 1))`` seconds first (exponential
    backoff with full jitter, so many subscribers do not reconnect in lockstep).

    Attributes:
        initial_delay: the backoff ceiling of the first attempt, in seconds.
        max_delay: the largest backoff ceiling, in seconds.
        multiplier: growth of the ceiling per attempt.
        max_attempts: give up after this many failed attempts (``None``: never give up).
            Giving up ends the iteration with :class:`~aioredispatterns.ConnectionFailed`.
        confirm_timeout: how long one attempt may take to connect and have every
            subscription confirmed.
    """

    initial_delay: float = 0.05
    max_delay: float = 5.0
    multiplier: float = 2.0
    max_attempts: int | None = None
    confirm_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("initial_delay", "max_delay", "confirm_timeout"):
            check_seconds(f"ReconnectPolicy.{name}", getattr(self, name))
        if self.max_delay < self.initial_delay:
            raise ConfigurationError("ReconnectPolicy.max_delay must be >= initial_delay")
        check_number("ReconnectPolicy.multiplier", self.multiplier, minimum=1, maximum=1000)
        if self.max_attempts is not None:
            check_count("ReconnectPolicy.max_attempts", self.max_attempts, minimum=1)

    def delay(self, attempt: int) -> float:
        """The (jittered) wait before attempt number ``attempt`` (from 1)."""
        return full_jitter(
            attempt - 1, base=self.initial_delay, cap=self.max_delay, multiplier=self.multiplier
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """The connection was lost and re-established: messages published meanwhile are gone.

    Pub/sub is fire-and-forget, so the server kept nothing for this subscriber while it
    was away. Treat a ``Gap`` as "resync now": drop a local cache, reload state.

    Attributes:
        duration: seconds from noticing the loss to having every subscription confirmed
            again (messages published in that window were not delivered).
        attempts: how many connection attempts it took.
        cause: what broke the connection.
    """

    duration: float
    attempts: int
    cause: str


class Sink:
    """One consumer's bounded buffer. The reader calls :meth:`put`; the consumer awaits."""

    __slots__ = (
        "buffered",
        "closed",
        "delivered",
        "dropped",
        "failure",
        "gap_seconds",
        "gaps",
        "overflow",
        "queue",
        "received",
        "size",
        "waiter",
    )

    def __init__(self, policy: BufferPolicy) -> None:
        self.queue: deque[Any] = deque()
        self.size = policy.size
        self.overflow = policy.overflow
        self.waiter: anyio.Event | None = None
        self.failure: BaseException | None = None
        self.closed = False
        self.received = 0
        self.buffered = 0  # messages in the queue (gap notices are not counted)
        self.delivered = 0
        self.dropped = 0
        self.gaps = 0
        self.gap_seconds = 0.0

    def put(self, item: Any) -> None:
        """Buffer one message (a raw reply, or a decoded one for a Broadcast)."""
        if self.failure is not None:
            return
        self.received += 1
        if self.buffered >= self.size:
            overflow = self.overflow
            self.dropped += 1
            if overflow == "drop_oldest":
                self._evict_oldest()
            elif overflow == "drop_newest":
                return
            else:
                self.dropped += self.buffered
                self.buffered = 0
                self.queue.clear()
                self.fail(
                    PubSubOverflow(
                        f"the consumer fell more than {self.size} messages behind "
                        "(BufferPolicy overflow='error')"
                    )
                )
                return
        else:
            self.buffered += 1
        self.queue.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()

    def pop(self) -> Any:
        """Take the oldest buffered item (the queue must not be empty)."""
        item = self.queue.popleft()
        if item.__class__ is not Gap:
            self.buffered -= 1
            self.delivered += 1
        return item

    def _evict_oldest(self) -> None:
        # Gap notices are never dropped: skip over them to the oldest message.
        queue = self.queue
        gaps = []
        while queue[0].__class__ is Gap:
            gaps.append(queue.popleft())
        queue.popleft()
        queue.extendleft(reversed(gaps))

    def put_gap(self, gap: Gap) -> None:
        """Queue a gap notice; it may exceed ``size`` (consecutive gaps merge into one)."""
        self.gaps += 1
        self.gap_seconds += gap.duration
        queue = self.queue
        if queue and queue[-1].__class__ is Gap:
            last: Gap = queue.pop()
            gap = Gap(last.duration + gap.duration, last.attempts + gap.attempts, gap.cause)
        queue.append(gap)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End delivery with ``error`` once the buffered items are consumed."""
        if self.failure is None:
            self.failure = error
        self._wake()

    def close(self) -> None:
        """End delivery: the consumer's iteration stops once the buffer is empty."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()

    async def wait(self) -> None:
        """Wait until something is buffered; raise the failure or StopAsyncIteration."""
        while not self.queue:
            if self.failure is not None:
                raise self.failure
            if self.closed:
                raise StopAsyncIteration
            waiter = self.waiter = anyio.Event()
            await waiter.wait()


def _names(values: Iterable[str | bytes], what: str) -> list[bytes]:
    found: list[bytes] = []
    for value in check_items(f"{what} names", values):
        checked = check_name(f"{what} name", value)
        raw = checked.encode() if isinstance(checked, str) else checked
        if raw not in found:
            found.append(raw)
    return found


def channel_names(values: Iterable[str | bytes]) -> list[bytes]:
    """Validate channel names and return them as unique bytes."""
    return _names(values, "channel")


def pattern_names(values: Iterable[str | bytes]) -> list[bytes]:
    """Validate pattern names and return them as unique bytes."""
    return _names(values, "pattern")


def _as_library_error(exc: Exception) -> RedisPatternsError:
    if isinstance(exc, RedisPatternsError):
        return exc
    error = PubSubError(f"the subscription's reader failed: {exc!r}")
    error.__cause__ = exc
    return error


class Hub:
    """One subscribed connection shared by the sinks attached to it."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        sharded: bool,
        reconnect: ReconnectPolicy | None,
        health_check_interval: float | None,
        decode: Callable[[Any], Any] | None = None,
    ) -> None:
        self.client = client
        # With many sinks (Broadcast), each message is decoded once here and the result
        # shared; with one sink it is decoded lazily by its consumer (dropped messages
        # are never decoded).
        self.decode = decode
        self.sharded = sharded
        self.reconnect = reconnect
        self.health_check_interval = health_check_interval
        # Routing: subscribed name -> the sinks that want it. A name is subscribed on the
        # server exactly while its list is non-empty.
        self.channels: dict[bytes, list[Sink]] = {}
        self.patterns: dict[bytes, list[Sink]] = {}
        self.sinks: list[Sink] = []
        # Confirmations awaited by attach(): (kind, name) -> event.
        self._pending: dict[tuple[bytes, bytes], anyio.Event] = {}
        self._conn: Dedicated | None = None
        self._live = False  # subscribed and read by the reader; writes may go out
        self._activity = 0
        self._failure: BaseException | None = None
        self.reconnects = 0

    @property
    def connections(self) -> int:
        """Connections this hub holds (0 or 1)."""
        return 0 if self._conn is None else 1

    # ------------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Hub]:
        """Connect, subscribe to what is routed so far, run the reader; close on exit.

        Entering is bounded: the server must confirm every subscription within the
        reconnect policy's ``confirm_timeout`` (the socket timeout without a policy),
        else :class:`~aioredispatterns.CommandTimeout`; an unreachable server raises
        :class:`~aioredispatterns.ConnectionFailed`.

        Cancellation: the connection is closed under a shielded, bounded scope (closing
        the socket ends every subscription on the server) and returned to the pool.
        """
        key = await self._node_key()
        try:
            async with dedicated(self.client, key=key, reusable=False) as conn:
                self._conn = conn
                limit = self._confirm_timeout(conn)
                try:
                    with anyio.fail_after(limit):
                        await self._subscribe_all(conn, hold=None)
                except TimeoutError:
                    raise CommandTimeout(
                        f"the server did not confirm the subscriptions within {limit:.1f} s"
                    ) from None
                self._live = True
                async with background("subscription") as tg:
                    tg.start_soon(self._read_forever)
                    if self.health_check_interval is not None:
                        tg.start_soon(self._health_check, self.health_check_interval)
                    yield self
        finally:
            self._live = False
            self._conn = None
            for sink in self.sinks:
                sink.close()

    def _confirm_timeout(self, conn: Dedicated) -> float:
        if self.reconnect is not None:
            return self.reconnect.confirm_timeout
        return conn.socket_timeout or 5.0

    async def _node_key(self) -> bytes | None:
        """On a cluster, the key whose node to subscribe on (None: any node will do)."""
        if not (self.sharded and self.channels):
            # Plain pub/sub messages reach every node of a cluster; one node will do.
            return None
        # A sharded channel lives on the node that owns its slot.
        names = list(self.channels)
        nodes = {await node_of(self.client, name) for name in names}
        if len(nodes) > 1:
            raise ConfigurationError(
                "sharded channels of one subscription must live on one cluster node "
                "(give them a common {hash tag}, or subscribe to each separately)"
            )
        return names[0]

    # ------------------------------------------------------------------ subscriptions

    def _commands(self) -> list[tuple[bytes, ...]]:
        commands: list[tuple[bytes, ...]] = []
        if self.channels:
            verb = b"SSUBSCRIBE" if self.sharded else b"SUBSCRIBE"
            if self.sharded:
                # One SSUBSCRIBE per channel: channels of different slots may not share one.
                commands += [(verb, name) for name in self.channels]
            else:
                commands.append((verb, *self.channels))
        if self.patterns:
            commands.append((b"PSUBSCRIBE", *self.patterns))
        return commands

    async def _subscribe_all(self, conn: Dedicated, hold: list[Any] | None) -> None:
        """Send every subscription and read until all are confirmed.

        Messages that arrive meanwhile go to ``hold`` when given (so a gap notice can be
        queued before them), else straight to the sinks.
        """
        expected = len(self.channels) + len(self.patterns)
        for command in self._commands():
            await conn.send(*command)
        while expected > 0:
            reply = await conn.read(timeout=math.inf, push=True)
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind in _CONFIRMATIONS:
                expected -= 1
                self._confirmed(kind, reply[1])
            elif hold is not None and kind in (_MESSAGE, _SMESSAGE, _PMESSAGE):
                hold.append(reply)
            else:
                self._dispatch(reply)

    def _confirmed(self, kind: bytes, name: bytes) -> None:
        event = self._pending.pop((_CONFIRMATIONS[kind], name), None)
        if event is not None:
            event.set()

    async def attach(
        self, sink: Sink, channels: list[bytes], patterns: list[bytes], *, wait: bool
    ) -> None:
        """Route ``channels``/``patterns`` to ``sink``; subscribe new names on the server.

        With ``wait``, returns once the server confirmed the new names (messages published
        after that reach the sink). Cancellation: the routing is already in place; the
        caller should :meth:`detach`.
        """
        self.sinks.append(sink)
        if self._failure is not None:
            sink.fail(self._failure)
            return
        new_channels = self._route(self.channels, channels, sink)
        new_patterns = self._route(self.patterns, patterns, sink)
        if wait:
            # Wait for the new names and for names another subscriber still waits on.
            for name in new_channels:
                self._expect(b"", name)
            for name in new_patterns:
                self._expect(b"p", name)
            wanted = [(b"", name) for name in channels] + [(b"p", name) for name in patterns]
            events = [self._pending[key] for key in wanted if key in self._pending]
        if self._live and (new_channels or new_patterns):
            # While reconnecting (not live) the resubscribe sends these names too.
            await self._send_subscribe(new_channels, new_patterns)
        if wait:
            for event in events:
                await event.wait()

    async def _send_subscribe(self, channels: list[bytes], patterns: list[bytes]) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if channels:
                if self.sharded:
                    for name in channels:
                        await conn.send(b"SSUBSCRIBE", name)
                else:
                    await conn.send(b"SUBSCRIBE", *channels)
            if patterns:
                await conn.send(b"PSUBSCRIBE", *patterns)
        except _CONNECTION_ERRORS:
            pass  # the reader notices the broken connection and resubscribes everything

    def _expect(self, kind: bytes, name: bytes) -> anyio.Event:
        event = self._pending.get((kind, name))
        if event is None:
            event = self._pending[(kind, name)] = anyio.Event()
        return event

    @staticmethod
    def _route(table: dict[bytes, list[Sink]], names: list[bytes], sink: Sink) -> list[bytes]:
        new = []
        for name in names:
            sinks = table.get(name)
            if sinks is None:
                table[name] = [sink]
                new.append(name)
            else:
                sinks.append(sink)
        return new

    async def detach(self, sink: Sink) -> None:
        """Stop routing to ``sink``; unsubscribe on the server names no sink wants any more.

        Does not wait for the server's confirmation. Cancellation: the local state is
        updated first, so a cancelled detach at worst leaves a server subscription whose
        messages nobody receives until the hub closes.
        """
        if sink in self.sinks:
            self.sinks.remove(sink)
        sink.close()
        gone_channels = self._unroute(self.channels, sink)
        gone_patterns = self._unroute(self.patterns, sink)
        for name in gone_channels:
            self._pending.pop((b"", name), None)
        for name in gone_patterns:
            self._pending.pop((b"p", name), None)
        if not self._live or self._conn is None:
            return
        conn = self._conn
        try:
            if gone_channels:
                verb = b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE"
                if self.sharded:
                    for name in gone_channels:
                        await conn.send(verb, name)
                else:
                    await conn.send(verb, *gone_channels)
            if gone_patterns:
                await conn.send(b"PUNSUBSCRIBE", *gone_patterns)
        except _CONNECTION_ERRORS:
            pass  # the next resubscribe only covers names still routed

    @staticmethod
    def _unroute(table: dict[bytes, list[Sink]], sink: Sink) -> list[bytes]:
        gone = []
        for name in list(table):
            sinks = table[name]
            if sink in sinks:
                sinks[:] = [s for s in sinks if s is not sink]
                if not sinks:
                    del table[name]
                    gone.append(name)
        return gone

    # ------------------------------------------------------------------ reading

    def _dispatch(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return  # PONG of the health check (RESP3 / not subscribed)
        kind = reply[0]
        if kind in (_MESSAGE, _SMESSAGE):
            sinks = self.channels.get(reply[1])
        elif kind == _PMESSAGE:
            sinks = self.patterns.get(reply[1])
        else:
            if kind in _CONFIRMATIONS:
                self._confirmed(kind, reply[1])
            elif kind == _SUNSUBSCRIBE and reply[1] in self.channels:
                # Not asked for (detach() unroutes a name before unsubscribing it): the
                # cluster moved the channel's slot to another node. Resubscribe there.
                raise SlotMoved(f"the slot of sharded channel {reply[1]!r} moved")
            return  # pong, unsubscribe confirmations
        if sinks is not None:
            item = reply if self.decode is None else self.decode(reply)
            for sink in sinks:
                sink.put(item)

    async def _read_forever(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while True:
                try:
                    await self._read(conn)
                except _CONNECTION_ERRORS as exc:
                    if self.reconnect is None:
                        raise
                    await self._recover(conn, exc)
        except Exception as exc:
            self._fail(_as_library_error(exc))

    async def _read(self, conn: Dedicated) -> None:
        # The hot path: one read, one dict lookup and a put per subscriber per message.
        read = conn.read
        channels = self.channels
        patterns = self.patterns
        decode = self.decode
        while True:
            reply = await read(timeout=math.inf, push=True)
            self._activity += 1
            kind = reply[0]
            if kind in (_MESSAGE, _SMESSAGE):
                sinks = channels.get(reply[1])
            elif kind == _PMESSAGE:
                sinks = patterns.get(reply[1])
            else:
                self._dispatch(reply)
                continue
            if sinks:
                item = reply if decode is None else decode(reply)
                for sink in sinks:
                    sink.put(item)

    async def _recover(self, conn: Dedicated, cause: BaseException) -> None:
        """Reconnect with backoff and resubscribe; queue a gap notice for every sink."""
        assert self.reconnect is not None
        policy = self.reconnect
        self._live = False
        lost_at = anyio.current_time()
        # Subscribers that attach during the outage wait for the resubscribe: they miss
        # nothing, so only those attached now get the gap notice.
        affected = list(self.sinks)
        logger.warning("pub/sub connection lost, reconnecting: %s", cause)
        await conn.disconnect()
        attempt = 0
        hold: list[Any] = []
        while True:
            attempt += 1
            if policy.max_attempts is not None and attempt > policy.max_attempts:
                logger.error(
                    "pub/sub connection not re-established after %d attempts; giving up",
                    policy.max_attempts,
                )
                raise ConnectionFailed(
                    f"pub/sub connection lost ({cause}) and not re-established after "
                    f"{policy.max_attempts} attempts"
                ) from cause
            await anyio.sleep(policy.delay(attempt))
            hold.clear()
            try:
                with anyio.fail_after(policy.confirm_timeout):
                    await conn.reconnect()
                    await self._subscribe_all(conn, hold)
            except (*_CONNECTION_ERRORS, TimeoutError):
                await conn.disconnect()
                continue
            break
        self._live = True
        self.reconnects += 1
        gap = Gap(duration=anyio.current_time() - lost_at, attempts=attempt, cause=str(cause))
        logger.info(
            "pub/sub resubscribed after %.2fs (%d attempts); a Gap was reported",
            gap.duration,
            attempt,
        )
        for sink in affected:
            if sink in self.sinks:
                sink.put_gap(gap)
        for reply in hold:
            self._dispatch(reply)

    def _fail(self, error: BaseException) -> None:
        logger.warning("pub/sub subscription ended: %r", error)
        self._failure = error
        self._live = False
        for event in self._pending.values():
            event.set()
        self._pending.clear()
        for sink in self.sinks:
            sink.fail(error)

    async def _health_check(self, interval: float) -> None:
        """PING an idle connection; close it when even the PING gets no answer.

        A half-open TCP connection (a dead peer behind a NAT or a pulled cable) never
        reports an error on its own; closing it makes the reader reconnect.
        """
        seen = self._activity
        pinged = False
        while True:
            await anyio.sleep(interval)
            if not self._live:
                seen, pinged = self._activity, False
                continue
            if self._activity != seen:
                seen, pinged = self._activity, False
                continue
            conn = self._conn
            if conn is None:
                continue
            try:
                if pinged:
                    await conn.disconnect()
                    pinged = False
                else:
                    await conn.send(b"PING")
                    pinged = True
            except _CONNECTION_ERRORS:
                pinged = False
