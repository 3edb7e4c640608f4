"""The in-process coalescing of a :class:`~aioredispatterns.Cache`: what waiters await.

A :class:`Flight` is one load of one key (a miss, or a background refresh) that every
concurrent caller of the key awaits; it runs in the cache's task group, so a waiter's
cancellation removes that waiter only. A :class:`SharedRead` is one GET of one key in
flight, whose reply readers arriving meanwhile share.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import anyio

__all__ = ("Flight", "SharedRead")


class Flight:
    """One load in flight for one key: what its waiters await."""

    __slots__ = ("done", "error", "refresh", "traceback", "value")

    def __init__(self, *, refresh: bool) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.refresh = refresh

    async def wait(self) -> Any:
        """The load's value, or its exception (raised in every waiter).

        Cancellation: only this waiter stops waiting; the load goes on.
        """
        await self.done.wait()
        if self.error is not None:
            # Every waiter raises the same exception object: reset its traceback each
            # time so it does not grow by one chain per waiter.
            raise self.error.with_traceback(self.traceback)
        return self.value


class SharedRead:
    """One GET in flight for one key, shared by the readers that arrive meanwhile."""

    __slots__ = ("done", "ok", "raw")

    def __init__(self) -> None:
        self.done: anyio.Event | None = None  # made by the first reader that joins
        self.raw: bytes | None = None
        self.ok = False
