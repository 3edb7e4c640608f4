"""What an ASGI glue does when Redis fails: one policy, shared by the rate-limit and the
session middlewares.

A glue asks Redis something per request (a rate-limit decision, a session load or
write-back) through :meth:`FailurePolicy.call`, which bounds the call by ``timeout`` and
turns a failure of Redis (unreachable, paused, the pool exhausted, an error reply, slower
than ``timeout``) into a :class:`Failure` carrying what ``on_error`` decided:
``"closed"`` (the glue answers 503 with ``Retry-After``) or ``"open"`` (the glue lets the
request through, degraded: unlimited, or without its session). Bad input or bad data
(:class:`~aioredispatterns.errors.ConfigurationError`,
:class:`~aioredispatterns.errors.SerializationError`) is a bug in the app or one
request's problem, not an outage: it is raised, and does not start a cooldown that would
degrade every other request.

:class:`Outage` is the failure state one glue shares between its calls: one warning when
calls start failing, one when they succeed again; and for ``error_cooldown`` seconds after
a failed call, calls skip Redis and go to ``on_error`` at once (a paused server would
otherwise cost every request the whole ``timeout``); the first call after that probes.

Cancellation: :meth:`FailurePolicy.call` adds no task and no state beyond the outage
counters; a caller cancelled from outside is cancelled (never turned into a failure).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Literal, TypeAlias, TypeVar

import anyio

from ._validate import check_count, check_seconds
from .errors import CommandTimeout, ConfigurationError, RedisPatternsError, SerializationError

__all__ = (
    "DEFAULT_ERROR_COOLDOWN",
    "DEFAULT_ERROR_RETRY_AFTER",
    "DEFAULT_TIMEOUT",
    "Failure",
    "FailurePolicy",
    "UNAVAILABLE_BODY",
    "OnError",
    "Outage",
    "check_on_error",
    "encode_headers",
    "refuse",
)

T = TypeVar("T")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
#: What to do when Redis fails: ``"closed"`` (503), ``"open"`` (degraded), or a callable
#: of the ASGI scope and the error deciding per request.
OnError: TypeAlias = (
    "Literal['open', 'closed'] | Callable[[Scope, RedisPatternsError], Literal['open', 'closed']]"
)

DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_ERROR_RETRY_AFTER: Final = 5
DEFAULT_ERROR_COOLDOWN: Final = 0.5

UNAVAILABLE_BODY: Final = b"Service Unavailable"


def check_on_error(on_error: object) -> OnError:
    """``on_error`` itself, checked: ``"open"``, ``"closed"`` or a callable."""
    if on_error in ("open", "closed") or callable(on_error):
        return on_error
    raise ConfigurationError(f"on_error must be 'open', 'closed' or a callable, got {on_error!r}")


class Outage:
    """The failure state shared by one glue's calls (see the module docstring).

    ``subject`` names what fails in the log lines ("rate limiting"); ``degraded`` says
    what the requests of the outage got ("were not limited normally").
    """

    __slots__ = (
        "cooldown",
        "degraded",
        "error",
        "failures",
        "logger",
        "noted",
        "retry_at",
        "since",
        "subject",
    )

    def __init__(
        self, cooldown: float, *, logger: logging.Logger, subject: str, degraded: str
    ) -> None:
        self.cooldown = check_seconds("error_cooldown", cooldown, zero=True)
        self.logger = logger
        self.subject = subject
        self.degraded = degraded
        self.since: float | None = None
        self.retry_at = 0.0
        self.error: RedisPatternsError | None = None
        self.failures = 0
        self.noted: set[str] = set()

    def cooling(self) -> RedisPatternsError | None:
        """The error of a call that failed less than ``cooldown`` seconds ago, else None."""
        if self.error is not None and anyio.current_time() < self.retry_at:
            return self.error
        return None

    def failed(self, error: RedisPatternsError, policy: str, *, asked: bool) -> None:
        """Count one failed request; ``asked``: Redis itself failed just now (not a call
        skipped in the cooldown). Logs when this starts an outage."""
        self.failures += 1
        now = anyio.current_time()
        if asked:
            self.retry_at = now + self.cooldown
            self.error = error
        if self.since is None:
            self.since = now
            self.logger.warning(
                "%s is failing (%s: %s): on_error decides every request until "
                "Redis answers again (this one: fail %s)",
                self.subject,
                type(error).__name__,
                error,
                policy,
            )

    def recovered(self) -> None:
        """A call succeeded: ends the outage (and logs it) if there was one."""
        if self.since is not None:
            self.logger.warning(
                "%s recovered after %.1f s; %d requests %s",
                self.subject,
                anyio.current_time() - self.since,
                self.failures,
                self.degraded,
            )
            self.since = None
            self.error = None
            self.failures = 0
            self.noted.clear()

    def note(self, what: str, message: str, *args: object) -> None:
        """Log ``message`` once per outage for ``what`` (a warning)."""
        if what not in self.noted:
            self.noted.add(what)
            self.logger.warning(message, *args)


class Failure:
    """Redis failed (or the call was skipped in the cooldown) and ``on_error`` decided.

    Attributes:
        error: what failed (for a call skipped in the cooldown: the failure before it).
        policy: ``"open"`` or ``"closed"``.
        retry_after: the ``Retry-After`` seconds of a 503.
    """

    __slots__ = ("error", "policy", "retry_after")

    def __init__(
        self, error: RedisPatternsError, policy: Literal["open", "closed"], retry_after: int
    ) -> None:
        self.error = error
        self.policy = policy
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """The headers of the 503: ``Retry-After``."""
        return {"Retry-After": str(self.retry_after)}


class FailurePolicy:
    """``on_error``, ``timeout`` and ``error_retry_after`` of a glue, with its outage."""

    __slots__ = ("error_retry_after", "on_error", "outage", "timeout")

    def __init__(
        self,
        *,
        on_error: OnError,
        timeout: float | None,
        error_retry_after: int,
        outage: Outage,
    ) -> None:
        self.on_error = check_on_error(on_error)
        self.timeout = None if timeout is None else check_seconds("timeout", timeout)
        self.error_retry_after = check_count("error_retry_after", error_retry_after, minimum=1)
        self.outage = outage

    async def call(
        self, scope: Scope, what: str, operation: Callable[[], Awaitable[T]]
    ) -> T | Failure:
        """``await operation()`` within ``timeout``; a :class:`Failure` if Redis failed.

        In the cooldown after a failure, ``operation`` is not called at all. ``what``
        names the call in the :class:`~aioredispatterns.errors.CommandTimeout` of a call
        that took too long ("a rate-limit decision").

        Raises:
            ConfigurationError, SerializationError: not an outage (see the module).
        """
        outage = self.outage
        recent = outage.cooling()
        if recent is not None:
            # Redis failed moments ago: do not make this request wait for it again.
            return self.failed(scope, recent, asked=False)
        try:
            if self.timeout is None:
                result = await operation()
            else:
                with anyio.move_on_after(self.timeout) as deadline:
                    result = await operation()
                if deadline.cancelled_caught:
                    raise CommandTimeout(f"no {what} within {self.timeout:g}s")
        except (ConfigurationError, SerializationError):
            raise  # the app's own mistake or one request's bad data, not an outage
        except RedisPatternsError as error:
            return self.failed(scope, error, asked=True)
        if outage.since is not None:
            outage.recovered()
        return result

    def failed(self, scope: Scope, error: RedisPatternsError, *, asked: bool) -> Failure:
        """Ask ``on_error`` about ``error`` and record the failed request."""
        on_error = self.on_error
        policy = on_error if isinstance(on_error, str) else on_error(scope, error)
        self.outage.failed(error, policy, asked=asked)
        return Failure(error, policy, self.error_retry_after)


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI wants them: lower-case names, bytes."""
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Answer an HTTP request or a WebSocket handshake with ``status`` and a text body.

    A WebSocket handshake gets it as an HTTP response where the server supports the
    ``websocket.http.response`` extension (uvicorn does), else a close with code 1008
    (policy violation) for a 429 and 1013 (try again later) otherwise.
    """
    head = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})
        return
    # A WebSocket handshake: read the connect event first, as the protocol expects.
    await receive()
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": head})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        code = 1008 if status == 429 else 1013
        await send({"type": "websocket.close", "code": code, "reason": body.decode()})
