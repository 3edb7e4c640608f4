"""The Redis side of a :class:`~aioredispatterns.Cache` load: the fill, and the fleet lease.

A load ends with :meth:`EntryWriter.fill`: a script that writes the entry only if it still
carries the version the loader saw (so an invalidation or a set that ran meanwhile wins).
With ``distributed=True`` one process per key holds a lease (``<entry>:lease``, ``SET NX
PX`` semantics inside ``cache_acquire.lua``) while it loads; the others block on
``<entry>:wake``, a list the fill pushes to, read with ``BLMOVE`` list -> same list so one
push wakes every waiter of every process in turn (a broadcast without pub/sub).

Every key of one entry shares its hash tag, so each script stays in one cluster slot.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Final

import anyio

from ._capabilities import server_info
from ._commands import execute, execute_blocking
from ._connection import AnyRedis
from ._keys import KeySpace
from ._scripts import Script, delete_if_equal
from .errors import RedisPatternsError

__all__ = ("EntryWriter",)

_FILL = Script.load("cache_fill")
_ACQUIRE = Script.load("cache_acquire")

# How long a shielded cleanup (giving back a lease) may take at most.
_CLEANUP_TIMEOUT: Final = 2.0


class EntryWriter:
    """Fills, leases and wake-ups of one cache's entries."""

    __slots__ = ("_client", "lease_ms")

    def __init__(self, client: AnyRedis, lease_ttl: float) -> None:
        self._client = client
        #: The lease's TTL in ms (also how long a wake-up list is kept).
        self.lease_ms = int(lease_ttl * 1000)

    @staticmethod
    def new_token() -> str:
        """A lease token (random, never reused)."""
        return os.urandom(12).hex()

    async def fill(self, ks: KeySpace, seen: bytes, blob: bytes, px: int, token: str) -> bool:
        """Write ``blob`` (TTL ``px`` ms, 0: none) if the entry still has version ``seen``;
        with a lease ``token``, release the lease and wake the waiters too. True if written.

        Without a lease the script touches the entry only: declaring absent lease / wake
        keys would make a cluster refuse it (TRYAGAIN) while the slot migrates.
        """
        keys = [ks.base, ks.key("lease"), ks.key("wake")] if token else [ks.base]
        return bool(await _FILL.run(self._client, keys, [seen, blob, px, token, self.lease_ms]))

    async def give_back(self, ks: KeySpace, seen: bytes, token: str) -> None:
        """Release the lease and wake the waiters without writing (shielded, bounded; a
        failure is ignored: the lease expires anyway)."""
        with (
            anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True),
            contextlib.suppress(RedisPatternsError),
        ):
            await _FILL.run(
                self._client,
                [ks.base, ks.key("lease"), ks.key("wake")],
                [seen, b"", 0, token, self.lease_ms],
            )

    async def acquire(self, ks: KeySpace, token: str) -> tuple[int, Any]:
        """Read the entry or take its lease: ``(1, entry)`` a live entry, ``(2, entry or
        nil)`` the lease is ours, ``(0, ms left)`` another process holds it.

        Cancellation or a lost reply: the script may have taken the lease; it is given
        back (shielded, bounded), or every process would wait it out.
        """
        keys = [ks.base, ks.key("lease"), ks.key("wake")]
        try:
            status, data = await _ACQUIRE.run(self._client, keys, [token, self.lease_ms])
        except BaseException:
            with (
                anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True),
                contextlib.suppress(RedisPatternsError),
            ):
                await delete_if_equal(self._client, ks.key("lease"), token)
            raise
        return int(status), data

    async def take_for_refresh(self, ks: KeySpace) -> str | None:
        """The lease for a background refresh, or None if another process holds it."""
        token = self.new_token()
        taken = await execute(
            self._client, "SET", ks.key("lease"), token, "NX", "PX", self.lease_ms
        )
        return token if taken else None

    async def wait_for_wake(self, ks: KeySpace, seconds: float) -> None:
        """Block up to ``seconds`` until the lease holder's fill (or release) wakes us."""
        wake_key = ks.key("wake")
        info = await server_info(self._client)
        timeout = f"{seconds:.3f}"
        if info.blmove:
            command: tuple[Any, ...] = ("BLMOVE", wake_key, wake_key, "RIGHT", "LEFT", timeout)
        else:
            command = ("BRPOPLPUSH", wake_key, wake_key, timeout)
        await execute_blocking(self._client, *command, block=seconds)
