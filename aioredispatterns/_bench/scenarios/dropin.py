"""The drop-in client: your own ``await client.get/set/incr`` at 1-256 tasks.

Per command and concurrency, three rows on the same server:

* **redis-py pool** (the baseline): ``redis.asyncio.Redis`` with a pool as large as the
  load, what a redis-py user writes;
* **aioredispatterns drop-in**: the same calls on the client ``connect()`` returns (a
  ``redis.asyncio.Redis`` subclass whose short commands ride the auto-pipeline);
* **minimal asyncio + hiredis client** (a reference, with the ``hiredis`` extra): one
  connection, an ``asyncio.Protocol`` feeding ``hiredis.Reader``, every command of one
  loop iteration written in one write. No timeouts, no errors handled, no cancellation
  care, no response callbacks: the ceiling a Python client on this event loop reaches.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario
from ._optional import has, load

VALUE = b"x" * 64
CONCURRENCY = (1, 16, 64, 256)
COMMANDS = ("GET", "SET", "INCR")

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _operation(client: Any, command: str, key: str) -> Operation:
    if command == "GET":
        return lambda: client.get(key)
    if command == "SET":
        return lambda: client.set(key, VALUE)
    return lambda: client.incr(f"{key}:n")


def _dropin(command: str, concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = env.client(max_connections=concurrency + 4)
        key = f"{env.prefix}:dropin"
        await client.set(key, VALUE)
        try:
            yield _operation(client, command, key)
        finally:
            await client.aclose()

    return setup


def _redis_py(command: str, concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
        key = f"{env.prefix}:dropin"
        await client.set(key, VALUE)
        try:
            yield _operation(client, command, key)
        finally:
            await client.aclose()

    return setup


class MinimalClient(asyncio.Protocol):
    """The reference client: one connection, replies parsed in the socket's callback."""

    def __init__(self) -> None:
        self._reader = load("hiredis").Reader()
        self._pack = load("hiredis").pack_command
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))

    def _flush(self) -> None:
        out, self._out = self._out, []
        assert self._transport is not None
        self._transport.writelines(out)

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for this loop iteration's write; await its raw reply."""
        future = asyncio.get_running_loop().create_future()
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(self._pack(args))
        self._waiting.append(future)
        return future

    def get(self, key: str) -> asyncio.Future[Any]:
        return self.execute("GET", key)

    def set(self, key: str, value: bytes) -> asyncio.Future[Any]:
        return self.execute("SET", key, value)

    def incr(self, key: str) -> asyncio.Future[Any]:
        return self.execute("INCR", key)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def connect_minimal(url: str) -> MinimalClient:
    """A :class:`MinimalClient` connected to ``url`` (``redis://host:port/db`` only)."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        MinimalClient, parts.hostname or "127.0.0.1", parts.port or 6379
    )
    db = (parts.path or "/0").strip("/") or "0"
    if db != "0":
        await client.execute("SELECT", db)
    return client


def _minimal(command: str) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = await connect_minimal(env.url)
        key = f"{env.prefix}:dropin"
        await client.set(key, VALUE)
        try:
            yield _operation(client, command, key)
        finally:
            client.close()

    return setup


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Per command and concurrency: redis-py's pool (baseline), the drop-in client, and
    the minimal client's ceiling (reference)."""
    rows = []
    minimal = has("hiredis") and urlsplit(env.url).scheme == "redis"
    for command in COMMANDS:
        for concurrency in CONCURRENCY:
            group = f"drop-in {command} c{concurrency}"
            ours = _dropin(command, concurrency)
            rows.append(
                Scenario(group, "redis-py pool", concurrency, _redis_py(command, concurrency), True)
            )
            rows.append(Scenario(group, "aioredispatterns drop-in", concurrency, ours))
            if minimal:
                rows.append(
                    Scenario(
                        group,
                        "minimal asyncio+hiredis client",
                        concurrency,
                        _minimal(command),
                        role="reference",
                    )
                )
    return rows
