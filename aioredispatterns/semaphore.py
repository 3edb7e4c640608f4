"""A counting semaphore: at most N holders at once, each on a self-renewing lease.

Same API as :class:`~aioredispatterns.Lock` (``async with sem as lease``, ``acquire``,
fencing tokens, renewal, ``cancel_on_loss``, push wake-ups). The holders live in one
sorted set scored by their expiry on the server's clock, so a holder that crashes or
stops renewing loses its slot when its lease runs out, without anyone cleaning up.
"""

from __future__ import annotations

from ._commands import execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, keyspace
from ._scripts import Script
from ._validate import MAX_COUNT, check_count
from .lock import DEFAULT_FENCE_TTL, _LeaseManager, _wait_for_wakeup

__all__ = ("Semaphore",)

_ACQUIRE = Script.load("semaphore_acquire")
_EXTEND = Script.load("semaphore_extend")
_RELEASE = Script.load("semaphore_release")


class Semaphore(_LeaseManager):
    """At most ``limit`` concurrent holders of ``name``, each with its own lease.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the semaphore's name; its keys share one cluster hash slot.
        limit: how many holders at once (>= 1).
        ttl: each holder's lease TTL in seconds; ``async with`` renews it every ``ttl / 3``.
        timeout: how long ``async with sem`` waits (None: forever).
        cancel_on_loss: cancel the ``async with`` body as soon as the lease is lost.
        prefix: the key namespace.
        fence_ttl: how long the fencing counter outlives the last acquire (None: forever).

    Fairness: a release wakes the waiter blocked longest (``BLPOP`` order); a newcomer
    that arrives between the release and that waiter's retry can still take the slot
    ("fair enough", not strictly FIFO). Each blocked waiter holds one pooled connection.

    Keys: ``<prefix>:semaphore:{<name>}:holders`` (sorted set owner -> expiry, expires
    with its last lease), ``...:fence`` and ``...:wake``.

    Raises:
        ConfigurationError: an argument is out of range (before any command is sent).
        InvalidKeyError: ``name`` is empty or neither str nor bytes.
    """

    def __init__(
        self,
        client: AnyRedis,
        name: str,
        limit: int,
        *,
        ttl: float = 10.0,
        timeout: float | None = None,
        cancel_on_loss: bool = False,
        prefix: str = DEFAULT_PREFIX,
        fence_ttl: float | None = DEFAULT_FENCE_TTL,
    ) -> None:
        self._client = check_client(client)
        keys = keyspace(prefix, "semaphore", name)
        # Compared with ZCARD inside a script: Lua numbers are exact up to 2**53.
        check_count("limit", limit, minimum=1, maximum=MAX_COUNT)
        self._setup(name, ttl, timeout, cancel_on_loss, fence_ttl)
        self.limit = limit
        self._holders_key = keys.key("holders")
        self._fence_key = keys.key("fence")
        self._wake_key = keys.key("wake")

    def __repr__(self) -> str:
        return f"<Semaphore {self.name!r} limit={self.limit} ttl={self._ttl}>"

    async def holders(self) -> int:
        """How many leases are held right now (a snapshot, stale on return)."""
        now_ms = await _server_ms(self._client)
        return int(await execute(self._client, "ZCOUNT", self._holders_key, f"({now_ms}", "+inf"))

    async def _try_acquire(self, owner: str) -> tuple[int | None, float]:
        taken, value = await _ACQUIRE.run(
            self._client,
            [self._holders_key, self._fence_key],
            [owner, self._ttl_ms, self.limit, self._fence_ms],
        )
        if taken:
            return int(value), 0.0
        return None, max(int(value), 1) / 1000

    async def _extend(self, owner: str) -> bool:
        return bool(await _EXTEND.run(self._client, [self._holders_key], [owner, self._ttl_ms]))

    async def _release(self, owner: str) -> bool:
        return bool(
            await _RELEASE.run(
                self._client,
                [self._holders_key, self._wake_key],
                [owner, self._ttl_ms, self.limit],
            )
        )

    async def _wait(self, hint: float, remaining: float | None) -> None:
        await _wait_for_wakeup(self._client, self._wake_key, hint, remaining, self._ttl)


async def _server_ms(client: AnyRedis) -> int:
    seconds, micros = await execute(client, "TIME")
    return int(seconds) * 1000 + int(micros) // 1000
