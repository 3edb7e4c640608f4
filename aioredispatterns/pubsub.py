"""Pub/sub: a context-managed message stream that survives reconnects and says what it lost.

::

    async with subscribe(redis, "orders", patterns=["user:*"]) as messages:
        async for item in messages:
            match item:
                case Message(channel=channel, payload=payload):
                    handle(channel, payload)
                case Gap(duration=seconds):
                    resync()  # messages published during those seconds are gone

Redis pub/sub is fire-and-forget: a subscriber receives only what is published while it is
connected. When the connection drops, the subscription reconnects with exponential backoff
and full jitter, resubscribes to everything, and then yields a :class:`Gap` so the
application can resync (drop a local cache, reload state) instead of silently missing
messages.

Between the socket reader and the consumer sits a bounded buffer (:class:`BufferPolicy`):
the reader always drains the socket, so Redis never buffers for (or disconnects) a slow
consumer, and the consumer's backlog never grows beyond ``size`` messages; what does not fit
is dropped by policy and counted in :attr:`Subscription.stats`.

:class:`Broadcast` shares one connection among many local subscribers of a process (fan-out
in process). ``sharded=True`` uses SSUBSCRIBE / SPUBLISH where the server has them (Redis and
Valkey 7.0+) and plain SUBSCRIBE / PUBLISH elsewhere; publisher and subscriber must agree.

Cross-instance cache invalidation is ``publish(redis, channel, keys)`` on writes and a
``subscribe(redis, channel)`` loop that evicts the named keys and clears everything on a
:class:`Gap`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

import anyio
from anyio import AsyncContextManagerMixin

from ._capabilities import server_info
from ._commands import execute
from ._connection import AnyRedis, check_client, is_cluster
from ._pubsub_hub import (
    CLOSE_TIMEOUT,
    BufferPolicy,
    Gap,
    Hub,
    PubSubError,
    PubSubOverflow,
    ReconnectPolicy,
    Sink,
    channel_names,
    pattern_names,
)
from ._validate import check_flag, check_seconds
from .errors import ConfigurationError, SerializationError
from .serializers import Serializer, check_serializer, default_serializer

__all__ = (
    "Broadcast",
    "BufferPolicy",
    "Gap",
    "Message",
    "PubSubError",
    "PubSubOverflow",
    "ReconnectPolicy",
    "Subscription",
    "SubscriptionStats",
    "publish",
    "subscribe",
)

_DEFAULT_BUFFER = BufferPolicy()
_DEFAULT_RECONNECT = ReconnectPolicy()
_SMESSAGE = b"smessage"


class Message(NamedTuple):
    """One published message, its payload decoded by the subscription's serializer.

    A named tuple rather than a dataclass: one is built per message on the hot path and
    a tuple is the cheapest immutable record Python has.

    Attributes:
        channel: the channel it was published to.
        payload: the decoded payload.
        pattern: the pattern that matched, for pattern subscriptions; else ``None``.
        sharded: whether it arrived by sharded pub/sub (SPUBLISH).
    """

    channel: str
    payload: Any
    pattern: str | None = None
    sharded: bool = False


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Counters of one subscription (a snapshot).

    ``received == delivered + dropped + buffered`` holds at every moment.

    Attributes:
        received: messages the reader took off the socket for this subscription.
        delivered: messages handed to the consumer.
        dropped: messages discarded by the buffer policy.
        buffered: messages waiting for the consumer now.
        gaps: reconnections (each reported by a :class:`Gap`).
        gap_seconds: total seconds without a subscription during those gaps.
    """

    received: int
    delivered: int
    dropped: int
    buffered: int
    gaps: int
    gap_seconds: float


def _check_options(
    serializer: Serializer | None,
    buffer: object,
    reconnect: object,
    health_check_interval: object,
) -> Serializer:
    if not isinstance(buffer, BufferPolicy):
        raise ConfigurationError(f"buffer must be a BufferPolicy, got {type(buffer).__name__}")
    if reconnect is not None and not isinstance(reconnect, ReconnectPolicy):
        raise ConfigurationError(
            f"reconnect must be a ReconnectPolicy or None, got {type(reconnect).__name__}"
        )
    if health_check_interval is not None:
        check_seconds("health_check_interval", health_check_interval)
    return default_serializer() if serializer is None else check_serializer(serializer)


async def _use_sharded(client: AnyRedis, sharded: bool) -> bool:
    return sharded and (await server_info(client)).sharded_pubsub


class Subscription(AsyncContextManagerMixin):
    """A live subscription: an async context manager and, once entered, an async iterator
    of :class:`Message` and :class:`Gap` items.

    Build one with :func:`subscribe` or :meth:`Broadcast.subscribe`. Entering returns once
    the server has confirmed every channel and pattern, so a message published after
    ``async with`` is entered is delivered.

    Iteration yields buffered items without suspending and waits only when the buffer is
    empty (like ``asyncio.Queue.get``). It raises:

    - :class:`~aioredispatterns.SerializationError` for a payload the serializer cannot
      decode (the subscription stays open: iterate again to continue);
    - :class:`PubSubOverflow` under ``overflow="error"`` once the consumer fell behind;
    - :class:`~aioredispatterns.ConnectionFailed` when the connection is lost and
      reconnection is off or gave up (after the items buffered before the loss).

    Cancellation: cancelling a consumer mid-iteration loses no buffered item; leaving the
    ``async with`` (normally, by error or by cancellation) closes the subscription on the
    server under a shielded, bounded cleanup: the dedicated connection is closed (a
    :class:`Broadcast` subscriber instead unsubscribes the names no other local subscriber
    wants) and nothing is left subscribed.
    """

    def __init__(
        self,
        client: AnyRedis,
        channels: Iterable[str | bytes],
        patterns: Iterable[str | bytes],
        *,
        sharded: bool,
        serializer: Serializer,
        buffer: BufferPolicy,
        reconnect: ReconnectPolicy | None,
        health_check_interval: float | None,
        broadcast: Broadcast | None = None,
    ) -> None:
        self._client = client
        self._channels = channel_names(channels)
        self._patterns = pattern_names(patterns)
        if not self._channels and not self._patterns:
            raise ConfigurationError("subscribe to at least one channel or pattern")
        self._sharded = sharded
        self._loads = serializer.loads
        self._buffer = buffer
        self._reconnect = reconnect
        self._health_check_interval = health_check_interval
        self._broadcast = broadcast
        self._sink: Sink | None = None
        self._hub: Hub | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        sink = Sink(self._buffer)
        if self._broadcast is not None:
            hub = self._broadcast._running_hub()
            try:
                await hub.attach(sink, self._channels, self._patterns, wait=True)
                self._sink, self._hub = sink, hub
                yield self
            finally:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await hub.detach(sink)
            return
        sharded = await _use_sharded(self._client, self._sharded)
        hub = Hub(
            self._client,
            sharded=sharded,
            reconnect=self._reconnect,
            health_check_interval=self._health_check_interval,
        )
        await hub.attach(sink, self._channels, self._patterns, wait=False)
        async with hub.running():
            self._sink, self._hub = sink, hub
            yield self

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels subscribed to."""
        return tuple(name.decode(errors="surrogateescape") for name in self._channels)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The patterns subscribed to."""
        return tuple(name.decode(errors="surrogateescape") for name in self._patterns)

    @property
    def sharded(self) -> bool:
        """Whether the channels use sharded pub/sub (known once entered)."""
        return self._hub is not None and self._hub.sharded

    @property
    def stats(self) -> SubscriptionStats:
        """A snapshot of this subscription's counters."""
        sink = self._sink
        if sink is None:
            return SubscriptionStats(0, 0, 0, 0, 0, 0.0)
        return SubscriptionStats(
            received=sink.received,
            delivered=sink.delivered,
            dropped=sink.dropped,
            buffered=sink.buffered,
            gaps=sink.gaps,
            gap_seconds=sink.gap_seconds,
        )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message | Gap:
        sink = self._sink
        if sink is None:
            raise PubSubError("enter the subscription (async with) before iterating it")
        queue = sink.queue
        if not queue:
            await sink.wait()
        item = sink.pop()
        kind = item.__class__
        if kind is Gap or kind is Message:  # a gap, or a message a Broadcast decoded
            return item  # type: ignore[no-any-return]
        if kind is _Undecodable:
            raise SerializationError(str(item.error)) from item.error
        return _to_message(item, self._loads)


class _Undecodable:
    """A Broadcast message whose payload failed to decode (each consumer raises anew)."""

    __slots__ = ("error",)

    def __init__(self, error: SerializationError) -> None:
        self.error = error


def _to_message(reply: Any, loads: Callable[[bytes], Any]) -> Message:
    if len(reply) == 3:  # [b"message" | b"smessage", channel, data]
        return Message(
            reply[1].decode(errors="surrogateescape"),
            loads(reply[2]),
            None,
            reply[0] == _SMESSAGE,
        )
    # [b"pmessage", pattern, channel, data]
    return Message(
        reply[2].decode(errors="surrogateescape"),
        loads(reply[3]),
        reply[1].decode(errors="surrogateescape"),
        False,
    )


def _decoder(loads: Callable[[bytes], Any]) -> Callable[[Any], Message | _Undecodable]:
    def decode(reply: Any) -> Message | _Undecodable:
        try:
            return _to_message(reply, loads)
        except SerializationError as exc:
            return _Undecodable(exc)

    return decode


def subscribe(
    client: AnyRedis,
    *channels: str | bytes,
    patterns: Iterable[str | bytes] = (),
    sharded: bool = False,
    serializer: Serializer | None = None,
    buffer: BufferPolicy = _DEFAULT_BUFFER,
    reconnect: ReconnectPolicy | None = _DEFAULT_RECONNECT,
    health_check_interval: float | None = 30.0,
) -> Subscription:
    """Subscribe to ``channels`` and ``patterns`` on a connection of its own.

    ::

        async with subscribe(redis, "events", serializer=JsonSerializer()) as messages:
            async for item in messages:
                ...

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`); the
            subscription takes one connection from its pool while entered.
        *channels: channel names.
        patterns: glob-style patterns (PSUBSCRIBE).
        sharded: use SSUBSCRIBE for the channels where the server has it (7.0+), plain
            SUBSCRIBE elsewhere; publish with ``publish(..., sharded=True)`` to match.
            Patterns are never sharded. On a cluster client the sharded channels of one
            subscription must live on one node (a common ``{hash tag}``).
        serializer: decodes payloads (default JSON); use the publisher's serializer.
        buffer: the bounded buffer between the socket and the consumer.
        reconnect: how to reconnect after a lost connection; ``None`` ends the iteration
            with ``ConnectionFailed`` instead.
        health_check_interval: PING the connection after this many idle seconds and
            reconnect when the PING goes unanswered for as long again (``None``: never).

    Returns:
        A :class:`Subscription` to enter with ``async with``. Entering connects and waits
        for the server's confirmations; it raises ``ConnectionFailed`` at once when the
        server cannot be reached (reconnection covers losses after that).

    Raises:
        ConfigurationError: bad options, or no channel and no pattern (before any command);
            on entering, sharded channels spread over several cluster nodes.

    Cancellation: cancelling the consumer (or leaving the ``async with``) unsubscribes on
    the server and returns the connection to the pool, shielded and bounded.
    """
    client = check_client(client)
    check_flag("sharded", sharded)
    chosen = _check_options(serializer, buffer, reconnect, health_check_interval)
    return Subscription(
        client,
        channels,
        patterns,
        sharded=sharded,
        serializer=chosen,
        buffer=buffer,
        reconnect=reconnect,
        health_check_interval=health_check_interval,
    )


async def publish(
    client: AnyRedis,
    channel: str | bytes,
    message: Any,
    *,
    serializer: Serializer | None = None,
    sharded: bool = False,
) -> int:
    """Publish ``message`` (encoded by ``serializer``, default JSON) to ``channel``.

    ``sharded=True`` uses SPUBLISH where the server has it and PUBLISH elsewhere, matching
    ``subscribe(..., sharded=True)``.

    Returns:
        How many subscribers the server delivered it to (on a cluster, PUBLISH counts the
        receiving node's subscribers only).

    Raises:
        SerializationError: ``message`` cannot be encoded (nothing is sent).
        ConfigurationError: ``channel`` is empty or not str/bytes.

    Cancellation: the message may or may not have been published.
    """
    client = check_client(client)
    check_flag("sharded", sharded)
    (name,) = channel_names([channel])
    codec = default_serializer() if serializer is None else check_serializer(serializer)
    data = codec.dumps(message)
    command = "SPUBLISH" if await _use_sharded(client, sharded) else "PUBLISH"
    return int(await execute(client, command, name, data))


class Broadcast(AsyncContextManagerMixin):
    """One Redis connection shared by many local subscribers: fan-out in process.

    ::

        async with Broadcast(redis) as hub:
            async with hub.subscribe("chat:1") as messages:
                async for item in messages:
                    ...

    The first local subscriber of a channel (or pattern) subscribes on the server; the
    last one to leave unsubscribes there. Each local subscriber has its own bounded
    buffer, policy and stats, so one slow subscriber drops its own messages without
    holding up the others. After a reconnect every local subscriber receives the
    :class:`Gap`. Each payload is decoded once and the same object is handed to every
    local subscriber of it: treat payloads as read-only.

    Args:
        client: a ``redis.asyncio`` client; the broadcast holds one pooled connection
            while entered.
        sharded: SSUBSCRIBE / SPUBLISH where the server has them (not on a cluster client).
        serializer, reconnect, health_check_interval: as for :func:`subscribe`.

    Cancellation: leaving the ``async with`` ends every local subscription (their
    iterations stop) and closes the connection under a shielded, bounded cleanup, which
    ends every subscription on the server.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        sharded: bool = False,
        serializer: Serializer | None = None,
        reconnect: ReconnectPolicy | None = _DEFAULT_RECONNECT,
        health_check_interval: float | None = 30.0,
    ) -> None:
        self._client = check_client(client)
        check_flag("sharded", sharded)
        self._serializer = _check_options(
            serializer, _DEFAULT_BUFFER, reconnect, health_check_interval
        )
        self._sharded = sharded
        self._reconnect = reconnect
        self._health_check_interval = health_check_interval
        self._hub: Hub | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        sharded = await _use_sharded(self._client, self._sharded)
        if sharded and is_cluster(self._client):
            raise ConfigurationError("a sharded Broadcast on a cluster client is not supported")
        hub = Hub(
            self._client,
            sharded=sharded,
            reconnect=self._reconnect,
            health_check_interval=self._health_check_interval,
            decode=_decoder(self._serializer.loads),
        )
        async with hub.running():
            self._hub = hub
            try:
                yield self
            finally:
                self._hub = None

    def _running_hub(self) -> Hub:
        if self._hub is None:
            raise PubSubError("enter the Broadcast (async with) before subscribing through it")
        return self._hub

    @property
    def connections(self) -> int:
        """Redis connections this broadcast holds (1 while entered, else 0)."""
        return 0 if self._hub is None else self._hub.connections

    @property
    def subscribers(self) -> int:
        """Local subscribers attached now."""
        return 0 if self._hub is None else len(self._hub.sinks)

    def subscribe(
        self,
        *channels: str | bytes,
        patterns: Iterable[str | bytes] = (),
        buffer: BufferPolicy = _DEFAULT_BUFFER,
    ) -> Subscription:
        """A local subscription sharing this broadcast's connection.

        Entering it returns once the server confirmed any channel or pattern that no
        other local subscriber had (a message published after that is delivered; while
        the connection is being re-established, entering waits for the resubscribe).

        Raises:
            ConfigurationError: no channel and no pattern, or bad names.
        """
        if not isinstance(buffer, BufferPolicy):
            raise ConfigurationError(f"buffer must be a BufferPolicy, got {type(buffer).__name__}")
        return Subscription(
            self._client,
            channels,
            patterns,
            sharded=self._sharded,
            serializer=self._serializer,
            buffer=buffer,
            reconnect=self._reconnect,
            health_check_interval=self._health_check_interval,
            broadcast=self,
        )

    async def publish(self, channel: str | bytes, message: Any) -> int:
        """:func:`publish` with this broadcast's serializer and sharding (pooled connection)."""
        return await publish(
            self._client, channel, message, serializer=self._serializer, sharded=self._sharded
        )
