"""doctor: every planted mistake is found and nothing else; a clean server is clean; a
least-privilege user gets "skipped" findings, never a crash; the CLI's JSON and exit code.

Mistakes are planted on a private server of each kind (``own_server``), so what the
doctor sees there is only what the test did.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from aioredispatterns import (
    BufferPolicy,
    Cache,
    ConfigurationError,
    Counter,
    Leaderboard,
    Lock,
    StreamProducer,
    connect,
    publish,
    subscribe,
)
from aioredispatterns._commands import dedicated, execute
from aioredispatterns._doctor_keys import group_of
from aioredispatterns.doctor import DoctorReport, Severity, doctor
from aioredispatterns.testing import RedisServer

pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")

MiB = 1 << 20


async def _wait_for(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(400):  # 20 s
        if await predicate():
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _found(report: DoctorReport) -> set[tuple[str, str | None]]:
    return {(f.check, f.group) for f in report.findings}


@contextmanager
def _sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def text_lines(reply: Any) -> list[str]:
    raw = reply.decode() if isinstance(reply, bytes) else str(reply)
    return [line for line in raw.splitlines() if line.strip()]


def _idle_pings(reply: Any) -> int:
    """Connections of CLIENT LIST whose last command was PING, idle 1 s or more."""
    count = 0
    for line in text_lines(reply):
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        count += fields.get("cmd") == "ping" and int(fields.get("idle", "0")) >= 1
    return count


def _ask(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command)
    return sock.recv(4096)


_READ_ONLY = {
    "info", "config", "config|get", "slowlog", "slowlog|get", "client", "client|list",
    "dbsize", "scan", "type", "pttl", "memory", "memory|usage", "llen", "scard", "zcard",
    "hlen", "xlen",
}  # fmt: skip


async def _command_calls(client: Any) -> dict[str, int]:
    stats = await execute(client, "INFO", "commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def _plant_library_keys(client: Any, prefix: str) -> None:
    """Keys of the library's own primitives, each with the TTL policy it has by design."""
    async with Cache(client, ttl=600, prefix=prefix) as cache:
        await cache.set("user:1", {"id": 1})
    await Counter(client, "hits", prefix=prefix).incr()  # no TTL by design
    lease = await Lock(client, "job", ttl=30, prefix=prefix, fence_ttl=None).acquire()
    await lease.release()  # leaves the fencing counter, without TTL by design
    await StreamProducer(client, "orders", prefix=prefix).add({"n": 1})
    await Leaderboard(client, "game", prefix=prefix).add("alice", 10)


def test_library_keys_are_grouped_by_primitive_and_part() -> None:
    assert group_of("arp:cache:{user:42}").label == "arp:cache:{*}"
    assert group_of("arp:cache:{user:42}").ttl == "expected"
    owner = group_of("app:v2:lock:{job}:owner")
    assert (owner.label, owner.ttl, owner.no_ttl_severity) == (
        "app:v2:lock:{*}:owner",
        "expected",
        Severity.ERROR,
    )
    assert group_of("arp:lock:{job}:fence").ttl == "optional"
    assert group_of("arp:counter:{hits}").ttl == "optional"
    assert group_of("arp:bucketed:{views}:1700000000").label == "arp:bucketed:{*}:*"
    assert group_of("arp:stream:{orders}").big_ok
    assert group_of("arp:queue:{q}:processing:w1").label == "arp:queue:{*}:processing:*"
    assert group_of("arp:cache#:{0123abcd}").label == "arp:cache:{*}"
    assert group_of("user:42:profile").label == "user:*"
    assert group_of("user:{x}").label == "user:*"  # not a library primitive
    assert group_of("plain").label == "(keys without ':')"


async def test_a_clean_cache_server_gets_a_clean_report(own_server: RedisServer) -> None:
    client = connect(own_server.url)
    try:
        await execute(client, "CONFIG", "SET", "maxmemory", 256 * MiB)
        await execute(client, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        for i in range(50):
            await execute(client, "SET", f"session:{i}", "x", "EX", 600)
        await _plant_library_keys(client, "arp")
        before = await _command_calls(client)
        report = await doctor(client, role="cache")
        sent = {
            name
            for name, calls in (await _command_calls(client)).items()
            if calls > before.get(name, 0)
        }
    finally:
        await client.aclose()
    assert report.findings == (), str(report)
    assert report.exit_code == 0
    # Read-only: what the doctor sent, by INFO commandstats (subcommands are counted apart
    # from 7.0 on, under their parent's name before).
    assert sent <= _READ_ONLY, sent - _READ_ONLY
    assert report.sample_complete
    assert report.keys_sampled == report.keys_total
    assert report.server is not None
    assert "clean" in str(report)


async def test_a_clean_lock_server_with_a_replica_gets_a_clean_report(
    own_server: RedisServer,
) -> None:
    # No diskless-sync delay (5 s by default on 7.0+): the replica syncs at once. AOF from
    # the start (CONFIG SET appendonly yes forks a rewrite, which can hold up the stop).
    fast = ["--repl-diskless-sync-delay", "0"]
    durable = [*fast, "--appendonly", "yes"]
    with RedisServer(own_server.binary, name="doctor-primary", extra_args=durable) as primary:
        replica_of = [*fast, "--replicaof", "127.0.0.1", str(primary.port)]
        with RedisServer(own_server.binary, name="doctor-replica", extra_args=replica_of):
            client = connect(primary.url)
            try:

                async def replicated() -> bool:
                    info = await execute(client, "INFO", "replication")
                    return str(info.get("slave0", {}).get("state")) == "online"

                await _wait_for(replicated, "the replica to sync")
                await _plant_library_keys(client, "jobs")
                await execute(client, "CONFIG", "SET", "min-replicas-to-write", 1)
                report = await doctor(client, role="lock")
            finally:
                await client.aclose()
    assert report.findings == (), str(report)
    assert report.exit_code == 0


async def test_every_planted_mistake_is_found_and_nothing_else(own_server: RedisServer) -> None:
    port = own_server.port
    client = connect(own_server.url)
    # The application's client: its pool is exhausted and it sent every command alone.
    app = connect(own_server.url, max_connections=3)
    try:
        await execute(client, "FLUSHDB")  # planted: a flush
        for i in range(20):  # planted: keys without TTL
            await execute(client, "SET", f"user:{i}", "x")
            await execute(client, "SET", f"session:{i}", "x", "EX", 600)
        await _plant_library_keys(client, "arp")
        await execute(client, "SET", "arp:lock:{stuck}:owner", "me")  # planted: a lease w/o TTL
        await execute(client, "SETRANGE", "blob:1", 2 * MiB, "x")  # planted: a big key
        await execute(client, "EXPIRE", "blob:1", 600)
        for start in range(0, 20_000, 5_000):  # planted: a big collection
            await execute(client, "SADD", "big:set", *range(start, start + 5_000))
        await execute(client, "EXPIRE", "big:set", 600)
        await execute(client, "CONFIG", "SET", "slowlog-log-slower-than", 0)
        await execute(client, "SMEMBERS", "big:set")  # planted: an O(N) read of it
        await execute(client, "CONFIG", "SET", "slowlog-log-slower-than", 10_000)
        await execute(client, "KEYS", "*")  # planted: KEYS
        await execute(client, "CONFIG", "SET", "maxmemory", 1024 * MiB)  # planted: eviction
        await execute(client, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        # Planted (by the harness's defaults): no persistence, no replica.

        # Planted: rejected connections (maxclients reached once).
        connected = len(text_lines(await execute(client, "CLIENT", "LIST")))
        await execute(client, "CONFIG", "SET", "maxclients", connected + 2)
        with _sockets(port, 4) as extra:
            replies = [_ask(sock, b"PING\r\n") for sock in extra]
        assert any(reply.startswith(b"-ERR max") for reply in replies), replies
        await execute(client, "CONFIG", "SET", "maxclients", 10_000)

        # Planted: a pub/sub client cut off by client-output-buffer-limit (counted 7.0+).
        info = await execute(client, "INFO", "stats")
        counts_cutoffs = "client_output_buffer_limit_disconnections" in info
        if counts_cutoffs:
            await execute(
                client, "CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 32kb 60"
            )
            slow = socket.socket()
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.connect(("127.0.0.1", port))
            _ask(slow, b"SUBSCRIBE firehose\r\n")
            payload = "x" * 65536
            for _ in range(1_000):  # the kernel's socket buffers take ~15 MB first
                if not await publish(client, "firehose", payload):
                    break  # cut off
            slow.close()

            async def cut_off() -> bool:
                stats = await execute(client, "INFO", "stats")
                return int(stats["client_output_buffer_limit_disconnections"]) > 0

            await _wait_for(cut_off, "the slow subscriber to be cut off")

        # In process: unpipelined traffic, an exhausted pool, a subscription that drops.
        for _ in range(1_000):
            await execute(app, "GET", "session:1")
        async with subscribe(app, "news", buffer=BufferPolicy(size=1)) as messages:
            for n in range(5):
                await publish(client, "news", n)

            async def dropped() -> bool:
                return messages.stats.dropped > 0

            await _wait_for(dropped, "the subscription to drop a message")
            async with dedicated(app):  # the third connection: the pool is exhausted
                # Planted: idle connections (a leaking pool); idle for a second is enough
                # with idle_seconds=1.
                with _sockets(port, 6) as idle:
                    for sock in idle:
                        _ask(sock, b"PING\r\n")

                    async def idle_now() -> bool:
                        return _idle_pings(await execute(client, "CLIENT", "LIST")) >= 6

                    await _wait_for(idle_now, "the connections to be idle")
                    report = await doctor(app, role="queue", idle_seconds=1, watch=[messages])
    finally:
        await app.aclose()
        await client.aclose()

    expected = {
        ("commands.flush", None),
        ("commands.keys", None),
        ("commands.linear", None),
        ("keys.no_ttl", "user:*"),
        ("keys.no_ttl", "arp:lock:{*}:owner"),
        ("keys.big", "blob:*"),
        ("keys.big", "big:*"),
        ("persistence", None),
        ("memory.policy", None),
        ("replication.none", None),
        ("clients.rejected", None),
        ("clients.idle", None),
        ("client.unpipelined", None),
        ("client.pool", None),
        ("pubsub.drops", None),
    }
    if counts_cutoffs:
        expected.add(("clients.output_buffer", None))
    assert _found(report) == expected, str(report)
    by_check = {(f.check, f.group): f for f in report.findings}
    assert by_check[("commands.linear", None)].summary.startswith("SMEMBERS")
    assert by_check[("keys.no_ttl", "user:*")].count == 20
    assert by_check[("keys.no_ttl", "arp:lock:{*}:owner")].severity is Severity.ERROR
    assert "blob:1" in by_check[("keys.big", "blob:*")].examples[0]
    assert "20,000 members" in by_check[("keys.big", "big:*")].examples[0]
    assert report.exit_code == 2
    assert report.sample_complete


async def test_a_least_privilege_user_gets_skipped_checks(own_server: RedisServer) -> None:
    user, password = f"doctor-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = connect(own_server.url)
    try:
        await execute(
            admin, "ACL", "SETUSER", user, "reset", "on", f">{password}", "~app:*",
            "+@all", "-@dangerous",
        )  # fmt: skip
        await execute(admin, "SET", "app:1", "x")
        await execute(admin, "SET", "other:1", "x")  # outside the user's key patterns
        limited = connect(own_server.url, username=user, password=password)
        try:
            report = await doctor(limited, role="queue")
        finally:
            await limited.aclose()
    finally:
        await admin.aclose()
    skipped = {f.summary for f in report.findings if f.severity is Severity.SKIPPED}
    for command in ("INFO", "CONFIG GET", "SLOWLOG GET", "CLIENT LIST"):
        assert f"skipped: needs {command}" in skipped, str(report)
    assert "skipped: 1 sampled key outside the user's key patterns" in skipped
    # What the user may read is still checked.
    assert ("keys.no_ttl", "app:*") in _found(report)
    assert report.server is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioredispatterns", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_prints_json_and_exits_by_the_worst_finding(
    own_server: RedisServer,
) -> None:
    done = await anyio.to_thread.run_sync(
        _cli, "--url", own_server.url, "--role", "queue", "--json"
    )
    assert done.returncode == 2, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == 2
    assert {"persistence", "replication.none"} <= {f["check"] for f in report["findings"]}
    assert report["counts"]["error"] >= 1

    done = await anyio.to_thread.run_sync(_cli, "--url", own_server.url, "--role", "cache")
    assert done.returncode == 1, done.stderr  # no maxmemory on a cache: a warning
    assert "memory.limit" in done.stdout

    client = connect(own_server.url)
    try:
        await execute(client, "CONFIG", "SET", "maxmemory", 256 * MiB)
        await execute(client, "CONFIG", "SET", "maxmemory-policy", "allkeys-lfu")
    finally:
        await client.aclose()
    done = await anyio.to_thread.run_sync(
        _cli, "--url", own_server.url, "--role", "cache", "--plain"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "clean: nothing to change (exit 0)" in done.stdout


async def test_every_primary_is_examined(
    redis_client: Any, redis_server: Any, key_prefix: str
) -> None:
    for i in range(30):
        await execute(redis_client, "SET", f"{key_prefix}:k{i}", "x")
    report = await doctor(redis_client, role="cache", sample=100_000)
    no_ttl = [
        f for f in report.findings if (f.check, f.group) == ("keys.no_ttl", f"{key_prefix}:*")
    ]
    assert sum(f.count or 0 for f in no_ttl) == 30
    if redis_server.name == "cluster":
        assert len(report.nodes) == 3
        assert {f.node for f in no_ttl} <= set(report.nodes)
        assert all(f.node for f in report.findings if f.check.startswith(("keys.", "memory.")))
    else:
        assert report.nodes == ()
        assert all(f.node is None for f in no_ttl)


@pytest.mark.parametrize(
    "options",
    [
        {"role": "database"},
        {"sample": -1},
        {"time_limit": 0},
        {"prefix": ""},
        {"prefix": b"app:"},
        {"big_bytes": 0},
        {"watch": [object()]},
        {"watch": "subscription"},
    ],
)
async def test_bad_arguments_fail_before_any_command(options: dict[str, Any]) -> None:
    client = connect("redis://127.0.0.1:1/0")  # nothing listens there: nothing is sent
    try:
        with pytest.raises(ConfigurationError):
            await doctor(client, **options)
    finally:
        await client.aclose()
