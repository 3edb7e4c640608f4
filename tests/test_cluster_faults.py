"""The slot router under the faults of a real cluster: a primary killed and its replica
promoted, a primary paused, a slot migrated while callers use it, pub/sub across a failover
and a moved slot.

One 3-primary + 3-replica Valkey 9.1 cluster (cluster-node-timeout 2 s) serves the module;
a test that kills a primary brings the node back (as a replica) before it ends.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from aioredispatterns import Gap, ReconnectPolicy, RedisPatternsError, connect, publish, subscribe
from aioredispatterns._commands import execute
from aioredispatterns.testing import (
    ClusterServers,
    RedisServer,
    ServerNotAvailable,
    find_server_binary,
    start_cluster,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SOCKET_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    try:
        binary = find_server_binary("valkey-9.1")
    except ServerNotAvailable as exc:
        pytest.skip(str(exc))
    with start_cluster(binary, replicas=1) as servers:
        yield servers


@pytest.fixture
async def client(cluster: ClusterServers) -> AsyncIterator[Any]:
    client = connect(cluster.url, socket_timeout=SOCKET_TIMEOUT)
    try:
        yield client
    finally:
        await client.aclose()


def _key_per_primary(cluster: ClusterServers, stem: str) -> dict[int, str]:
    """A key (hash-tagged) on each primary, by the primary's port."""
    keys: dict[int, str] = {}
    index = 0
    while len(keys) < len(cluster.primaries()):
        key = f"{{{stem}{index}}}"
        keys.setdefault(cluster.node_for_key(key).port, key)
        index += 1
    return keys


async def _restore(cluster: ClusterServers, node: RedisServer) -> None:
    await anyio.to_thread.run_sync(cluster.restart, node)


class Workload:
    """Callers hammering one key per primary; errors counted per primary."""

    def __init__(
        self,
        client: Any,
        keys: dict[int, str],
        *,
        deadline: float | None = None,
        deadlines: dict[int, float] | None = None,
    ):
        self.client = client
        self.keys = keys
        self.deadline = deadline
        self.deadlines = deadlines or {}
        self.ok: collections.Counter[int] = collections.Counter()
        self.errors: dict[int, list[BaseException]] = collections.defaultdict(list)
        self.slowest: collections.Counter[int] = collections.Counter()
        self.last_ok: dict[int, float] = {}
        self.running = True

    async def run(self, port: int) -> None:
        key = self.keys[port]
        deadline = self.deadlines.get(port, self.deadline)
        while self.running:
            began = time.monotonic()
            try:
                if deadline is None:
                    await execute(self.client, "INCR", key)
                else:
                    with anyio.move_on_after(deadline) as scope:
                        await execute(self.client, "INCR", key)
                    if scope.cancelled_caught:
                        self.errors[port].append(TimeoutError("move_on_after"))
                        continue
            except Exception as exc:
                self.errors[port].append(exc)
                await anyio.sleep(0.01)
                continue
            finally:
                self.slowest[port] = max(self.slowest[port], time.monotonic() - began)
            self.ok[port] += 1
            self.last_ok[port] = time.monotonic()

    async def works_again(self, port: int, after: float, within: float) -> float:
        """Seconds from ``after`` until ``port``'s callers succeed again."""
        with anyio.fail_after(within):
            while self.last_ok.get(port, 0.0) <= after:  # noqa: ASYNC110 - polled state
                await anyio.sleep(0.02)
        return self.last_ok[port] - after


async def test_a_killed_primary_fails_only_its_own_callers(
    cluster: ClusterServers, client: Any
) -> None:
    keys = _key_per_primary(cluster, "kill")
    victim = cluster.primaries()[0]
    work = Workload(client, keys)
    async with anyio.create_task_group() as tg:
        for port in keys:
            for _ in range(4):
                tg.start_soon(work.run, port)
        await anyio.sleep(0.5)
        failover = await anyio.to_thread.run_sync(cluster.kill_primary, victim)
        promoted = time.monotonic()
        # Goal: within cluster-node-timeout + 1 s of the promotion (more room on a busy CI).
        await work.works_again(victim.port, promoted, within=3.0 + 5.0)
        await anyio.sleep(0.3)
        work.running = False
    try:
        healthy = [port for port in keys if port != victim.port]
        assert all(work.ok[port] > 0 for port in keys)
        assert {port: work.errors[port] for port in healthy} == {port: [] for port in healthy}
        # The victim's callers saw typed errors only, and not forever.
        assert all(isinstance(exc, RedisPatternsError) for exc in work.errors[victim.port])
        assert failover.new_primary is not None
    finally:
        await _restore(cluster, victim)


async def test_a_paused_primary_delays_only_its_own_callers(
    cluster: ClusterServers, client: Any
) -> None:
    keys = _key_per_primary(cluster, "pause")
    victim = cluster.primaries()[1]
    # The paused node's callers give up after 0.3 s; the healthy nodes' callers get 1 s
    # (room for a busy CI machine), still half the pause: held up by it, they would fail.
    work = Workload(client, keys, deadline=1.0, deadlines={victim.port: 0.3})
    async with anyio.create_task_group() as tg:
        for port in keys:
            for _ in range(4):
                tg.start_soon(work.run, port)
        await anyio.sleep(0.3)
        # 2 x socket_timeout, shorter than a failover (node timeout 2 s + election).
        victim.pause()
        try:
            await anyio.sleep(2 * SOCKET_TIMEOUT)
        finally:
            victim.resume()
        resumed = time.monotonic()
        await work.works_again(victim.port, resumed, within=5.0)
        work.running = False
    await anyio.to_thread.run_sync(cluster.settle)
    healthy = [port for port in keys if port != victim.port]
    assert {port: work.errors[port] for port in healthy} == {port: [] for port in healthy}
    assert work.errors[victim.port], "the paused primary's callers were not held up"
    # Cancellation is honoured at once on the paused node (0.3 s scopes; slack for CI).
    assert work.slowest[victim.port] < 0.3 + 0.5
    assert all(
        isinstance(exc, RedisPatternsError | TimeoutError) for exc in work.errors[victim.port]
    )


async def test_reads_during_a_live_migration_all_succeed(
    cluster: ClusterServers, client: Any
) -> None:
    tag = "{migrating}"
    keys = [f"{tag}:{index}" for index in range(300)]
    for key in keys:
        await execute(client, "SET", key, key)
    slot = cluster.slot_of(tag)
    source = cluster.owner_of_slot(slot)
    target = next(node for node in cluster.primaries() if node.port != source.port)
    failures: list[BaseException] = []
    wrong: list[str] = []
    reads = 0
    migration = cluster.start_migration(slot, target, batch=20, step_delay=0.05)
    try:
        while not migration.done:
            batch = keys[reads % 10 :: 10][:32]
            replies = await _gather_gets(client, batch, failures)
            wrong += [key for key, value in zip(batch, replies, strict=True) if value != key]
            reads += len(batch)
    finally:
        await anyio.to_thread.run_sync(migration.join)
    assert migration.keys_moved == len(keys)
    assert failures == []
    assert wrong == []
    assert reads > 0
    assert cluster.owner_of_slot(slot).port == target.port
    assert [await execute(client, "GET", key) for key in keys] == [k.encode() for k in keys]


async def _gather_gets(client: Any, keys: list[str], failures: list[BaseException]) -> list[str]:
    replies: dict[str, str] = {}

    async def get(key: str) -> None:
        try:
            value = await execute(client, "GET", key)
            replies[key] = value.decode() if value is not None else "<missing>"
        except Exception as exc:
            failures.append(exc)
            replies[key] = key

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(get, key)
    return [replies[key] for key in keys]


def _subscribed_node(cluster: ClusterServers, channel: str) -> RedisServer:
    import redis

    for node in cluster.primaries():
        with redis.Redis(port=node.port) as direct:
            if dict(direct.pubsub_numsub(channel)).get(channel.encode(), 0) > 0:
                return node
    raise AssertionError(f"no primary has a subscriber of {channel!r}")


POLICY = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, confirm_timeout=2.0)


async def test_a_subscription_follows_a_failover_and_reports_a_gap(
    cluster: ClusterServers, client: Any
) -> None:
    received: list[Any] = []
    async with subscribe(client, "news", reconnect=POLICY) as messages:
        node = await anyio.to_thread.run_sync(_subscribed_node, cluster, "news")

        async def consume() -> None:
            async for item in messages:
                received.append(item)

        async def publish_forever() -> None:
            index = 0
            while True:
                with contextlib.suppress(RedisPatternsError):  # its node may have died
                    await publish(client, "news", f"m{index}")
                index += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(publish_forever)
            with anyio.fail_after(10):
                while not received:  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(cluster.kill_primary, node)
            with anyio.fail_after(15):
                while not any(isinstance(item, Gap) for item in received):  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.05)
                gap_at = next(i for i, item in enumerate(received) if isinstance(item, Gap))
                while len(received) <= gap_at + 5:  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    try:
        gap_at = next(i for i, item in enumerate(received) if isinstance(item, Gap))
        after = [item for item in received[gap_at + 1 :] if not isinstance(item, Gap)]
        assert len(after) >= 5  # delivery resumed on another node
    finally:
        await _restore(cluster, node)


async def test_a_sharded_subscription_follows_its_moved_slot(
    cluster: ClusterServers, client: Any
) -> None:
    channel = "{moving-channel}updates"
    slot = cluster.slot_of(channel)
    received: list[Any] = []
    async with subscribe(client, channel, sharded=True, reconnect=POLICY) as messages:

        async def consume() -> None:
            async for item in messages:
                received.append(item)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await publish(client, channel, "before", sharded=True)
            with anyio.fail_after(10):
                while not received:  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.01)
            source = cluster.owner_of_slot(slot)
            target = next(node for node in cluster.primaries() if node.port != source.port)
            await anyio.to_thread.run_sync(lambda: cluster.migrate_slot(slot, target))
            with anyio.fail_after(10):
                while not any(isinstance(item, Gap) for item in received):  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.02)
                # Published at the slot's new owner, delivered to the moved subscription.
                while not any(getattr(item, "payload", None) == "after" for item in received):
                    await publish(client, channel, "after", sharded=True)
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    kinds = ["gap" if isinstance(item, Gap) else "message" for item in received]
    assert kinds[0] == "message"
    assert "gap" in kinds
    assert cluster.owner_of_slot(slot).port == target.port


async def test_a_near_cache_follows_a_failover(cluster: ClusterServers, client: Any) -> None:
    """The near layer is flushed when its primary fails over, and afterwards a write on the
    promoted node still evicts the copy (tracking moved with the slot)."""
    from aioredispatterns import Cache, NearCachePolicy

    keys: dict[int, str] = {}  # a cache key per primary, by where its entry lives
    index = 0
    while len(keys) < len(cluster.primaries()):
        name = f"near{index}"
        keys.setdefault(cluster.node_for_key(f"nearfo:cache:{{{name}}}").port, name)
        index += 1
    victim = cluster.primaries()[2]
    key = keys[victim.port]
    writer_client = connect(cluster.url, socket_timeout=SOCKET_TIMEOUT)
    try:
        async with (
            Cache(client, ttl=60, prefix="nearfo", near=NearCachePolicy()) as cache,
            Cache(writer_client, ttl=60, prefix="nearfo") as writer,
        ):
            for name in keys.values():
                await writer.set(name, "before")
            with anyio.fail_after(10):
                while cache.stats.near_entries < len(keys):
                    for name in keys.values():
                        assert await cache.get(name) == "before"
                    await anyio.sleep(0.01)
            flushes = cache.stats.near_flushes
            await anyio.to_thread.run_sync(cluster.kill_primary, victim)
            with anyio.fail_after(15):  # the lost tracking connection flushes the layer
                while cache.stats.near_flushes == flushes:  # noqa: ASYNC110 - polled state
                    await anyio.sleep(0.02)
            with anyio.fail_after(15):  # the promoted node serves the key; write it there
                while True:
                    try:
                        await writer.set(key, "after")
                        break
                    except RedisPatternsError:
                        await anyio.sleep(0.1)
            with anyio.fail_after(15):
                while await _get_or_none(cache, key) != "after":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            # Kept near again, and invalidated by the new primary's tracking connection.
            with anyio.fail_after(15):
                while True:
                    hits = cache.stats.near_hits
                    assert await _get_or_none(cache, key) == "after"
                    if cache.stats.near_hits > hits:
                        break
                    await anyio.sleep(0.05)
            await writer.set(key, "again")
            with anyio.fail_after(15):
                while await _get_or_none(cache, key) != "again":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            # The dead primary's tracker was retired with the old map.
            tracked = [node for node in cache._tracking._trackers if node is not None]
            assert not [node for node in tracked if node.endswith(f":{victim.port}")], tracked
    finally:
        await writer_client.aclose()
        await _restore(cluster, victim)


async def _get_or_none(cache: Any, key: str) -> Any:
    try:
        return await cache.get(key)
    except RedisPatternsError:
        return None
