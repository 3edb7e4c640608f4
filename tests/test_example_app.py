"""The FastAPI example app (examples/fastapi_app) under uvicorn, through a server outage.

One uvicorn process on a private server: every route works; with the server paused, then
killed, reads answer 2xx (fail open) and writes 503 with Retry-After, never a 500, never a
traceback, each well within its deadline; afterwards everything recovers by itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from aioredispatterns.testing import RedisServer, free_port

pytestmark = pytest.mark.budget_kinds("valkey-9.1")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app"
#: Generous: the app answers a read within ~1 s even with Redis paused; a CPU hog may
#: slow it, a 500 or a hang never passes.
REQUEST_DEADLINE = 5.0


@contextmanager
def uvicorn_app(redis_url: str, log: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "EXAMPLE_PREFIX": f"ex{uuid.uuid4().hex[:8]}",
        "EXAMPLE_RATE_LIMIT": "1000",
        "EXAMPLE_SECURE_COOKIES": "0",  # the test talks plain HTTP
    }
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "app:app",
                "--app-dir", str(EXAMPLE),
                "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning",
                "--timeout-graceful-shutdown", "5",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def text_of(log: Path) -> str:
    return log.read_text(errors="replace")


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds, 30 s at most (the app gives no event to wait on)."""
    with anyio.fail_after(30):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def wait_until_healthy(http: httpx.AsyncClient, log: Path) -> None:
    async def healthy() -> bool:
        assert "Traceback" not in text_of(log), text_of(log)
        try:
            return (await http.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False  # uvicorn is still starting

    await eventually(healthy)


def fulfilled(http: httpx.AsyncClient, order: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await http.get(f"/orders/{order}")).json()["status"] == "fulfilled")

    return check


@asynccontextmanager
async def sse(http: httpx.AsyncClient) -> AsyncIterator[AsyncIterator[str]]:
    async with http.stream("GET", "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield response.aiter_lines()


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_example_app_routes_and_outage(own_server: RedisServer, tmp_path: Path) -> None:
    log = tmp_path / "uvicorn.log"
    headers = {"X-Api-Key": "test-suite"}
    with uvicorn_app(own_server.url, log) as base:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            await wait_until_healthy(http, log)
            health = (await http.get("/healthz")).json()
            assert health["ok"] is True
            assert health["pool"]["max_connections"] == 32

            # Cache-aside, with the rate-limit headers on an allowed response.
            first = await http.get("/products/7")
            assert first.status_code == 200, first.text
            assert first.json()["id"] == 7
            assert first.headers["RateLimit-Limit"] == "1000"
            assert (await http.get("/products/7")).json() == first.json()
            assert (await http.get("/products/99999999")).status_code == 404

            # A write: invalidation, and the publish reaches a server-sent-events client.
            async with sse(http) as lines:
                assert await anext(lines) == ": listening"
                changed = await http.put("/products/7", json={"price": 4242})
                assert changed.status_code == 200, changed.text
                with anyio.fail_after(10):
                    async for line in lines:
                        if line.startswith("data: "):
                            assert json.loads(line[6:])["price"] == 4242
                            break
            assert (await http.get("/products/7")).json()["price"] == 4242

            # A stream-backed order, fulfilled by the lifespan's consumer group.
            placed = await http.post("/orders", json={"product_id": 7, "quantity": 2})
            assert placed.status_code == 202, placed.text
            order = placed.json()["order"]
            await eventually(fulfilled(http, order))

            # A fenced report; the per-route limit of /reports/* (10 a minute) binds.
            built = await http.post("/reports/daily")
            assert built.status_code == 200, built.text
            assert built.json()["written"] is True
            assert (await http.get("/reports/daily")).json()["report"] == "daily"
            codes = [(await http.post("/reports/weekly")).status_code for _ in range(9)]
            assert codes[-1] == 429
            denied = await http.post("/reports/weekly")
            assert denied.status_code == 429
            assert denied.headers["RateLimit-Limit"] == "10"
            assert int(denied.headers["Retry-After"]) >= 1

            # Sessions (their cookie is scoped to /account: other routes never read them).
            async with httpx.AsyncClient(base_url=base, headers=headers) as browser:
                assert (await browser.get("/account/me")).status_code == 401
                logged_in = await browser.post("/account/login", json={"user": "ada"})
                assert logged_in.status_code == 200, logged_in.text
                assert "session" in browser.cookies
                me = await browser.get("/account/me")
                assert me.json() == {"user": "ada", "data": {"theme": "dark"}}
                assert (await browser.post("/account/logout")).status_code == 200
                assert (await browser.get("/account/me")).status_code == 401

            # The outage: paused (answers nothing), then killed (refuses connections).
            for outage in ("pause", "kill"):
                getattr(own_server, outage)()
                try:
                    read, took = await timed(http.get("/products/8"))
                    assert read.status_code == 200, (outage, read.text)  # failed open
                    assert took < REQUEST_DEADLINE
                    for write in (
                        http.put("/products/8", json={"price": 1}),
                        http.post("/orders", json={"product_id": 8, "quantity": 1}),
                    ):
                        refused, took = await timed(write)
                        assert refused.status_code == 503, (outage, refused.text)
                        assert refused.headers["Retry-After"] == "2"
                        assert took < REQUEST_DEADLINE
                    sick, took = await timed(http.get("/healthz"))
                    assert sick.status_code == 503
                    assert sick.json()["ok"] is False
                    assert took < REQUEST_DEADLINE
                finally:
                    if outage == "pause":
                        own_server.resume()
                    else:
                        own_server.restart()  # same port, empty dataset
                # It recovers by itself: health, writes and the consumer group.
                await wait_until_healthy(http, log)

                async def writable() -> bool:
                    return (await http.put("/products/8", json={"price": 5})).status_code == 200

                await eventually(writable)
                placed = await http.post("/orders", json={"product_id": 8, "quantity": 1})
                assert placed.status_code == 202, placed.text
                order = placed.json()["order"]
                await eventually(fulfilled(http, order))

    output = text_of(log)
    assert "Traceback" not in output, output
    # One warning when the limiter starts failing and one when it recovers, per outage:
    # not one per request.
    assert output.count("rate limiting is failing") <= 2, output


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (the dev extra)"
)
def test_the_example_passes_mypy_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not re.search(r"\bcast\(", (EXAMPLE / "app.py").read_text())  # no casts
