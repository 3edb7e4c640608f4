"""Least privilege: every primitive works for an ACL user limited to its key prefix.

The user may touch only ``~<prefix>:*`` keys and ``&<prefix>:*`` channels and run
``+@all -@dangerous``. A core scenario of every primitive runs through a client of
:func:`aioredispatterns.connect` logged in as that user; afterwards the server's
``ACL LOG`` must be empty: no command denied, no key or channel outside the prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from aioredispatterns import (
    GCRA,
    Broadcast,
    Cache,
    ConsumerGroup,
    ConsumerPolicy,
    FixedWindow,
    Gap,
    Lock,
    LockNotAcquired,
    Message,
    RateLimiter,
    Redlock,
    Semaphore,
    SlidingWindowCounter,
    SlidingWindowLog,
    StreamMessage,
    StreamProducer,
    StreamRetention,
    Subscription,
    TokenBucket,
    connect,
    fenced_get,
    fenced_set,
    publish,
    server_info,
    subscribe,
)
from aioredispatterns._connection import is_cluster
from aioredispatterns.ratelimit import Policy
from aioredispatterns.testing import on_every_node

Scenario = Callable[[Any, Any, str], Awaitable[None]]


@asynccontextmanager
async def _limited_user(admin: Any, prefix: str) -> AsyncIterator[tuple[str, str]]:
    user, password = f"app-{prefix}", uuid.uuid4().hex
    # resetchannels: Redis 6.2 grants every channel by default (acl-pubsub-default).
    # ACL users are per node: on a cluster, every node gets the same user.
    await on_every_node(
        admin, "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{prefix}:*",
        "resetchannels", f"&{prefix}:*", "+@all", "-@dangerous",
    )  # fmt: skip
    try:
        yield user, password
    finally:
        await on_every_node(admin, "ACL", "DELUSER", user)


# ------------------------------------------------------------------ the scenarios


async def _cache(client: Any, admin: Any, prefix: str) -> None:
    loads = 0

    async def load() -> dict[str, int]:
        nonlocal loads
        loads += 1
        await anyio.sleep(0.2)
        return {"id": 1}

    async with Cache(client, ttl=60, stale_ttl=5, prefix=prefix) as cache:
        assert await cache.get_or_load("user:1", load) == {"id": 1}
        assert await cache.get_or_load("user:1", load) == {"id": 1}
        assert await cache.set("user:2", {"id": 2})
        assert await cache.get("user:2") == {"id": 2}
        many: dict[str | bytes, int] = {"user:3": 3, "user:4": 4}
        await cache.set_many(many)
        assert await cache.get_many(["user:3", "user:4"]) == {"user:3": 3, "user:4": 4}
        await cache.invalidate("user:1", "user:2")
        assert await cache.get("user:1") is None
    # Two processes (two caches) miss at once: one loads under the fleet lease, the
    # other waits for the fill.
    async with (
        Cache(client, ttl=60, prefix=prefix, distributed=True) as first,
        Cache(client, ttl=60, prefix=prefix, distributed=True) as second,
    ):
        values: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(values, first.get_or_load("fleet:1", load)))
            await anyio.sleep(0.05)
            tg.start_soon(lambda: _append(values, second.get_or_load("fleet:1", load)))
        assert values == [{"id": 1}, {"id": 1}]
        await first.invalidate("fleet:1")


async def _append(values: list[Any], value: Awaitable[Any]) -> None:
    values.append(await value)


async def _lock(client: Any, admin: Any, prefix: str) -> None:
    lock = Lock(client, "job", ttl=1.2, timeout=10, prefix=prefix)
    owner_key = f"{prefix}:lock:{{job}}:owner"
    async with lock as lease:
        assert await lock.locked()
        with pytest.raises(LockNotAcquired):
            await lock.acquire(blocking=False)
        await anyio.sleep(0.6)  # the renewal, at ttl / 3, has run
        assert await admin.pttl(owner_key) > 650  # 600 or less without it
        await lease.extend()
        assert await fenced_set(client, "report", b"v1", lease.token, prefix=prefix)
        assert not await fenced_set(client, "report", b"v0", lease.token - 1, prefix=prefix)
    stored = await fenced_get(client, "report", prefix=prefix)
    assert stored is not None
    assert stored.value == b"v1"
    # A waiter blocked on the wake-up list, woken by the release.
    holder = await lock.acquire()
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            lease = await lock.acquire(timeout=10)
            await lease.release()

        tg.start_soon(waiter)
        await anyio.sleep(0.1)
        await holder.release()
    assert not await lock.locked()


async def _semaphore(client: Any, admin: Any, prefix: str) -> None:
    semaphore = Semaphore(client, "pool", 1, ttl=1.2, timeout=10, prefix=prefix)
    async with semaphore as lease:
        assert await semaphore.holders() == 1
        await anyio.sleep(0.5)  # one renewal
        assert lease.held
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                async with semaphore:
                    pass

            tg.start_soon(waiter)
            await anyio.sleep(0.1)
            await lease.release()
    assert await semaphore.holders() == 0


async def _redlock(client: Any, admin: Any, prefix: str) -> None:
    redlock = Redlock([client], "job", ttl=1.2, timeout=10, prefix=prefix)
    async with redlock as lease:
        await anyio.sleep(0.6)  # one renewal
        assert lease.held
    second = await redlock.acquire()
    assert second.token > lease.token
    await second.release()


async def _ratelimit(client: Any, admin: Any, prefix: str) -> None:
    policies: list[Policy] = [
        GCRA(1, 0.2),
        TokenBucket(1, 5.0),
        FixedWindow(1, 0.2),
        SlidingWindowCounter(1, 0.2),
        SlidingWindowLog(1, 0.2),
    ]
    for policy in policies:
        limiter = RateLimiter(client, policy, name=type(policy).__name__, prefix=prefix)
        assert (await limiter.hit("user:1")).allowed
        assert not (await limiter.peek("user:1")).allowed
        assert (await limiter.wait("user:1", timeout=5)).allowed
        await limiter.reset("user:1")
        assert (await limiter.peek("user:1")).allowed
    both = RateLimiter(client, policies, name="all", prefix=prefix)
    assert (await both.hit("user:2")).allowed
    await both.reset("user:2")


async def _streams(client: Any, admin: Any, prefix: str) -> None:
    producer = StreamProducer(
        client, "orders", prefix=prefix, retention=StreamRetention(maxlen=1000)
    )
    await producer.add({"n": 0, "kind": "ok"})
    await producer.add_many([{"n": 1, "kind": "flaky"}, {"n": 2, "kind": "poison"}])
    done: list[int] = []

    async def handle(message: StreamMessage) -> None:
        kind = message.fields["kind"]
        if kind == "poison" or (kind == "flaky" and message.deliveries == 1):
            raise RuntimeError(f"{kind} fails")
        done.append(int(message.fields["n"]))

    # Fast reclaim and hygiene so XAUTOCLAIM, the dead-letter script and the consumer
    # clean-up all run.
    policy = ConsumerPolicy(
        block=0.1,
        claim_idle=0.2,
        claim_interval=0.1,
        max_deliveries=2,
        consumer_idle=0.2,
        drain_timeout=2,
    )
    group = ConsumerGroup(client, "orders", "billing", handler=handle, policy=policy,
                          prefix=prefix)  # fmt: skip
    async with group:
        with anyio.fail_after(15):
            # The dead-letter count is a counter no event announces.
            while sorted(done) != [0, 1] or group.stats.dead_lettered < 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        info = await group.info()
        assert info.length == 3
        letters = await group.dead_letters()
        assert len(letters) == 1


async def _pubsub(client: Any, admin: Any, prefix: str) -> None:
    channel = f"{prefix}:news"
    async with subscribe(client, channel, patterns=[f"{prefix}:*"]) as messages:
        # Received by name and by pattern (on a cluster PUBLISH counts the receiving node's
        # subscribers only).
        assert await publish(client, channel, {"n": 1}) in _receivers(client, 2)
        seen = {await _payload(messages), await _payload(messages)}
        assert seen == {(channel, "{'n': 1}")}
    info = await server_info(client)
    async with subscribe(client, f"{prefix}:shard", sharded=True) as messages:
        assert messages.sharded is info.sharded_pubsub
        await publish(client, f"{prefix}:shard", "s", sharded=True)
        assert await _payload(messages) == (f"{prefix}:shard", "s")
    async with Broadcast(client) as hub, hub.subscribe(f"{prefix}:chat") as chat:
        assert await hub.publish(f"{prefix}:chat", "hi") in _receivers(client, 1)
        assert await _payload(chat) == (f"{prefix}:chat", "hi")


def _receivers(client: Any, subscribers: int) -> range | tuple[int]:
    return range(subscribers + 1) if is_cluster(client) else (subscribers,)


async def _payload(messages: Subscription) -> tuple[str, str]:
    with anyio.fail_after(10):
        item = await messages.__anext__()
    assert not isinstance(item, Gap), item
    assert isinstance(item, Message)
    channel = item.channel.decode() if isinstance(item.channel, bytes) else item.channel
    return str(channel), str(item.payload)


async def _capabilities(client: Any, admin: Any, prefix: str) -> None:
    info = await server_info(client)
    assert info.version >= (6, 2)


SCENARIOS: dict[str, Scenario] = {
    "server_info": _capabilities,
    "Cache": _cache,
    "Lock": _lock,
    "Semaphore": _semaphore,
    "Redlock": _redlock,
    "RateLimiter": _ratelimit,
    "streams": _streams,
    "pubsub": _pubsub,
}


def _entry(entry: dict[str, Any]) -> str:
    command = entry.get("client-info", {}).get("cmd", "?")
    return (
        f"{entry['reason']} {entry['object']!r} denied {entry['count']}x "
        f"(context {entry['context']}, last command {command})"
    )


# ------------------------------------------------------------------------ the test


async def test_every_primitive_runs_with_prefix_only_rights(
    redis_server: Any, redis_client: Any, key_prefix: str
) -> None:
    if not redis_server.owned:
        pytest.skip("creates an ACL user: needs a server this suite started")
    admin = redis_client
    failures: dict[str, str] = {}
    async with _limited_user(admin, key_prefix) as (user, password):
        await on_every_node(admin, "ACL", "LOG", "RESET")
        client = connect(redis_server.url, username=user, password=password)
        try:
            for name, scenario in SCENARIOS.items():
                try:
                    with anyio.fail_after(60):
                        await scenario(client, admin, key_prefix)
                except Exception as exc:  # reported below, with the ACL log
                    failures[name] = f"{type(exc).__name__}: {exc}"
        finally:
            await client.aclose()
        log = [entry for node in await on_every_node(admin, "ACL LOG") for entry in node]
    # The server was flushed before the test: every key now is one the scenarios wrote.
    outside = [key async for key in admin.scan_iter() if not key.startswith(key_prefix.encode())]
    entries = [_entry(entry) for entry in log]
    assert not failures, f"failed: {failures}\nACL LOG:\n" + "\n".join(entries)
    assert not outside, outside
    # No denied command at all: connect() does not send CLIENT SETINFO (CLIENT is
    # @dangerous on Redis 6.2), and capability detection needs no INFO.
    assert not log, "ACL LOG is not empty:\n" + "\n".join(entries)
