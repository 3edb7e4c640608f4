"""A FastAPI shop on aioredispatterns, wired the recommended way.

Run it (``pip install 'aioredispatterns[asgi]' fastapi uvicorn``)::

    REDIS_URL=redis://localhost:6379/0 uvicorn app:app --app-dir examples/fastapi_app

What it shows:

* **Lifespan owns every Redis object.** The client, the cache, the limiters, the
  broadcast hub, the session store and the stream worker are made in ``lifespan`` and
  closed there (in reverse order, even on cancellation); nothing Redis-related exists at
  import.
* **Providers, resolved per request.** The rate-limit and session middlewares are added
  at import but given ``app_state("limiter")`` / ``app_state("sessions")``: they find
  their object in the lifespan state when a request comes in. Endpoints get the same
  objects by dependency injection (``ServicesDep``, ``SessionDep``), typed, no casts.
* **Outages degrade, they do not crash.** Reads fail open (the middleware lets them
  through, the cache falls back to the database within a deadline); writes fail closed
  with ``503`` and ``Retry-After``; an exception handler turns any other Redis failure
  into the same 503. No request waits on Redis longer than its deadline.
* **Routes**: ``GET /products/{id}`` (cache-aside, single flight), ``PUT
  /products/{id}`` (database write, race-safe invalidation, a publish), ``POST /orders``
  (appended to a stream; a consumer group fulfils it in the background), ``GET
  /orders/{id}``, ``POST /reports/{name}`` (one builder at a time: a lock, and a write
  fenced by its token), ``GET /reports/{name}``, ``GET /events`` (server-sent events fed
  by one shared ``Broadcast``, never a subscription per client), ``POST /account/login``
  / ``GET /account/me`` / ``POST /account/logout`` (sessions) and ``GET /healthz``.

Settings come from the environment: ``REDIS_URL``, ``EXAMPLE_PREFIX`` (key namespace,
default ``shop``), ``EXAMPLE_RATE_LIMIT`` (requests per second per API key or client
address, default 100), ``EXAMPLE_REPORT_LIMIT`` (report builds per minute, default 10)
``SESSION_SECRET`` (the cookie signing key; random per start if unset),
``EXAMPLE_SECURE_COOKIES`` (``0`` to send the session cookie over plain HTTP, for local
runs) and ``EXAMPLE_DB_SECONDS`` (the fake database's latency).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fakedb import Database, Product
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from redis.asyncio import Redis

import aioredispatterns as arp
from aioredispatterns.health import health
from aioredispatterns.ratelimit_asgi import (
    RateLimitMiddleware,
    RouteLimit,
    Scope,
    api_key,
    app_state,
    client_address,
)
from aioredispatterns.sessions import SessionStore
from aioredispatterns.sessions_asgi import RequestSession, SessionMiddleware, session_of

#: The most a request waits on Redis for a read before it falls back to the database.
READ_DEADLINE = 0.5
#: The most the rate limiter may take to decide (then on_error decides).
LIMIT_DEADLINE = 0.25
#: Retry-After, in seconds, of a 503 caused by Redis.
RETRY_AFTER = "2"


@dataclass(frozen=True)
class Settings:
    """What the environment configures."""

    redis_url: str
    prefix: str
    rate_limit: int
    report_limit: int
    session_secret: str
    secure_cookies: bool

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            redis_url=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
            prefix=os.environ.get("EXAMPLE_PREFIX", "shop"),
            rate_limit=int(os.environ.get("EXAMPLE_RATE_LIMIT", "100")),
            report_limit=int(os.environ.get("EXAMPLE_REPORT_LIMIT", "10")),
            # A random secret logs everyone out at every restart: set SESSION_SECRET.
            session_secret=os.environ.get("SESSION_SECRET") or secrets.token_hex(32),
            secure_cookies=os.environ.get("EXAMPLE_SECURE_COOKIES", "1") != "0",
        )


@dataclass(frozen=True)
class Services:
    """Everything the endpoints use, made by the lifespan (see ``services``)."""

    settings: Settings
    redis: Redis
    db: Database
    cache: arp.Cache[Product | None]
    orders: arp.StreamProducer
    broadcast: arp.Broadcast


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Make the Redis objects, hand them to the app, close them on shutdown."""
    settings = SETTINGS
    prefix = settings.prefix
    db = Database()

    async def fulfil(message: arp.StreamMessage) -> None:
        # At least once: setting the same state twice is harmless.
        db.orders[message.id] = "fulfilled"

    worker_policy = arp.ConsumerPolicy(concurrency=8, block=1.0, claim_idle=30)
    async with (
        # cluster=False: the client is typed Redis (a redis+cluster:// URL would need True).
        # Short deadlines: a web request must not wait seconds on a paused server.
        arp.connect(
            settings.redis_url,
            cluster=False,
            socket_timeout=0.5,
            connect_timeout=0.25,
            pool_timeout=0.5,
            retries=2,
            backoff_cap=0.2,
        ) as redis,
        arp.Cache[Product | None](
            redis, ttl=300, stale_ttl=60, negative_ttl=30, prefix=prefix
        ) as cache,
        arp.Broadcast(redis) as broadcast,
        arp.ConsumerGroup(
            redis, "orders", "fulfilment", handler=fulfil, policy=worker_policy, prefix=prefix
        ),
    ):
        per_second = settings.rate_limit
        services = Services(
            settings=settings,
            redis=redis,
            db=db,
            cache=cache,
            orders=arp.StreamProducer(
                redis, "orders", prefix=prefix, retention=arp.StreamRetention(maxlen=100_000)
            ),
            broadcast=broadcast,
        )
        # The lifespan state: Starlette copies it into every request's scope, where
        # app_state(...) providers and request.state find it.
        yield {
            "services": services,
            "limiter": arp.RateLimiter(redis, arp.GCRA(per_second, 1.0), name="api", prefix=prefix),
            "report_limiter": arp.RateLimiter(
                redis, arp.GCRA(settings.report_limit, 60.0), name="reports", prefix=prefix
            ),
            "sessions": SessionStore(redis, ttl=1800, prefix=prefix),
        }


def services(request: Request) -> Services:
    """The dependency that hands the lifespan's objects to an endpoint."""
    found: Services = request.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


def reads_fail_open(scope: Scope, error: arp.RedisPatternsError) -> Literal["open", "closed"]:
    """When Redis cannot decide: let reads through unlimited, refuse writes (503)."""
    return "open" if scope.get("method") in ("GET", "HEAD") else "closed"


SETTINGS = Settings.from_env()  # what the middleware needs before the lifespan runs

app = FastAPI(title="shop", lifespan=lifespan)
# Sessions only under /account: the cookie's Path keeps every other route from reading
# (and depending on) the session.
app.add_middleware(
    SessionMiddleware,
    store=app_state("sessions"),
    secret=SETTINGS.session_secret,
    path="/account",
    secure=SETTINGS.secure_cookies,
)
app.add_middleware(
    RateLimitMiddleware,
    limiter=app_state("limiter"),
    key=api_key(fallback=client_address),  # per API key, else per client address
    on_error=reads_fail_open,
    timeout=LIMIT_DEADLINE,
    error_retry_after=int(RETRY_AFTER),
    exempt=["/healthz", "/events"],
    routes=[RouteLimit("/reports/*", app_state("report_limiter"))],
)


@app.exception_handler(arp.ConnectionFailed)
@app.exception_handler(arp.CommandTimeout)
async def redis_unavailable(request: Request, exc: Exception) -> Response:
    """Redis failed in an endpoint: 503 with Retry-After, not a 500 with a traceback."""
    return JSONResponse(
        {"detail": "temporarily unavailable"},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER},
    )


# ------------------------------------------------------------------- products


@app.get("/products/{product_id}")
async def get_product(product_id: int, s: ServicesDep) -> Product:
    """Cache-aside: one load per key however many requests miss it at once."""

    async def load() -> Product | None:
        return await s.db.product(product_id)

    try:
        with anyio.fail_after(READ_DEADLINE):
            found = await s.cache.get_or_load(f"product:{product_id}", load)
    except (ConnectionError, TimeoutError):  # Redis unreachable or too slow
        found = await load()  # the database answers, uncached
    if found is None:
        raise HTTPException(404, "no such product")
    return found


class PriceChange(BaseModel):
    price: int = Field(ge=0)


@app.put("/products/{product_id}")
async def set_price(product_id: int, change: PriceChange, s: ServicesDep) -> Product:
    """Write the database, drop the cached copy, tell the SSE listeners."""
    product = await s.db.set_price(product_id, change.price)
    if product is None:
        raise HTTPException(404, "no such product")
    await s.cache.invalidate(f"product:{product_id}")
    await s.broadcast.publish("products", product)
    return product


# ------------------------------------------------------------------- orders


class NewOrder(BaseModel):
    product_id: int = Field(ge=1)
    quantity: int = Field(ge=1, le=1000)


@app.post("/orders", status_code=202)
async def place_order(order: NewOrder, s: ServicesDep) -> dict[str, str]:
    """Append the order to a stream; the lifespan's consumer group fulfils it."""
    order_id = await s.orders.add({"product": order.product_id, "quantity": order.quantity})
    s.db.orders.setdefault(order_id, "pending")
    return {"order": order_id, "status": s.db.orders[order_id]}


@app.get("/orders/{order_id}")
async def order_status(order_id: str, s: ServicesDep) -> dict[str, str]:
    status = s.db.orders.get(order_id)
    if status is None:
        raise HTTPException(404, "no such order")
    return {"order": order_id, "status": status}


# ------------------------------------------------------------------- reports


def report_name(name: str) -> str:
    if not name.isalnum() or len(name) > 32:
        raise HTTPException(422, "a report name is up to 32 letters or digits")
    return name


@app.post("/reports/{name}")
async def build_report(
    name: Annotated[str, Depends(report_name)], s: ServicesDep
) -> dict[str, object]:
    """One builder at a time (a lock); its write is fenced by the lease's token, so a
    builder that lost its lease (paused past the TTL) cannot overwrite a newer report."""
    resource = f"report:{name}"
    lock = arp.Lock(s.redis, resource, ttl=10, timeout=1.0, prefix=s.settings.prefix)
    try:
        async with lock as lease:
            report = await s.db.report(name)
            written = await arp.fenced_set(
                s.redis, resource, json.dumps(report), lease.token, prefix=s.settings.prefix
            )
    except arp.LockNotAcquired:
        raise HTTPException(409, "being built", headers={"Retry-After": "1"}) from None
    return {"token": lease.token, "written": written, **report}


@app.get("/reports/{name}")
async def get_report(name: Annotated[str, Depends(report_name)], s: ServicesDep) -> Response:
    stored = await arp.fenced_get(s.redis, f"report:{name}", prefix=s.settings.prefix)
    if stored is None:
        raise HTTPException(404, "not built yet")
    return Response(stored.value, media_type="application/json")


# ------------------------------------------------------------------- events


@app.get("/events")
async def events(s: ServicesDep) -> StreamingResponse:
    """Price changes as server-sent events.

    Every client shares the lifespan's one ``Broadcast`` (one Redis connection for all of
    them). A ``subscribe()`` per client would hold a pooled connection each: a few
    hundred listeners would exhaust the pool and stall every other request.
    """

    async def stream() -> AsyncIterator[str]:
        async with s.broadcast.subscribe("products") as messages:
            yield ": listening\n\n"
            async for item in messages:
                if isinstance(item, arp.Message):
                    yield f"data: {json.dumps(item.payload)}\n\n"
                else:  # a Gap: Redis reconnected, changes may have been missed
                    yield "event: gap\ndata: {}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


# ------------------------------------------------------------------- sessions


def current_session(request: Request) -> RequestSession:
    return session_of(request)


SessionDep = Annotated[RequestSession, Depends(current_session)]


class Login(BaseModel):
    user: str = Field(min_length=1, max_length=64)


@app.post("/account/login")
async def login(credentials: Login, session: SessionDep) -> dict[str, str]:
    """Check the password (yours to write), then log in: a new session id (rotation)."""
    await session.login(credentials.user)
    session["theme"] = "dark"  # written when the response starts
    return {"user": credentials.user}


@app.get("/account/me")
async def me(session: SessionDep) -> dict[str, object]:
    if session.user is None:
        raise HTTPException(401, "not logged in")
    return {"user": session.user, "data": dict(session)}


@app.post("/account/logout")
async def logout(session: SessionDep) -> dict[str, bool]:
    await session.logout()
    return {"logged_out": True}


# ------------------------------------------------------------------- health


@app.get("/healthz")
async def healthz(s: ServicesDep) -> JSONResponse:
    report = await health(s.redis, timeout=0.5)
    return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)
