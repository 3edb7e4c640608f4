"""Pub/sub against real servers: typed messages, gaps after reconnects, bounded buffers,
cancellation, Broadcast fan-out, sharded channels."""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from aioredispatterns import (
    ConfigurationError,
    ConnectionFailed,
    RawSerializer,
    SerializationError,
    connect,
    server_info,
)
from aioredispatterns._connection import is_cluster
from aioredispatterns.pubsub import (
    Broadcast,
    BufferPolicy,
    Gap,
    Message,
    PubSubError,
    PubSubOverflow,
    ReconnectPolicy,
    Subscription,
    publish,
    subscribe,
)
from aioredispatterns.testing import (
    RedisServer,
    borrowed_connections,
    on_every_node,
    subscriber_count,
)

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.02, max_delay=0.2)


def _channel() -> str:
    return f"ch:{uuid.uuid4().hex[:10]}"


async def _numsub(client: Any, channel: str) -> int:
    # On a cluster a plain subscription lives on one node: summed over every node.
    return await subscriber_count(client, channel)


def _receivers(client: Any, subscribers: int) -> range | tuple[int]:
    """What publish() may return with ``subscribers`` subscribed: exactly that many on one
    server; on a cluster PUBLISH counts the subscribers of the node it went to only (as
    documented), so anything up to that many."""
    return range(subscribers + 1) if is_cluster(client) else (subscribers,)


async def _poll(done: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until ``done()``; for state no event announces (server state, counters)."""
    with anyio.move_on_after(seconds):
        while not await done():  # noqa: ASYNC110 - polling state outside this process
            await anyio.sleep(0.005)


async def _wait_numsub(client: Any, channel: str, expected: int) -> int:
    """The server drops a closed connection's subscriptions promptly, but asynchronously."""

    async def reached() -> bool:
        return await _numsub(client, channel) == expected

    await _poll(reached, 3.0)
    return await _numsub(client, channel)


def _true_when(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


def _in_use(client: Any) -> int:
    # Checked-out connections, not counting the one the auto-pipeline keeps.
    return len(borrowed_connections(client))


async def _next(messages: Subscription, seconds: float = 5.0) -> Message | Gap:
    with anyio.fail_after(seconds):
        return await messages.__anext__()


async def _publish_many(client: Any, channel: str, payloads: list[bytes]) -> None:
    """Publish fast from a plain pipeline (the subscriber reads meanwhile), in order.

    On a cluster, through one node (a cluster pipeline refuses PUBLISH): every node
    forwards what it is published to every other node, in the order it received it.
    """
    node_client = None
    if is_cluster(client):
        await client.initialize()
        node = client.get_primaries()[0]
        client = node_client = Redis(host=node.host, port=node.port)
    try:
        for start in range(0, len(payloads), 2000):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[start : start + 2000]:
                pipe.publish(channel, payload)
            await pipe.execute()
    finally:
        if node_client is not None:
            await node_client.aclose()


# --------------------------------------------------------------------------- basics


async def test_messages_arrive_typed_and_decoded(redis_client: Any) -> None:
    channel = _channel()
    async with subscribe(redis_client, channel, patterns=[f"{channel}.*"]) as messages:
        assert await publish(redis_client, channel, {"id": 1, "tags": ["a"]}) in _receivers(
            redis_client, 1
        )
        assert await publish(redis_client, f"{channel}.x", [1, 2]) in _receivers(redis_client, 1)
        first = await _next(messages)
        second = await _next(messages)
    assert first == Message(channel=channel, payload={"id": 1, "tags": ["a"]})
    assert isinstance(second, Message)
    assert (second.channel, second.payload, second.pattern) == (
        f"{channel}.x",
        [1, 2],
        f"{channel}.*",
    )
    assert messages.stats.delivered == 2


async def test_entering_waits_for_confirmation_so_nothing_published_after_is_lost(
    redis_client: Any,
) -> None:
    channels = [_channel() for _ in range(5)]
    async with subscribe(redis_client, *channels, serializer=RawSerializer()) as messages:
        for channel in channels:  # no sleep: the subscription is already confirmed
            receivers = await publish(redis_client, channel, b"x", serializer=RawSerializer())
            assert receivers in _receivers(redis_client, 1)
        got = {(await _next(messages)).channel for _ in channels}  # type: ignore[union-attr]
    assert got == set(channels)


async def test_undecodable_payload_raises_and_the_subscription_continues(redis_client: Any) -> None:
    channel = _channel()
    async with subscribe(redis_client, channel) as messages:
        # One at a time: on a cluster two publishes may reach the subscriber out of order.
        await redis_client.publish(channel, b"\xff not json")
        with pytest.raises(SerializationError):
            await _next(messages)
        await publish(redis_client, channel, "fine")
        assert await _next(messages) == Message(channel, "fine")


async def test_one_publishers_messages_arrive_in_the_order_published(redis_client: Any) -> None:
    channel = _channel()
    payloads = _payloads(300)
    async with subscribe(redis_client, channel, serializer=RawSerializer()) as messages:
        for payload in payloads:
            await publish(redis_client, channel, payload, serializer=RawSerializer())
        got = [(await _next(messages)).payload for _ in payloads]  # type: ignore[union-attr]
    assert got == payloads


async def test_sharded_uses_ssubscribe_where_the_server_has_it(redis_client: Any) -> None:
    info = await server_info(redis_client)
    channel = _channel()
    async with subscribe(redis_client, channel, sharded=True) as messages:
        assert messages.sharded is info.sharded_pubsub
        assert await publish(redis_client, channel, "hello", sharded=True) == 1
        received = await _next(messages)
        if info.sharded_pubsub:
            assert await subscriber_count(redis_client, channel, sharded=True) == 1
            assert await _numsub(redis_client, channel) == 0  # not a plain subscription
    assert received == Message(channel, "hello", None, info.sharded_pubsub)


async def test_bad_options_fail_before_any_command(redis_client: Any) -> None:
    with pytest.raises(ConfigurationError):
        subscribe(redis_client)  # nothing to subscribe to
    with pytest.raises(ConfigurationError):
        subscribe(redis_client, "")
    with pytest.raises(ConfigurationError):
        subscribe(redis_client, "a", buffer=10)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        BufferPolicy(size=0)
    with pytest.raises(ConfigurationError):
        BufferPolicy(overflow="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(initial_delay=1.0, max_delay=0.5)
    with pytest.raises(ConfigurationError):
        ReconnectPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        subscribe("not a client", "a")  # type: ignore[arg-type]
    with pytest.raises(PubSubError):
        await subscribe(redis_client, "a").__anext__()  # not entered


def test_reconnect_backoff_grows_exponentially_with_full_jitter() -> None:
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=1.0, multiplier=2.0)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (60, 1.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.7  # jitter spreads over the whole range
        assert min(delays) < ceiling * 0.3


async def test_idle_health_checks_keep_the_subscription_working(redis_client: Any) -> None:
    channel = _channel()
    async with subscribe(redis_client, channel, health_check_interval=0.05) as messages:
        await anyio.sleep(0.4)  # several PINGs answered in subscribed mode
        await publish(redis_client, channel, 1)
        assert await _next(messages) == Message(channel, 1)
        assert messages.stats.gaps == 0


async def test_unanswered_health_check_reconnects_and_reports_a_gap(redis_client: Any) -> None:
    """A server that stops answering (here: CLIENT PAUSE) looks like a half-open connection."""
    channel = _channel()
    async with subscribe(
        redis_client, channel, health_check_interval=0.1, reconnect=FAST_RECONNECT
    ) as messages:
        await on_every_node(redis_client, "CLIENT", "PAUSE", "700", "ALL")
        gap = await _next(messages, seconds=10)
        assert isinstance(gap, Gap)
        await publish(redis_client, channel, "after")
        assert await _next(messages) == Message(channel, "after")


# --------------------------------------------------------------------------- reconnect


@pytest.fixture
def own_server(redis_server: Any) -> Any:
    """A server of the current matrix kind that this test may kill and restart."""
    if not redis_server.owned:
        pytest.skip("needs a server binary (not an external server: --redis-url)")
    server = RedisServer(redis_server.binary, name=f"{redis_server.name}-own").start()
    try:
        yield server
    finally:
        server.stop()


async def test_reconnect_after_restart_reports_the_gap_and_resumes(own_server: RedisServer) -> None:
    tasks_before = len(asyncio.all_tasks())
    subscriber = connect(own_server.url, retries=0)
    publisher = connect(own_server.url)
    channel = _channel()
    try:
        async with subscribe(
            subscriber, channel, patterns=[f"{channel}:*"], reconnect=FAST_RECONNECT
        ) as messages:
            await publish(publisher, channel, "before")
            assert await _next(messages) == Message(channel, "before")

            own_server.kill()
            await anyio.sleep(0.3)  # the subscriber retries against a dead port meanwhile
            await anyio.to_thread.run_sync(own_server.restart)  # same port, empty server

            gap = await _next(messages, seconds=10)
            assert isinstance(gap, Gap)
            assert gap.duration >= 0.3
            assert gap.attempts >= 1
            # The subscription is back (the gap is reported after the resubscribe).
            assert await _numsub(publisher, channel) == 1
            await publish(publisher, channel, "after")
            await publish(publisher, f"{channel}:x", "pattern after")
            assert await _next(messages) == Message(channel, "after")
            assert await _next(messages) == Message(f"{channel}:x", "pattern after", f"{channel}:*")
            stats = messages.stats
            assert (stats.gaps, stats.delivered, stats.dropped) == (1, 3, 0)
            assert stats.gap_seconds == pytest.approx(gap.duration)
        assert _in_use(subscriber) == 0  # the dedicated connection went back to the pool
        assert await _wait_numsub(publisher, channel, 0) == 0
    finally:
        await subscriber.aclose()
        await publisher.aclose()
    assert len(asyncio.all_tasks()) == tasks_before  # reader and health tasks ended


async def test_without_reconnect_a_lost_connection_ends_the_iteration(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url, retries=0)
    channel = _channel()
    try:
        async with subscribe(client, channel, reconnect=None) as messages:
            await publish(client, channel, 1)
            own_server.kill()
            assert await _next(messages) == Message(channel, 1)  # buffered before the loss
            with pytest.raises(ConnectionFailed):
                await _next(messages)
        assert _in_use(client) == 0
    finally:
        await client.aclose()


async def test_reconnect_gives_up_after_max_attempts(own_server: RedisServer) -> None:
    client = connect(own_server.url, retries=0)  # refused at once once killed
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=3)
    try:
        async with subscribe(client, _channel(), reconnect=policy) as messages:
            own_server.kill()
            with pytest.raises(ConnectionFailed, match="3 attempts"):
                await _next(messages)
    finally:
        await client.aclose()


async def test_broadcast_reports_the_gap_to_every_local_subscriber(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url, retries=0)
    channel = _channel()
    try:
        async with (
            Broadcast(client, reconnect=FAST_RECONNECT) as hub,
            hub.subscribe(channel) as first,
            hub.subscribe(channel) as second,
        ):
            own_server.kill()
            await anyio.to_thread.run_sync(own_server.restart)
            assert isinstance(await _next(first, 10), Gap)
            assert isinstance(await _next(second, 10), Gap)
            assert await hub.publish(channel, "x") == 1  # one server subscriber for both
            assert await _next(first) == Message(channel, "x")
            assert await _next(second) == Message(channel, "x")
    finally:
        await client.aclose()


async def test_broadcast_subscribe_during_an_outage_waits_for_the_resubscribe(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url, retries=0)
    channel = _channel()
    try:
        async with (
            Broadcast(client, reconnect=FAST_RECONNECT) as hub,
            hub.subscribe(_channel()) as first,
        ):
            own_server.kill()
            with anyio.move_on_after(0.3) as waited:  # no server: entering cannot complete
                async with hub.subscribe(channel):
                    pytest.fail("entered without a server")
            assert waited.cancelled_caught
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, own_server.restart)
                with anyio.fail_after(10):
                    async with hub.subscribe(channel) as late:
                        assert await hub.publish(channel, "hi") == 1
                        # It joined during the outage and missed nothing: no gap for it.
                        assert await _next(late) == Message(channel, "hi")
            assert isinstance(await _next(first), Gap)
    finally:
        await client.aclose()


async def test_broadcast_without_reconnect_fails_new_subscribers_after_a_loss(
    own_server: RedisServer,
) -> None:
    client = connect(own_server.url, retries=0)
    try:
        async with Broadcast(client, reconnect=None) as hub:
            async with hub.subscribe(_channel()) as first:
                own_server.kill()
                with pytest.raises(ConnectionFailed):
                    await _next(first)
            async with hub.subscribe(_channel()) as late:
                with pytest.raises(ConnectionFailed):
                    await _next(late)
    finally:
        await client.aclose()
        await anyio.to_thread.run_sync(own_server.restart)


async def test_entering_fails_fast_when_the_server_is_down(own_server: RedisServer) -> None:
    own_server.kill()
    client = connect(own_server.url, retries=0, connect_timeout=0.5)
    try:
        with pytest.raises(ConnectionFailed):
            async with subscribe(client, "x"):
                pass
        assert _in_use(client) == 0
    finally:
        await client.aclose()
        await anyio.to_thread.run_sync(own_server.restart)


# --------------------------------------------------------------------------- backpressure


def _payloads(count: int, size: int = 0) -> list[bytes]:
    pad = b"." * size
    return [b"%d:" % i + pad for i in range(count)]


async def _drain(messages: Subscription) -> list[Any]:
    """Take what is buffered now without waiting for more."""
    out = []
    while messages.stats.buffered:
        item = await _next(messages)
        assert isinstance(item, Message)
        out.append(item.payload)
    return out


async def _wait_received(messages: Subscription, count: int) -> None:
    async def reached() -> bool:
        return messages.stats.received >= count

    await _poll(reached, 30.0)
    assert messages.stats.received == count


async def test_stalled_consumer_memory_stays_bounded_and_drops_are_counted(
    redis_server: Any, redis_client: Any
) -> None:
    if redis_server.name not in ("valkey-9.1", "external"):
        pytest.skip("heavy scenario (100,000 messages): valkey-9.1 only")
    published, size, payload_size, consumed_early = 100_000, 1_000, 300, 10
    channel = _channel()
    payloads = _payloads(published, payload_size)
    async with subscribe(
        redis_client,
        channel,
        serializer=RawSerializer(),
        buffer=BufferPolicy(size=size, overflow="drop_oldest"),
    ) as messages:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            publishing = anyio.create_task_group()
            async with publishing:
                publishing.start_soon(_publish_many, redis_client, channel, payloads)
                got = [await _next(messages) for _ in range(consumed_early)]
                # The consumer now stalls while the rest is published and read.
            await _wait_received(messages, published)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        stats = messages.stats
        assert stats.received == published
        assert stats.buffered == size
        assert stats.delivered == consumed_early
        assert stats.dropped == published - stats.buffered - stats.delivered
        # Unbounded, the backlog alone would hold ~30 MB of payloads.
        print(f"traced peak while 100,000 messages arrived: {peak:,} bytes; {stats}")
        assert peak < 0.2 * published * payload_size, f"peak {peak:,} bytes"
        rest = await _drain(messages)
    assert [m.payload for m in got] == payloads[:consumed_early]  # type: ignore[union-attr]
    assert rest == payloads[-size:]  # drop_oldest keeps the newest


async def test_error_policy_stops_the_subscription(redis_server: Any, redis_client: Any) -> None:
    channel = _channel()
    async with subscribe(
        redis_client, channel, serializer=RawSerializer(), buffer=BufferPolicy(5, "error")
    ) as messages:
        await _publish_many(redis_client, channel, _payloads(8))
        await _wait_received(messages, 6)
        with pytest.raises(PubSubOverflow):
            await _next(messages)
        with pytest.raises(PubSubOverflow):
            await _next(messages)
        assert messages.stats.dropped == 6  # the 5 buffered + the one that overflowed


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    size=st.integers(1, 40),
    published=st.integers(0, 120),
    consumed=st.integers(0, 10),
    overflow=st.sampled_from(["drop_oldest", "drop_newest"]),
)
async def test_drop_accounting_matches_the_policy(
    redis_server: Any,
    redis_client: Any,
    size: int,
    published: int,
    consumed: int,
    overflow: Any,
) -> None:
    if redis_server.name not in ("valkey-9.1", "external"):
        pytest.skip("property test: valkey-9.1 only")
    channel = _channel()  # fresh per example
    payloads = _payloads(published)
    consumed = min(consumed, published)
    async with subscribe(
        redis_client,
        channel,
        serializer=RawSerializer(),
        buffer=BufferPolicy(size, overflow),
    ) as messages:
        early = []
        for payload in payloads[:consumed]:  # one at a time: these never overflow
            await redis_client.publish(channel, payload)
            early.append((await _next(messages)).payload)  # type: ignore[union-attr]
        await _publish_many(redis_client, channel, payloads[consumed:])
        await _wait_received(messages, published)
        stats = messages.stats
        assert stats.received == published
        assert stats.dropped == published - stats.buffered - stats.delivered
        assert stats.buffered == min(size, published - consumed)
        rest = await _drain(messages)
    late = payloads[consumed:]
    assert early == payloads[:consumed]
    assert rest == (late[-size:] if overflow == "drop_oldest" else late[:size]) or not late


# --------------------------------------------------------------------------- cancellation


async def test_cancelling_the_consumer_closes_the_subscription_on_the_server(
    redis_client: Any,
) -> None:
    channel = _channel()
    tasks_before = len(asyncio.all_tasks())
    in_use_before = _in_use(redis_client)
    delivered: list[Any] = []
    subscribed = anyio.Event()

    async def consumer() -> None:
        async with subscribe(redis_client, channel) as messages:
            subscribed.set()
            async for item in messages:
                delivered.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await subscribed.wait()
        assert await _numsub(redis_client, channel) == 1
        await publish(redis_client, channel, 1)
        await _poll(_true_when(lambda: bool(delivered)))
        tg.cancel_scope.cancel()  # mid-iteration: the consumer waits for the next message
    assert await _wait_numsub(redis_client, channel, 0) == 0
    assert _in_use(redis_client) == in_use_before
    assert len(asyncio.all_tasks()) == tasks_before
    assert delivered == [Message(channel, 1)]


async def test_cancelling_while_entering_leaks_nothing(redis_client: Any) -> None:
    channel = _channel()
    in_use_before = _in_use(redis_client)
    with anyio.move_on_after(0):  # cancelled at the first await of the enter
        async with subscribe(redis_client, channel):
            pytest.fail("the body must not run")
    assert _in_use(redis_client) == in_use_before
    assert await _wait_numsub(redis_client, channel, 0) == 0


# --------------------------------------------------------------------------- Broadcast


async def test_broadcast_fans_out_over_one_connection(redis_client: Any) -> None:
    channel = _channel()
    in_use_before = _in_use(redis_client)
    async with Broadcast(redis_client) as hub:
        assert hub.connections == 1
        subscriptions = [hub.subscribe(channel) for _ in range(20)]
        async with anyio.create_task_group() as tg:
            entered = 0
            done = anyio.Event()

            async def local(sub: Subscription) -> None:
                nonlocal entered
                async with sub:
                    entered += 1
                    await done.wait()

            for sub in subscriptions:
                tg.start_soon(local, sub)
            await _poll(_true_when(lambda: entered == 20))
            assert _in_use(redis_client) == in_use_before + 1
            assert await _numsub(redis_client, channel) == 1  # one server subscription
            assert await hub.publish(channel, {"n": 1}) in _receivers(redis_client, 1)
            for sub in subscriptions:
                assert await _next(sub) == Message(channel, {"n": 1})
            done.set()
    assert _in_use(redis_client) == in_use_before
    assert await _wait_numsub(redis_client, channel, 0) == 0


async def test_last_local_unsubscribe_unsubscribes_on_the_server(redis_client: Any) -> None:
    channel, other = _channel(), _channel()
    async with Broadcast(redis_client) as hub:
        async with hub.subscribe(channel) as first:
            async with hub.subscribe(channel, other, patterns=[f"{other}*"]):
                assert hub.subscribers == 2
                assert await _numsub(redis_client, channel) == 1
                assert await _numsub(redis_client, other) == 1
            # ``second`` left: ``other`` and its pattern go, ``channel`` stays for ``first``.
            assert await _wait_numsub(redis_client, other, 0) == 0
            assert sum(await on_every_node(redis_client, "PUBSUB", "NUMPAT")) == 0
            assert await _numsub(redis_client, channel) == 1
            await hub.publish(channel, "still here")
            assert await _next(first) == Message(channel, "still here")
        assert await _wait_numsub(redis_client, channel, 0) == 0
        assert hub.connections == 1  # the connection stays for the next subscriber
        async with hub.subscribe(channel) as again:  # and resubscribes on demand
            await hub.publish(channel, "back")
            assert await _next(again) == Message(channel, "back")


async def test_broadcast_slow_subscriber_drops_its_own_messages_only(redis_client: Any) -> None:
    channel = _channel()
    async with (
        Broadcast(redis_client, serializer=RawSerializer()) as hub,
        hub.subscribe(channel, buffer=BufferPolicy(3, "drop_newest")) as slow,
        hub.subscribe(channel, buffer=BufferPolicy(100)) as fast,
    ):
        await _publish_many(redis_client, channel, _payloads(10))
        await _wait_received(fast, 10)
        await _wait_received(slow, 10)
        assert [(await _next(fast)).payload for _ in range(10)] == _payloads(10)  # type: ignore[union-attr]
        assert (slow.stats.buffered, slow.stats.dropped) == (3, 7)
        assert await _drain(slow) == _payloads(3)


async def test_broadcast_subscribe_needs_an_entered_broadcast(redis_client: Any) -> None:
    hub = Broadcast(redis_client)
    with pytest.raises(PubSubError):
        async with hub.subscribe("x"):
            pass


async def test_broadcast_exit_ends_local_iterations(redis_client: Any) -> None:
    channel = _channel()
    seen: list[Any] = []
    async with Broadcast(redis_client) as hub:
        sub = hub.subscribe(channel)

        async def consume() -> None:
            async with sub:
                async for item in sub:
                    seen.append(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await _wait_numsub(redis_client, channel, 1)
            await hub.publish(channel, 1)
            await _poll(_true_when(lambda: bool(seen)))
            tg.cancel_scope.cancel()
    assert seen == [Message(channel, 1)]
    assert await _wait_numsub(redis_client, channel, 0) == 0


# --------------------------------------------------------------------------- cluster


@pytest.mark.cluster
async def test_plain_pubsub_on_a_cluster_client(cluster_client: Any) -> None:
    channels = [f"{_channel()}:{i}" for i in range(5)]  # spread over slots and nodes
    async with subscribe(cluster_client, *channels) as messages:
        for channel in channels:
            await publish(cluster_client, channel, channel)
        got = [await _next(messages) for _ in channels]
    assert sorted(m.payload for m in got) == sorted(channels)  # type: ignore[union-attr]


async def test_broadcast_decodes_once_and_reports_bad_payloads_to_each_subscriber(
    redis_client: Any,
) -> None:
    channel = _channel()
    async with (
        Broadcast(redis_client) as hub,
        hub.subscribe(channel) as first,
        hub.subscribe(channel) as second,
    ):
        # One at a time: on a cluster two publishes may reach the hub out of order.
        await redis_client.publish(channel, b"{not json")
        for sub in (first, second):
            with pytest.raises(SerializationError):
                await _next(sub)
        await hub.publish(channel, {"k": [1]})
        one, two = await _next(first), await _next(second)
        assert one == two == Message(channel, {"k": [1]})
        assert one.payload is two.payload  # type: ignore[union-attr]


@pytest.mark.cluster
async def test_sharded_pubsub_on_a_cluster_client(cluster_client: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    channels = [f"{{{tag}}}:a", f"{{{tag}}}:b"]  # one slot, so one node
    async with subscribe(cluster_client, *channels, sharded=True) as messages:
        assert messages.sharded
        for channel in channels:
            assert await publish(cluster_client, channel, channel, sharded=True) == 1
        got = [await _next(messages) for _ in channels]
    assert got == [Message(c, c, None, True) for c in channels]
    spread = [f"{_channel()}:{i}" for i in range(20)]  # certainly more than one node
    with pytest.raises(ConfigurationError, match="one cluster node"):
        async with subscribe(cluster_client, *spread, sharded=True):
            pass


@pytest.mark.parametrize("protocol", [2, 3])
async def test_resp2_and_resp3_clients(redis_server: Any, protocol: Any) -> None:
    client = connect(redis_server.url, protocol=protocol)
    channel = _channel()
    try:
        async with (
            subscribe(client, channel, patterns=[f"{channel}*"]) as messages,
            Broadcast(client) as hub,
            hub.subscribe(channel) as local,
        ):
            await publish(client, channel, protocol)
            got = {await _next(messages), await _next(messages)}
            assert got == {Message(channel, protocol), Message(channel, protocol, f"{channel}*")}
            assert await _next(local) == Message(channel, protocol)
    finally:
        await client.aclose()
