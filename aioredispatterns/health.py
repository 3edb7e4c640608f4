"""A health check for a client: ping with a deadline, pool usage, auto-pipeline counters.

``await health(redis, timeout=0.5)`` never raises because the server is in trouble: it
returns a :class:`HealthReport` whose ``ok`` says whether a ``PING`` came back in time,
ready for a ``/healthz`` route::

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        report = await health(request.app.state.redis, timeout=0.5)
        return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)

The report also says how full the connection pool is. A pool that stays nearly full
means connections are held for long: every blocked waiter (a lock wait, a blocking
stream or queue read) and every :func:`~aioredispatterns.subscribe` holds one of its
own, so a subscription per request (one per SSE client, say) runs the pool dry under
load. Share one :class:`~aioredispatterns.Broadcast` per process instead: it holds one
connection for any number of local subscribers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from ._commands import execute, pipeline_stats
from ._connection import AnyRedis, check_client, is_cluster, state_of
from ._pipeline import PipelineStats
from ._validate import check_seconds
from .errors import RedisPatternsError

__all__ = ("HealthReport", "PoolUsage", "health")

#: Pool use at or above this share adds a warning to the report.
_CROWDED = 0.8


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """How many pooled connections exist and are checked out (summed over a cluster's nodes).

    Attributes:
        in_use: connections checked out now (the auto-pipeline keeps one of them).
        idle: connections open and free.
        max_connections: the most the pool(s) may open.
    """

    in_use: int
    idle: int
    max_connections: int

    @property
    def exhausted(self) -> bool:
        """No connection is free and none may be opened: the next checkout waits."""
        return self.in_use >= self.max_connections


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What :func:`health` found.

    Attributes:
        ok: a ``PING`` was answered within the deadline.
        latency: seconds the ``PING`` took, as the application sees it (queueing in the
            auto-pipeline included); None if it was not answered.
        error: why not ok (the error's type and message), else None.
        pool: the connection pool's usage (None: the client has no pool the library
            can read).
        pipeline: the auto-pipeline's counters (None: not used yet, or off).
        warnings: conditions worth a look that do not make the check fail (a pool
            nearly or fully in use).
    """

    ok: bool
    latency: float | None
    error: str | None
    pool: PoolUsage | None
    pipeline: PipelineStats | None
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready builtins (for a ``/healthz`` response body)."""
        pool = self.pool
        pipeline = self.pipeline
        return {
            "ok": self.ok,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
            "error": self.error,
            "pool": None
            if pool is None
            else {
                "in_use": pool.in_use,
                "idle": pool.idle,
                "max_connections": pool.max_connections,
                "exhausted": pool.exhausted,
            },
            "pipeline": None
            if pipeline is None
            else {
                "batches": pipeline.batches,
                "commands": pipeline.commands,
                "mean_batch_size": round(pipeline.mean_batch_size, 3),
                "max_in_flight": pipeline.max_in_flight,
                "connection_errors": pipeline.connection_errors,
            },
            "warnings": list(self.warnings),
        }


def _pool_usage(client: AnyRedis) -> PoolUsage | None:
    if is_cluster(client):
        router = state_of(client).router
        nodes: list[Any] = router.nodes if router is not None else []
    else:
        nodes = [client]
    in_use = idle = most = 0
    for node in nodes:
        pool = getattr(node, "connection_pool", None)
        try:
            in_use += len(list(pool._get_in_use_connections()))  # type: ignore[union-attr]
            idle += len(list(pool._get_free_connections()))  # type: ignore[union-attr]
            most += int(pool.max_connections)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            return None  # not a redis-py pool we know how to read
    return PoolUsage(in_use, idle, most) if nodes else None


async def health(client: AnyRedis, *, timeout: float = 1.0) -> HealthReport:  # noqa: ASYNC109
    """Ping ``client``'s server within ``timeout`` seconds and report on its pool.

    The ``PING`` goes through the library's command path (the auto-pipeline, so its
    latency includes any queueing there); on a cluster client, to one node. Server
    trouble (unreachable, paused, erring, slower than ``timeout``) makes a report with
    ``ok=False``, never an exception; a failing check takes at most about ``timeout``.

    Raises:
        ConfigurationError: ``timeout`` is not a number of seconds above 0, or
            ``client`` is not a redis.asyncio client.

    Cancellation: propagates; the ``PING``'s reply, if any, is discarded.
    """
    check_client(client)
    check_seconds("timeout", timeout)
    error: str | None = None
    latency: float | None = None
    started = anyio.current_time()
    try:
        with anyio.move_on_after(timeout) as deadline:
            reply = await execute(client, "PING")
        if deadline.cancelled_caught:
            error = f"CommandTimeout: no reply to PING within {timeout:g}s"
        elif reply not in (True, b"PONG", "PONG"):
            error = f"unexpected reply to PING: {reply!r}"
        else:
            latency = anyio.current_time() - started
    except RedisPatternsError as exc:
        error = f"{type(exc).__name__}: {exc}"
    pool = _pool_usage(client)
    warnings: list[str] = []
    if pool is not None and pool.in_use >= _CROWDED * pool.max_connections:
        warnings.append(
            f"connection pool {pool.in_use}/{pool.max_connections} in use: blocked waiters "
            "and subscriptions hold one each (share one Broadcast rather than a subscribe() "
            "per request), or raise max_connections"
        )
    return HealthReport(
        ok=error is None,
        latency=latency,
        error=error,
        pool=pool,
        pipeline=pipeline_stats(client),
        warnings=tuple(warnings),
    )
