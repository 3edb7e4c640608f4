"""The test harness itself: servers owned by pid, logs on failure, replica pairs."""

from __future__ import annotations

import os

import pytest
import redis

from aioredispatterns.testing import RedisServer, find_server_binary, start_replica_pair


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still has a pid; it is dead for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_server_is_stopped_by_its_pid() -> None:
    server = RedisServer(find_server_binary("valkey-9.1"), name="t").start()
    pid = server.pid
    assert pid is not None
    assert _alive(pid)
    with redis.Redis(port=server.port) as client:
        assert client.ping()
    server.stop()
    assert not _alive(pid)


def test_failed_start_shows_the_log() -> None:
    server = RedisServer(
        find_server_binary("valkey-9.1"), name="bad", extra_args=["--no-such-option", "x"]
    )
    with pytest.raises(RuntimeError, match=r"(?i)no-such-option|bad directive|fatal"):
        server.start()
    server.stop()


def test_replica_pair_replicates() -> None:
    primary, replica = start_replica_pair(find_server_binary("valkey-9.1"))
    try:
        with redis.Redis(port=primary.port) as p, redis.Redis(port=replica.port) as r:
            p.set("k", "v")
            p.wait(1, 2000)
            assert r.get("k") == b"v"
            assert r.info("replication")["role"] == "slave"
    finally:
        replica.stop()
        primary.stop()


def test_restart_keeps_the_port() -> None:
    with RedisServer(find_server_binary("valkey-9.1"), name="t") as server:
        port = server.port
        server.kill()
        server.restart()
        assert server.port == port
        with redis.Redis(port=port) as client:
            assert client.ping()
