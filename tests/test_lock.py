"""Lock: fencing tokens, renewal, loss, wake-ups, cancellation, failover (real servers)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from aioredispatterns import (
    ConfigurationError,
    InvalidKeyError,
    Lock,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    connect,
    fenced_get,
    fenced_set,
)
from aioredispatterns.testing import (
    RedisServer,
    borrowed_connections,
    key_count,
    on_every_node,
    start_replica_pair,
)


def _one_kind(redis_server: Any) -> None:
    if not redis_server.owned or redis_server.name != "valkey-9.1":
        pytest.skip("heavy scenario: runs on valkey-9.1 only")


def _owner_key(prefix: str, name: str) -> str:
    return f"{prefix}:lock:{{{name}}}:owner"


def _in_use(client: Redis) -> int:
    # Checked-out connections, not counting the one the auto-pipeline keeps.
    return len(borrowed_connections(client))


# ------------------------------------------------------------------------- basics


async def test_tokens_strictly_increase_and_release_frees(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
    tokens = []
    for _ in range(5):
        async with lock as lease:
            assert await lock.locked()
            assert lease.held
            tokens.append(lease.token)
        assert not await lock.locked()
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 5
    # The owner key carries the lease TTL; nothing of the lock lingers without a TTL.
    lease = await lock.acquire()
    pttl = await redis_client.pttl(_owner_key(key_prefix, "job"))
    assert 4000 < pttl <= 5000
    await lease.release()


async def test_token_survives_expiry_and_a_lost_counter(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", ttl=0.05, prefix=key_prefix)
    first = await lock.acquire()
    await anyio.sleep(0.1)  # expires without release
    second = await lock.acquire()
    assert second.token > first.token
    await second.release()
    # The counter is lost (flushed, expired, never replicated): tokens still increase.
    await redis_client.delete(f"{key_prefix}:lock:{{job}}:fence")
    third = await lock.acquire()
    assert third.token > second.token
    await third.release()
    assert third.token < 2**53  # exact in Lua doubles, JSON, SQL BIGINT


async def test_fence_counter_ttl_is_refreshed(redis_client: Redis, key_prefix: str) -> None:
    fence = f"{key_prefix}:lock:{{job}}:fence"
    lease = await Lock(redis_client, "job", prefix=key_prefix, fence_ttl=3600).acquire()
    assert 3590 < await redis_client.ttl(fence) <= 3600
    await lease.release()
    lease = await Lock(redis_client, "job", prefix=key_prefix, fence_ttl=None).acquire()
    assert await redis_client.ttl(fence) == -1
    await lease.release()


async def test_non_blocking_acquire_fails_while_held(redis_client: Redis, key_prefix: str) -> None:
    lock = Lock(redis_client, "job", prefix=key_prefix)
    async with lock:
        with pytest.raises(LockNotAcquired) as caught:
            await lock.acquire(blocking=False)
        assert isinstance(caught.value, TimeoutError)
    lease = await lock.acquire(blocking=False)
    await lease.release()


@pytest.mark.parametrize("seconds", [0.0, 0.15, 0.4])
async def test_timeout_is_honoured_within_50ms(
    redis_client: Redis, key_prefix: str, seconds: float
) -> None:
    lock = Lock(redis_client, "job", ttl=10, prefix=key_prefix)
    holder = await lock.acquire()
    started = anyio.current_time()
    with pytest.raises(LockNotAcquired):
        await lock.acquire(timeout=seconds)
    elapsed = anyio.current_time() - started
    assert seconds - 0.05 <= elapsed <= seconds + 0.05
    await holder.release()


async def test_owner_ids_are_unique_per_acquisition(redis_client: Redis, key_prefix: str) -> None:
    # One Lock object shared by two tasks: each gets its own lease and owner id, and
    # neither can release the other's (redis-py's asyncio Lock shares one token).
    lock = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
    leases = []
    first_in = anyio.Event()

    async def user() -> None:
        async with lock as lease:
            leases.append(lease)
            first_in.set()
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(user)
        await first_in.wait()
        tg.start_soon(user)
    assert len({lease.owner for lease in leases}) == 2
    assert leases[0].token < leases[1].token


async def test_release_of_a_lease_no_longer_held_raises(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", ttl=0.05, prefix=key_prefix)
    stale = await lock.acquire()
    await anyio.sleep(0.1)
    current = await lock.acquire()
    with pytest.raises(LockNotOwned):
        await stale.release()
    with pytest.raises(LockNotOwned):
        await stale.extend()
    assert stale.lost.is_set()
    # The stale release left the current holder's key alone.
    assert await redis_client.get(_owner_key(key_prefix, "job")) == current.owner.encode()
    await current.release()
    with pytest.raises(LockNotOwned):
        await current.release()


async def test_body_error_propagates_unwrapped_and_releases(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", prefix=key_prefix)
    with pytest.raises(KeyError, match="boom"):
        async with lock:
            raise KeyError("boom")
    assert not await lock.locked()


async def test_explicit_release_inside_the_body(redis_client: Redis, key_prefix: str) -> None:
    lock = Lock(redis_client, "job", prefix=key_prefix)
    async with lock as lease:
        await lease.release()
        assert not lease.held
        assert not await lock.locked()
    assert not lease.lost.is_set()


async def test_not_reentrant_in_one_task(redis_client: Redis, key_prefix: str) -> None:
    lock = Lock(redis_client, "job", timeout=1, prefix=key_prefix)
    async with lock:
        with pytest.raises(LockError, match="reentrant"):
            async with lock:
                pass
    assert not await lock.locked()


async def test_bad_arguments_fail_before_any_command(redis_client: Redis) -> None:
    with pytest.raises(ConfigurationError):
        Lock(redis_client, "job", ttl=0)
    with pytest.raises(ConfigurationError):
        Lock(redis_client, "job", timeout=-1)
    with pytest.raises(ConfigurationError):
        Lock(redis_client, "job", fence_ttl=0)
    with pytest.raises(InvalidKeyError):
        Lock(redis_client, "")
    with pytest.raises(ConfigurationError):
        Lock("redis://localhost", "job")  # type: ignore[arg-type]
    lock = Lock(redis_client, "job")
    with pytest.raises(ConfigurationError):
        await lock.acquire(timeout=float("nan"))
    with pytest.raises(ConfigurationError):
        await fenced_set(redis_client, "r", b"v", -1)
    assert await key_count(redis_client) == 0


# ----------------------------------------------------------------------- renewal / loss


async def test_renewal_keeps_the_lease_past_its_ttl(redis_client: Redis, key_prefix: str) -> None:
    lock = Lock(redis_client, "job", ttl=0.3, prefix=key_prefix)
    async with lock as lease:
        await anyio.sleep(1.0)  # more than three TTLs
        with pytest.raises(LockNotAcquired):
            await lock.acquire(blocking=False)
        assert lease.held
    assert not lease.lost.is_set()
    assert not await lock.locked()


async def test_lease_taken_over_is_detected_within_a_renewal(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", ttl=0.6, prefix=key_prefix)
    other = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
    # The whole ``async with`` is what raises: LockLost comes out of its exit.
    with pytest.raises(LockLost):  # noqa: PT012
        async with lock as lease:
            # The key disappears (as if it expired) and someone else takes the lock.
            await redis_client.delete(_owner_key(key_prefix, "job"))
            taken = await other.acquire(blocking=False)
            with anyio.fail_after(0.4):  # the next renewal, at ttl / 3, notices
                await lease.lost.wait()
            # Without cancel_on_loss the body runs on; LockLost comes at the end.
    assert await redis_client.get(_owner_key(key_prefix, "job")) == taken.owner.encode()
    await taken.release()


async def test_lost_lease_cancels_the_body_and_its_late_write_is_rejected(
    redis_client: Redis, redis_server: Any, key_prefix: str
) -> None:
    if not redis_server.owned:
        pytest.skip("pauses the server: needs one this suite started")
    lock = Lock(redis_client, "job", ttl=0.6, cancel_on_loss=True, prefix=key_prefix)
    pauser = connect(redis_server.url)
    inside = anyio.Event()
    cancelled_after: list[float] = []
    paused_at = 0.0
    token_a = 0

    async def holder() -> None:
        nonlocal token_a
        with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
            async with lock as lease:
                token_a = lease.token
                assert await fenced_set(redis_client, "report", b"a-early", lease.token,
                                        prefix=key_prefix)  # fmt: skip
                inside.set()
                try:
                    await anyio.sleep(30)
                except anyio.get_cancelled_exc_class():
                    cancelled_after.append(anyio.current_time() - paused_at)
                    raise

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await inside.wait()
            # Nothing answers for 1.5 s (no node of a cluster): the holder's renewals hang
            # past its TTL.
            paused_at = anyio.current_time()
            await on_every_node(pauser, "CLIENT", "PAUSE", "1500", "ALL")
            b_lease = await Lock(redis_client, "job", ttl=5, prefix=key_prefix).acquire(timeout=5)
    finally:
        await pauser.aclose()
    # The holder learned at its TTL (0.6 s), not when the server came back (1.5 s).
    assert cancelled_after
    assert cancelled_after[0] < 1.0
    assert b_lease.token > token_a
    assert await fenced_set(redis_client, "report", b"b", b_lease.token, prefix=key_prefix)
    # The first holder's late write (it did not notice, say, after a GC pause) is rejected.
    assert not await fenced_set(redis_client, "report", b"a-late", token_a, prefix=key_prefix)
    stored = await fenced_get(redis_client, "report", prefix=key_prefix)
    assert stored is not None
    assert (stored.value, stored.token) == (b"b", b_lease.token)
    await b_lease.release()


# ------------------------------------------------------------------------ wake-ups


async def test_waiters_are_woken_by_release_in_fifo_order(
    redis_client: Redis, key_prefix: str
) -> None:
    # TTL 30 s: were waiters polling at their TTL fallback, this would take minutes.
    lock = Lock(redis_client, "job", ttl=30, prefix=key_prefix)
    holder = await lock.acquire()
    order: list[int] = []
    woke_after: list[float] = []
    released_at = 0.0

    async def waiter(index: int) -> None:
        lease = await lock.acquire(timeout=10)
        woke_after.append(anyio.current_time() - released_at)
        order.append(index)
        await lease.release()

    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for index in range(5):
            tg.start_soon(waiter, index)
            await anyio.sleep(0.05)  # each one blocked before the next arrives
        released_at = anyio.current_time()
        await holder.release()
    assert order == [0, 1, 2, 3, 4]
    assert woke_after[0] < 0.1
    assert anyio.current_time() - started < 2.0


async def test_waiter_takes_over_from_a_crashed_holder_at_its_ttl(
    redis_client: Redis, key_prefix: str
) -> None:
    lock = Lock(redis_client, "job", ttl=0.3, prefix=key_prefix)
    await lock.acquire()  # never released: the holder "crashed"
    started = anyio.current_time()
    lease = await lock.acquire(timeout=3)
    assert 0.2 <= anyio.current_time() - started < 0.6
    await lease.release()


# ---------------------------------------------------------------------- cancellation


def _tasks() -> int:
    return len(asyncio.all_tasks())


@pytest.mark.parametrize("delay_ms", [0, 0.2, 0.5, 1, 2, 3, 5, 8, 20])
async def test_cancelled_waiter_leaves_nothing_behind(
    redis_client: Redis, key_prefix: str, delay_ms: float
) -> None:
    lock = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
    holder = await lock.acquire()
    tasks = _tasks()
    with anyio.move_on_after(delay_ms / 1000):
        await lock.acquire(timeout=2)
        pytest.fail("acquired a held lock")
    # The cancelled waiter's BLPOP connection was closed, not leaked; no task survives.
    assert _in_use(redis_client) == 0
    assert _tasks() == tasks
    await holder.release()
    # The next waiter is not starved by a wake-up the cancelled one may have eaten.
    lease = await lock.acquire(timeout=1)
    await lease.release()
    assert await redis_client.exists(_owner_key(key_prefix, "job")) == 0


@pytest.mark.parametrize("delay_ms", [0, 0.1, 0.3, 0.6, 1, 1.5, 2, 3, 5, 10])
async def test_cancelled_holder_leaves_no_key(
    redis_client: Redis, key_prefix: str, delay_ms: float
) -> None:
    # The cancel lands anywhere: in the acquire script, in the body, in the release.
    lock = Lock(redis_client, "job", ttl=5, prefix=key_prefix)
    tasks = _tasks()
    with anyio.move_on_after(delay_ms / 1000):
        async with lock:
            await anyio.sleep(0.002)
    assert await redis_client.exists(_owner_key(key_prefix, "job")) == 0
    assert _in_use(redis_client) == 0
    assert _tasks() == tasks
    lease = await lock.acquire(blocking=False)  # free at once, not after the TTL
    await lease.release()


# ------------------------------------------------------------------------- fencing


async def test_fenced_set_rejects_older_tokens(redis_client: Redis, key_prefix: str) -> None:
    assert await fenced_get(redis_client, "r", prefix=key_prefix) is None
    assert await fenced_set(redis_client, "r", b"v5", 5, prefix=key_prefix)
    assert await fenced_set(redis_client, "r", b"v5b", 5, prefix=key_prefix)  # same holder
    assert not await fenced_set(redis_client, "r", b"v4", 4, prefix=key_prefix)
    assert await fenced_set(redis_client, "r", "v9", 9, prefix=key_prefix)
    stored = await fenced_get(redis_client, "r", prefix=key_prefix)
    assert stored is not None
    assert (stored.value, stored.token) == (b"v9", 9)


# ------------------------------------------------------------------------- topologies


@pytest.mark.cluster
async def test_lock_on_a_cluster(cluster_client: Any, key_prefix: str) -> None:
    lock = Lock(cluster_client, "job", ttl=5, prefix=key_prefix)
    held: list[int] = []

    async def user() -> None:
        async with lock as lease:
            held.append(lease.token)
            assert len(held) - len(done) == 1  # mutual exclusion
            await anyio.sleep(0.01)
            done.append(lease.token)

    done: list[int] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(user)
    assert held == sorted(held)
    assert not await lock.locked()


@pytest.fixture
def replica_pair(redis_server: Any) -> Iterator[tuple[RedisServer, RedisServer]]:
    _one_kind(redis_server)
    primary, replica = start_replica_pair(redis_server.binary, name="lock")
    try:
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


@pytest.fixture
async def failover_clients(
    replica_pair: tuple[RedisServer, RedisServer],
) -> AsyncIterator[tuple[Redis, Redis]]:
    primary, replica = replica_pair
    on_primary = connect(primary.url, retries=0, connect_timeout=0.5)
    on_replica = connect(replica.url)
    try:
        yield on_primary, on_replica
    finally:
        await on_primary.aclose()
        await on_replica.aclose()


@pytest.mark.replication
async def test_failover_hands_the_lock_to_two_clients_and_fencing_saves_the_write(
    replica_pair: tuple[RedisServer, RedisServer],
    failover_clients: tuple[Redis, Redis],
    redis_client: Redis,
    key_prefix: str,
) -> None:
    primary, _ = replica_pair
    on_primary, on_replica = failover_clients
    resource = redis_client  # the protected resource lives elsewhere (a database, say)

    # Some history, replicated: the counter exists on both servers.
    for _ in range(3):
        lease = await Lock(on_primary, "job", prefix=key_prefix).acquire()
        await lease.release()
    await on_primary.execute_command("WAIT", 1, 1000)

    # The replica loses its link (a partition), then A acquires on the primary:
    # the acquire never reaches the replica.
    await on_replica.execute_command("REPLICAOF", "127.0.0.1", "1")
    a = await Lock(on_primary, "job", ttl=30, prefix=key_prefix).acquire()
    assert await fenced_set(resource, "ledger", b"a1", a.token, prefix=key_prefix)

    # The primary dies; the replica is promoted without A's lock or counter increment.
    primary.kill()
    await on_replica.execute_command("REPLICAOF", "NO", "ONE")
    assert await on_replica.exists(_owner_key(key_prefix, "job")) == 0
    replica_counter = int(await on_replica.get(f"{key_prefix}:lock:{{job}}:fence"))
    assert replica_counter < a.token  # a plain INCR counter would now reissue A's token

    # B acquires on the new primary: two clients believe they hold the lock.
    b = await Lock(on_replica, "job", ttl=30, prefix=key_prefix).acquire(blocking=False)
    assert a.held
    assert b.held
    # Fencing keeps the resource consistent: B's token is higher (clock floor), so once
    # B has written, A's late write is rejected.
    assert b.token > a.token
    assert await fenced_set(resource, "ledger", b"b1", b.token, prefix=key_prefix)
    assert not await fenced_set(resource, "ledger", b"a2", a.token, prefix=key_prefix)
    stored = await fenced_get(resource, "ledger", prefix=key_prefix)
    assert stored is not None
    assert stored.value == b"b1"
    await b.release()


# ------------------------------------------------------------- renewal refused


def _lock_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aioredispatterns.lock"]


async def test_a_renewal_refused_with_an_error_loses_the_lease_at_once(
    redis_client: Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # WRONGTYPE will not go away by retrying: the lease is lost at the first renewal
    # (2 s), not retried every 50 ms until its validity runs out (5.9 s).
    caplog.set_level(logging.WARNING, logger="aioredispatterns.lock")
    lock = Lock(redis_client, "job", ttl=6, prefix=key_prefix)
    owner_key = _owner_key(key_prefix, "job")
    with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
        async with lock as lease:
            await redis_client.delete(owner_key)
            await redis_client.rpush(owner_key, lease.owner)
            with anyio.fail_after(4.5):
                await lease.lost.wait()
    warnings = _lock_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert "WRONGTYPE" in warnings[0].getMessage()


async def test_a_renewal_denied_by_the_acl_is_not_retried(
    redis_client: Redis, redis_server: Any, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    if not redis_server.owned:
        pytest.skip("creates an ACL user: needs a server this suite started")
    caplog.set_level(logging.WARNING, logger="aioredispatterns.lock")
    user, password = f"renew-{key_prefix}", uuid.uuid4().hex
    # ACL users are per node: a cluster gets the same user on every node.
    await on_every_node(
        redis_client, "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{key_prefix}:*",
        "resetchannels", f"&{key_prefix}:*", "+@all", "-@dangerous",
    )  # fmt: skip
    limited = connect(redis_server.url, username=user, password=password)
    try:
        lock = Lock(limited, "job", ttl=1.5, prefix=key_prefix)
        with pytest.raises(LockLost):  # noqa: PT012 - the async with raises it
            async with lock as lease:
                # An operator takes the key rights away while the lease is held.
                await on_every_node(redis_client, "ACL", "LOG", "RESET")
                await on_every_node(redis_client, "ACL", "SETUSER", user, "resetkeys")
                with anyio.fail_after(5):
                    await lease.lost.wait()
        logs = await on_every_node(redis_client, "ACL LOG")
        denied = [e for log in logs for e in log if e["username"] == user and e["reason"] == "key"]
    finally:
        await limited.aclose()
        await on_every_node(redis_client, "ACL", "DELUSER", user)
    # One denied renewal and one denied release, not a retry every 50 ms until the
    # validity ran out.
    assert sum(int(str(e["count"])) for e in denied) <= 2, denied
    assert len(_lock_warnings(caplog)) == 1
