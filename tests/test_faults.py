"""Fault injection: every FaultProxy mode and pause/resume/kill against a real server.

Timing assertions are lower bounds for added delays and loose upper bounds elsewhere, so
they hold on a loaded machine.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from aioredispatterns.testing import (
    FaultProxy,
    RedisServer,
    ServerNotAvailable,
    _FrameScanner,
    find_server_binary,
)


def _binary() -> os.PathLike[str]:
    try:
        return find_server_binary("valkey-9.1")
    except ServerNotAvailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """One server shared by the proxy tests (they never pause or kill it)."""
    with RedisServer(_binary(), name="faults") as started:
        yield started


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that pause or kill it."""
    with RedisServer(_binary(), name="faults-own") as started:
        yield started


@pytest.fixture
def direct(server: RedisServer) -> Iterator[redis.Redis]:
    """A client straight to the server, flushed first: what really happened there."""
    with redis.Redis(port=server.port, socket_timeout=10) as client:
        client.flushall()
        yield client


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as started:
        yield started


def _client(port: int, timeout: float | None = 1.0) -> redis.Redis:
    # No retries: redis-py would otherwise retry a timed-out command on a new connection.
    return redis.Redis(
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _timed(call: object) -> float:
    assert callable(call)
    started = time.monotonic()
    call()
    return time.monotonic() - started


def _read_until_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- plain forwarding


def test_forwards_plainly(proxy: FaultProxy, direct: redis.Redis) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    with redis.Redis.from_url(proxy.url, socket_timeout=5) as client:
        client.set("k", "v")
        assert client.get("k") == b"v"
    assert direct.get("k") == b"v"
    assert proxy.connections == 1


# -- latency


def test_latency_delays_both_directions_until_healed(proxy: FaultProxy) -> None:
    with _client(proxy.port, timeout=10) as client:
        assert client.ping()  # the connection is open before the fault is switched on
        proxy.latency(0.4)
        # 0.4 s each way: the round trip takes at least 0.8 s.
        assert 0.78 <= _timed(client.ping) < 8
        proxy.heal()
        assert _timed(client.ping) < 0.5


# -- dropped replies


def test_dropped_reply_times_out_though_the_command_ran(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    with _client(proxy.port) as client:
        assert client.ping()
        proxy.drop_replies(1)
        with pytest.raises(redis.TimeoutError):
            client.set("k", "v")
        assert direct.get("k") == b"v"
        assert proxy.dropped_replies == 1
        # Only one reply was dropped: the client's next command (on a new connection,
        # redis-py closes a timed-out one) gets its reply.
        assert client.get("k") == b"v"


def test_drop_all_replies_until_healed(proxy: FaultProxy, direct: redis.Redis) -> None:
    with _client(proxy.port, timeout=0.5) as client:
        assert client.ping()
        proxy.drop_replies()
        with pytest.raises(redis.TimeoutError):
            client.set("k", "1")
        # redis-py closed that connection; the new one times out in its handshake already
        # (CLIENT SETINFO), whose replies are dropped too, so this SET is never sent.
        with pytest.raises(redis.TimeoutError):
            client.set("k", "2")
        assert direct.get("k") == b"1"
        proxy.heal()
        assert client.get("k") == b"1"
    assert proxy.dropped_replies >= 2


@pytest.mark.parametrize(
    ("setup", "dropped"),
    [
        pytest.param([], [b"PING", b"PING"], id="two-pipelined-replies"),
        pytest.param([["SET", "big", "x" * 300_000]], [b"GET big"], id="reply-of-many-chunks"),
        pytest.param(
            [["RPUSH", "list", *[str(i) * 50 for i in range(500)]]],
            [b"LRANGE list 0 -1"],
            id="array",
        ),
        pytest.param(
            [["XADD", "s", "*", "f", "v"], ["XADD", "s", "*", "g", "w"]],
            [b"XRANGE s - +"],
            id="nested-arrays",
        ),
        pytest.param([], [b"HELLO 3"], id="resp3-map"),
        pytest.param(
            [["HSET", "h", "a", "1", "b", "2"]], [b"HELLO 3", b"HGETALL h"], id="two-resp3-maps"
        ),
    ],
)
def test_drop_replies_counts_whole_replies(
    proxy: FaultProxy, direct: redis.Redis, setup: list[list[str]], dropped: list[bytes]
) -> None:
    for command in setup:
        direct.execute_command(*command)
    proxy.drop_replies(len(dropped))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        # All in one write: the replies to drop and the one to keep may share a chunk.
        sock.sendall(b"".join(command + b"\r\n" for command in dropped) + b"PING\r\n")
        received = b""
        while not received.endswith(b"+PONG\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"EOF after {received!r}"
            received += chunk
    assert received == b"+PONG\r\n"
    assert proxy.dropped_replies == len(dropped)


def test_frame_scanner_finds_frame_ends_in_any_chunking() -> None:
    frames = [
        b"+OK\r\n",
        b"$5\r\nhello\r\n",
        b"$-1\r\n",
        b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n",
        b"*0\r\n",
        b"%1\r\n+k\r\n~2\r\n#t\r\n,1.5\r\n",
        b"|1\r\n+ttl\r\n:3\r\n=8\r\ntxt:abcd\r\n",  # an attribute, then the value it describes
        b">2\r\n+message\r\n_\r\n",
        b"-ERR x\r\n",
    ]
    stream = b"".join(frames)
    expected, offset = [], 0
    for frame in frames:
        offset += len(frame)
        expected.append(offset)
    for size in (1, 2, 3, 7, len(stream)):
        scanner, found = _FrameScanner(), []
        for start in range(0, len(stream), size):
            found += [start + end for end in scanner.feed(stream[start : start + size])]
        assert found == expected, size
        assert not scanner.broken


# -- cuts


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
def test_cut_mid_command_is_a_connection_error(
    proxy: FaultProxy, direct: redis.Redis, reset: bool
) -> None:
    errors: list[Exception] = []
    with _client(proxy.port, timeout=30) as client:

        def blocked_pop() -> None:
            try:
                client.blpop(["nothing"], timeout=20)
            except Exception as exc:
                errors.append(exc)

        popper = threading.Thread(target=blocked_pop)
        popper.start()
        try:
            deadline = time.monotonic() + 10
            while not direct.info("clients")["blocked_clients"]:
                assert time.monotonic() < deadline, "BLPOP never reached the server"
                time.sleep(0.02)
            cut_at = time.monotonic()
            proxy.cut(reset=reset)
        finally:
            popper.join(25)
        assert time.monotonic() - cut_at < 10  # long before BLPOP's own timeout
        assert len(errors) == 1
        assert isinstance(errors[0], redis.ConnectionError)
        # New connections are forwarded as usual.
        assert client.ping()
    assert proxy.connections == 2


def test_cut_after_bytes_truncates_the_reply(proxy: FaultProxy, direct: redis.Redis) -> None:
    direct.set("big", b"x" * 100_000)
    proxy.cut_after_bytes(100)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET big\r\n")
        received = _read_until_eof(sock)
    assert received == b"$100000\r\n" + b"x" * (100 - len(b"$100000\r\n"))
    # It fired once: a client now gets whole replies, until the next one is armed.
    with _client(proxy.port, timeout=10) as client:
        assert client.get("big") == b"x" * 100_000
        proxy.cut_after_bytes(10)
        with pytest.raises(redis.ConnectionError):
            client.get("big")


# -- blackhole


def test_blackhole_times_out_open_and_new_connections_until_healed(proxy: FaultProxy) -> None:
    with _client(proxy.port, timeout=0.5) as opened, _client(proxy.port, timeout=0.5) as fresh:
        assert opened.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            opened.ping()
        accepted = proxy.connections
        # The connect succeeds (the proxy accepts it); the PING is never answered.
        with pytest.raises(redis.TimeoutError):
            fresh.ping()
        assert proxy.connections > accepted
        proxy.heal()
        assert fresh.ping()
        assert opened.ping()


def test_command_sent_into_a_blackhole_is_delivered_on_heal(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    with _client(proxy.port, timeout=0.5) as client:
        assert client.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            client.set("k", "late")
    assert direct.get("k") is None
    proxy.heal()  # as TCP retransmission would, the held SET reaches the server now
    deadline = time.monotonic() + 10
    while direct.get("k") != b"late":
        assert time.monotonic() < deadline
        time.sleep(0.05)


# -- lifecycle


def test_stop_closes_everything_and_joins_its_thread(server: RedisServer) -> None:
    proxy = FaultProxy(server.port)
    proxy.latency(0.01)  # faults may be set before start
    proxy.start()
    name = repr(proxy)
    assert any(thread.name == name for thread in threading.enumerate())
    with _client(proxy.port, timeout=5) as client:
        assert client.ping()
        proxy.stop()
        assert not any(thread.name == name for thread in threading.enumerate())
        with pytest.raises(redis.ConnectionError):
            client.ping()
        # A restarted proxy listens on the same port.
        with proxy:
            assert client.ping()
    proxy.stop()  # stopping a stopped proxy does nothing


def test_invalid_arguments_are_rejected() -> None:
    proxy = FaultProxy(6379)
    with pytest.raises(ValueError, match="seconds"):
        proxy.latency(-1)
    with pytest.raises(ValueError, match="seconds"):
        proxy.latency(float("nan"))
    with pytest.raises(ValueError, match="n must be"):
        proxy.drop_replies(0)
    with pytest.raises(ValueError, match="n must be"):
        proxy.cut_after_bytes(-1)


async def test_proxy_works_from_inside_an_event_loop(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    client = redis.asyncio.Redis(
        port=proxy.port, socket_timeout=1, retry=redis.asyncio.retry.Retry(NoBackoff(), 0)
    )
    try:
        assert await client.ping()
        proxy.latency(0.3)
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started >= 0.58
        proxy.heal()
        proxy.drop_replies(1)
        with pytest.raises(redis.TimeoutError):
            await client.set("k", "v")
        assert direct.get("k") == b"v"
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


# -- the server itself: pause, resume, kill, restart


def test_pause_times_clients_out_and_resume_answers_again(own_server: RedisServer) -> None:
    with _client(own_server.port, timeout=0.5) as client:
        assert client.ping()
        own_server.pause()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            own_server.resume()
        assert client.ping()


def test_paused_for_seconds_stalls_then_answers(own_server: RedisServer) -> None:
    with _client(own_server.port, timeout=20) as client:
        assert client.ping()
        with own_server.paused(1.0):
            assert _timed(client.ping) >= 0.5
        assert client.ping()


def test_a_paused_server_stops_promptly(own_server: RedisServer) -> None:
    pid = own_server.pid
    assert pid is not None
    own_server.pause()
    # SIGTERM alone would wait for a SIGCONT (and stop() would SIGKILL after 10 s).
    assert _timed(own_server.stop) < 8
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="not running"):
        own_server.pause()
    own_server.resume()  # harmless when not running


def test_kill_and_restart_behind_a_proxy(own_server: RedisServer) -> None:
    port = own_server.port
    with FaultProxy(port) as proxy, _client(proxy.port, timeout=5) as client:
        client.set("k", "v")
        own_server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        own_server.restart()
        assert own_server.port == port
        assert client.ping()
        assert client.get("k") is None  # a restart starts with an empty dataset
