"""Worker-pool machinery for consumers of a queue: a credit window and an ack batcher.

Both are free of any particular data structure: a stream's consumer group uses them
today, a list-based reliable queue can use them tomorrow.

* :class:`CreditWindow` bounds the items in flight (read from the server, not yet
  settled). Whoever asks the server for items (a read, a reclaim) first reserves as many
  credits as it asks for, so what arrives always fits, however many requests are
  outstanding at once and in whatever order their replies come back.
* :class:`AckBatcher` sends acknowledgements in batches: one call for every id that
  queued up while the previous call was in flight. A batch whose outcome is unknown
  goes back to the queue, so acknowledging must be idempotent.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType

import anyio

from ._backoff import Backoff
from .errors import CommandTimeout, ConnectionFailed

__all__ = ("AckBatcher", "CreditWindow", "Reservation")

# What may succeed if simply tried again: the command may or may not have run.
_TRANSIENT = (ConnectionFailed, CommandTimeout)


class _Waiter:
    __slots__ = ("event", "granted", "need", "wanted")

    def __init__(self, wanted: int, need: int) -> None:
        self.wanted = wanted
        self.need = need
        self.granted = 0
        self.event = anyio.Event()


class CreditWindow:
    """At most ``limit`` items in flight, counting those already asked for.

    An item is *in flight* from the moment it is admitted (handed to a buffer or a
    worker) until it is settled. Before asking the server for up to ``n`` items, a
    producer reserves ``n`` credits (:meth:`reserve`); each item that arrives is admitted
    out of that reservation (:meth:`Reservation.take`); the credits it did not use go
    back when the reservation ends, right after the reply. The invariant::

        in_flight + reserved <= limit

    holds at every moment, so a buffer of ``limit`` slots can never overflow.

    Waiters are served first come, first served, and freed credits are handed to the
    first waiter directly: a loop that returns its credits and at once reserves again
    queues behind the others instead of starving them.
    """

    __slots__ = ("_in_flight", "_limit", "_reserved", "_waiters")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a credit window needs a limit >= 1")
        self._limit = limit
        self._in_flight = 0
        self._reserved = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def limit(self) -> int:
        """The most items in flight and reserved together."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Items admitted and not yet settled."""
        return self._in_flight

    @property
    def reserved(self) -> int:
        """Credits held by requests that have not yet been answered."""
        return self._reserved

    @property
    def free(self) -> int:
        """Credits neither reserved nor in flight."""
        return self._limit - self._in_flight - self._reserved

    def reserve(self, wanted: int, *, at_least: int = 1) -> Reservation:
        """Credits for a request of up to ``wanted`` items, as an async context manager.

        Entering waits until ``at_least`` credits are free (a request for fewer is not
        worth a round trip), then takes as many as are free, up to ``wanted``; both are
        clamped to ``limit``. Leaving returns the credits no item used.

        Cancellation: a cancelled wait takes nothing (credits handed over just as it was
        cancelled go back at once); leaving by cancellation returns the unused credits.
        """
        if wanted < 1:
            raise ValueError("reserve at least one credit")
        wanted = min(wanted, self._limit)
        return Reservation(self, wanted, max(1, min(at_least, wanted)))

    def settle(self, n: int = 1) -> None:
        """``n`` admitted items are done: their credits are free again."""
        if n > self._in_flight:
            raise RuntimeError(f"settling {n} items of {self._in_flight} in flight")
        self._in_flight -= n
        self._serve()

    # -- used by Reservation

    async def _acquire(self, wanted: int, need: int) -> int:
        if not self._waiters and self.free >= need:
            granted = min(wanted, self.free)
            self._reserved += granted
            return granted
        waiter = _Waiter(wanted, need)
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._reserved -= waiter.granted
            else:
                self._waiters.remove(waiter)
            self._serve()
            raise
        return waiter.granted

    def _admit(self) -> None:
        self._reserved -= 1
        self._in_flight += 1

    def _release(self, n: int) -> None:
        if n:
            self._reserved -= n
            self._serve()

    def _serve(self) -> None:
        waiters = self._waiters
        while waiters:
            head = waiters[0]
            free = self.free
            if free < head.need:
                return
            head.granted = min(head.wanted, free)
            self._reserved += head.granted
            waiters.popleft()
            head.event.set()


class Reservation:
    """Credits reserved for one request to the server (see :meth:`CreditWindow.reserve`).

    Attributes:
        granted: credits reserved (known once entered): ask the server for this many.
        used: credits turned into items in flight by :meth:`take`.
    """

    __slots__ = ("_need", "_wanted", "_window", "granted", "used")

    def __init__(self, window: CreditWindow, wanted: int, need: int) -> None:
        self._window = window
        self._wanted = wanted
        self._need = need
        self.granted = 0
        self.used = 0

    @property
    def left(self) -> int:
        """Credits reserved and not yet used."""
        return self.granted - self.used

    def take(self) -> bool:
        """Admit one item out of this reservation; False if none is left (leave it)."""
        if self.used >= self.granted:
            return False
        self.used += 1
        self._window._admit()
        return True

    async def __aenter__(self) -> Reservation:
        self.granted = await self._window._acquire(self._wanted, self._need)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        left = self.left
        self.granted = self.used
        self._window._release(left)


class AckBatcher:
    """Sends acknowledgements in batches: one ``send`` for every id queued meanwhile.

    Queue ids with :meth:`add`; :meth:`run` (a background task) sends what has queued up
    whenever the previous batch is done, at most ``max_batch`` ids per call, one call at
    a time. ``send(ids)`` must be idempotent (XACK, LREM from a processing list ...): a
    batch whose outcome is unknown (the connection broke, no reply in time, cancelled)
    goes back to the front of the queue and is sent again. Any other error of ``send``
    is raised from :meth:`run` (it is not one to retry); to make an error mean "nothing
    to acknowledge" (the queue is gone), catch it inside ``send``.

    Args:
        send: ``async def send(ids) -> None``, the one command for a batch.
        backoff: the wait between attempts after a transient failure.
        max_batch: the most ids in one call.
        name: says whose acknowledgements these are in log messages.
        logger: where retries are logged (warning).
    """

    __slots__ = ("_backoff", "_lock", "_logger", "_max_batch", "_name", "_queue", "_send", "_wake")

    def __init__(
        self,
        send: Callable[[Sequence[str]], Awaitable[None]],
        *,
        backoff: Backoff,
        max_batch: int = 1000,
        name: str = "acks",
        logger: logging.Logger | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._send = send
        self._backoff = backoff
        self._max_batch = max_batch
        self._name = name
        self._logger = logger or logging.getLogger(__name__)
        self._queue: list[str] = []
        self._wake = anyio.Event()
        # One batch at a time: a flush waits for the batch in flight instead of racing it.
        self._lock = anyio.Lock()

    @property
    def pending(self) -> int:
        """Ids queued and not yet sent (a batch in flight is not counted)."""
        return len(self._queue)

    def add(self, ids: Iterable[str]) -> None:
        """Queue ids; :meth:`run` sends them with the next batch."""
        self._queue.extend(ids)
        self._wake.set()

    async def run(self) -> None:
        """Send batches until cancelled, retrying transient failures with backoff.

        Raises:
            RedisPatternsError: ``send`` failed in a way that is not worth retrying.

        Cancellation: a batch in flight goes back to the queue (it may have landed;
        sending it again is harmless); :meth:`close` sends it later.
        """
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._queue:
                try:
                    await self._send_batch()
                except _TRANSIENT as exc:
                    self._logger.warning(
                        "%s: acknowledgement failed, retrying: %s", self._name, exc
                    )
                    await self._backoff.sleep()
                else:
                    self._backoff.reset()

    async def flush(self) -> None:
        """Send everything queued now, after the batch in flight (if any) is done.

        Raises:
            ConnectionFailed, CommandTimeout: a batch failed (it is queued again).

        Cancellation: the batch in flight goes back to the queue.
        """
        while True:
            async with self._lock:
                if not self._queue:
                    return
                await self._send_locked()

    async def close(self, timeout: float) -> int:  # noqa: ASYNC109
        """The final flush: retry transient failures for up to ``timeout`` seconds.

        Returns how many ids could not be sent (they stay unacknowledged). Run it
        shielded: it is what makes a graceful shutdown keep its finished work.

        Raises:
            RedisPatternsError: ``send`` failed in a way that is not worth retrying.
        """
        with anyio.move_on_after(timeout):
            while True:
                try:
                    await self.flush()
                except _TRANSIENT as exc:
                    self._logger.warning("%s: final acknowledgement failed: %s", self._name, exc)
                    await self._backoff.sleep()
                else:
                    break
        return len(self._queue)

    async def _send_batch(self) -> None:
        async with self._lock:
            if self._queue:
                await self._send_locked()

    async def _send_locked(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        try:
            await self._send(batch)
        except BaseException:
            # Unknown whether it landed: acknowledging is idempotent, so send it again.
            self._queue[:0] = batch
            raise
