"""SessionMiddleware in a real Starlette app driven by httpx: login with rotation, sliding
expiry, forged and tampered cookies refused without a Redis command, log out everywhere,
concurrent field writes of one session; a paused store answered by on_error (503 or an
unavailable session), never a 500, and recovery."""

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

from aioredispatterns import ConfigurationError, ConnectionFailed, SerializationError, connect
from aioredispatterns.sessions import SessionStore
from aioredispatterns.sessions_asgi import (
    RequestSession,
    SessionMiddleware,
    app_state,
    session_of,
)
from aioredispatterns.testing import command_calls, free_port

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
    # Load the read script on the genuine session's node first: a first EVALSHA there
    # would be answered NOSCRIPT and re-sent as EVAL, two calls for one read.
    assert await store.get(real.id) is not None
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


# ----------------------------------------------------------------------- outages


def outage_app(store: SessionStore, **options: Any) -> Starlette:
    """An app that shows whether the session is available; ``/put?pause=1`` pauses the
    server (``app.state.pause``) in the handler, so only the write-back meets the outage."""

    async def show(request: Request) -> Response:
        session = session_of(request)
        return JSONResponse({"user": session.user, "data": dict(session), "up": session.available})

    async def put(request: Request) -> Response:
        session = session_of(request)
        for name, value in request.query_params.items():
            session[name] = value
        if "pause" in request.query_params:
            request.app.state.pause()
        return JSONResponse({"ok": True})

    async def login(request: Request) -> Response:
        await session_of(request).login("alice")
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/", show),
            Route("/put", put, methods=["POST"]),
            Route("/login", login, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, store=store, secret=SECRET, **options)],
    )
    app.state.pause = lambda: None
    return app


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def test_a_paused_store_fails_closed_with_503_then_recovers(
    own_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="aioredispatterns.sessions_asgi")
    async with connect(own_server.url) as client:
        store = SessionStore(client)
        app = outage_app(store, error_retry_after=7)  # timeout 1 s, cooldown 0.5 s
        app.state.pause = own_server.pause
        async with browser(app) as http, browser(app) as stranger:
            await http.post("/put", params={"cart": "book"})
            cookie = http.cookies["session"]
            try:
                # The load succeeds; the write-back at response start meets the paused
                # server: the app's 200 becomes a 503 (the response had not started).
                started = anyio.current_time()
                written = await http.post("/put", params={"cart": "pen", "pause": "1"})
                assert written.status_code == 503, written.text
                assert written.headers["Retry-After"] == "7"
                assert written.text == "Service Unavailable"
                assert "set-cookie" not in written.headers
                # Loads: 503 without calling the app, bounded by the timeout (or less, in
                # the cooldown), never a 500.
                for _ in range(3):
                    refused = await http.get("/")
                    assert refused.status_code == 503
                    assert refused.headers["Retry-After"] == "7"
                assert anyio.current_time() - started < 10
                # A request without a cookie that writes nothing needs no Redis.
                assert (await stranger.get("/")).json() == {"user": None, "data": {}, "up": True}
            finally:
                own_server.resume()
            assert warnings_with(caplog, "the session store is failing") == 1, caplog.text
            with anyio.fail_after(20):
                while (response := await http.get("/")).status_code != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert http.cookies["session"] == cookie  # the same session, unharmed
            # Whether the timed-out write landed after the resume is unknown; the session
            # holds one of the two values.
            assert response.json()["data"]["cart"] in ("book", "pen")
            assert warnings_with(caplog, "the session store recovered") == 1, caplog.text


async def test_a_paused_store_fails_open_with_an_unavailable_session(
    own_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="aioredispatterns.sessions_asgi")
    async with connect(own_server.url) as client:
        store = SessionStore(client)
        app = outage_app(store, on_error="open")
        async with browser(app) as http:
            await http.post("/put", params={"cart": "book"})
            cookie = http.cookies["session"]
            with own_server.paused():
                for _ in range(3):
                    seen = await http.get("/")
                    assert seen.status_code == 200
                    assert seen.json() == {"user": None, "data": {}, "up": False}
                # Writes to an unavailable session are dropped (no new session, no cookie
                # overwriting the real one), with one warning for the outage.
                for _ in range(2):
                    put = await http.post("/put", params={"cart": "pen"})
                    assert put.status_code == 200
                    assert "set-cookie" not in put.headers
                # A login cannot be done without the store: a typed error in the handler
                # (httpx's ASGI transport re-raises what the app did not handle).
                with pytest.raises(ConnectionFailed, match="cannot log in"):
                    await http.post("/login")
            assert warnings_with(caplog, "the session store is failing") == 1, caplog.text
            assert warnings_with(caplog, "session writes are dropped") == 1, caplog.text
            with anyio.fail_after(20):
                while not (await http.get("/")).json()["up"]:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert http.cookies["session"] == cookie
            assert (await http.get("/")).json() == {
                "user": None,
                "data": {"cart": "book"},
                "up": True,
            }
            assert warnings_with(caplog, "the session store recovered") == 1, caplog.text


async def test_on_error_per_request_and_websocket_handshake() -> None:
    """A store whose server refuses connections: a callable on_error decides per request;
    a WebSocket handshake failed closed is refused with 1013, not a crash."""
    async with connect(f"redis://127.0.0.1:{free_port()}/0", retries=0) as client:
        store = SessionStore(client)

        def by_method(scope: Any, error: Exception) -> Any:
            assert isinstance(error, ConnectionFailed)
            return "open" if scope.get("method") == "GET" else "closed"

        app = outage_app(store, on_error=by_method, error_cooldown=0)
        session_id = "abcd." + "x" * 32
        cookie = SessionMiddleware(app, store, secret=SECRET).sign(session_id)
        async with browser(app) as http:
            headers = {"cookie": f"session={cookie}"}
            assert (await http.get("/", headers=headers)).json()["up"] is False
            refused = await http.post("/put", params={"a": "1"}, headers=headers)
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "5"

        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        closed = SessionMiddleware(app, store, secret=SECRET)
        raw = [(b"cookie", f"session={cookie}".encode())]
        await closed({"type": "websocket", "path": "/", "headers": raw}, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1013, "reason": "Service Unavailable"}]

    with pytest.raises(ConfigurationError):
        SessionMiddleware(app, store, secret=SECRET, on_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        SessionMiddleware(app, store, secret=SECRET, timeout=0)
