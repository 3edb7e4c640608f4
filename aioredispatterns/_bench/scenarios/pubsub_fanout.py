"""Pub/sub fan-out: one channel, 100 subscribers in this process, deliveries per second.

An operation publishes one JSON message (with an id) and ends when all 100 subscribers
have received and decoded it, so it counts 100 deliveries and its latency runs from the
publish to the 100th delivery. A few operations are in flight at once (PUBLISHERS), so
the figure is the rate the subscribers keep up with, not one round trip's.

Rows (group ``pubsub fan-out x100``):

- 100 redis-py ``PubSub`` objects, one connection each, each decoding its JSON
  (baseline: what a redis-py user writes for 100 local consumers);
- one :class:`~aioredispatterns.Broadcast` (one connection; each payload decoded once and
  handed to the 100 local subscribers);
- broadcaster (one connection; each subscriber decodes the JSON string it gets).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio

from ...pubsub import Broadcast, Message
from ..redis_py import Redis, redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, json_loads, load
from .pubsub import nudge_broadcaster

GROUP = "pubsub fan-out x100"
FANOUT = 100
PUBLISHERS = 4  # operations in flight
BODY = {"type": "new_message", "user": "u:42", "v": [1, 2, 3]}

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]
# Starts the subscribers, calling ``delivered(message_id)`` for every message each gets;
# returns once every subscription is confirmed by the server.
Subscribers = Callable[[BenchEnv, str, Callable[[int], None], AsyncExitStack], Awaitable[int]]


class _Deliveries:
    """Per message id, how many subscribers have yet to get it; wakes its publisher."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[list[int], anyio.Event]] = {}

    def expect(self, message_id: int) -> anyio.Event:
        done = anyio.Event()
        self._pending[message_id] = ([FANOUT], done)
        return done

    def delivered(self, message_id: int) -> None:
        entry = self._pending.get(message_id)
        if entry is None:
            return
        left, done = entry
        left[0] -= 1
        if left[0] == 0:
            del self._pending[message_id]
            done.set()


async def _wait_subscribed(publisher: Redis, channel: str, count: int) -> None:
    with anyio.fail_after(30):
        while True:
            reply: Any = await publisher.pubsub_numsub(channel)
            if reply and int(reply[0][1]) >= count:
                return
            await anyio.sleep(0.005)


def _fanout(subscribers: Subscribers) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        channel = f"{env.prefix}:fanout:{uuid.uuid4().hex[:8]}"
        publisher = redis_py(env.url, PUBLISHERS)
        deliveries = _Deliveries()
        ids = itertools.count()
        try:
            async with AsyncExitStack() as stack:
                connections = await subscribers(env, channel, deliveries.delivered, stack)
                await _wait_subscribed(publisher, channel, connections)

                async def operation() -> None:
                    message_id = next(ids)
                    done = deliveries.expect(message_id)
                    await publisher.publish(channel, json.dumps({**BODY, "id": message_id}))
                    await done.wait()

                yield operation
        finally:
            with anyio.move_on_after(5, shield=True):
                await publisher.aclose()

    return setup


async def _consumers(
    stack: AsyncExitStack, sources: list[Any], consume: Callable[[Any], Coroutine[Any, Any, None]]
) -> None:
    tg = await stack.enter_async_context(anyio.create_task_group())
    for source in sources:
        tg.start_soon(consume, source)
    # Runs first on exit: stop the consumers before their subscriptions close.
    stack.callback(tg.cancel_scope.cancel)


async def _redis_py_subscribers(
    env: BenchEnv, channel: str, delivered: Callable[[int], None], stack: AsyncExitStack
) -> int:
    loads = json_loads()
    client = redis_py(env.url, FANOUT + 4)
    stack.push_async_callback(client.aclose)
    pubsubs: list[Any] = [client.pubsub() for _ in range(FANOUT)]

    async def close_all() -> None:
        with anyio.move_on_after(5, shield=True):
            async with anyio.create_task_group() as tg:
                for pubsub in pubsubs:
                    tg.start_soon(pubsub.aclose)

    stack.push_async_callback(close_all)
    async with anyio.create_task_group() as tg:  # 100 connections: open them together
        for pubsub in pubsubs:
            tg.start_soon(pubsub.subscribe, channel)

    async def consume(pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                delivered(loads(message["data"])["id"])

    await _consumers(stack, pubsubs, consume)
    return FANOUT


async def _broadcast_subscribers(
    env: BenchEnv, channel: str, delivered: Callable[[int], None], stack: AsyncExitStack
) -> int:
    client = env.client()
    stack.push_async_callback(client.aclose)
    hub = await stack.enter_async_context(Broadcast(client))
    sources = [await stack.enter_async_context(hub.subscribe(channel)) for _ in range(FANOUT)]

    async def consume(messages: Any) -> None:
        async for item in messages:
            if isinstance(item, Message):
                delivered(item.payload["id"])

    await _consumers(stack, sources, consume)
    return 1


async def _broadcaster_subscribers(
    env: BenchEnv, channel: str, delivered: Callable[[int], None], stack: AsyncExitStack
) -> int:
    loads = json_loads()
    broadcast = await stack.enter_async_context(load("broadcaster").Broadcast(env.url))
    sources = [await stack.enter_async_context(broadcast.subscribe(channel)) for _ in range(FANOUT)]
    nudge_broadcaster(broadcast)

    async def consume(subscriber: Any) -> None:
        while True:
            # broadcaster hands out str; a user decodes the JSON in each subscriber.
            delivered(loads((await subscriber.get()).message)["id"])

    await _consumers(stack, sources, consume)
    return 1


def scenarios(env: BenchEnv) -> list[Scenario]:
    """100 redis-py subscriptions (baseline), Broadcast, broadcaster."""
    common: dict[str, Any] = {"ops_per_call": FANOUT, "unit": "deliveries"}
    rows = [
        Scenario(GROUP, "redis-py: 100 PubSub (100 connections)", PUBLISHERS,
                 _fanout(_redis_py_subscribers), baseline=True, **common),
        Scenario(GROUP, "Broadcast: 100 subscribers (1 connection)", PUBLISHERS,
                 _fanout(_broadcast_subscribers), **common),
    ]  # fmt: skip
    if has("broadcaster"):
        rows.append(
            Scenario(GROUP, "broadcaster: 100 subscribers (1 connection)", PUBLISHERS,
                     _fanout(_broadcaster_subscribers), role="competitor", **common)
        )  # fmt: skip
    return rows
