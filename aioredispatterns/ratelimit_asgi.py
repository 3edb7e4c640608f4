"""Rate limiting for ASGI apps (Starlette, FastAPI): a middleware, a decorator, a dependency.

Install with ``pip install 'aioredispatterns[asgi]'``. The middleware is plain ASGI and
needs nothing else; the endpoint decorator and the FastAPI dependency import Starlette
when they are built.

Denied requests get ``429 Too Many Requests`` with ``Retry-After`` (whole seconds,
rounded up); every limited response carries ``RateLimit-Limit``, ``RateLimit-Remaining``
and ``RateLimit-Reset`` (seconds until the quota is full again, rounded up) of the
binding limit.

**Lifespan.** Each of the three takes the limiter as a *provider* resolved per request:
the limiter itself, :func:`app_state` ``("limiter")`` (the lifespan state or
``app.state``), or a callable (with no argument, or the ASGI scope). So the client and
its limiters are made and closed in the app's lifespan, not at import.

**When Redis fails** (unreachable, paused, the pool exhausted, or slower than
``timeout``), ``on_error`` decides: ``"closed"`` (default) answers ``503 Service
Unavailable`` with ``Retry-After: error_retry_after``; ``"open"`` lets the request through
unlimited; a callable ``(scope, error) -> "open" | "closed"`` decides per request. For
``error_cooldown`` seconds after a failure, requests go to ``on_error`` without waiting
on Redis again; then one probes. One warning is logged when an outage starts and one when
decisions succeed again, not one per request (``aioredispatterns.ratelimit_asgi``
logger). Bad configuration (a provider
that finds nothing, a bad identity from your key function) is not an outage: it raises.

**Identities** come from a key function of the ASGI scope (``None``: not limited):
:func:`client_address` (the peer as the server saw it: see the proxy note there),
:func:`forwarded_client` (``X-Forwarded-For`` read through an explicit list of trusted
proxies), :func:`header_key`, :func:`api_key` (stored hashed) and
:func:`authenticated_user`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from ._asgi_outage import (
    DEFAULT_ERROR_COOLDOWN,
    DEFAULT_ERROR_RETRY_AFTER,
    DEFAULT_TIMEOUT,
    UNAVAILABLE_BODY,
    Failure,
    FailurePolicy,
    OnError,
    Outage,
    encode_headers,
    refuse,
)
from ._provider import AppState, Provider, app_state, resolver
from ._validate import check_count
from .errors import ConfigurationError
from .ratelimit import RateLimitDecision, RateLimiter

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = (
    "AppState",
    "OnError",
    "RateLimitMiddleware",
    "RouteLimit",
    "api_key",
    "app_state",
    "authenticated_user",
    "bounded_identity",
    "client_address",
    "forwarded_client",
    "header_key",
    "rate_limit_dependency",
    "rate_limit_headers",
    "rate_limited",
)

logger: logging.Logger = logging.getLogger("aioredispatterns.ratelimit_asgi")

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
KeyFunc: TypeAlias = Callable[[Scope], "str | None"]


def _outage(cooldown: float) -> Outage:
    return Outage(
        cooldown, logger=logger, subject="rate limiting", degraded="were not limited normally"
    )


# ----------------------------------------------------------------------- identities


def client_address(scope: Scope) -> str | None:
    """The default identity: the client's host as the server saw it (None: not limited).

    Proxy headers: this is ``scope["client"]``, which the *server* may already have
    rewritten. uvicorn does by default (``--proxy-headers`` on, trusting
    ``--forwarded-allow-ips``, which defaults to ``127.0.0.1``): behind a proxy on the same
    host every request is limited by its ``X-Forwarded-For``; reached directly, by its
    peer address. Other servers differ. To decide yourself, run uvicorn with
    ``--no-proxy-headers`` and use :func:`forwarded_client` with your proxies.

    A scope without ``client`` (some test clients, Unix sockets) gets None: not limited.
    """
    client = scope.get("client")
    return str(client[0]) if client else None


_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("["):  # "[::1]:8000"
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:  # "10.0.0.1:8000"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def forwarded_client(trusted_proxies: Iterable[str], *, fallback: KeyFunc | None = None) -> KeyFunc:
    """A key function: the client address read through your own list of trusted proxies.

    The peer (``scope["client"]``) is the identity unless it is a trusted proxy; then
    ``X-Forwarded-For`` is read from right to left (each trusted hop appended the address
    it saw) and the first address that is not a trusted proxy is the identity. A client
    can put anything at the left of the header, never at the right of what your proxies
    appended, so nothing it writes is believed.

    Args:
        trusted_proxies: addresses or networks (``"10.0.0.0/8"``, ``"::1"``) of your
            proxies. Empty: the peer address always (the header is ignored).
        fallback: the identity when the peer is unknown (no ``client`` in the scope);
            default None: not limited.

    Run uvicorn with ``--no-proxy-headers`` (or ``--forwarded-allow-ips`` naming the same
    proxies), or the server will have rewritten the peer before this sees it.

    Raises:
        ConfigurationError: a trusted proxy is not an address or network.
    """
    networks: list[_Network] = []
    for text in trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except (TypeError, ValueError):
            raise ConfigurationError(f"not an address or network: {text!r}") from None
    frozen = tuple(networks)

    def trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in network for network in frozen)

    def key(scope: Scope) -> str | None:
        client = scope.get("client")
        if not client:
            return fallback(scope) if fallback is not None else None
        peer = str(client[0])
        if not frozen or not trusted(_ip(peer)):
            return peer
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops += value.decode("latin-1").split(",")
        last = peer
        for hop in reversed(hops):
            address = _ip(hop)
            if address is None:
                # Only the client's own part of the header can be garbage: the address
                # the last trusted hop connected from is the best we know.
                return last
            if not trusted(address):
                return str(address)
            last = str(address)
        return last  # every hop was a proxy of ours

    return key


def _header(scope: Scope, name: bytes) -> str | None:
    for header, value in scope.get("headers", ()):
        if header == name:
            text: str = value.decode("latin-1").strip()
            return text or None
    return None


def header_key(
    name: str, *, fallback: KeyFunc | None = client_address, prefix: str = "header:"
) -> KeyFunc:
    """A key function: the value of request header ``name`` (first occurrence, stripped).

    A request without it (or with an empty one) is keyed by ``fallback`` (default: the
    client address, so omitting the header does not escape the limit; None: not limited).
    The identity is ``prefix + value``; a value too long for an identity is hashed
    (:func:`bounded_identity`). Store secrets with :func:`api_key` instead.
    """
    raw = name.lower().encode("latin-1")

    def key(scope: Scope) -> str | None:
        value = _header(scope, raw)
        if value is None:
            return fallback(scope) if fallback is not None else None
        return prefix + value

    return key


def api_key(header: str = "x-api-key", *, fallback: KeyFunc | None = client_address) -> KeyFunc:
    """A key function: an API key from ``header``, kept in Redis only as its SHA-256.

    With ``header="authorization"`` the ``Bearer`` scheme word is dropped. A request
    without a key is keyed by ``fallback`` (default: the client address; None: not
    limited). The identity is ``"key:" + sha256(key)[:32]`` (hex): a key name in Redis
    never reveals the secret.
    """
    raw = header.lower().encode("latin-1")

    def key(scope: Scope) -> str | None:
        value = _header(scope, raw)
        if value is not None and raw == b"authorization":
            scheme, _, token = value.partition(" ")
            value = token.strip() or None if scheme.lower() == "bearer" else value
        if value is None:
            return fallback(scope) if fallback is not None else None
        return "key:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    return key


def authenticated_user(
    *, attribute: str = "identity", fallback: KeyFunc | None = client_address
) -> KeyFunc:
    """A key function: the signed-in user, ``"user:" + str(user.<attribute>)``.

    The user is ``scope["user"]`` (Starlette's ``AuthenticationMiddleware``, which must
    then wrap the limiter: listed before it in ``middleware=[...]``), else
    ``request.state.user`` (``scope["state"]["user"]``, set by a middleware of yours that
    wraps the limiter, or by a dependency that runs before a limiting dependency). A user
    counts when it has no ``is_authenticated`` or it is true. Anyone else is keyed by
    ``fallback`` (default: the client address; None: not limited).
    """

    def key(scope: Scope) -> str | None:
        user = scope.get("user")
        if user is None:
            state = scope.get("state")
            user = state.get("user") if isinstance(state, Mapping) else None
        if user is not None and getattr(user, "is_authenticated", True):
            value = getattr(user, attribute, None)
            if value is not None and value != "":
                return f"user:{value}"
        return fallback(scope) if fallback is not None else None

    return key


# ----------------------------------------------------------------------- headers


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


def _raw_headers(decision: RateLimitDecision) -> list[tuple[bytes, bytes]]:
    reset = str(math.ceil(decision.reset_after)).encode()
    headers = [
        (b"ratelimit-limit", str(decision.limit).encode()),
        (b"ratelimit-remaining", str(decision.remaining).encode()),
        (b"ratelimit-reset", reset),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(max(1, math.ceil(decision.retry_after))).encode()))
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


# ----------------------------------------------------------------------- the decision


class _Guard:
    """One limiter provider with its key, cost and failure policy: decides one request."""

    __slots__ = ("_limiter", "cost", "key", "policy")

    def __init__(
        self,
        limiter: Provider[RateLimiter],
        *,
        key: KeyFunc,
        cost: int,
        on_error: OnError,
        timeout: float | None,
        error_retry_after: int,
        outage: Outage,
    ) -> None:
        if isinstance(limiter, RateLimiter):
            limiter._check_cost(cost)  # now, when the limiter is known; else per request
        else:
            check_count("cost", cost, minimum=1)
        if not callable(key):
            raise ConfigurationError("key must be a callable of the ASGI scope")
        self._limiter = resolver(limiter, RateLimiter, "limiter")
        self.key = key
        self.cost = cost
        self.policy = FailurePolicy(
            on_error=on_error, timeout=timeout, error_retry_after=error_retry_after, outage=outage
        )

    async def decide(self, scope: Scope) -> RateLimitDecision | Failure | None:
        """The decision, None (not limited, or failed open) or a Failure (closed)."""
        identity = self.key(scope)
        if identity is None:
            return None
        limiter = self._limiter(scope)
        outcome = await self.policy.call(
            scope,
            "rate-limit decision",
            lambda: limiter.hit(bounded_identity(limiter, identity), self.cost),
        )
        if isinstance(outcome, Failure) and outcome.policy == "open":
            return None
        return outcome


# ----------------------------------------------------------------------- middleware


@dataclass(frozen=True, slots=True)
class RouteLimit:
    """A path's own limit in :class:`RateLimitMiddleware` (or its exemption).

    Attributes:
        path: an exact path (``"/search"``) or a prefix ending in ``*`` (``"/api/*"``
            matches ``/api/`` and everything below it). The longest matching pattern wins;
            at equal length an exact path beats a prefix.
        limiter: a limiter provider (as the middleware's), or None: exempt, not limited.
        key, cost, on_error: this path's own (default: the middleware's).
    """

    path: str
    limiter: Provider[RateLimiter] | None
    key: KeyFunc | None = None
    cost: int | None = None
    on_error: OnError | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigurationError(f"a route path starts with '/', got {self.path!r}")
        if "*" in self.path[:-1]:
            raise ConfigurationError(f"'*' may only end a route path: {self.path!r}")


_TOO_MANY_BODY: Final = b"Too Many Requests"


class RateLimitMiddleware:
    """ASGI middleware: one hit per HTTP request and WebSocket handshake.

    Args:
        app: the wrapped ASGI app.
        limiter: the default limiter: a :class:`~aioredispatterns.RateLimiter`, or a
            provider of one resolved per request (:func:`app_state` ``("limiter")``, a
            callable), so the limiter can be made in the app's lifespan. None: only the
            paths of ``routes`` are limited.
        key: maps the ASGI scope to an identity; ``None`` lets the request through
            unlimited (default: :func:`client_address`).
        cost: units per request.
        routes: per-path limits and exemptions (:class:`RouteLimit`), matched on
            ``scope["path"]`` before the app routes the request.
        exempt: paths (or ``/prefix/*``) never limited, such as ``"/healthz"``.
        on_error: ``"closed"`` (default: 503 with ``Retry-After``), ``"open"`` (let the
            request through unlimited) or a callable ``(scope, error) -> "open" |
            "closed"``; when Redis fails or takes longer than ``timeout``.
        timeout: the most seconds one decision may take (``None``: the client's own
            socket timeout); past it, ``on_error`` decides.
        error_retry_after: the ``Retry-After`` seconds of a 503.
        error_cooldown: after a failed decision, for this many seconds, ``on_error``
            answers at once without asking Redis (so a paused server does not cost every
            request ``timeout``); then one request probes again. 0: always ask.
        websockets: limit WebSocket handshakes too (default True).

    Denied: ``429`` with ``Retry-After`` and the ``RateLimit-*`` headers. Allowed: the
    app's response gets the ``RateLimit-*`` headers. A denied or failed-closed WebSocket
    handshake gets the 429 / 503 as an HTTP response where the server supports the
    ``websocket.http.response`` extension (uvicorn does), else a close with code 1008
    (policy violation; 1013 for a failure), which the server turns into a 403.

    Cancellation: a client disconnect that cancels the request before the script runs
    consumes nothing; after it ran, the unit stays consumed.

    Raises:
        ConfigurationError: bad options (here), or a provider that found no limiter (per
            request: a bug in the app's wiring, not an outage).
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Provider[RateLimiter] | None = None,
        *,
        key: KeyFunc = client_address,
        cost: int = 1,
        routes: Sequence[RouteLimit] = (),
        exempt: Iterable[str] = (),
        on_error: OnError = "closed",
        timeout: float | None = DEFAULT_TIMEOUT,
        error_retry_after: int = DEFAULT_ERROR_RETRY_AFTER,
        error_cooldown: float = DEFAULT_ERROR_COOLDOWN,
        websockets: bool = True,
    ) -> None:
        self.app = app
        outage = self._outage = _outage(error_cooldown)

        def guard(
            limiter: Provider[RateLimiter], key: KeyFunc, cost: int, on_error: OnError
        ) -> _Guard:
            return _Guard(
                limiter,
                key=key,
                cost=cost,
                on_error=on_error,
                timeout=timeout,
                error_retry_after=error_retry_after,
                outage=outage,
            )

        if limiter is None and not routes:
            raise ConfigurationError("give a limiter, or routes with limiters of their own")
        self._default = None if limiter is None else guard(limiter, key, cost, on_error)
        rules: list[tuple[str, _Guard | None]] = []
        for route in (*routes, *(RouteLimit(path, None) for path in exempt)):
            if not isinstance(route, RouteLimit):
                raise ConfigurationError(f"routes takes RouteLimit items, got {route!r}")
            rules.append(
                (
                    route.path,
                    None
                    if route.limiter is None
                    else guard(
                        route.limiter,
                        route.key or key,
                        route.cost or cost,
                        route.on_error or on_error,
                    ),
                )
            )
        # Exemptions listed last win over a route of the same path.
        self._exact: dict[str, _Guard | None] = {p: g for p, g in rules if not p.endswith("*")}
        prefixes = {p[:-1]: g for p, g in rules if p.endswith("*")}
        self._prefixes = sorted(prefixes.items(), key=lambda item: -len(item[0]))
        self._types = ("http", "websocket") if websockets else ("http",)

    def _guard_for(self, path: str) -> _Guard | None:
        exact = self._exact
        if exact and path in exact:
            return exact[path]
        for prefix, guard in self._prefixes:
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return guard
        return self._default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in self._types:
            await self.app(scope, receive, send)
            return
        guard = self._guard_for(scope["path"])
        outcome = None if guard is None else await guard.decide(scope)
        if outcome is None:
            await self.app(scope, receive, send)
            return
        if isinstance(outcome, Failure):
            headers = encode_headers(outcome.headers())
            await refuse(scope, receive, send, 503, UNAVAILABLE_BODY, headers)
            return
        extra = _raw_headers(outcome)
        if not outcome.allowed:
            await refuse(scope, receive, send, 429, _TOO_MANY_BODY, extra)
            return
        start = "http.response.start" if kind == "http" else "websocket.accept"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == start:
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------- endpoints


def rate_limited(
    limiter: Provider[RateLimiter],
    *,
    key: KeyFunc = client_address,
    cost: int = 1,
    on_error: OnError = "closed",
    timeout: float | None = DEFAULT_TIMEOUT,
    error_retry_after: int = DEFAULT_ERROR_RETRY_AFTER,
    error_cooldown: float = DEFAULT_ERROR_COOLDOWN,
) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
    """Decorate one Starlette endpoint ``async def endpoint(request) -> Response``.

    Denied requests get a 429 response without calling the endpoint; allowed ones get
    the ``RateLimit-*`` headers added to the endpoint's response. ``limiter``, ``on_error``,
    ``timeout``, ``error_retry_after`` and ``error_cooldown`` as for
    :class:`RateLimitMiddleware` (a failure closed answers 503 with ``Retry-After``).
    """
    guard = _Guard(
        limiter,
        key=key,
        cost=cost,
        on_error=on_error,
        timeout=timeout,
        error_retry_after=error_retry_after,
        outage=_outage(error_cooldown),
    )

    def decorate(
        endpoint: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        from starlette.responses import PlainTextResponse

        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            outcome = await guard.decide(request.scope)
            if outcome is None:
                return await endpoint(request)
            if isinstance(outcome, Failure):
                return PlainTextResponse(
                    "Service Unavailable", status_code=503, headers=outcome.headers()
                )
            if not outcome.allowed:
                return PlainTextResponse(
                    "Too Many Requests", status_code=429, headers=rate_limit_headers(outcome)
                )
            response = await endpoint(request)
            response.headers.update(rate_limit_headers(outcome))
            return response

        return wrapper

    return decorate


def rate_limit_dependency(
    limiter: Provider[RateLimiter],
    *,
    key: KeyFunc = client_address,
    cost: int = 1,
    on_error: OnError = "closed",
    timeout: float | None = DEFAULT_TIMEOUT,
    error_retry_after: int = DEFAULT_ERROR_RETRY_AFTER,
    error_cooldown: float = DEFAULT_ERROR_COOLDOWN,
) -> Callable[..., Awaitable[RateLimitDecision | None]]:
    """A FastAPI dependency: ``Depends(rate_limit_dependency(app_state("limiter")))``.

    Denied: raises Starlette's ``HTTPException(429)`` with ``Retry-After`` and the
    ``RateLimit-*`` headers (the app's exception handlers turn it into the response).
    Allowed: adds the ``RateLimit-*`` headers to the response FastAPI builds from the
    endpoint's return value (an endpoint that returns a ``Response`` object itself must
    copy them: ``response.headers.update(rate_limit_headers(decision))``). Returns the
    decision, or None when ``key`` exempts the request or a failure was let through.
    ``limiter``, ``on_error``, ``timeout``, ``error_retry_after`` and ``error_cooldown`` as
    for :class:`RateLimitMiddleware` (a failure closed raises ``HTTPException(503)`` with
    ``Retry-After``).
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as RuntimeRequest
    from starlette.responses import Response as RuntimeResponse

    guard = _Guard(
        limiter,
        key=key,
        cost=cost,
        on_error=on_error,
        timeout=timeout,
        error_retry_after=error_retry_after,
        outage=_outage(error_cooldown),
    )

    async def dependency(
        request: RuntimeRequest, response: RuntimeResponse | None = None
    ) -> RateLimitDecision | None:
        outcome = await guard.decide(request.scope)
        if outcome is None:
            return None
        if isinstance(outcome, Failure):
            raise HTTPException(503, "Service Unavailable", headers=outcome.headers())
        headers = rate_limit_headers(outcome)
        if not outcome.allowed:
            raise HTTPException(429, "Too Many Requests", headers=headers)
        if response is not None:  # FastAPI passes the response it will send
            response.headers.update(headers)
        return outcome

    # FastAPI reads the annotations to inject the request and the response; make them
    # the classes themselves (this module's annotations are strings).
    dependency.__annotations__ = {
        "request": RuntimeRequest,
        "response": RuntimeResponse,
        "return": RateLimitDecision | None,
    }
    return dependency
