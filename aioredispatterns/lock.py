"""A lock with fencing tokens, self-renewing leases that cancel lost work, push wake-ups.

::

    async with Lock(redis, "nightly-report", ttl=10, cancel_on_loss=True) as lease:
        await fenced_set(redis, "report", data, lease.token)   # rejected if stale

What it guarantees, and what it does not:

* **Mutual exclusion while the lease is valid.** Acquire is one atomic script: ``SET owner
  NX PX ttl`` and, on success, the fencing token. Nobody else can take the lock until the
  owner releases it (compare-and-delete) or its TTL runs out.
* **Fencing tokens** strictly increase per lock name across all clients and survive lock
  expiry. A lease can still be lost without its holder noticing in time (a GC or VM pause,
  a failover that drops the last write): the token is what lets the *resource* reject the
  stale holder's late write. Use :func:`fenced_set` for a value in Redis, or the SQL recipe
  in its docstring.
* **Leases renew themselves** every ``ttl / 3`` while held with ``async with``; when renewal
  fails (the key expired and someone else took it, the server stayed unreachable until
  the TTL ran out, or it refused the renewal with an error such as ``NOPERM`` or
  ``WRONGTYPE``, which is logged once at WARNING on ``aioredispatterns.lock``)
  ``lease.lost`` is set at once, and with ``cancel_on_loss=True`` the body is cancelled
  and :class:`LockLost` raised. Only connection errors and timeouts are retried (with
  backoff, never past the lease's validity).
* **Waiters do not poll.** A release pushes one wake-up onto a per-lock list; waiters block
  on it with ``BLPOP`` (served longest-waiting first, so hand-offs are roughly FIFO), with a
  fallback bounded by the holder's remaining TTL (a crashed holder never releases).
  "Roughly": a client that releases and at once acquires again, or a newcomer, can beat
  the woken waiter to the key; that waiter then queues again behind the others.

Where the fencing counter lives
-------------------------------
The counter is a key next to the lock (same hash slot) with a long TTL (``fence_ttl``,
7 days by default) refreshed on every acquire. A plain counter that expires, is flushed,
or was not replicated before a failover would restart lower, and a fenced resource would
then reject every later holder (or, where it had forgotten too, accept writes out of
order). So the acquire script raises each token to at least the server's clock in
microseconds: ``token = max(counter + 1, TIME in µs)``. The counter keeps tokens strictly
increasing on one server even if its clock steps back; the clock floor keeps them
increasing across a lost counter as long as server clocks agree better than the time
between two acquisitions of the lock. Tokens are therefore large (about ``1.7e15``), but
below ``2**53``: they fit a SQL ``BIGINT``, a JSON number and a Lua double exactly.
:func:`fenced_set` accepts any token in ``[0, 2**64 - 1]`` (a database sequence, an
unsigned 64-bit counter) and compares it exactly on the server, as a decimal string.
Set ``fence_ttl=None`` to keep the counter forever (one small key per lock name).

Redis is not a consensus system: a failover can hand the lock to two clients at once (the
test suite shows it). Use the token wherever a double run would hurt.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import anyio

from ._backoff import Backoff
from ._capabilities import server_info
from ._commands import Arg, execute, execute_blocking
from ._connection import AnyRedis, check_client, is_cluster
from ._keys import DEFAULT_PREFIX, KeySpace, KeyT, keyspace
from ._scripts import Script
from ._validate import check_count, check_flag, check_seconds
from .errors import (
    ClusterUnavailable,
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    RedisPatternsError,
)

__all__ = (
    "FencedValue",
    "Lease",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "LockStats",
    "fenced_get",
    "fenced_set",
)

_ACQUIRE = Script.load("lock_acquire")
_EXTEND = Script.load("lock_extend")
_RELEASE = Script.load("lock_release")
_FENCED_SET = Script.load("fenced_set")

#: How long the fencing counter lives after the last acquire, by default.
DEFAULT_FENCE_TTL: Final = 7 * 24 * 3600.0
# Cleanup (release after the body, undo of a cancelled acquire) never waits longer.
_CLEANUP_TIMEOUT: Final = 2.0
# Backoff between renewal attempts after a connection error or timeout: the cap is
# also kept under a sixth of the TTL, so several attempts fit in the lease's validity.
_RENEW_BACKOFF_BASE: Final = 0.05
_RENEW_BACKOFF_CAP: Final = 1.0
# A cluster client reads a BLPOP reply within its socket timeout: keep blocks shorter.
_CLUSTER_MAX_BLOCK: Final = 2.0
# How long past its own deadline a waiter lets the server answer a BLPOP.
_WAIT_SLACK: Final = 0.01

_log = logging.getLogger("aioredispatterns.lock")


class LockError(RedisPatternsError):
    """Base of the errors of :class:`Lock`, :class:`~aioredispatterns.Redlock` and
    :class:`~aioredispatterns.Semaphore`."""


class LockNotAcquired(LockError, TimeoutError):
    """The lock was not acquired: held by someone else (``blocking=False``) or not freed
    within ``timeout``. Nothing is left behind in Redis."""


class LockNotOwned(LockError):
    """The lease is no longer held: released already, expired, or taken by someone else.

    Raised by :meth:`Lease.release` and :meth:`Lease.extend`; nothing was changed in Redis.
    """


class LockLost(LockNotOwned):
    """The lease was lost while its ``async with`` body ran.

    Raised when the body ends (or, with ``cancel_on_loss=True``, is cancelled) after
    renewal failed: the key expired and someone else may have taken it, so the body's
    effects were not protected throughout. Writes guarded by the fencing token are safe.
    """


def _seconds(name: str, value: object, *, allow_none: bool = False, minimum: float = 0.0) -> None:
    if value is None and allow_none:
        return
    # At most ten years (_validate.MAX_SECONDS): TTLs become milliseconds on the server.
    check_seconds(name, value, zero=minimum == 0, minimum=minimum or None)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _fence_ms(fence_ttl: float | None) -> int:
    return 0 if fence_ttl is None else _ms(fence_ttl)


def _new_owner() -> str:
    # Unique per acquisition (not per Lock object, task or thread), so a lease can only
    # ever be released or extended by the acquisition that created it.
    return os.urandom(16).hex()


class Lease:
    """One acquisition of a lock or semaphore slot.

    Attributes:
        name: the lock's name.
        owner: the owner id stored in Redis, unique to this acquisition.
        token: the fencing token, strictly increasing per lock name; pass it to
            :func:`fenced_set` (or your database) with every protected write.
        lost: set as soon as the lease is known to be lost (renewal failed).

    Cancellation: a lease is released (shielded, bounded) when the ``async with`` that
    holds it ends, cancelled or not; a lease that is never released expires with its TTL.
    """

    __slots__ = ("_manager", "_released", "_valid_until", "lost", "name", "owner", "token")

    name: str
    owner: str
    token: int
    lost: anyio.Event

    def __init__(self, manager: _LeaseManager, owner: str, token: int, valid_until: float) -> None:
        self._manager = manager
        self._released = False
        self._valid_until = valid_until
        self.name = manager.name
        self.owner = owner
        self.token = token
        self.lost = anyio.Event()

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self.lost.is_set() else "held"
        return f"<Lease {self.name!r} token={self.token} {state}>"

    @property
    def remaining(self) -> float:
        """Seconds the lease is known to be valid for (0 once released or lost).

        Measured on this process's monotonic clock from the moment the last acquire or
        renewal was *sent*, minus a clock-drift margin, so it errs on the short side.
        """
        if self._released or self.lost.is_set():
            return 0.0
        return max(0.0, self._valid_until - anyio.current_time())

    @property
    def held(self) -> bool:
        """True while the lease has been neither released nor lost and has not run out."""
        return self.remaining > 0

    async def extend(self) -> None:
        """Reset the lease's TTL to the lock's full ``ttl`` now.

        ``async with`` does this by itself every ``ttl / 3``; call it yourself only for a
        lease from :meth:`Lock.acquire`.

        Raises:
            LockNotOwned: the lease was released, expired or taken (``lost`` is then set).
            ConnectionFailed, CommandTimeout: the server could not be reached; the lease
                may still be valid until :attr:`remaining` runs out.

        Cancellation: the extension may or may not have happened; the lease stays as valid
        as it was before the call.
        """
        if self._released:
            raise LockNotOwned(f"lease on {self.name!r} was already released")
        sent = anyio.current_time()
        if not await self._manager._extend(self.owner):
            self._mark_lost()
            raise LockNotOwned(f"lease on {self.name!r} (token {self.token}) is no longer held")
        self._valid_until = sent + self._manager._validity

    async def release(self) -> None:
        """Release the lease by compare-and-delete, waking one waiter.

        Raises:
            LockNotOwned: the lease was already released, or expired (and was perhaps taken
                by someone else): nothing was deleted.
            ConnectionFailed, CommandTimeout: the server could not be reached; the key
                expires on its own at the end of its TTL.

        Cancellation: the release may or may not have reached the server; if it did not,
        the key expires at the end of its TTL.
        """
        if self._released:
            raise LockNotOwned(f"lease on {self.name!r} was already released")
        released = await self._manager._release(self.owner)
        self._released = True
        if released:
            self._manager._counts.released += 1
        if not released:
            self._mark_lost()
            raise LockNotOwned(f"lease on {self.name!r} (token {self.token}) had expired")

    def _mark_lost(self) -> None:
        self._valid_until = 0.0
        if not self.lost.is_set():
            self._manager._counts.lost += 1
            self.lost.set()


@dataclass(slots=True)
class LockStats:
    """Counters of one :class:`Lock`, :class:`~aioredispatterns.Semaphore` or
    :class:`~aioredispatterns.Redlock` object in this process (``.stats`` is a copy).

    A plain snapshot in memory: reading it sends nothing, so nothing to cancel.

    Attributes:
        acquired: leases granted.
        not_acquired: acquires that gave up (:class:`LockNotAcquired`).
        waits: times an acquire waited for a release (or the holder's TTL).
        renewals: successful lease renewals.
        lost: leases found lost (renewal failed, or expired before release).
        released: leases released while still held.
    """

    acquired: int = 0
    not_acquired: int = 0
    waits: int = 0
    renewals: int = 0
    lost: int = 0
    released: int = 0


class _LeaseManager(abc.ABC):
    """What Lock, Redlock and Semaphore share: acquire loop, renewal, ``async with``."""

    name: str
    _ttl: float
    _timeout: float | None
    _cancel_on_loss: bool
    # The bound of the shielded cleanup (release after the body, undo of a cancelled
    # acquire); Redlock raises it to its release_timeout.
    _cleanup_timeout: float = _CLEANUP_TIMEOUT

    def _setup(
        self,
        name: str,
        ttl: float,
        timeout: float | None,
        cancel_on_loss: bool,
        fence_ttl: float | None,
    ) -> None:
        """Validate and keep the settings every lease manager shares (no command sent)."""
        _seconds("ttl", ttl, minimum=0.01)
        _seconds("timeout", timeout, allow_none=True)
        _seconds("fence_ttl", fence_ttl, allow_none=True, minimum=1.0)
        self.name = name
        self._ttl = float(ttl)
        self._ttl_ms = _ms(self._ttl)
        self._fence_ms = _fence_ms(fence_ttl)
        self._timeout = timeout
        self._cancel_on_loss = check_flag("cancel_on_loss", cancel_on_loss)
        self._entered: dict[int, AbstractAsyncContextManager[Lease] | None] = {}
        self._counts = LockStats()

    @property
    def ttl(self) -> float:
        """The lease TTL in seconds."""
        return self._ttl

    @property
    def stats(self) -> LockStats:
        """A snapshot of this object's counters (this process only)."""
        return dataclasses.replace(self._counts)

    @property
    def _validity(self) -> float:
        # What a holder may count on after sending an acquire or renewal: the TTL minus
        # a margin for clock drift between this process and the server.
        return self._ttl - (self._ttl * 0.01 + 0.002)

    async def _prepare(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Work an acquire attempt needs done before its timed part (none by default)."""

    def _refusal(self) -> str:
        """Why the last attempt failed, for the LockNotAcquired message."""
        return "is held by someone else"

    @abc.abstractmethod
    async def _try_acquire(self, owner: str) -> tuple[int | None, float]:
        """One attempt: ``(token, 0)`` when taken, ``(None, seconds to wait at most)``."""

    @abc.abstractmethod
    async def _extend(self, owner: str) -> bool:
        """Reset the TTL if still held; raise ConnectionFailed/CommandTimeout if unknown."""

    @abc.abstractmethod
    async def _release(self, owner: str) -> bool:
        """Compare-and-delete; True if it was still held."""

    @abc.abstractmethod
    async def _wait(self, hint: float, remaining: float | None) -> None:
        """Wait for a wake-up, at most ``hint`` and ``remaining`` seconds."""

    # ``timeout`` (not a cancel scope around the call) because the wait loop needs the
    # deadline to bound each blocking wait, and a cancel scope would cut a BLPOP that
    # may already have consumed a wake-up meant for the next waiter.
    async def acquire(
        self,
        *,
        blocking: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Lease:
        """Acquire and return a :class:`Lease` that does *not* renew itself.

        Prefer ``async with lock as lease`` (or :meth:`hold`), which renews the lease and
        releases it. A lease from here lives for ``ttl`` unless you call
        :meth:`Lease.extend`, and must be released with :meth:`Lease.release`.

        Args:
            blocking: wait for the lock (False: one attempt).
            timeout: seconds to wait at most (None: forever).

        Raises:
            LockNotAcquired: not acquired (held elsewhere, or ``timeout`` passed).
            ConfigurationError: ``timeout`` is negative or not a number.

        Cancellation: a cancelled acquire leaves no key behind: if the acquire may have
        reached the server, the owner id is compare-and-deleted (shielded, bounded).
        """
        _seconds("timeout", timeout, allow_none=True)
        check_flag("blocking", blocking)
        deadline = None if timeout is None else anyio.current_time() + timeout
        owner = _new_owner()
        while True:
            # Outside the lease's clock: nothing has been sent for this owner yet.
            await self._prepare()
            sent = anyio.current_time()
            try:
                token, hint = await self._try_acquire(owner)
            except ClusterUnavailable:
                raise  # the cluster refused the script: it did not run, nothing to undo
            except BaseException:
                # The script may have run and only its reply been lost: undo it so a
                # cancelled or failed acquire never holds the lock until the TTL.
                with anyio.move_on_after(self._cleanup_timeout, shield=True):
                    # Unreachable: the key (if any) expires at the end of its TTL.
                    with contextlib.suppress(RedisPatternsError):
                        await self._release(owner)
                raise
            if token is not None:
                self._counts.acquired += 1
                return Lease(self, owner, token, sent + self._validity)
            remaining = None if deadline is None else deadline - anyio.current_time()
            if not blocking or (remaining is not None and remaining <= 0):
                self._counts.not_acquired += 1
                raise LockNotAcquired(f"lock {self.name!r} {self._refusal()}")
            self._counts.waits += 1
            await self._wait(hint, remaining)

    def hold(
        self, *, blocking: bool = True, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Lease]:
        """Acquire, keep the lease renewed while the body runs, then release it.

        ``async with lock as lease`` is ``async with lock.hold(timeout=lock.timeout)``.

        Raises:
            LockNotAcquired: not acquired in time.
            LockLost: the lease was lost while the body ran (renewal failed). With
                ``cancel_on_loss=True`` the body is cancelled at once; otherwise it runs to
                its end and this is raised then. An exception of the body wins over it.
            ConnectionFailed, CommandTimeout: the release after a successful body could
                not reach the server (the key expires at the end of its TTL).

        Cancellation: cancelling the caller cancels the body; the lease is then released
        (shielded, bounded by 2 s), so no key outlives the body by more than its TTL.
        """
        return self._hold(blocking, timeout)

    @asynccontextmanager
    async def _hold(
        self,
        blocking: bool,
        timeout: float | None,  # noqa: ASYNC109
    ) -> AsyncIterator[Lease]:
        lease = await self.acquire(blocking=blocking, timeout=timeout)
        body_scope = anyio.CancelScope()
        body_error: Exception | None = None
        release_error: RedisPatternsError | None = None
        try:
            async with anyio.create_task_group() as tg:
                # The renewal task is started by a timer at the first renewal: most bodies
                # end sooner, and spawning and cancelling a task per hold would cost more
                # than the lock's two round trips.
                renewing = False

                def start_renewing() -> None:
                    nonlocal renewing
                    renewing = True
                    tg.start_soon(self._keep_alive, lease, body_scope)

                timer = asyncio.get_running_loop().call_later(self._ttl / 3, start_renewing)
                try:
                    with body_scope:
                        yield lease
                except Exception as exc:
                    # Re-raised below, outside the task group (which would wrap it in
                    # an ExceptionGroup).
                    body_error = exc
                finally:
                    timer.cancel()
                    if renewing:  # cancelling an empty task group would cost a yield
                        tg.cancel_scope.cancel()
        finally:
            if not lease._released:
                with anyio.move_on_after(self._cleanup_timeout, shield=True):
                    try:
                        await lease.release()
                    except RedisPatternsError as exc:
                        release_error = exc
        if body_error is not None:
            raise body_error
        if lease.lost.is_set() or isinstance(release_error, LockNotOwned):
            raise LockLost(
                f"lease on {self.name!r} (token {lease.token}) was lost while held"
            ) from release_error
        if release_error is not None:
            raise release_error

    async def _keep_alive(self, lease: Lease, body_scope: anyio.CancelScope) -> None:
        # Started ttl/3 after the acquisition: renew now, then every ttl/3.
        while not lease._released:
            if not await self._renew(lease):
                if not lease.lost.is_set():
                    _log.warning(
                        "lease on %r (token %d) lost: it could not be renewed in time%s",
                        self.name,
                        lease.token,
                        "; cancelling the body" if self._cancel_on_loss else "",
                    )
                lease._mark_lost()
                if self._cancel_on_loss:
                    body_scope.cancel()
                return
            await anyio.sleep(self._ttl / 3)

    async def _renew(self, lease: Lease) -> bool:
        # Retry through connection errors and timeouts (the lease may still be held),
        # but never past the moment the lease may have expired on the server: from then
        # on someone else may hold the lock. An error reply (NOPERM, WRONGTYPE, a
        # failing script) will not go away by itself: the lease cannot be renewed.
        backoff = Backoff(base=_RENEW_BACKOFF_BASE, cap=min(_RENEW_BACKOFF_CAP, self._ttl / 6))
        while not lease._released:
            remaining = lease._valid_until - anyio.current_time()
            if remaining <= 0:
                return False
            sent = anyio.current_time()
            with anyio.move_on_after(remaining):
                try:
                    owned = await self._extend(lease.owner)
                except (ConnectionFailed, CommandTimeout):
                    await backoff.sleep()
                    continue
                except RedisPatternsError as exc:
                    _log.warning(
                        "lease on %r (token %d) cannot be renewed, marked lost: %s",
                        self.name,
                        lease.token,
                        exc,
                    )
                    lease._mark_lost()  # logged here: _keep_alive does not log it again
                    return False
                if owned:
                    lease._valid_until = sent + self._validity
                    self._counts.renewals += 1
                return owned
        return True

    async def __aenter__(self) -> Lease:
        # Each task entering ``async with lock`` gets its own lease: the context manager
        # is kept per task, never on the Lock object (where another task could release it).
        task = anyio.get_current_task().id
        if task in self._entered:
            raise LockError(f"{self.name!r} is already held by this task (not reentrant)")
        self._entered[task] = None
        try:
            context = self.hold(timeout=self._timeout)
            lease = await context.__aenter__()
        except BaseException:
            del self._entered[task]
            raise
        self._entered[task] = context
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        context = self._entered.pop(anyio.get_current_task().id)
        assert context is not None
        return await context.__aexit__(exc_type, exc, tb)


async def _wait_for_wakeup(
    client: AnyRedis, wake_key: KeyT, hint: float, remaining: float | None, ttl: float
) -> None:
    # ``hint`` is the holder's remaining TTL: a crashed holder never pushes a wake-up,
    # so never block past the moment its key expires (-1: a key without TTL; poll at ttl).
    wait = hint if hint > 0 else (ttl if hint < 0 else 0.001)
    if remaining is not None:
        wait = min(wait, remaining)
    if is_cluster(client):
        wait = min(wait, _CLUSTER_MAX_BLOCK)
    wait = max(wait, 0.001)  # BLPOP 0 would block forever
    # The server times blocked commands out on its cron tick (up to 100 ms late at the
    # default hz), so the deadline is kept here. Cutting the BLPOP closes its connection;
    # should a wake-up land in that same instant it is lost, and the other waiters fall
    # back to the holder's TTL (a delay, never two holders).
    with anyio.move_on_after(wait + _WAIT_SLACK):
        await execute_blocking(client, "BLPOP", wake_key, f"{wait:.3f}", block=wait)


class Lock(_LeaseManager):
    """A Redis lock with fencing tokens, self-renewing leases and push wake-ups.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the lock's name; all its keys share one cluster hash slot.
        ttl: the lease TTL in seconds; ``async with`` renews it every ``ttl / 3``.
        timeout: how long ``async with lock`` waits (None: forever).
        cancel_on_loss: cancel the ``async with`` body as soon as the lease is lost.
        prefix: the key namespace.
        fence_ttl: how long the fencing counter outlives the last acquire (None: forever);
            see the module docstring for why its expiry is safe.

    One ``Lock`` object may be shared by many tasks: every ``async with`` and every
    :meth:`acquire` makes a new :class:`Lease` with its own owner id. It is not
    reentrant: a task entering it twice gets :class:`LockError`.

    Every blocked waiter holds one pooled connection (``BLPOP``): size the pool for the
    number of concurrent waiters.

    Keys: ``<prefix>:lock:{<name>}:owner`` (the holder, with the lease TTL),
    ``...:fence`` (the counter, ``fence_ttl``), ``...:wake`` (wake-ups, at most one
    element, with the lease TTL), ``...:waiting`` (set by a failed acquire so the release
    knows to push a wake-up; it lives as long as a waiter may block).

    Raises:
        ConfigurationError: an argument is out of range (before any command is sent).
        InvalidKeyError: ``name`` is empty or neither str nor bytes.
    """

    def __init__(
        self,
        client: AnyRedis,
        name: str,
        *,
        ttl: float = 10.0,
        timeout: float | None = None,
        cancel_on_loss: bool = False,
        prefix: str = DEFAULT_PREFIX,
        fence_ttl: float | None = DEFAULT_FENCE_TTL,
    ) -> None:
        self._client = check_client(client)
        keys: KeySpace = keyspace(prefix, "lock", name)
        self._setup(name, ttl, timeout, cancel_on_loss, fence_ttl)
        self._owner_key = keys.key("owner")
        self._fence_key = keys.key("fence")
        self._wake_key = keys.key("wake")
        self._waiting_key = keys.key("waiting")

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} ttl={self._ttl}>"

    async def locked(self) -> bool:
        """True if someone holds the lock right now (a snapshot, stale on return)."""
        return bool(await execute(self._client, "EXISTS", self._owner_key))

    async def _try_acquire(self, owner: str) -> tuple[int | None, float]:
        taken, value = await _ACQUIRE.run(
            self._client,
            [self._owner_key, self._fence_key, self._waiting_key],
            [owner, self._ttl_ms, self._fence_ms],
        )
        if taken:
            return int(value), 0.0
        return None, int(value) / 1000 if value >= 0 else -1.0

    async def _extend(self, owner: str) -> bool:
        info = await server_info(self._client)
        if info.set_ifeq:
            reply = await execute(
                self._client, "SET", self._owner_key, owner, "IFEQ", owner, "PX", self._ttl_ms
            )
            return bool(reply)
        return bool(await _EXTEND.run(self._client, [self._owner_key], [owner, self._ttl_ms]))

    async def _release(self, owner: str) -> bool:
        # Lua on every server (not DELIFEQ): the compare-and-delete and the wake-up push
        # must be one atomic step, or a waiter could sleep until the poll fallback.
        return bool(
            await _RELEASE.run(
                self._client,
                [self._owner_key, self._wake_key, self._waiting_key],
                [owner, self._ttl_ms],
            )
        )

    async def _wait(self, hint: float, remaining: float | None) -> None:
        await _wait_for_wakeup(self._client, self._wake_key, hint, remaining, self._ttl)


# ------------------------------------------------------------------ fencing on the resource


@dataclass(frozen=True, slots=True)
class FencedValue:
    """A value written by :func:`fenced_set` and the token of its writer."""

    value: bytes
    token: int


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _resource_key(resource: str, prefix: str) -> KeyT:
    return keyspace(prefix, "fenced", resource).key()


#: The largest token :func:`fenced_set` accepts: an unsigned 64-bit integer.
_MAX_TOKEN: Final = 2**64 - 1
# What every redis-py parser sends as is (not bytearray: hiredis refuses it; not bool:
# redis-py refuses it, and True stored as "1" would be a surprise anyway).
_VALUE_TYPES = (bytes, str, int, float)


def _check_token(token: object) -> int:
    return check_count("token", token, minimum=0, maximum=_MAX_TOKEN)


def _check_value(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, _VALUE_TYPES):
        raise ConfigurationError(
            f"value must be bytes, str, int or float, got {type(value).__name__}"
        )


async def fenced_set(
    client: AnyRedis,
    resource: str,
    value: Arg,
    token: int,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> bool:
    """Write ``value`` to ``resource`` unless a newer fencing token has written it.

    The check and the write are one Lua script, so a holder whose lease was lost (paused
    past its TTL, cut off by a failover) cannot overwrite the newer holder's value: its
    token is lower. Writes with an *equal* token are accepted (one holder writing twice).
    Tokens are compared exactly over the whole accepted range ``[0, 2**64 - 1]``: the
    script compares them as decimal strings, not as Lua numbers (doubles, which cannot
    tell ``2**64 - 1`` from ``2**64 - 2``). The tokens of :class:`Lock`,
    :class:`~aioredispatterns.Semaphore` and :class:`~aioredispatterns.Redlock` are
    below ``2**53``; larger ones come from elsewhere (an unsigned 64-bit sequence).

    The same rule for a SQL resource, with a ``fence BIGINT`` column next to the data::

        UPDATE jobs SET result = :result, fence = :token
         WHERE id = :id AND fence <= :token;     -- 0 rows updated: a newer holder wrote

    (``fence < :token`` if each holder writes once.) Insert the row first with
    ``fence = 0``, and treat "0 rows" as "stop: you no longer hold the lock".

    Args:
        resource: the resource's name (its key is ``<prefix>:fenced:{<resource>}``, a
            hash with fields ``value`` and ``token``, the token in decimal; it has no
            TTL).
        value: bytes, str, int or float, stored as is (a number as its decimal text).
        token: the writer's :attr:`Lease.token`: an int in ``[0, 2**64 - 1]``.

    Returns:
        True if written, False if rejected as stale.

    Raises:
        ConfigurationError: ``token`` is not an int in ``[0, 2**64 - 1]`` (a bool, a
            float, a negative or larger number), or ``value`` is none of the types
            above (``None`` included); before any command is sent.
        InvalidKeyError: ``resource`` is empty, not a str or bytes, or too long.
        ScriptError: the stored token is not a decimal integer (the hash was written by
            something else than this function).

    Cancellation: the write may or may not have happened; if it did, it was checked.
    """
    digits = str(int(_check_token(token)))  # the script compares this decimal text
    _check_value(value)
    key = _resource_key(resource, prefix)
    return bool(await _FENCED_SET.run(client, [key], [value, digits]))


async def fenced_get(
    client: AnyRedis, resource: str, *, prefix: str = DEFAULT_PREFIX
) -> FencedValue | None:
    """The value :func:`fenced_set` last accepted for ``resource`` and its token, or None.

    The token comes back as the int it was written as, exactly (any size).

    Raises:
        CommandError: the key holds a token ``fenced_set`` did not write.

    Cancellation: a read only; nothing to undo.
    """
    key = _resource_key(resource, prefix)
    value, token = await execute(client, "HMGET", key, "value", "token")
    if value is None or token is None:
        return None
    if not token.isdigit():
        # Written by something other than fenced_set (which stores plain decimals).
        raise CommandError(f"{_text(key)} holds a token that is not a decimal integer")
    return FencedValue(value=value, token=int(token))
