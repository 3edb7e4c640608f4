"""SessionMiddleware in a real Starlette app driven by httpx: login with rotation, sliding
expiry, forged and tampered cookies refused without a Redis command, log out everywhere,
concurrent field writes of one session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aioredispatterns import ConfigurationError, SerializationError, connect
from aioredispatterns.sessions import SessionStore
from aioredispatterns.sessions_asgi import (
    RequestSession,
    SessionMiddleware,
    app_state,
    session_of,
)
from aioredispatterns.testing import command_calls

pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")

SECRET = "test-secret-0123456789abcdef"


def build_app(
    store: SessionStore, provider: Any = None, **options: Any
) -> tuple[Starlette, SessionMiddleware]:
    """The app under test; by default it finds the store in ``app.state`` per request, as
    when the store is made in the app's lifespan."""

    async def show(request: Request) -> Response:
        session = session_of(request)
        assert request.session is session  # Starlette's accessor sees the same object
        return JSONResponse({"user": session.user, "data": dict(session)})

    async def put(request: Request) -> Response:
        session = session_of(request)
        for name, value in request.query_params.items():
            session[name] = value
        return JSONResponse({"ok": True})

    async def login(request: Request) -> Response:
        await session_of(request).login(request.query_params["user"])
        return JSONResponse({"ok": True})

    async def logout(request: Request) -> Response:
        everywhere = request.query_params.get("everywhere") == "1"
        await session_of(request).logout(everywhere=everywhere)
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/", show),
            Route("/put", put, methods=["POST"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                store=app_state("sessions") if provider is None else provider,
                secret=SECRET,
                **options,
            )
        ],
    )
    app.state.sessions = store
    return app, SessionMiddleware(app, store, secret=SECRET)


@asynccontextmanager
async def browser(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    # https: the cookie is Secure, and httpx's jar sends it over https only.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        yield client


async def script_calls(client: Any) -> int:
    return await command_calls(client, "evalsha") + await command_calls(client, "eval")


def session_key(prefix: str, session_id: str) -> str:
    tag, secret = session_id.split(".")
    return f"{prefix}:session:{{sessions:{tag}}}:s:{secret}"


def cookie_id(http: httpx.AsyncClient) -> str:
    value = http.cookies["session"]
    return value.rsplit(".", 1)[0]


async def test_login_rotation_and_cookie_attributes(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    app, _ = build_app(store, lambda: store)  # a zero-argument provider
    async with browser(app) as http:
        first = await http.get("/")
        assert first.json() == {"user": None, "data": {}}
        assert "set-cookie" not in first.headers  # nothing written, no session made

        put = await http.post("/put", params={"cart": "book"})
        cookie = put.headers["set-cookie"]
        assert cookie.startswith("session=")
        for attribute in ("Path=/", "SameSite=Lax", "Secure", "HttpOnly"):
            assert attribute in cookie.split("; ")
        anonymous_id = cookie_id(http)
        assert (await http.get("/")).json() == {"user": None, "data": {"cart": "book"}}

        login = await http.post("/login", params={"user": "alice"})
        assert "set-cookie" in login.headers
        alice_id = cookie_id(http)
        assert alice_id != anonymous_id
        assert (await http.get("/")).json() == {"user": "alice", "data": {"cart": "book"}}
        old_cookie = SessionMiddleware(app, store, secret=SECRET).sign(anonymous_id)

    # The pre-login cookie (a planted one, in a fixation attack) is worthless now.
    assert await store.get(anonymous_id) is None
    async with browser(app) as attacker:
        planted = await attacker.get("/", headers={"cookie": f"session={old_cookie}"})
        assert planted.json() == {"user": None, "data": {}}
        # While the current cookie works, sent the same way.
        alice_cookie = SessionMiddleware(app, store, secret=SECRET).sign(alice_id)
        current = await attacker.get("/", headers={"cookie": f"session={alice_cookie}"})
        assert current.json()["user"] == "alice"


async def test_sliding_expiry_through_the_app(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix, ttl=60)
    app, _ = build_app(store)
    async with browser(app) as http:
        await http.post("/put", params={"a": "1"})
        key = session_key(key_prefix, cookie_id(http))
        # Stand in for 58 s of idleness: a mere read slides the TTL back.
        await redis_client.pexpire(key, 2000)
        assert (await http.get("/")).json()["data"] == {"a": "1"}
        assert await redis_client.pttl(key) > 50_000

    short = SessionStore(redis_client, prefix=key_prefix, ttl=0.5)
    app, _ = build_app(short)
    async with browser(app) as http:
        await http.post("/put", params={"a": "1"})
        key = session_key(key_prefix, cookie_id(http))
        with anyio.fail_after(30):
            while await redis_client.exists(key):  # noqa: ASYNC110 - polling the server
                await anyio.sleep(0.05)
        # Expired: the request has no session; the stale cookie is left as it is.
        response = await http.get("/")
        assert response.json() == {"user": None, "data": {}}
        assert "set-cookie" not in response.headers


async def test_forged_and_tampered_cookies_cost_no_command(
    redis_client: Any, key_prefix: str
) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    app, middleware = build_app(store)
    real = await store.create({"role": "user"}, user="mallory")
    victim = await store.create({"role": "admin"}, user="root")
    signed = middleware.sign(real.id)
    sid, signature = signed.rsplit(".", 1)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    forgeries = [
        victim.id,  # a real id without a signature
        f"{victim.id}.{signature}",  # another id under a stolen signature
        f"{sid}.{flipped}",  # a tampered signature
        signed[:-1],  # truncated
        signed + "A",  # extended
        f"{victim.id}.{'A' * 43}",  # a guessed signature
        SessionMiddleware(app, store, secret="another-secret-0123456789").sign(victim.id),
        "x" * 5000,
        "garbage",
        "",
    ]
    async with browser(app) as http:
        before = await script_calls(redis_client)
        for forged in forgeries:
            response = await http.get("/", headers={"cookie": f"session={forged}"})
            assert response.json() == {"user": None, "data": {}}, forged
        assert await script_calls(redis_client) == before
        # The genuine cookie does reach Redis: exactly one script (the read and slide).
        genuine = await http.get("/", headers={"cookie": f"other=1; session={signed}"})
        assert genuine.json() == {"user": "mallory", "data": {"role": "user"}}
        assert await script_calls(redis_client) == before + 1
    assert await store.get(victim.id) == victim


async def test_key_rotation_of_the_signing_secret(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    session = await store.create({"a": 1})
    old = SessionMiddleware(Starlette(), store, secret=SECRET)
    new = SessionMiddleware(Starlette(), store, secret=["new-secret-0123456789abcdef", SECRET])
    assert new.unsign(old.sign(session.id)) == session.id  # old cookies still verify
    assert old.unsign(new.sign(session.id)) is None  # new cookies signed with the new key
    assert new.sign(session.id) != old.sign(session.id)


async def test_log_out_everywhere(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    app, _ = build_app(store)
    async with browser(app) as laptop, browser(app) as phone, browser(app) as other:
        for http, user in ((laptop, "alice"), (phone, "alice"), (other, "bob")):
            await http.post("/login", params={"user": user})
            assert (await http.get("/")).json()["user"] == user
        out = await laptop.post("/logout", params={"everywhere": "1"})
        assert "Max-Age=0" in out.headers["set-cookie"]
        assert "session" not in laptop.cookies
        assert (await phone.get("/")).json() == {"user": None, "data": {}}
        assert (await other.get("/")).json()["user"] == "bob"
        # A plain logout ends one session only.
        await laptop.post("/login", params={"user": "alice"})
        await phone.post("/login", params={"user": "alice"})
        await phone.post("/logout")
        assert (await phone.get("/")).json()["user"] is None
        assert (await laptop.get("/")).json()["user"] == "alice"


async def test_concurrent_requests_writing_different_fields(
    redis_client: Any, key_prefix: str
) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    app, _ = build_app(store)
    async with browser(app) as http:
        await http.post("/put", params={"base": "0"})

        async def write(i: int) -> None:
            response = await http.post("/put", params={f"f{i}": str(i)})
            assert response.status_code == 200
            assert "set-cookie" not in response.headers  # same session, no new cookie

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(write, i)
        data = (await http.get("/")).json()["data"]
        assert data == {"base": "0", **{f"f{i}": str(i) for i in range(30)}}


def test_bad_options_and_missing_middleware() -> None:
    store = SessionStore(connect("redis://127.0.0.1:1/0"))
    app = Starlette()
    for options in (
        {"secret": "short"},
        {"secret": []},
        {"secret": SECRET, "samesite": "none", "secure": False},
        {"secret": SECRET, "samesite": "sideways"},
        {"secret": SECRET, "cookie_name": "bad name"},
        {"secret": SECRET, "path": "/; Domain=evil"},
        {"secret": SECRET, "max_age": 0},
    ):
        with pytest.raises(ConfigurationError):
            SessionMiddleware(app, store, **options)
    with pytest.raises(ConfigurationError):
        SessionMiddleware(app, 42, secret=SECRET)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        session_of({"type": "http"})
    session = RequestSession(store, None)
    assert session_of({"session": session}) is session
    with pytest.raises(SerializationError):
        session["when"] = object()  # refused in the handler, not at response start
    assert "when" not in session
    assert not session.modified
