"""The cluster harness: replicas, a killed primary replaced, CLUSTER FAILOVER, live slot
migration under load, every process gone after stop()."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from aioredispatterns.testing import (
    SERVER_KINDS,
    ClusterServers,
    RedisServer,
    ServerNotAvailable,
    find_server_binary,
    start_cluster,
)

pytestmark = pytest.mark.cluster

# The fault tests run on the newest and the oldest server the suite supports.
FAULT_KINDS = ("valkey-9.1", "redis-6.2")


def _binary_or_skip(kind: str) -> Any:
    try:
        return find_server_binary(kind)
    except ServerNotAvailable as exc:
        pytest.skip(str(exc))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still has a pid; it is dead for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _direct(node: RedisServer) -> redis.Redis:
    return redis.Redis(port=node.port, socket_timeout=10)


def _cluster_client(node: RedisServer) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=10)


def _replication(node: RedisServer) -> dict[str, Any]:
    with _direct(node) as client:
        return dict(client.info("replication"))


def _write_replicated(cluster: ClusterServers, keys: list[str]) -> None:
    """Write ``keys`` (one slot) and wait until the owner's replica acknowledged them."""
    with _cluster_client(cluster.nodes[0]) as client:
        for key in keys:
            client.set(key, key)
    with _direct(cluster.node_for_key(keys[0])) as primary:
        assert primary.wait(1, 10_000) >= 1


@pytest.fixture(scope="module", params=FAULT_KINDS)
def replicated(request: pytest.FixtureRequest) -> Iterator[ClusterServers]:
    """3 primaries with one replica each, shared by this module's fault tests (each leaves
    it whole: every primary with a running replica)."""
    cluster = start_cluster(_binary_or_skip(request.param), replicas=1, name=request.param)
    started: list[int] = []
    try:
        started += [pid for pid in (node.pid for node in cluster.nodes) if pid is not None]
        yield cluster
    finally:
        started += [pid for pid in (node.pid for node in cluster.nodes) if pid is not None]
        cluster.stop()
    assert all(_gone(pid) for pid in started), "a cluster node outlived stop()"


def test_replicas_follow_their_primaries(replicated: ClusterServers) -> None:
    primaries = replicated.primaries()
    assert len(primaries) == 3
    assert len(replicated.nodes) == 6
    for primary in primaries:
        replicas = replicated.replicas_of(primary)
        assert len(replicas) == 1
        info = _replication(replicas[0])
        assert info["role"] == "slave"
        assert info["master_port"] == primary.port
        assert info["master_link_status"] == "up"
        assert _replication(primary)["role"] == "master"
    every_node = {node.port for node in replicated.nodes}
    assert every_node == {p.port for p in primaries} | {
        r.port for p in primaries for r in replicated.replicas_of(p)
    }


def test_slots_and_owners_match_the_server_and_redis_py(replicated: ClusterServers) -> None:
    keys = ["plain", "{tag}a", "x{tag}b", "{}empty-tag", "{unclosed", "ключ", "{user:1}:cart"]
    with _direct(replicated.nodes[0]) as node, _cluster_client(replicated.nodes[0]) as client:
        for key in keys:
            slot = replicated.slot_of(key)
            assert slot == node.cluster("KEYSLOT", key)
            owner = replicated.node_for_key(key)
            assert owner.port == client.get_node_from_key(key).port
            assert replicated.owner_of_slot(slot).port == owner.port


@pytest.mark.slow
def test_a_killed_primary_is_replaced_and_rejoins_as_a_replica(
    replicated: ClusterServers,
) -> None:
    keys = [f"{{victim}}:{index}" for index in range(200)]
    slot = replicated.slot_of(keys[0])
    victim = replicated.owner_of_slot(slot)
    replicas = replicated.replicas_of(victim)
    victim_pid, victim_id = victim.pid, replicated.node_id(victim)
    assert victim_pid is not None
    _write_replicated(replicated, keys)

    failover = replicated.kill_primary(slot)

    assert _gone(victim_pid)
    assert failover.old_primary is victim
    promoted = failover.new_primary
    assert promoted is not None
    assert promoted.port in {replica.port for replica in replicas}
    assert failover.seconds is not None
    assert failover.seconds > 0
    assert replicated.owner_of_slot(slot) is promoted
    assert _replication(promoted)["role"] == "master"
    with _cluster_client(promoted) as client:
        assert client.mget_nonatomic(keys) == [key.encode() for key in keys]

    assert replicated.restart(victim) is victim
    assert [node.port for node in replicated.replicas_of(promoted)] == [victim.port]
    info = _replication(victim)
    assert (info["role"], info["master_port"]) == ("slave", promoted.port)
    with _direct(victim) as rejoined:
        # Its nodes.conf survived the kill: the same node, not a stranger.
        assert rejoined.execute_command("CLUSTER", "MYID").decode() == victim_id
        assert rejoined.dbsize() == len(keys)  # resynced from the new primary


def test_cluster_failover_swaps_the_roles(replicated: ClusterServers) -> None:
    keys = [f"{{handover}}:{index}" for index in range(50)]
    slot = replicated.slot_of(keys[0])
    primary = replicated.owner_of_slot(slot)
    (replica,) = replicated.replicas_of(primary)
    _write_replicated(replicated, keys)

    failover = replicated.failover(replica)

    assert failover.new_primary is replica
    assert replicated.owner_of_slot(slot) is replica
    assert [node.port for node in replicated.replicas_of(replica)] == [primary.port]
    assert replicated.replicas_of(primary) == []
    assert _replication(replica)["role"] == "master"
    info = _replication(primary)
    assert (info["role"], info["master_port"]) == ("slave", replica.port)
    with _cluster_client(replica) as client:
        assert client.mget_nonatomic(keys) == [key.encode() for key in keys]


def test_failover_needs_a_replica(replicated: ClusterServers) -> None:
    primary = replicated.primaries()[0]
    with pytest.raises(ValueError, match="not a replica"):
        replicated.failover(primary)


@pytest.mark.slow
def test_a_slot_migrates_under_load_without_losing_a_write(replicated: ClusterServers) -> None:
    tag = "{moving}"
    slot = replicated.slot_of(tag)
    source = replicated.owner_of_slot(slot)
    target = next(p for p in replicated.primaries() if p.port != source.port)
    expected = {f"{tag}:{index}": "0" for index in range(500)}
    with _cluster_client(source) as client:
        for key, value in expected.items():
            client.set(key, value)

        errors: list[BaseException] = []
        mismatches = []
        operations_while_keys_moved = 0
        step = 0
        with replicated.start_migration(slot, target, batch=50, step_delay=0.1) as migration:
            while not migration.done:
                step += 1
                key = f"{tag}:{step % 500}"
                # A key created during the migration goes to the target (ASK).
                created = f"{tag}:new:{step}"
                try:
                    client.set(key, str(step))
                    expected[key] = str(step)
                    client.set(created, created)
                    expected[created] = created
                    probe = f"{tag}:{(step * 7) % 500}"
                    if client.get(probe) != expected[probe].encode():
                        mismatches.append(probe)
                except redis.RedisError as exc:
                    errors.append(exc)
                    continue
                if migration.moving and 0 < migration.keys_moved < 500:
                    operations_while_keys_moved += 1
        assert migration.keys_moved >= 500

        assert operations_while_keys_moved > 0, "the workload never ran during the move"
        assert errors == []
        assert mismatches == []
        assert replicated.owner_of_slot(slot) is target
        with _direct(source) as old, _direct(target) as new:
            assert old.cluster("COUNTKEYSINSLOT", slot) == 0
            assert new.cluster("COUNTKEYSINSLOT", slot) == len(expected)
        keys = sorted(expected)
        assert client.mget_nonatomic(keys) == [expected[key].encode() for key in keys]


def test_a_migration_to_the_owner_is_refused(replicated: ClusterServers) -> None:
    owner = replicated.owner_of_slot(42)
    with pytest.raises(ValueError, match="already served"):
        replicated.migrate_slot(42, owner)
    replica = replicated.replicas_of(owner)[0]
    with pytest.raises(ValueError, match="not a running primary"):
        replicated.migrate_slot(42, replica)
    assert replicated.owner_of_slot(42) is owner


def test_a_paused_primary_answers_nothing_until_resumed(replicated: ClusterServers) -> None:
    slot = replicated.slot_of("{frozen}")
    primary = replicated.owner_of_slot(slot)
    no_retries = Retry(NoBackoff(), 0)
    with redis.Redis(port=primary.port, socket_timeout=0.3, retry=no_retries) as client:
        assert client.ping()
        with replicated.pause_primary(slot), pytest.raises(redis.TimeoutError):
            client.ping()
        assert client.ping()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_default_cluster_and_every_process_gone_after_stop(kind: str) -> None:
    cluster = start_cluster(_binary_or_skip(kind), name=kind)
    pids = [node.pid for node in cluster.nodes]
    try:
        assert len(cluster.primaries()) == 3
        assert all(cluster.replicas_of(node) == [] for node in cluster.nodes)
        with pytest.raises(ValueError, match="no running replica"):
            cluster.kill_primary(0)  # refused before the kill: nothing could take over
        assert all(not _gone(pid) for pid in pids if pid is not None)
        with _direct(cluster.nodes[0]) as node:
            assert node.config_get("cluster-node-timeout") == {"cluster-node-timeout": "2000"}
        url = cluster.url.replace("redis+cluster://", "redis://")
        with RedisCluster.from_url(url) as client:
            client.set("{a}k", "v")
            assert client.get("{a}k") == b"v"
    finally:
        cluster.stop()
    assert all(_gone(pid) for pid in pids if pid is not None)
