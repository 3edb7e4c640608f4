"""The same shop as ``app.py``, hand-written on redis-py: the benchmark's baseline.

What a careful FastAPI user writes without the library: one ``redis.asyncio.Redis`` on a
bounded pool made in the lifespan; cache-aside as GET, then SET with a TTL on a miss (no
single flight, no stale serving); a fixed-window rate limit (INCR + EXPIRE in one
pipeline) in a plain ASGI middleware with the same fail-open-reads / fail-closed-writes
rule and deadline; an exception handler turning Redis errors into 503; a stream worker
(XREADGROUP + XACK) in a lifespan task; redis-py's ``Lock`` and a plain SET for reports;
a pub/sub connection per SSE client. Same routes, same fake database, same key counts
per request on the hot path (one rate-limit round trip, one cache round trip).

Run it like ``app.py``: ``uvicorn baseline:app --app-dir examples/fastapi_app``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import redis.asyncio as redis
from fakedb import Database, Product
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from redis.exceptions import LockError, RedisError, ResponseError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READ_DEADLINE = 0.5
LIMIT_DEADLINE = 0.25
RETRY_AFTER = "2"


@dataclass(frozen=True)
class Services:
    prefix: str
    rate_limit: int
    redis: redis.Redis
    db: Database


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    prefix = os.environ.get("EXAMPLE_PREFIX", "shop") + "-baseline"
    pool = redis.BlockingConnectionPool.from_url(
        os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        max_connections=64,
        timeout=0.5,
        socket_timeout=0.5,
        socket_connect_timeout=0.25,
    )
    client = redis.Redis.from_pool(pool)
    services = Services(
        prefix=prefix,
        rate_limit=int(os.environ.get("EXAMPLE_RATE_LIMIT", "100")),
        redis=client,
        db=Database(),
    )
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(order_worker, services)
        yield {"services": services}
        tg.cancel_scope.cancel()


async def order_worker(s: Services) -> None:
    stream, group = f"{s.prefix}:orders", "fulfilment"
    while True:
        try:
            try:
                await s.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            while True:
                # redis-py types the reply loosely: a union of everything a command returns.
                reply: Any = await s.redis.xreadgroup(group, "worker", {stream: ">"}, 100, 1000)
                for _, entries in reply or []:
                    for entry_id, _fields in entries:
                        order = entry_id.decode()
                        s.db.orders[order] = "fulfilled"
                        await s.redis.xack(stream, group, order)
        except RedisError:
            await anyio.sleep(0.5)


def services(request: Request) -> Services:
    found: Services = request.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


class FixedWindowLimit:
    """INCR + EXPIRE per (identity, second): the usual hand-written limiter."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz", "/events"):
            await self.app(scope, receive, send)
            return
        s: Services = scope["state"]["services"]
        identity = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                identity = value.decode("latin-1")
        if identity is None:
            identity = scope["client"][0] if scope.get("client") else "anonymous"
        window = int(time.time())
        key = f"{s.prefix}:rl:{identity}:{window}"
        try:
            with anyio.fail_after(LIMIT_DEADLINE):
                async with s.redis.pipeline(transaction=False) as pipe:
                    pipe.incr(key)
                    pipe.expire(key, 2)
                    count, _ = await pipe.execute()
        except (RedisError, TimeoutError):
            if scope["method"] in ("GET", "HEAD"):
                await self.app(scope, receive, send)
                return
            count = None
        if count is None or count > s.rate_limit:
            status = 503 if count is None else 429
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"retry-after", b"1" if status == 429 else RETRY_AFTER.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


app = FastAPI(title="shop (redis-py baseline)", lifespan=lifespan)
app.add_middleware(FixedWindowLimit)


@app.exception_handler(RedisError)
async def redis_unavailable(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"detail": "temporarily unavailable"},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER},
    )


@app.get("/products/{product_id}")
async def get_product(product_id: int, s: ServicesDep) -> Product:
    key = f"{s.prefix}:product:{product_id}"
    found: Product | None
    try:
        with anyio.fail_after(READ_DEADLINE):
            raw = await s.redis.get(key)
            if raw is not None:
                found = json.loads(raw)
            else:
                found = await s.db.product(product_id)
                await s.redis.set(key, json.dumps(found), ex=300)
    except (RedisError, TimeoutError):
        found = await s.db.product(product_id)
    if found is None:
        raise HTTPException(404, "no such product")
    return found


class PriceChange(BaseModel):
    price: int = Field(ge=0)


@app.put("/products/{product_id}")
async def set_price(product_id: int, change: PriceChange, s: ServicesDep) -> Product:
    product = await s.db.set_price(product_id, change.price)
    if product is None:
        raise HTTPException(404, "no such product")
    await s.redis.delete(f"{s.prefix}:product:{product_id}")
    await s.redis.publish(f"{s.prefix}:products", json.dumps(product))
    return product


class NewOrder(BaseModel):
    product_id: int = Field(ge=1)
    quantity: int = Field(ge=1, le=1000)


@app.post("/orders", status_code=202)
async def place_order(order: NewOrder, s: ServicesDep) -> dict[str, str]:
    fields: dict[Any, Any] = {"product": order.product_id, "quantity": order.quantity}
    raw_id = await s.redis.xadd(f"{s.prefix}:orders", fields, maxlen=100_000, approximate=True)
    order_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
    s.db.orders.setdefault(order_id, "pending")
    return {"order": order_id, "status": s.db.orders[order_id]}


@app.get("/orders/{order_id}")
async def order_status(order_id: str, s: ServicesDep) -> dict[str, str]:
    status = s.db.orders.get(order_id)
    if status is None:
        raise HTTPException(404, "no such order")
    return {"order": order_id, "status": status}


def report_name(name: str) -> str:
    if not name.isalnum() or len(name) > 32:
        raise HTTPException(422, "a report name is up to 32 letters or digits")
    return name


@app.post("/reports/{name}")
async def build_report(
    name: Annotated[str, Depends(report_name)], s: ServicesDep
) -> dict[str, object]:
    lock = s.redis.lock(f"{s.prefix}:lock:report:{name}", timeout=10, blocking_timeout=1.0)
    try:
        async with lock:
            report = await s.db.report(name)
            await s.redis.set(f"{s.prefix}:report:{name}", json.dumps(report))
    except LockError:
        raise HTTPException(409, "being built", headers={"Retry-After": "1"}) from None
    return {"written": True, **report}


@app.get("/reports/{name}")
async def get_report(name: Annotated[str, Depends(report_name)], s: ServicesDep) -> Response:
    stored = await s.redis.get(f"{s.prefix}:report:{name}")
    if stored is None:
        raise HTTPException(404, "not built yet")
    return Response(stored, media_type="application/json")


@app.get("/events")
async def events(s: ServicesDep) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        async with s.redis.pubsub() as pubsub:  # one connection per client
            await pubsub.subscribe(f"{s.prefix}:products")
            yield ": listening\n\n"
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield f"data: {message['data'].decode()}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@app.get("/healthz")
async def healthz(s: ServicesDep) -> JSONResponse:
    try:
        with anyio.fail_after(0.5):
            await s.redis.ping()
    except (RedisError, TimeoutError) as exc:
        return JSONResponse({"ok": False, "error": repr(exc)}, status_code=503)
    return JSONResponse({"ok": True})
