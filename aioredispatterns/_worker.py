"""Worker-pool machinery for consumers of a queue: the pool, its credit window, its acks.

All of it is free of any particular data structure: a stream's consumer group
(:class:`~aioredispatterns.ConsumerGroup`) and a list-based reliable queue
(:class:`~aioredispatterns.ReliableQueue`) run on the same pieces.

* :class:`CreditWindow` bounds the items in flight (read from the server, not yet
  settled). Whoever asks the server for items (a read, a reclaim) first reserves as many
  credits as it asks for, so what arrives always fits, however many requests are
  outstanding at once and in whatever order their replies come back.
* :class:`AckBatcher` sends acknowledgements in batches: one call for every id that
  queued up while the previous call was in flight. A batch whose outcome is unknown
  goes back to the queue, so acknowledging must be idempotent.
* :class:`WorkerPool` is one consumer's run: a bounded buffer fed by the owner's intake
  loops, ``concurrency`` handler tasks (or the owner's own loop, through
  :meth:`WorkerPool.items`), the renewal of every item it holds (a lease), the ack
  batcher, and the graceful drain on the way out. The owner supplies what is specific to
  its data structure: how items are read (intake), acknowledged, renewed and failed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._backoff import Backoff
from .errors import CommandTimeout, ConnectionFailed

__all__ = ("AckBatcher", "CreditWindow", "Item", "PoolCounts", "Reservation", "WorkerPool")

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


# --------------------------------------------------------------------------- the pool


class Item(Protocol):
    """What a pool hands to handlers: an id unique among what is held, and how many
    times it has been delivered (1 the first time)."""

    @property
    def id(self) -> str: ...

    @property
    def deliveries(self) -> int: ...


class PoolCounts(Protocol):
    """The owner's counters the pool keeps up to date (they outlive one run)."""

    processed: int
    failed: int
    retried: int
    refreshed: int


ItemT = TypeVar("ItemT", bound=Item)


class WorkerPool(Generic[ItemT]):
    """One run of a consumer: buffer, credit window, handlers, renewal, acks, drain.

    The owner's intake loops (:meth:`running`) reserve credits from :attr:`window`, ask
    the server for that many items and :meth:`dispatch` each into a buffer of
    ``max_in_flight`` slots (it cannot overflow: every buffered item holds a credit).
    ``concurrency`` handler tasks take items from it; a handler that returns queues the
    item's id for the batched acknowledgement, one that raises goes to ``on_failure``.
    Without a handler the owner's user takes items through :meth:`items`.

    Every item held here (buffered, or its handler running) is renewed every
    ``renew_every`` seconds through ``renew(ids)``: the lease that keeps it from being
    handed to another consumer while this one is alive. Transient failures of a renewal
    or an acknowledgement are retried with backoff; any other error fails the run.

    Args:
        name: names the consumer in log messages.
        logger: where the pool logs.
        concurrency: handler tasks.
        max_in_flight: items admitted and not yet settled, counting those asked for.
        drain_timeout: on shutdown, seconds running handlers get to finish.
        ack_timeout: on shutdown, seconds the final acknowledgement (and the owner's
            ``on_stopped``) may take.
        renew_every: seconds between renewals of the held items.
        send_acks: ``async def send_acks(ids)``: acknowledge a batch (idempotent).
        renew: ``async def renew(ids) -> int``: renew the leases of the held ids (the
            list may be empty: a heartbeat), returns how many were renewed.
        on_failure: ``async def on_failure(item, error)``: a handler raised ``error``.
        counts: the owner's counters.
        new_backoff: a fresh backoff for each retry loop.
        left_behind: what happens to the items of handlers cancelled after
            ``drain_timeout`` or whose acknowledgement could not be sent, for the logs.
    """

    def __init__(
        self,
        *,
        name: str,
        logger: logging.Logger,
        concurrency: int,
        max_in_flight: int,
        drain_timeout: float,
        ack_timeout: float,
        renew_every: float,
        send_acks: Callable[[Sequence[str]], Awaitable[None]],
        renew: Callable[[list[str]], Awaitable[int]],
        on_failure: Callable[[ItemT, Exception], Awaitable[None]],
        counts: PoolCounts,
        new_backoff: Callable[[], Backoff],
        left_behind: str,
    ) -> None:
        self.name = name
        self._logger = logger
        self._concurrency = concurrency
        self._drain_timeout = drain_timeout
        self._ack_timeout = ack_timeout
        self._renew_every = renew_every
        self._renew = renew
        self._on_failure = on_failure
        self._counts = counts
        self._new_backoff = new_backoff
        self._left_behind = left_behind
        self.window = CreditWindow(max_in_flight)
        self.acks = AckBatcher(send_acks, backoff=new_backoff(), name=name, logger=logger)
        # What this consumer holds, renewed every renew_every: items in the buffer and
        # items whose handler runs.
        self.buffered: set[str] = set()
        self.handling: set[str] = set()
        self.stopping = False
        self._max_in_flight = max_in_flight
        # The buffer: created by running(), closed when it ends.
        self._send: MemoryObjectSendStream[ItemT] | None = None
        self._receive: MemoryObjectReceiveStream[ItemT] | None = None

    def held(self) -> list[str]:
        """The ids held right now (buffered or being handled)."""
        return [*self.buffered, *self.handling]

    def dispatch(self, credits: Reservation, item: ItemT) -> bool:
        """Hand one delivered item to the handlers; False if it was left with the server
        (shutting down, held already, or no credit left for it)."""
        if self.stopping or self._send is None:
            # A read that completed just as shutdown began: the item stays with the
            # server (pending, leased) for the owner's recovery.
            return False
        item_id = item.id
        if item_id in self.buffered or item_id in self.handling:
            # Held here already (renewals lagged behind a paused event loop, say): never
            # hand it out a second time.
            return False
        if not credits.take():
            # More items than asked for: cannot happen with a server that honours
            # COUNT; the item stays with the server rather than overflow the buffer.
            self._logger.warning("%s: unrequested item %s", self.name, item_id)
            return False
        self.buffered.add(item_id)
        # Cannot block: the buffer has max_in_flight slots and every item in it holds
        # one of the window's max_in_flight credits.
        self._send.send_nowait(item)
        return True

    def items(self) -> AsyncIterator[ItemT]:
        """Iterate the buffer (no handler): each item is settled as it is taken."""
        return _PoolIterator(self)

    def _taken(self, item: ItemT) -> None:
        """``item`` left the buffer for the owner's user (no-handler mode)."""
        self.buffered.discard(item.id)
        self.window.settle()
        if item.deliveries > 1:
            self._counts.retried += 1

    @asynccontextmanager
    async def running(
        self,
        tg: TaskGroup,
        intake: Sequence[Callable[[], Coroutine[Any, Any, None]]],
        handler: Callable[[ItemT], Awaitable[object]] | None,
        on_stopped: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[None]:
        """Run the pool in ``tg`` (the owner's ``background`` task group) for the body.

        On the way out (normally, by an error or by cancellation), shielded: intake
        stops, handlers get ``drain_timeout`` to finish, acknowledgements are flushed
        (``ack_timeout``), then ``on_stopped`` runs (bounded by ``ack_timeout``), and
        only then does renewal stop.

        The stop runs in a task of ``tg`` (started with the pool, waiting for the body
        to end), not in the caller's task: asyncio's own ``Task.cancel()`` of the
        caller (a timeout, a server shutting down) goes through any shield the caller
        awaits in, but ``tg`` waits for its tasks on the way out whatever happens to the
        caller, so the stop always runs to its end.
        """
        send, receive = anyio.create_memory_object_stream[ItemT](self._max_in_flight)
        self._send, self._receive = send, receive
        workers_done = anyio.Event()
        # Shielded: cancelling the consumer must not interrupt running handlers or the
        # renewal of their items; the stop ends both itself.
        work_scope = anyio.CancelScope(shield=True)
        renew_scope = anyio.CancelScope(shield=True)
        intake_scope = anyio.CancelScope()
        stop = anyio.Event()
        stopped = anyio.Event()
        tg.start_soon(
            self._stop_when_asked,
            stop,
            stopped,
            (intake_scope, work_scope, renew_scope),
            (send, receive),
            workers_done,
            on_stopped,
        )
        tg.start_soon(self.acks.run)
        tg.start_soon(self._renew_loop, renew_scope)
        tg.start_soon(self._intake, intake_scope, intake)
        if handler is not None:
            tg.start_soon(self._work, handler, work_scope, workers_done)
        else:
            workers_done.set()
        try:
            yield
        finally:
            stop.set()
            with anyio.CancelScope(shield=True):
                await stopped.wait()

    async def _stop_when_asked(
        self,
        stop: anyio.Event,
        stopped: anyio.Event,
        scopes: tuple[anyio.CancelScope, anyio.CancelScope, anyio.CancelScope],
        buffer: tuple[MemoryObjectSendStream[ItemT], MemoryObjectReceiveStream[ItemT]],
        workers_done: anyio.Event,
        on_stopped: Callable[[], Awaitable[None]] | None,
    ) -> None:
        intake_scope, work_scope, renew_scope = scopes
        send, receive = buffer
        with anyio.CancelScope(shield=True):
            await stop.wait()
            try:
                await self._shutdown(intake_scope, work_scope, workers_done)
                if on_stopped is not None:
                    with anyio.move_on_after(self._ack_timeout):
                        await on_stopped()
            finally:
                renew_scope.cancel()
                send.close()
                receive.close()
                stopped.set()

    async def _intake(
        self, scope: anyio.CancelScope, loops: Sequence[Callable[[], Coroutine[Any, Any, None]]]
    ) -> None:
        with scope:
            async with anyio.create_task_group() as tg:
                for loop in loops:
                    tg.start_soon(loop)

    async def _shutdown(
        self,
        intake_scope: anyio.CancelScope,
        work_scope: anyio.CancelScope,
        workers_done: anyio.Event,
    ) -> None:
        # Order matters: stop taking new items, let running handlers end (their acks
        # join the queue), then flush the queue. Buffered items that no handler started
        # are no longer renewed: they stay with the server for the owner's recovery.
        self.stopping = True
        intake_scope.cancel()
        if self._send is not None:
            self._send.close()
        self.buffered.clear()
        with anyio.move_on_after(self._drain_timeout):
            await workers_done.wait()
        if not workers_done.is_set():
            self._logger.warning(
                "%s: handlers still running after drain_timeout=%ss; cancelling them, %s",
                self.name,
                self._drain_timeout,
                self._left_behind,
            )
            work_scope.cancel()
            with anyio.move_on_after(self._ack_timeout):
                await workers_done.wait()
        unsent = await self.acks.close(self._ack_timeout)
        if unsent:
            self._logger.warning(
                "%s: %d acknowledgements could not be sent; %s",
                self.name,
                unsent,
                self._left_behind,
            )

    async def _renew_loop(self, scope: anyio.CancelScope) -> None:
        # The lease renewal of held items: without it their lease would count from
        # delivery, and once it ran out the owner's recovery (this consumer's or
        # another's) would hand them out again while they wait here or run.
        period = max(self._renew_every, 0.01)
        backoff = self._new_backoff()
        with scope:
            while True:
                await anyio.sleep(period)
                while True:
                    try:
                        renewed = await self._renew(self.held())
                    except _TRANSIENT as exc:
                        self._logger.warning("%s: renewal failed, retrying: %s", self.name, exc)
                        await backoff.sleep()
                    else:
                        backoff.reset()
                        self._counts.refreshed += renewed
                        break

    async def _work(
        self,
        handler: Callable[[ItemT], Awaitable[object]],
        scope: anyio.CancelScope,
        done: anyio.Event,
    ) -> None:
        # Shielded: cancelling the consumer must not interrupt running handlers;
        # _shutdown cancels this scope itself once drain_timeout has passed.
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(self._concurrency):
                        tg.start_soon(self._worker, handler)
        finally:
            done.set()

    async def _worker(self, handler: Callable[[ItemT], Awaitable[object]]) -> None:
        counts = self._counts
        window = self.window
        buffered = self.buffered
        handling = self.handling
        receive = self._receive
        assert receive is not None
        add_ack = self.acks.add
        while True:
            # Take what is already buffered without a checkpoint per item (the buffer
            # is bounded, so this cannot starve the intake for long).
            try:
                item = receive.receive_nowait()
            except anyio.WouldBlock:
                try:
                    item = await receive.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            item_id = item.id
            buffered.discard(item_id)
            if self.stopping:
                window.settle()
                return
            handling.add(item_id)
            try:
                if item.deliveries > 1:
                    counts.retried += 1
                await handler(item)
            except Exception as exc:
                counts.failed += 1
                await self._on_failure(item, exc)
            else:
                counts.processed += 1
                add_ack((item_id,))
            finally:
                handling.discard(item_id)
                window.settle()


class _PoolIterator(Generic[ItemT]):
    """The iterator :meth:`WorkerPool.items` returns (not a generator: no aclose)."""

    __slots__ = ("_pool",)

    def __init__(self, pool: WorkerPool[ItemT]) -> None:
        self._pool = pool

    def __aiter__(self) -> _PoolIterator[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        pool = self._pool
        if pool.stopping or pool._receive is None:
            raise StopAsyncIteration
        try:
            item = await pool._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        pool._taken(item)
        if pool.stopping:
            # Shutdown began while this was being taken: it stays with the server.
            raise StopAsyncIteration
        return item
