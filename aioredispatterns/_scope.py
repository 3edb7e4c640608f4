"""The ``async with`` contract every primitive keeps: what comes out is what happened.

A primitive that runs background work (a cache's loads, a subscription's reader, a
consumer group's workers) owns a task group for it. Yielding to the user's body inside a
bare task group wraps whatever the body raises in an ``ExceptionGroup``, so ``except
KeyError:`` around ``async with`` would never match. :func:`background` is that task
group with the contract applied at its exit:

* the body's own exception comes out as itself (and wins over a background failure);
* a background task's failure comes out as one :class:`RedisPatternsError` (the library's
  own error as is; anything else wrapped in one, kept as ``__cause__``);
* cancellation comes out as cancellation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup

from .errors import RedisPatternsError

__all__ = ("background", "one_error")


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in error.exceptions:
            found += _leaves(inner)
        return found
    return [error]


def one_error(group: BaseExceptionGroup[BaseException], what: str) -> BaseException:
    """The one exception to raise for a task group's failure ``group``.

    Cancellations inside the group are ignored when a real failure is there; an
    interpreter-level exception (KeyboardInterrupt, SystemExit) wins over the rest.
    """
    leaves = _leaves(group)
    cancelled = anyio.get_cancelled_exc_class()
    for leaf in leaves:
        if not isinstance(leaf, Exception | cancelled):
            return leaf
    failures = [leaf for leaf in leaves if not isinstance(leaf, cancelled)]
    if not failures:
        return leaves[0]
    first = failures[0]
    if isinstance(first, RedisPatternsError):
        return first
    error = RedisPatternsError(f"{what}: background task failed: {first!r}")
    error.__cause__ = first
    return error


@asynccontextmanager
async def background(what: str) -> AsyncIterator[TaskGroup]:
    """A task group for background work around a user's ``async with`` body.

    Leaving it (normally, by an exception or by cancellation) cancels the background
    tasks and waits for them; then the body's exception, one library error, or the
    cancellation is raised, never an ``ExceptionGroup``. ``what`` names the primitive
    in the message of a wrapped background failure.
    """
    body_error: Exception | None = None
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            try:
                yield tg
            except Exception as exc:
                # Re-raised below, outside the task group (which would wrap it).
                body_error = exc
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = one_error(group, what)
    # Raised outside the except clause, so neither error gets the group as its context.
    if body_error is not None:
        raise body_error
    if failure is not None:
        raise failure
