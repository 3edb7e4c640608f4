"""Pub/sub delivery: messages per second reaching one ``async for`` consumer.

Every row shares one kind of publisher: a server-side loop (one EVAL publishes a batch),
so the client spends almost no CPU on publishing and the rows differ only in how messages
reach the consumer. The publisher keeps a bounded window of messages in flight (it waits
for the consumer), so no subscriber ever falls behind far enough to drop or be cut off.

Groups:

- ``pubsub raw``: bytes payloads; redis-py ``PubSub.listen()`` (baseline) vs
  ``subscribe(..., serializer=RawSerializer())`` vs broadcaster's redis backend.
- ``pubsub json``: JSON payloads decoded by the consumer (``orjson.loads`` after
  ``listen()`` for the baseline, the default serializer for ours).

Fan-out to 100 subscribers is in :mod:`.pubsub_fanout`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ...pubsub import subscribe
from ...serializers import RawSerializer
from ..redis_py import Redis, redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, json_loads, load

BATCH = 500  # messages per EVAL
WINDOW = 4 * BATCH  # at most this many published and not yet consumed
PER_CALL = 100  # messages one timed operation receives

RAW_PAYLOAD = b"x" * 64
JSON_PAYLOAD = json.dumps({"id": 12345, "type": "new_message", "user": "u:42", "v": [1, 2, 3]})

_PUBLISH_LOOP = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('PUBLISH', KEYS[1], ARGV[2])
end
return 0
"""

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


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
    """A feed on a channel of its own; call ``start()`` once the consumer is subscribed."""
    client = redis_py(env.url)
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


def _listen(decode: bool) -> Setup:
    loads = json_loads()

    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        payload = JSON_PAYLOAD if decode else RAW_PAYLOAD
        client = redis_py(env.url)
        try:
            async with _feeding(env, payload) as (feed, start):
                pubsub: Any = client.pubsub()
                await pubsub.subscribe(feed.channel)
                stream: Any = pubsub.listen()

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


def _ours(decode: bool) -> Setup:
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
    broadcaster: Any = load("broadcaster").Broadcast(env.url)
    async with (
        _feeding(env, RAW_PAYLOAD) as (feed, start),
        broadcaster as broadcast,
        broadcast.subscribe(feed.channel) as subscriber,
    ):

        async def operation() -> None:
            for _ in range(PER_CALL):
                await subscriber.get()
            feed.took(PER_CALL)

        nudge_broadcaster(broadcast)
        await start()
        yield operation


def nudge_broadcaster(broadcast: Any) -> None:
    """Work around a race in broadcaster 0.3.1's redis backend.

    Its ``subscribe()`` sets the listener's ready event *before* awaiting redis-py's
    SUBSCRIBE; the listener wakes while redis-py's ``PubSub.subscribed`` is still False,
    its ``listen()`` loop ends at once, it clears the event and waits forever: no message
    is ever delivered. Setting the event again after the subscribe completes restarts it.
    """
    backend = broadcast._backend
    if hasattr(backend, "_ready"):
        backend._ready.set()


def scenarios(env: BenchEnv) -> list[Scenario]:
    """One consumer: raw bytes and JSON payloads."""
    decoder = "orjson.loads" if has("orjson") else "json.loads"
    rows = [
        Scenario("pubsub raw", "redis-py PubSub.listen()", 1, _listen(False), baseline=True,
                 ops_per_call=PER_CALL, unit="msgs"),
        Scenario("pubsub raw", "aioredispatterns subscribe()", 1, _ours(False),
                 ops_per_call=PER_CALL, unit="msgs"),
        Scenario("pubsub json", f"redis-py listen() + {decoder}", 1, _listen(True),
                 baseline=True, ops_per_call=PER_CALL, unit="msgs"),
        Scenario("pubsub json", "aioredispatterns subscribe() JSON", 1, _ours(True),
                 ops_per_call=PER_CALL, unit="msgs"),
    ]  # fmt: skip
    if has("broadcaster"):
        rows.append(
            Scenario("pubsub raw", "broadcaster (redis backend)", 1, _broadcaster,
                     ops_per_call=PER_CALL, unit="msgs", role="competitor")
        )  # fmt: skip
    return rows
