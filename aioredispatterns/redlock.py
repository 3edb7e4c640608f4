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

What a server's silence means: a server that does not answer within ``node_timeout``
(or whose connection fails) is *unknown*, never "no". A renewal is confirmed by a
majority of "yes", lost on a majority of explicit "not yours", and otherwise retried
until the lease's validity runs out. The release is not bound by ``node_timeout``: it
waits for every server (up to ``release_timeout``), because a delete cut short before
it was sent leaves the key behind for a whole TTL.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._capabilities import server_info
from ._connection import AnyRedis, check_client, is_cluster
from ._keys import DEFAULT_PREFIX, keyspace
from ._scripts import Script, delete_if_equal
from ._validate import check_items, check_number
from .errors import CommandError, ConfigurationError, ConnectionFailed, RedisPatternsError
from .lock import _CLEANUP_TIMEOUT, DEFAULT_FENCE_TTL, _LeaseManager, _seconds

__all__ = ("Redlock",)

_ACQUIRE = Script.load("lock_acquire")
_EXTEND = Script.load("lock_extend")
_FENCE_RAISE = Script.load("fence_raise")

#: Where a server is: ("tcp", host, port, db) or ("unix", path, db).
_Endpoint = tuple[object, ...]


def _endpoints(client: AnyRedis) -> set[_Endpoint]:
    """The servers ``client`` talks to, as its connection settings name them."""
    if is_cluster(client):
        # The nodes it was given (and, once initialized, the ones it found).
        manager = client.nodes_manager  # type: ignore[union-attr]
        nodes = [*manager.startup_nodes.values(), *manager.nodes_cache.values()]
        return {("tcp", str(node.host).lower(), int(node.port), 0) for node in nodes}
    settings = client.connection_pool.connection_kwargs  # type: ignore[union-attr]
    db = int(settings.get("db") or 0)
    if settings.get("path"):
        return {("unix", str(settings["path"]), db)}
    host = str(settings.get("host") or "localhost").lower()
    return {("tcp", host, int(settings.get("port") or 6379), db)}


def _check_distinct(clients: Sequence[AnyRedis]) -> None:
    seen: dict[_Endpoint, int] = {}
    for index, client in enumerate(clients):
        for endpoint in _endpoints(client):
            first = seen.setdefault(endpoint, index)
            if first != index:
                where = ":".join(str(part) for part in endpoint[1:])
                raise ConfigurationError(
                    f"Redlock clients {first} and {index} both talk to {where}: "
                    "each client must be a different server (a lock cannot get a "
                    "majority out of one server counted twice)"
                )


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
        node_timeout: seconds one server may take to answer an acquire or a renewal
            (default: ``ttl / 50``, between 5 ms and 0.5 s); a server that does not answer
            is "unknown": no vote for an acquire, no verdict on a renewal.
        retry_delay: waiters retry after a random delay up to this many seconds.
        fence_ttl: how long each fencing counter outlives the last acquire (None: forever).
        release_timeout: how long a release (and the undo of a failed attempt) waits for
            the servers, independently of ``node_timeout`` (default 2 s, as ``Lock``'s
            cleanup). Once a majority has answered, the others get ``node_timeout`` more.

    The first acquire through each client detects what its server supports (native
    ``DELIFEQ`` for the release) before the timed part of the attempt, so no detection
    ever runs inside a node's deadline.

    Raises:
        ConfigurationError: fewer than 1 client, two clients to the same server (same
            host, port and db, or unix socket; for cluster clients, a shared node), or an
            argument out of range (before any command is sent).
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
        release_timeout: float = _CLEANUP_TIMEOUT,
    ) -> None:
        self._clients = [check_client(c) for c in check_items("clients", clients)]
        if not self._clients:
            raise ConfigurationError("Redlock needs at least one client")
        if len({id(c) for c in self._clients}) != len(self._clients):
            raise ConfigurationError("Redlock clients must be distinct (one per server)")
        _check_distinct(self._clients)
        keys = keyspace(prefix, "lock", name)
        check_number("drift_factor", drift_factor, minimum=0)
        if not 0 <= drift_factor < 0.5:
            raise ConfigurationError(f"drift_factor must be in [0, 0.5), got {drift_factor!r}")
        _seconds("retry_delay", retry_delay, minimum=0.001)
        _seconds("node_timeout", node_timeout, allow_none=True, minimum=0.001)
        _seconds("release_timeout", release_timeout, minimum=0.001)
        self._setup(name, ttl, timeout, cancel_on_loss, fence_ttl)
        self._drift_factor = float(drift_factor)
        self._node_timeout = (
            min(0.5, max(0.005, self._ttl / 50)) if node_timeout is None else node_timeout
        )
        if self._node_timeout >= self._ttl:
            raise ConfigurationError("node_timeout must be shorter than ttl")
        self._retry_delay = float(retry_delay)
        self._release_timeout = float(release_timeout)
        # The shielded cleanup around a release (``async with`` exit, cancelled acquire)
        # must not cut the release's own deadline short.
        self._cleanup_timeout = self._release_timeout
        self.quorum: int = len(self._clients) // 2 + 1
        self._last_refusal = "is held by someone else"
        self._owner_key = keys.key("owner")
        self._fence_key = keys.key("fence")
        # Clients whose server's capabilities are not known yet (see _prepare).
        self._undetected = list(self._clients)

    def __repr__(self) -> str:
        return f"<Redlock {self.name!r} on {len(self._clients)} servers ttl={self._ttl}>"

    @property
    def _validity(self) -> float:
        return self._ttl - (self._ttl * self._drift_factor + 0.002)

    async def _on_each(
        self,
        call: Callable[[AnyRedis], Awaitable[Any]],
        clients: Sequence[AnyRedis],
        timeout: float,  # noqa: ASYNC109
        *,
        settle: bool = False,
    ) -> list[Any]:
        """Run ``call`` on every client at once, for at most ``timeout`` seconds.

        Each entry is the server's reply; a :class:`CommandError` if it answered with
        an error (a refusal: NOPERM, WRONGTYPE ...); None if it did not answer (timed
        out, unreachable): unknown. With ``settle``, once a majority has answered the
        others get ``node_timeout`` more, not the whole ``timeout``.
        """
        results: list[Any] = [None] * len(clients)
        answered = 0

        async def one(index: int, client: AnyRedis) -> None:
            nonlocal answered
            try:
                results[index] = await call(client)
            except CommandError as exc:
                results[index] = exc
            except RedisPatternsError:
                return  # no answer: unknown
            answered += 1
            if settle and answered == self.quorum:
                scope.deadline = min(scope.deadline, anyio.current_time() + self._node_timeout)

        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                for index, client in enumerate(clients):
                    tg.start_soon(one, index, client)
        return results

    async def _prepare(self) -> None:
        # Capability detection takes round trips of its own (HELLO, COMMAND INFO, ...):
        # done here, outside any node deadline, the release later is one command per
        # server. A server that cannot be asked now is asked again next attempt (or by
        # the release itself, within release_timeout).
        if not self._undetected:
            return
        replies = await self._on_each(
            server_info, self._undetected, self._release_timeout, settle=True
        )
        self._undetected = [
            client
            for client, reply in zip(self._undetected, replies, strict=True)
            if reply is None or isinstance(reply, CommandError)
        ]

    async def _try_acquire(self, owner: str) -> tuple[int | None, float]:
        started = anyio.current_time()
        replies = await self._on_each(
            lambda c: _ACQUIRE.run(
                c, [self._owner_key, self._fence_key], [owner, self._ttl_ms, self._fence_ms]
            ),
            self._clients,
            self._node_timeout,
        )
        granted = [
            (client, int(reply[1]))
            for client, reply in zip(self._clients, replies, strict=True)
            if _granted(reply) is True
        ]
        held = sum(_granted(reply) is False for reply in replies)
        self._last_refusal = (
            f"was not granted by {self.quorum} of {len(self._clients)} servers: "
            f"{len(granted)} granted, {held} held by someone else, "
            f"{len(replies) - len(granted) - held} did not answer"
        )
        if len(granted) >= self.quorum:
            token = max(t for _, t in granted)
            raised = await self._on_each(
                lambda c: _FENCE_RAISE.run(c, [self._fence_key], [token, self._fence_ms]),
                [client for client, _ in granted],
                self._node_timeout,
            )
            in_time = anyio.current_time() - started < self._validity
            confirmed = sum(r is not None and not isinstance(r, CommandError) for r in raised)
            if in_time and confirmed >= self.quorum:
                return token, 0.0
        # Not a majority (or too slow): give back what may have been granted: on every
        # server but those that said "held by someone else" (the script is atomic, so
        # they did not store this owner); a reply lost on the way back may be a grant.
        maybe = [
            client
            for client, reply in zip(self._clients, replies, strict=True)
            if _granted(reply) is not False
        ]
        with anyio.CancelScope(shield=True):
            await self._delete(owner, maybe)
        return None, random.uniform(0.5, 1.0) * self._retry_delay

    def _refusal(self) -> str:
        return self._last_refusal

    async def _extend(self, owner: str) -> bool:
        replies = await self._on_each(
            lambda c: _EXTEND.run(c, [self._owner_key], [owner, self._ttl_ms]),
            self._clients,
            self._node_timeout,
        )
        return _verdict(replies, self.quorum, "renewal")

    async def _release(self, owner: str) -> bool:
        replies = await self._delete(owner, self._clients)
        return _verdict(replies, self.quorum, "release", release=True)

    async def _delete(self, owner: str, clients: Sequence[AnyRedis]) -> list[Any]:
        # Bounded by release_timeout, not node_timeout: a delete cancelled before it was
        # written leaves the key for a whole TTL, and a loaded machine can take longer
        # than a node deadline (12 ms for a 0.6 s lock) just to write it.
        return await self._on_each(
            lambda c: delete_if_equal(c, self._owner_key, owner),
            clients,
            self._release_timeout,
            settle=True,
        )

    async def _wait(self, hint: float, remaining: float | None) -> None:
        await anyio.sleep(hint if remaining is None else min(hint, remaining))


def _granted(reply: Any) -> bool | None:
    """An acquire reply: True granted, False held by someone else, None unknown."""
    if isinstance(reply, list | tuple) and reply:
        return bool(reply[0] == 1)
    return None


def _verdict(replies: Sequence[Any], quorum: int, what: str, *, release: bool = False) -> bool:
    """Decide a renewal or a release from the servers' replies.

    True: a majority confirmed (for a release: a majority answered and not a majority
    said "not held"). False: a majority said "not yours"; only an explicit reply counts,
    since a server that did not answer may still hold the key. Raises
    :class:`CommandError` when so many servers refused with an error (NOPERM, WRONGTYPE
    ...) that a majority can never confirm, else :class:`ConnectionFailed`: unknown.
    """
    refusals = [r for r in replies if isinstance(r, CommandError)]
    answers = [bool(r) for r in replies if r is not None and not isinstance(r, CommandError)]
    confirmed = sum(answers)
    denied = len(answers) - confirmed
    if confirmed >= quorum:
        return True
    if denied >= quorum:
        return False
    if release and len(answers) >= quorum:
        return True  # a majority was reached, and some of it still held the lease
    if refusals and denied + len(refusals) >= quorum:
        raise CommandError(
            f"{len(refusals)} of {len(replies)} servers refused the {what} "
            f"({denied} said not held): {refusals[0]}"
        ) from refusals[0]
    raise ConnectionFailed(
        f"the {what} was neither confirmed nor denied by {quorum} of {len(replies)} servers "
        f"({confirmed} confirmed, {denied} denied, {len(refusals)} refused, "
        f"{len(replies) - len(answers) - len(refusals)} did not answer)"
    )
