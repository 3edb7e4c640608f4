"""The test harness itself: servers owned by pid, logs on failure, replica pairs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from aioredispatterns.testing import RedisServer, find_server_binary, start_replica_pair


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still has a pid; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:  # reaped meanwhile
        return False


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


def test_server_started_in_a_thread_outlives_the_thread() -> None:
    servers: list[RedisServer] = []
    starter = threading.Thread(
        target=lambda: servers.append(RedisServer(find_server_binary("valkey-9.1")).start())
    )
    starter.start()
    starter.join()
    (server,) = servers
    try:
        time.sleep(1.0)
        with redis.Redis(port=server.port, socket_timeout=5) as client:
            assert client.ping()
    finally:
        server.stop()


def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # Started from a worker thread too, the case PR_SET_PDEATHSIG used to get wrong.
    script = tmp_path / "owner.py"
    script.write_text(
        "import threading, time\n"
        "from aioredispatterns.testing import RedisServer, find_server_binary\n"
        "servers = []\n"
        "starter = threading.Thread(target=lambda: servers.append(\n"
        "    RedisServer(find_server_binary('valkey-9.1')).start()))\n"
        "starter.start()\n"
        "starter.join()\n"
        "print(servers[0].pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            server_pid = int(owner.stdout.readline())
        finally:
            owner.kill()
        assert owner.wait(10) == -signal.SIGKILL
    try:
        deadline = time.monotonic() + 10
        while _alive(server_pid):
            assert time.monotonic() < deadline, "the server outlived its owner"
            time.sleep(0.05)
    finally:
        if _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
