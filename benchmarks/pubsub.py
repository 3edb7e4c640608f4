"""Pub/sub delivery: messages per second reaching an ``async for`` consumer.

Every row shares one publisher: a server-side loop (one EVAL publishes a batch), so the
client spends almost no CPU on publishing and the rows differ only in how messages reach
the consumer. The publisher keeps a bounded window of messages in flight (it waits for the
consumers), so no subscriber ever falls behind far enough to drop or be disconnected.

Groups:

- ``pubsub raw``: bytes payloads; redis-py ``PubSub.listen()`` (baseline) vs
  ``subscribe(..., serializer=RawSerializer())`` vs broadcaster's redis backend.
- ``pubsub json``: JSON payloads decoded by the consumer (``orjson.loads`` after
  ``listen()`` for the baseline, the default serializer for ours).
- ``pubsub fan-out x100``: 100 local consumers of one channel; each delivery counts.
  100 separate ``subscribe()`` calls (100 connections, baseline) vs one ``Broadcast``
  (1 connection, decodes each JSON payload once for all) vs broadcaster (1 connection;
  each subscriber decodes the JSON it gets, as its users must).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from redis.asyncio import Redis

from aioredispatterns import Broadcast, RawSerializer, subscribe
from aioredispatterns._bench import BenchEnv, Operation, Scenario

BATCH = 500  # messages per EVAL
WINDOW = 4 * BATCH  # at most this many published and not yet consumed
PER_CALL = 100  # messages one timed operation receives
FANOUT = 100
FANOUT_PER_CALL = 1000  # deliveries one timed fan-out operation waits for

RAW_PAYLOAD = b"x" * 64
JSON_PAYLOAD = json.dumps({"id": 12345, "type": "new_message", "user": "u:42", "v": [1, 2, 3]})

_PUBLISH_LOOP = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('PUBLISH', KEYS[1], ARGV[2])
end
return 0
"""


class _Feed:
    """Publishes batches server-side while fewer than WINDOW messages are unconsumed."""

    def __init__(self, client: Redis, channel: str, payload: bytes | str) -> None:
        self.client = client
        self.channel = channel
        self.payload = payload
        self.published = 0
        self.consumed = 0
        self._room = anyio.Event()

    def took(self, count: int) -> None:
        self.consumed += count
        if self.published - self.consumed < WINDOW:
            self._room.set()

    async def run(self) -> None:
        while True:
            while self.published - self.consumed >= WINDOW:
                self._room = anyio.Event()
                await self._room.wait()
            await self.client.eval(_PUBLISH_LOOP, 1, self.channel, BATCH, self.payload)
            self.published += BATCH


@asynccontextmanager
async def _feeding(
    env: BenchEnv, payload: bytes | str
) -> AsyncIterator[tuple[_Feed, Callable[[], Awaitable[None]]]]:
    """A running feed; call ``start()`` once the subscribers are subscribed."""
    client = Redis.from_url(env.url)
    feed = _Feed(client, f"{env.prefix}:ps:{uuid.uuid4().hex[:8]}", payload)
    try:
        async with anyio.create_task_group() as tg:

            async def start() -> None:
                tg.start_soon(feed.run)

            yield feed, start
            tg.cancel_scope.cancel()
    finally:
        with anyio.move_on_after(2, shield=True):
            await client.aclose()


# --------------------------------------------------------------------------- one consumer


def _listen(decode: bool) -> Any:
    loads = _json_loads()

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        payload = JSON_PAYLOAD if decode else RAW_PAYLOAD
        client = Redis.from_url(env.url)
        try:
            async with _feeding(env, payload) as (feed, start):
                pubsub = client.pubsub()
                await pubsub.subscribe(feed.channel)
                stream = pubsub.listen()

                async def operation() -> None:
                    got = 0
                    async for message in stream:
                        if message["type"] == "message":
                            if decode:
                                loads(message["data"])
                            got += 1
                            if got == PER_CALL:
                                break
                    feed.took(PER_CALL)

                await start()
                try:
                    yield operation
                finally:
                    await stream.aclose()
                    await pubsub.aclose()
        finally:
            await client.aclose()

    return setup


def _ours(decode: bool) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        payload = JSON_PAYLOAD if decode else RAW_PAYLOAD
        client = env.client()
        serializer = None if decode else RawSerializer()
        try:
            async with (
                _feeding(env, payload) as (feed, start),
                subscribe(client, feed.channel, serializer=serializer) as messages,
            ):

                async def operation() -> None:
                    got = 0
                    async for _message in messages:
                        got += 1
                        if got == PER_CALL:
                            break
                    feed.took(PER_CALL)

                await start()
                yield operation
        finally:
            await client.aclose()

    return setup


@asynccontextmanager
async def _broadcaster(env: BenchEnv) -> AsyncIterator[Operation]:
    from broadcaster import Broadcast as Broadcaster

    async with (
        _feeding(env, RAW_PAYLOAD) as (feed, start),
        Broadcaster(env.url) as broadcast,
        broadcast.subscribe(feed.channel) as subscriber,
    ):

        async def operation() -> None:
            for _ in range(PER_CALL):
                await subscriber.get()
            feed.took(PER_CALL)

        _nudge(broadcast)
        await start()
        yield operation


def _nudge(broadcast: Any) -> None:
    """Work around a race in broadcaster 0.3.1's redis backend.

    Its ``subscribe()`` sets the listener's ready event *before* awaiting redis-py's
    SUBSCRIBE; the listener wakes while redis-py's ``PubSub.subscribed`` is still False,
    its ``listen()`` loop ends at once, it clears the event and waits forever: no message
    is ever delivered. Setting the event again after the subscribe completes restarts it.
    """
    backend = broadcast._backend
    if hasattr(backend, "_ready"):
        backend._ready.set()


# --------------------------------------------------------------------------- fan-out


class _Deliveries:
    """Counts deliveries over all consumers; wakes the timed operation every target."""

    def __init__(self, feed: _Feed) -> None:
        self.feed = feed
        self.count = 0
        self.target = 0
        self.reached = anyio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count % FANOUT == 0:
            self.feed.took(1)  # a message counts as consumed once every consumer had it
        if self.count >= self.target:
            self.reached.set()

    async def operation(self) -> None:
        self.target += FANOUT_PER_CALL
        while self.count < self.target:
            self.reached = anyio.Event()
            await self.reached.wait()


def _fanout(kind: str) -> Any:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # connect() with a pool large enough for 100 dedicated connections.
        client = env.client(max_connections=FANOUT + 8)
        try:
            async with AsyncExitStack() as stack:
                feed, start = await stack.enter_async_context(_feeding(env, JSON_PAYLOAD))
                deliveries = _Deliveries(feed)
                tg = await stack.enter_async_context(anyio.create_task_group())
                sources: list[Any] = []
                if kind == "subscribe":
                    for _ in range(FANOUT):
                        sources.append(
                            await stack.enter_async_context(subscribe(client, feed.channel))
                        )
                elif kind == "Broadcast":
                    hub = await stack.enter_async_context(Broadcast(client))
                    for _ in range(FANOUT):
                        sources.append(await stack.enter_async_context(hub.subscribe(feed.channel)))
                else:
                    from broadcaster import Broadcast as Broadcaster

                    broadcast = await stack.enter_async_context(Broadcaster(env.url))
                    for _ in range(FANOUT):
                        subscriber = await stack.enter_async_context(
                            broadcast.subscribe(feed.channel)
                        )
                        sources.append(_broadcaster_events(subscriber))
                    _nudge(broadcast)

                async def consume(source: Any) -> None:
                    async for _item in source:
                        deliveries.add()

                for source in sources:
                    tg.start_soon(consume, source)
                # Runs first on exit: stop the consumers before their subscriptions close.
                stack.callback(tg.cancel_scope.cancel)
                await start()
                yield deliveries.operation
        finally:
            await client.aclose()

    return setup


async def _broadcaster_events(subscriber: Any) -> AsyncIterator[Any]:
    from broadcaster._base import Unsubscribed

    loads = _json_loads()
    try:
        while True:
            # broadcaster hands out str; a user decodes the JSON in each subscriber.
            yield loads((await subscriber.get()).message)
    except Unsubscribed:
        return


# --------------------------------------------------------------------------- rows


def _json_loads() -> Callable[[bytes], Any]:
    try:
        import orjson
    except ImportError:
        return json.loads
    return orjson.loads  # type: ignore[no-any-return]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def scenarios(env: BenchEnv) -> list[Scenario]:
    rows = [
        Scenario("pubsub raw", "redis-py PubSub.listen()", 1, _listen(False), baseline=True,
                 ops_per_call=PER_CALL),
        Scenario("pubsub raw", "aioredispatterns subscribe()", 1, _ours(False),
                 ops_per_call=PER_CALL),
        Scenario("pubsub json", "redis-py listen() + orjson.loads", 1, _listen(True),
                 baseline=True, ops_per_call=PER_CALL),
        Scenario("pubsub json", "aioredispatterns subscribe() JSON", 1, _ours(True),
                 ops_per_call=PER_CALL),
        Scenario("pubsub fan-out x100", "100 x subscribe() (100 connections)", 1,
                 _fanout("subscribe"), baseline=True, ops_per_call=FANOUT_PER_CALL),
        Scenario("pubsub fan-out x100", "Broadcast (1 connection)", 1, _fanout("Broadcast"),
                 ops_per_call=FANOUT_PER_CALL),
    ]  # fmt: skip
    if _has("broadcaster"):
        rows.append(
            Scenario("pubsub raw", "broadcaster (redis backend)", 1, _broadcaster,
                     ops_per_call=PER_CALL)
        )  # fmt: skip
        rows.append(
            Scenario("pubsub fan-out x100", "broadcaster (1 connection)", 1,
                     _fanout("broadcaster"), ops_per_call=FANOUT_PER_CALL)
        )  # fmt: skip
    return rows
