"""The command path every primitive uses for short, non-blocking commands.

With auto-pipelining on (the default), commands issued by many coroutines in one
event-loop iteration travel to the server as one batch; otherwise each command takes
a pooled connection of its own. Blocking commands (BLPOP, XREADGROUP BLOCK, SUBSCRIBE)
never come through here.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
from redis.typing import EncodableT

from ._client import AnyRedis, is_cluster, state_of
from ._pipeline import AutoPipeline, PipelineStats
from ._translate import map_redis_errors, reraise
from .errors import CommandTimeout


def pipeline_stats(client: AnyRedis) -> PipelineStats | None:
    """Counters of ``client``'s auto-pipeline, or None if it has not been used (or is off).

    Example: ``stats.mean_batch_size`` tells how many commands share a round trip.
    A plain read of counters: nothing is sent, nothing to cancel.
    """
    pipeline = state_of(client).pipeline
    return pipeline.stats if pipeline is not None else None


def _pipeline_of(client: AnyRedis) -> AutoPipeline | None:
    state = state_of(client)
    if not state.auto_pipeline:
        return None
    pipeline = state.pipeline
    if pipeline is None:
        pipeline = state.pipeline = AutoPipeline(client)
    return pipeline


async def execute_raw(client: AnyRedis, *args: EncodableT, **options: Any) -> Any:
    """Run one command and return the parsed reply; redis-py errors pass untranslated."""
    pipeline = _pipeline_of(client)
    if pipeline is not None:
        return await pipeline.execute(*args, **options)
    return await client.execute_command(*args, **options)


async def execute(client: AnyRedis, *args: EncodableT, **options: Any) -> Any:
    """Run one command and return the parsed reply, with errors translated.

    Cancellation: a cancelled caller's reply is discarded; the connection stays usable.
    """
    # The hot path of every primitive: a plain try/except is cheaper than entering
    # map_redis_errors() for every command.
    try:
        pipeline = _pipeline_of(client)
        if pipeline is not None:
            return await pipeline.execute(*args, **options)
        return await client.execute_command(*args, **options)
    except Exception as exc:
        reraise(exc)


async def execute_blocking(
    client: AnyRedis, *args: EncodableT, block: float, **options: Any
) -> Any:
    """Run a blocking command (BLPOP, BLMOVE, XREADGROUP BLOCK ...) on a connection of its own.

    ``block`` is how many seconds the server may hold the command; the reply is awaited
    that long plus the client's socket timeout, then CommandTimeout. Errors are translated.

    Cancellation: the connection is closed (its reply can no longer be matched to a
    caller) and returned to the pool, shielded; a command the server completes after
    that is lost to this caller, so use BLMOVE into a processing list where that matters.
    """
    with map_redis_errors():
        if is_cluster(client):
            # The cluster client routes by key and owns its node connections; keep
            # ``block`` below its socket timeout there.
            return await client.execute_command(*args, **options)
        pool = client.connection_pool  # type: ignore[union-attr]
        conn = await pool.get_connection()
        healthy = False
        try:
            await conn.send_command(*args)
            limit = block + (conn.socket_timeout or 0.0) + 1.0
            try:
                with anyio.fail_after(limit):
                    response = await conn.read_response(timeout=math.inf)
            except TimeoutError:
                raise CommandTimeout(f"no reply to {args[0]!r} within {limit:.1f} s") from None
            healthy = True
        finally:
            with anyio.CancelScope(shield=True):
                if not healthy:
                    await conn.disconnect()
                await pool.release(conn)
        command_name = str(args[0]).upper()
        callback = client.response_callbacks.get(command_name)
        return callback(response, **options) if callback else response
