"""A real Starlette app under uvicorn, driven by httpx: 429s and headers exactly as decided."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from aioredispatterns import ConfigurationError, ConnectionFailed, connect
from aioredispatterns.ratelimit import (
    GCRA,
    FixedWindow,
    RateLimiter,
    SlidingWindowLog,
    TokenBucket,
)
from aioredispatterns.ratelimit_asgi import (
    RateLimitMiddleware,
    RouteLimit,
    Scope,
    api_key,
    app_state,
    authenticated_user,
    client_address,
    forwarded_client,
    header_key,
    rate_limit_dependency,
    rate_limit_headers,
    rate_limited,
)
from aioredispatterns.testing import free_port

pytestmark = pytest.mark.budget_kinds("valkey-9.1")


def raw_api_key(scope: Scope) -> str | None:
    """Limit by the X-Api-Key header; requests without one are not limited."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return str(value.decode())
    return None


class App:
    def __init__(self, client: Any, prefix: str) -> None:
        self.global_limiter = RateLimiter(
            client, [GCRA(3, 60.0), FixedWindow(100, 3600.0)], name="global", prefix=prefix
        )
        self.endpoint_limiter = RateLimiter(
            client, SlidingWindowLog(2, 30.0), name="search", prefix=prefix
        )
        self.dependency_limiter = RateLimiter(
            client, TokenBucket(1, 0.5), name="dep", prefix=prefix
        )
        dependency = rate_limit_dependency(self.dependency_limiter)

        async def home(request: Request) -> Response:
            return PlainTextResponse("home")

        @rate_limited(self.endpoint_limiter)
        async def search(request: Request) -> Response:
            return PlainTextResponse("search")

        async def with_dependency(request: Request) -> Response:
            decision = await dependency(request)
            return PlainTextResponse(f"remaining={decision.remaining if decision else None}")

        self.starlette = Starlette(
            routes=[
                Route("/", home),
                Route("/search", search),
                Route("/dep", with_dependency),
            ],
            middleware=[
                Middleware(RateLimitMiddleware, limiter=self.global_limiter, key=raw_api_key)
            ],
        )


@pytest.fixture
def only_one_server(redis_server: Any) -> None:
    if redis_server.name != "valkey-9.1":
        pytest.skip("HTTP scenario runs on valkey-9.1 only (CI budget)")


# A context manager entered by the test itself, not a fixture: uvicorn runs in a task
# group, which must be entered and left by the same task (pytest-asyncio runs async
# fixture setup and teardown in different tasks).
@asynccontextmanager
async def serve(redis_url: str) -> AsyncIterator[tuple[str, App]]:
    client = connect(redis_url)
    app = App(client, f"a{uuid.uuid4().hex[:10]}")
    port = free_port()
    config = uvicorn.Config(
        app.starlette, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            with anyio.fail_after(10):
                # uvicorn exposes a flag, not an event, for "listening".
                while not server.started:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}", app
            finally:
                server.should_exit = True
    finally:
        await client.aclose()


@pytest.mark.usefixtures("only_one_server")
async def test_middleware_answers_429_exactly_when_the_policy_says(redis_url: str) -> None:
    async with serve(redis_url) as (base, app), httpx.AsyncClient(base_url=base) as http:
        responses = [await http.get("/", headers={"X-Api-Key": "alice"}) for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert [r.headers["RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
        assert {r.headers["RateLimit-Limit"] for r in responses} == {"3"}
        assert "Retry-After" not in responses[0].headers
        denied = responses[3]
        # GCRA(3 per 60 s): one cell every 20 s, so the next request may pass in <= 20 s.
        assert 19 <= int(denied.headers["Retry-After"]) <= 20
        assert int(denied.headers["RateLimit-Reset"]) == 60
        assert denied.text == "Too Many Requests"
        # The headers say what the limiter says: a peek agrees the next request is denied.
        peek = await app.global_limiter.peek("alice")
        assert not peek.allowed
        assert math.ceil(peek.retry_after) == int(denied.headers["Retry-After"])
        # Another identity is not affected; a request without a key is not limited.
        other = await http.get("/", headers={"X-Api-Key": "bob"})
        assert other.status_code == 200
        assert other.headers["RateLimit-Remaining"] == "2"
        free = await http.get("/")
        assert free.status_code == 200
        assert "RateLimit-Limit" not in free.headers
        # Reset lets alice through again.
        await app.global_limiter.reset("alice")
        assert (await http.get("/", headers={"X-Api-Key": "alice"})).status_code == 200


@pytest.mark.usefixtures("only_one_server")
async def test_endpoint_decorator_and_dependency(redis_url: str) -> None:
    async with serve(redis_url) as (base, app), httpx.AsyncClient(base_url=base) as http:
        # Requests without an API key pass the middleware; the endpoint limits by address.
        codes = [(await http.get("/search")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        denied = await http.get("/search")
        assert 29 <= int(denied.headers["Retry-After"]) <= 30
        assert denied.headers["RateLimit-Limit"] == "2"
        assert (await app.endpoint_limiter.peek("127.0.0.1")).remaining == 0

        first = await http.get("/dep")
        assert first.status_code == 200
        assert first.text == "remaining=0"
        second = await http.get("/dep")
        assert second.status_code == 429
        assert 1 <= int(second.headers["Retry-After"]) <= 2  # one token per 2 s


def test_headers_and_defaults() -> None:
    from aioredispatterns.ratelimit import RateLimitDecision

    allowed = RateLimitDecision(True, 10, 4, 0.0, 2.2, 0.0)
    assert rate_limit_headers(allowed) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "3",
    }
    denied = RateLimitDecision(False, 10, 0, 0.0004, 0.5, 0.0)
    assert rate_limit_headers(denied)["Retry-After"] == "1"  # never "0"
    assert client_address({"client": ("10.0.0.7", 5000)}) == "10.0.0.7"
    assert client_address({}) is None


async def test_middleware_rejects_bad_cost(redis_client: Any) -> None:
    limiter = RateLimiter(redis_client, GCRA(3, 1.0))
    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(PlainTextResponse("x"), limiter, cost=4)


def test_a_client_controlled_identity_is_bounded(redis_client: Any) -> None:
    from aioredispatterns import GCRA, RateLimiter
    from aioredispatterns.ratelimit_asgi import bounded_identity

    limiter = RateLimiter(redis_client, [GCRA(10, 1.0)], name="api")
    assert bounded_identity(limiter, "user:1") == "user:1"
    long = bounded_identity(limiter, "x" * 100_000)
    assert isinstance(long, str)
    assert long.startswith("sha256:")
    assert len(long) < 100
    assert bounded_identity(limiter, "\ud800") != "\ud800"
    assert bounded_identity(limiter, b"y" * 5000) != b"y" * 5000


# ------------------------------------------------------------------ lifespan, outages, routes


class Sent:
    """What an ASGI app sent for one request: status, headers (lower-cased), body."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(dict(message))

    @property
    def status(self) -> int:
        for message in self.messages:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                return int(message["status"])
        raise AssertionError(f"no response start in {self.messages}")

    @property
    def headers(self) -> dict[str, str]:
        for message in self.messages:
            if "headers" in message:
                return {k.decode(): v.decode() for k, v in message["headers"]}
        return {}


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def http_scope(path: str = "/", *, method: str = "GET", **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [],
        "client": ("10.1.2.3", 5000),
        **extra,
    }


async def nothing() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def ask(app: Any, scope: dict[str, Any]) -> Sent:
    sent = Sent()
    await app(scope, nothing, sent)
    return sent


def dead_client() -> Any:
    """A client of a port nobody listens on: every command fails fast (refused)."""
    return connect(f"redis://127.0.0.1:{free_port()}/0", retries=0, connect_timeout=1)


async def test_on_error_policies_and_one_log_line_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with dead_client() as client:
        limiter = RateLimiter(client, GCRA(5, 1.0))
        closed = RateLimitMiddleware(ok_app, limiter, error_retry_after=7)
        with caplog.at_level("WARNING", logger="aioredispatterns.ratelimit_asgi"):
            for _ in range(5):
                refused = await ask(closed, http_scope())
                assert refused.status == 503  # never a 500
                assert refused.headers["retry-after"] == "7"
        failing = [r for r in caplog.records if "rate limiting is failing" in r.message]
        assert len(failing) == 1, caplog.text

        opened = RateLimitMiddleware(ok_app, limiter, on_error="open")
        let_through = await ask(opened, http_scope())
        assert let_through.status == 200
        assert "ratelimit-limit" not in let_through.headers

        def by_method(scope: Scope, error: Exception) -> Literal["open", "closed"]:
            assert isinstance(error, ConnectionFailed)
            return "open" if scope["method"] == "GET" else "closed"

        mixed = RateLimitMiddleware(ok_app, limiter, on_error=by_method, error_cooldown=0)
        assert (await ask(mixed, http_scope())).status == 200
        assert (await ask(mixed, http_scope(method="POST"))).status == 503

    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(ok_app, limiter, on_error="maybe")  # type: ignore[arg-type]


async def test_a_paused_server_costs_one_timeout_then_recovers(
    own_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(own_server.url) as client:
        limiter = RateLimiter(client, GCRA(100, 1.0), name="paused")
        app = RateLimitMiddleware(ok_app, limiter, timeout=0.2, error_cooldown=60)
        assert (await ask(app, http_scope())).status == 200
        with caplog.at_level("WARNING", logger="aioredispatterns.ratelimit_asgi"):
            with own_server.paused():
                started = anyio.current_time()
                first = await ask(app, http_scope())
                assert first.status == 503
                assert "CommandTimeout" in caplog.text
                # In the cooldown: answered without waiting on Redis again.
                second_started = anyio.current_time()
                assert (await ask(app, http_scope())).status == 503
                assert anyio.current_time() - second_started < 0.15
                assert second_started - started < 10  # bounded by the timeout, not hung
            # Redis is back: after the cooldown one request probes and succeeds.
            app._outage.retry_at = 0.0  # the test does not wait out its 60 s cooldown
            with anyio.fail_after(20):
                while (await ask(app, http_scope())).status != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        assert "rate limiting recovered" in caplog.text


async def test_providers_resolve_per_request(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, GCRA(2, 60.0), name="lazy", prefix=key_prefix)

    class State:
        pass

    class FakeApp:
        state = State()

    app = RateLimitMiddleware(ok_app, app_state("limiter"))
    # Before the lifespan set it: a wiring bug, raised (not an outage, not a 503).
    with pytest.raises(ConfigurationError, match="limiter"):
        await ask(app, http_scope(app=FakeApp()))
    FakeApp.state.limiter = limiter  # type: ignore[attr-defined]
    assert (await ask(app, http_scope(app=FakeApp()))).headers["ratelimit-limit"] == "2"
    # The lifespan state (scope["state"]) is looked at first.
    other = RateLimiter(redis_client, GCRA(9, 60.0), name="other", prefix=key_prefix)
    sent = await ask(app, http_scope(app=FakeApp(), state={"limiter": other}))
    assert sent.headers["ratelimit-limit"] == "9"
    # A callable with no argument, and one of the scope.
    for provider in (lambda: other, lambda scope: other):
        assert (await ask(RateLimitMiddleware(ok_app, provider), http_scope())).status == 200
    wrong = RateLimitMiddleware(ok_app, lambda: "not a limiter")
    with pytest.raises(ConfigurationError, match="returned str"):
        await ask(wrong, http_scope())
    with pytest.raises(ConfigurationError):
        RateLimitMiddleware(ok_app, "limiter")  # type: ignore[arg-type]


async def test_per_route_limits_and_exemptions(redis_client: Any, key_prefix: str) -> None:
    default = RateLimiter(redis_client, GCRA(100, 60.0), name="default", prefix=key_prefix)
    search = RateLimiter(redis_client, GCRA(1, 60.0), name="search", prefix=key_prefix)
    app = RateLimitMiddleware(
        ok_app,
        default,
        routes=[
            RouteLimit("/api/*", search),
            RouteLimit("/api/public/*", None),
            RouteLimit("/api/heavy", search, cost=1, key=lambda scope: "heavy"),
        ],
        exempt=["/healthz"],
    )
    assert "ratelimit-limit" not in (await ask(app, http_scope("/healthz"))).headers
    assert (await ask(app, http_scope("/other"))).headers["ratelimit-limit"] == "100"
    assert "ratelimit-limit" not in (await ask(app, http_scope("/api/public/x"))).headers
    assert (await ask(app, http_scope("/api/search"))).status == 200
    assert (await ask(app, http_scope("/api"))).status == 429  # same identity, 1 a minute
    assert (await ask(app, http_scope("/api/heavy"))).status == 200  # its own identity
    assert (await ask(app, http_scope("/api/heavy"))).status == 429
    with pytest.raises(ConfigurationError):
        RouteLimit("api/*", None)
    with pytest.raises(ConfigurationError):
        RouteLimit("/a*b", None)


async def test_websocket_handshakes_are_limited(redis_client: Any, key_prefix: str) -> None:
    limiter = RateLimiter(redis_client, GCRA(1, 60.0), name="ws", prefix=key_prefix)
    app = RateLimitMiddleware(ok_app, limiter)

    async def connect_event() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    def ws_scope(extensions: dict[str, Any]) -> dict[str, Any]:
        return {**http_scope("/ws"), "type": "websocket", "extensions": extensions}

    accepted = Sent()
    await app(ws_scope({}), connect_event, accepted)
    assert accepted.messages[0]["type"] == "websocket.accept"
    assert accepted.headers["ratelimit-remaining"] == "0"
    denied = Sent()
    await app(ws_scope({"websocket.http.response": {}}), connect_event, denied)
    assert denied.status == 429
    assert int(denied.headers["retry-after"]) >= 1
    closed = Sent()
    await app(ws_scope({}), connect_event, closed)
    assert closed.messages == [
        {"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"}
    ]
    unlimited = RateLimitMiddleware(ok_app, limiter, websockets=False)
    passed = Sent()
    await unlimited(ws_scope({}), connect_event, passed)
    assert passed.messages == [{"type": "websocket.accept"}]


@pytest.mark.usefixtures("only_one_server")
async def test_dependency_adds_headers_and_fails_closed(redis_url: str) -> None:
    from fastapi import Depends, FastAPI

    app = FastAPI()
    limit = rate_limit_dependency(app_state("limiter"), key=lambda scope: "dep-user")

    @app.get("/item", dependencies=[Depends(limit)])
    async def item() -> dict[str, str]:
        return {"ok": "yes"}

    async with connect(redis_url) as client, dead_client() as dead:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            app.state.limiter = RateLimiter(
                client, GCRA(5, 60.0), name=f"dep{uuid.uuid4().hex[:8]}"
            )
            allowed = await http.get("/item")
            assert allowed.status_code == 200
            assert allowed.headers["RateLimit-Limit"] == "5"
            assert allowed.headers["RateLimit-Remaining"] == "4"
            app.state.limiter = RateLimiter(dead, GCRA(5, 60.0))
            refused = await http.get("/item")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "5"


def test_key_helpers() -> None:
    def scope(client: str | None, **headers: str) -> dict[str, Any]:
        return {
            "client": (client, 1234) if client else None,
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        }

    behind = forwarded_client(["10.0.0.0/8", "::1"])
    # The peer is not a proxy of ours: the header is not believed.
    assert behind(scope("203.0.113.9", x_forwarded_for="1.2.3.4")) == "203.0.113.9"
    # Through two proxies of ours: the first untrusted address from the right.
    chain = scope("10.0.0.2", x_forwarded_for="6.6.6.6, 198.51.100.7, 10.0.0.1")
    assert behind(chain) == "198.51.100.7"
    assert behind(scope("10.0.0.2")) == "10.0.0.2"  # no header
    assert behind(scope("10.0.0.2", x_forwarded_for="junk, 10.0.0.5")) == "10.0.0.5"
    assert behind(scope(None)) is None
    assert forwarded_client([])(scope("10.0.0.2", x_forwarded_for="1.2.3.4")) == "10.0.0.2"
    with pytest.raises(ConfigurationError):
        forwarded_client(["not-an-ip"])

    by_tenant = header_key("X-Tenant")
    assert by_tenant(scope("1.1.1.1", x_tenant="acme")) == "header:acme"
    assert by_tenant(scope("1.1.1.1", x_tenant="  ")) == "1.1.1.1"  # empty: fallback
    assert header_key("X-Tenant", fallback=None)(scope("1.1.1.1")) is None

    keyed = api_key()
    identity = keyed(scope("1.1.1.1", x_api_key="secret-123"))
    assert identity is not None
    assert identity.startswith("key:")
    assert "secret" not in identity
    bearer = api_key("authorization")
    assert bearer(scope("1.1.1.1", authorization="Bearer secret-123")) == identity
    assert keyed(scope("1.1.1.1")) == "1.1.1.1"

    class User:
        is_authenticated = True
        identity = "u42"

    class Anonymous:
        is_authenticated = False
        identity = "nobody"

    user = authenticated_user()
    assert user({"user": User(), "client": ("1.1.1.1", 1)}) == "user:u42"
    assert user({"state": {"user": User()}, "client": ("1.1.1.1", 1)}) == "user:u42"
    assert user({"user": Anonymous(), "client": ("1.1.1.1", 1)}) == "1.1.1.1"
    assert authenticated_user(fallback=None)({}) is None
