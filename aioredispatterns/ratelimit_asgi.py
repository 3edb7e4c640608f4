"""Rate limiting for ASGI apps (Starlette, FastAPI): a middleware, a decorator, a dependency.

Install with ``pip install 'aioredispatterns[asgi]'``. The middleware is plain ASGI and
needs nothing else; the endpoint decorator and the FastAPI dependency import Starlette
when they are built.

Denied requests get ``429 Too Many Requests`` with ``Retry-After`` (whole seconds,
rounded up); every limited response carries ``RateLimit-Limit``, ``RateLimit-Remaining``
and ``RateLimit-Reset`` (seconds until the quota is full again, rounded up) of the
binding limit.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias

from .ratelimit import RateLimitDecision, RateLimiter

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = (
    "RateLimitMiddleware",
    "bounded_identity",
    "client_address",
    "rate_limit_dependency",
    "rate_limit_headers",
    "rate_limited",
)

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
KeyFunc: TypeAlias = Callable[[Scope], "str | None"]


def client_address(scope: Scope) -> str | None:
    """The default identity: the client's host as the server saw it (None: not limited)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def rate_limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    """The ``RateLimit-*`` (and, when denied, ``Retry-After``) headers of a decision."""
    headers = {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(math.ceil(decision.reset_after)),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers


def bounded_identity(limiter: RateLimiter, identity: str | bytes) -> str | bytes:
    """``identity``, or its SHA-256 when it is too long (or not valid UTF-8) to be one.

    An identity taken from the request (a header, an API key) is client-controlled and
    can be any size; the limiter refuses one above ``max_identity_bytes`` with an error,
    which would turn an abusive request into a server error instead of a limited one.
    Not a coroutine (a hash at most): nothing to cancel, nothing sent.
    """
    if isinstance(identity, str):
        try:
            raw = identity.encode()
        except UnicodeEncodeError:
            raw = identity.encode("utf-8", "surrogatepass")
        else:
            if len(raw) <= limiter.max_identity_bytes:
                return identity
    elif isinstance(identity, bytes):
        if len(identity) <= limiter.max_identity_bytes:
            return identity
        raw = identity
    else:
        return identity  # not ours to fix: the limiter raises its typed error
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class RateLimitMiddleware:
    """ASGI middleware: one hit per HTTP request, 429 when the limiter denies it.

    Args:
        app: the wrapped ASGI app.
        limiter: the :class:`~aioredispatterns.ratelimit.RateLimiter` to ask.
        key: maps the ASGI scope to an identity; ``None`` lets the request through
            unlimited (default: the client address).
        cost: units per request.

    Errors from Redis propagate (the request fails with 500 under most servers): fail
    closed. Wrap ``key`` to return None on your own conditions to exempt requests.

    Cancellation: a client disconnect that cancels the request before the script runs
    consumes nothing; after it ran, the unit stays consumed.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        *,
        key: KeyFunc = client_address,
        cost: int = 1,
    ) -> None:
        limiter._check_cost(cost)
        self.app = app
        self.limiter = limiter
        self.key = key
        self.cost = cost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identity = self.key(scope)
        if identity is None:
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.hit(bounded_identity(self.limiter, identity), self.cost)
        extra = [(k.lower().encode(), v.encode()) for k, v in rate_limit_headers(decision).items()]
        if not decision.allowed:
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", b"17"),
                        *extra,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"Too Many Requests"})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _too_many(decision: RateLimitDecision) -> Response:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(
        "Too Many Requests", status_code=429, headers=rate_limit_headers(decision)
    )


def rate_limited(
    limiter: RateLimiter, *, key: KeyFunc = client_address, cost: int = 1
) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
    """Decorate one Starlette endpoint ``async def endpoint(request) -> Response``.

    Denied requests get a 429 response without calling the endpoint; allowed ones get
    the ``RateLimit-*`` headers added to the endpoint's response.
    """

    def decorate(
        endpoint: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            identity = key(request.scope)
            if identity is None:
                return await endpoint(request)
            decision = await limiter.hit(bounded_identity(limiter, identity), cost)
            if not decision.allowed:
                return _too_many(decision)
            response = await endpoint(request)
            response.headers.update(rate_limit_headers(decision))
            return response

        return wrapper

    return decorate


def rate_limit_dependency(
    limiter: RateLimiter, *, key: KeyFunc = client_address, cost: int = 1
) -> Callable[..., Awaitable[RateLimitDecision | None]]:
    """A FastAPI dependency: ``Depends(rate_limit_dependency(limiter))`` on an endpoint.

    Raises Starlette's ``HTTPException(429)`` with the headers when denied (FastAPI turns
    it into the response); returns the decision (None when ``key`` exempts the request).
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as RuntimeRequest

    async def dependency(request: RuntimeRequest) -> RateLimitDecision | None:
        identity = key(request.scope)
        if identity is None:
            return None
        decision = await limiter.hit(bounded_identity(limiter, identity), cost)
        if not decision.allowed:
            raise HTTPException(429, "Too Many Requests", headers=rate_limit_headers(decision))
        return decision

    # FastAPI reads the annotation to inject the request; make it the class itself.
    dependency.__annotations__ = {"request": RuntimeRequest, "return": RateLimitDecision | None}
    return dependency
