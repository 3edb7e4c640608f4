"""Redlock: one lock over N independent Redis servers, held while a majority agrees.

The algorithm (from the Redis documentation): take the lock with the same owner id on
every server, each attempt bounded by a short ``node_timeout``; the lock is held if a
majority (``N // 2 + 1``) granted it and the time spent is well inside the TTL — the
lease is valid for ``ttl - elapsed - drift``, where ``drift = ttl * drift_factor + 2 ms``.
Otherwise it is released everywhere and retried after a random delay. Release is a
compare-and-delete on every server (``DELIFEQ`` where the server has it).

What Redlock buys over one server: the lock survives the crash of a minority of servers
(no single failover can hand it to two clients, as one primary/replica pair can).

What it does **not** solve (Martin Kleppmann, "How to do distributed locking", 2016):
a holder can be paused — a GC pause, a swapped-out VM, a slow network — after it checked
that it holds the lock and before its write reaches the resource. Its lease expires, a
second client takes the lock, and the first one's write lands late. No lock service can
prevent that, because the pause happens *after* the check. It also trusts clocks to
measure the lease: a server whose clock jumps forward expires the key early. What makes
the protected write safe is the **fencing token**: the resource remembers the highest
token it has accepted and rejects lower ones (:func:`~aioredispatterns.fenced_set`).

Tokens here: each server issues ``max(counter + 1, its clock in µs)``; the lease's token is
the highest one granted, and before the lease is returned that value is written back
to a majority of counters ("raise to at least"). Any later majority overlaps that
majority in at least one server, whose counter is then already at least this token, so
later tokens are strictly higher even if clocks disagree.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, keyspace
from ._scripts import Script, delete_if_equal
from .errors import ConfigurationError, ConnectionFailed, RedisPatternsError
from .lock import DEFAULT_FENCE_TTL, _LeaseManager, _seconds

__all__ = ("Redlock",)

_ACQUIRE = Script.load("lock_acquire")
_EXTEND = Script.load("lock_extend")
_FENCE_RAISE = Script.load("fence_raise")


class Redlock(_LeaseManager):
    """A lock held on a majority of ``clients`` (independent servers, not replicas).

    Args:
        clients: one ``redis.asyncio`` client per server (an odd number, usually 5).
            Build them with a small ``connect_timeout`` and ``retries=0``: a dead server
            must fail fast, not be retried.
        name: the lock's name.
        ttl: the lease TTL in seconds; ``async with`` renews it on a majority every
            ``ttl / 3``.
        timeout: how long ``async with redlock`` waits (None: forever).
        cancel_on_loss: cancel the ``async with`` body as soon as the lease is lost.
        prefix: the key namespace (the same on every server).
        drift_factor: the share of the TTL reserved for clock drift (default 0.01).
        node_timeout: seconds one server may take to answer (default: ``ttl / 50``,
            between 5 ms and 0.5 s); a server that does not answer counts as a "no".
        retry_delay: waiters retry after a random delay up to this many seconds.
        fence_ttl: how long each fencing counter outlives the last acquire (None: forever).

    Raises:
        ConfigurationError: fewer than 1 client, a duplicate client, or an argument out
            of range (before any command is sent).
    """

    def __init__(
        self,
        clients: Sequence[AnyRedis],
        name: str,
        *,
        ttl: float = 10.0,
        timeout: float | None = None,
        cancel_on_loss: bool = False,
        prefix: str = DEFAULT_PREFIX,
        drift_factor: float = 0.01,
        node_timeout: float | None = None,
        retry_delay: float = 0.2,
        fence_ttl: float | None = DEFAULT_FENCE_TTL,
    ) -> None:
        self._clients = [check_client(c) for c in clients]
        if not self._clients:
            raise ConfigurationError("Redlock needs at least one client")
        if len({id(c) for c in self._clients}) != len(self._clients):
            raise ConfigurationError("Redlock clients must be distinct (one per server)")
        keys = keyspace(prefix, "lock", name)
        if not 0 <= drift_factor < 0.5:
            raise ConfigurationError(f"drift_factor must be in [0, 0.5), got {drift_factor!r}")
        _seconds("retry_delay", retry_delay, minimum=0.001)
        _seconds("node_timeout", node_timeout, allow_none=True, minimum=0.001)
        self._setup(name, ttl, timeout, cancel_on_loss, fence_ttl)
        self._drift_factor = float(drift_factor)
        self._node_timeout = (
            min(0.5, max(0.005, self._ttl / 50)) if node_timeout is None else node_timeout
        )
        if self._node_timeout >= self._ttl:
            raise ConfigurationError("node_timeout must be shorter than ttl")
        self._retry_delay = float(retry_delay)
        self.quorum = len(self._clients) // 2 + 1
        self._owner_key = keys.key("owner")
        self._fence_key = keys.key("fence")

    def __repr__(self) -> str:
        return f"<Redlock {self.name!r} on {len(self._clients)} servers ttl={self._ttl}>"

    @property
    def _validity(self) -> float:
        return self._ttl - (self._ttl * self._drift_factor + 0.002)

    async def _on_each(
        self, call: Callable[[AnyRedis], Awaitable[Any]], clients: Sequence[AnyRedis]
    ) -> list[Any]:
        """Run ``call`` on every client at once; None for a server that failed or was slow."""
        results: list[Any] = [None] * len(clients)

        async def one(index: int, client: AnyRedis) -> None:
            with anyio.move_on_after(self._node_timeout):
                try:
                    results[index] = await call(client)
                except RedisPatternsError:
                    results[index] = None

        async with anyio.create_task_group() as tg:
            for index, client in enumerate(clients):
                tg.start_soon(one, index, client)
        return results

    async def _try_acquire(self, owner: str) -> tuple[int | None, float]:
        started = anyio.current_time()
        replies = await self._on_each(
            lambda c: _ACQUIRE.run(
                c, [self._owner_key, self._fence_key], [owner, self._ttl_ms, self._fence_ms]
            ),
            self._clients,
        )
        granted = [
            (client, int(reply[1]))
            for client, reply in zip(self._clients, replies, strict=True)
            if reply is not None and reply[0] == 1
        ]
        if len(granted) >= self.quorum:
            token = max(t for _, t in granted)
            raised = await self._on_each(
                lambda c: _FENCE_RAISE.run(c, [self._fence_key], [token, self._fence_ms]),
                [client for client, _ in granted],
            )
            in_time = anyio.current_time() - started < self._validity
            if in_time and sum(r is not None for r in raised) >= self.quorum:
                return token, 0.0
        # Not a majority (or too slow): give back what was granted, on every server
        # (a reply lost on the way back may have granted it too).
        with anyio.move_on_after(self._node_timeout * 2, shield=True):
            await self._release(owner)
        return None, random.uniform(0.5, 1.0) * self._retry_delay

    async def _extend(self, owner: str) -> bool:
        replies = await self._on_each(
            lambda c: _EXTEND.run(c, [self._owner_key], [owner, self._ttl_ms]), self._clients
        )
        if sum(r == 1 for r in replies) >= self.quorum:
            return True
        if sum(r == 0 for r in replies) > len(self._clients) - self.quorum:
            return False  # a majority is impossible: enough servers said "not yours"
        raise ConnectionFailed(f"fewer than {self.quorum} servers confirmed the renewal")

    async def _release(self, owner: str) -> bool:
        replies = await self._on_each(
            lambda c: delete_if_equal(c, self._owner_key, owner), self._clients
        )
        return any(replies)

    async def _wait(self, hint: float, remaining: float | None) -> None:
        await anyio.sleep(hint if remaining is None else min(hint, remaining))
