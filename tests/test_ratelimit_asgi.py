"""A real Starlette app under uvicorn, driven by httpx: 429s and headers exactly as decided."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from aioredispatterns import ConfigurationError, connect
from aioredispatterns.ratelimit import (
    GCRA,
    FixedWindow,
    RateLimiter,
    SlidingWindowLog,
    TokenBucket,
)
from aioredispatterns.ratelimit_asgi import (
    RateLimitMiddleware,
    Scope,
    client_address,
    rate_limit_dependency,
    rate_limit_headers,
    rate_limited,
)
from aioredispatterns.testing import free_port


def api_key(scope: Scope) -> str | None:
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
            middleware=[Middleware(RateLimitMiddleware, limiter=self.global_limiter, key=api_key)],
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
