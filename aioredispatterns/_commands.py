"""The one door to redis-py: every command the library sends goes through here.

What crosses this boundary is decided here, once:

* **Errors.** Whatever redis-py, the socket or the parser raises comes out as a
  :class:`~aioredispatterns.errors.RedisPatternsError` (``_translate``); cancellation
  passes untouched.
* **Retries.** A command that may have reached the server is never re-sent unless the
  caller said it is idempotent (:func:`execute_many`). Establishing a connection is
  retried (nothing was sent), with the client's ``retries`` and the one backoff.
* **Deadlines.** A reply is awaited at most ``socket_timeout`` after the command was
  queued (the auto-pipeline enforces it per command); a blocking command gets its block
  time on top; a dedicated connection's reads take a deadline each.

It offers what the primitives need and nothing else:

* :func:`execute` — one short command (auto-pipelined unless the client opted out);
* :func:`execute_many` — a batch, with an explicit retry rule;
* :func:`execute_script` — EVALSHA with the NOSCRIPT fallback to EVAL;
* :func:`execute_blocking` — BLPOP, BLMOVE, XREADGROUP BLOCK ... on a connection of its own;
* :func:`dedicated` — a connection of one's own as an async context manager
  (subscriptions), released shielded and bounded.

Capability detection (``_capabilities``) is built on :func:`execute`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster

from ._backoff import Backoff
from ._cluster import SlotRouter, route_key
from ._connection import AnyRedis, ClusterClient, is_cluster, node_factory_of, state_of
from ._pipeline import AutoPipeline, PipelineStats, apply_callback, packer_of
from ._translate import NoScriptReply, reraise
from ._transport import checkout, guarded, return_invalidations, send
from .errors import (
    CommandError,
    CommandTimeout,
    ConnectionFailed,
    RedisPatternsError,
    ScriptError,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection

    from ._keys import KeyT

__all__ = (
    "Arg",
    "Dedicated",
    "dedicated",
    "execute",
    "execute_blocking",
    "execute_initialize",
    "execute_many",
    "execute_script",
    "known_primaries",
    "node_of",
    "pipeline_stats",
    "primaries",
    "topology_epoch",
)

#: One argument of a command, as redis-py's encoder takes it.
Arg = bytes | bytearray | memoryview | str | int | float

# How long the shielded release of a dedicated connection may take.
_RELEASE_TIMEOUT = 2.0


def pipeline_stats(client: AnyRedis) -> PipelineStats | None:
    """Counters of ``client``'s auto-pipeline, or None if it has not been used (or is off).

    Example: ``stats.mean_batch_size`` tells how many commands share a round trip.
    On a cluster, the sums over the auto-pipelines of its nodes.
    A plain read of counters: nothing is sent, nothing to cancel.
    """
    state = state_of(client)
    if state.router is None:
        return state.pipeline.stats if state.pipeline is not None else None
    parts = [stats for node in state.router.nodes if (stats := pipeline_stats(node)) is not None]
    if not parts:
        return None
    return PipelineStats(
        batches=sum(s.batches for s in parts),
        commands=sum(s.commands for s in parts),
        max_in_flight=max(s.max_in_flight for s in parts),
        connection_errors=sum(s.connection_errors for s in parts),
    )


def _router_of(client: RedisCluster) -> SlotRouter:
    """The slot router of a cluster client (created on first use, closed with it)."""
    state = state_of(client)
    router = state.router
    if router is None:
        router = state.router = SlotRouter(client, node_factory_of(client))
        if not isinstance(client, ClusterClient):
            _close_with(client, router)
    return router


def _close_with(client: RedisCluster, router: SlotRouter) -> None:
    """Close ``router``'s node pools when a ``RedisCluster`` not built by connect() is
    closed (``ClusterClient`` does this itself)."""
    close_cluster = client.aclose

    async def aclose() -> None:
        try:
            await router.close()
        finally:
            await close_cluster()

    client.aclose = aclose  # type: ignore[method-assign]


def _pipeline_of(client: AnyRedis) -> AutoPipeline | None:
    state = state_of(client)
    if not state.auto_pipeline:
        return None
    pipeline = state.pipeline
    if pipeline is None:
        pipeline = state.pipeline = AutoPipeline(client)
    return pipeline


def execute(client: AnyRedis, *args: Arg, **options: Any) -> Coroutine[Any, Any, Any]:
    """Run one command and return the parsed reply (redis-py's response callbacks).

    Raises:
        ConnectionFailed: the connection broke; the command may or may not have run
            (it is not re-sent).
        CommandTimeout: no reply within the client's ``socket_timeout``.
        CommandError: the server answered with an error.
        ConfigurationError: an argument cannot be encoded (nothing was sent).

    Cancellation: a cancelled caller's reply is discarded; the connection stays usable.
    """
    # The hot path of every primitive: on a standalone client the auto-pipeline runs the
    # command and translates its errors itself, with no coroutine of ours around it.
    if not is_cluster(client):
        pipeline = _pipeline_of(client)
        if pipeline is not None:
            return pipeline.execute_translated(args, options)
    return _execute(client, args, options)


async def _execute(client: AnyRedis, args: Sequence[Arg], options: dict[str, Any]) -> Any:
    try:
        if is_cluster(client):
            return await _routed(client, args, options)  # type: ignore[arg-type]
        return await _execute_direct(client, args, options)  # type: ignore[arg-type]
    except Exception as exc:
        reraise(exc)


async def _execute_direct(client: Redis, args: Sequence[Arg], options: dict[str, Any]) -> Any:
    async with dedicated(client) as connection:
        return await connection.command(*args, **options)


async def _on_node(node: Redis, args: Sequence[Arg], options: dict[str, Any]) -> Any:
    pipeline = _pipeline_of(node)
    if pipeline is not None:
        return await pipeline.execute(*args, **options)
    return await _execute_direct(node, args, options)


async def _asking(node: Redis, args: Sequence[Arg], options: dict[str, Any]) -> Any:
    """``ASKING`` and the command back to back on one connection (a slot in migration)."""
    async with dedicated(node) as connection:
        await connection.send("ASKING")
        await connection.send(*args)
        await connection.read()
        reply = await connection.read()
    return apply_callback(node, args[0], reply, options)


async def _routed(client: RedisCluster, args: Sequence[Arg], options: dict[str, Any]) -> Any:
    """One command on the cluster node that serves its key (see ``_cluster``)."""

    async def run(node: Redis) -> Any:
        return await _on_node(node, args, options)

    async def run_asking(node: Redis) -> Any:
        return await _asking(node, args, options)

    return await _router_of(client).call(route_key(args), run, run_asking)


async def _routed_many(client: RedisCluster, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    """A batch on a cluster: each command on its node's auto-pipeline, all at once.

    The commands start in order, so those bound for one node are queued (and run) in
    order there. Every reply is awaited; then a connection error is raised before an
    error reply, else the first error reply.
    """
    if len(commands) == 1:
        return [await _routed(client, commands[0], {})]
    results: list[Any] = [None] * len(commands)
    failed: list[Exception] = []

    async def one(index: int) -> None:
        try:
            results[index] = await _routed(client, commands[index], {})
        except Exception as exc:
            failed.append(exc)

    async with anyio.create_task_group() as group:
        for index in range(len(commands)):
            group.start_soon(one, index)
    if failed:
        broken = [exc for exc in failed if isinstance(exc, ConnectionError | OSError)]
        raise (broken or failed)[0]
    return results


async def execute_many(
    client: AnyRedis, commands: Sequence[Sequence[Arg]], *, idempotent: bool
) -> list[Any]:
    """Run ``commands`` as one pipelined batch and return their replies in order.

    Not a transaction: each command runs on its own. Every reply is read before an error
    reply is raised (the first one), so the batch is never left half-read.

    Args:
        idempotent: whether running a command twice is harmless (GETs, SETs of the same
            value). A batch whose connection broke is re-sent (``retries`` times, with
            backoff) only when this is true; otherwise :class:`ConnectionFailed` is raised
            and any prefix of the batch may have run.

    Cancellation: any prefix of the batch may have run; its replies are discarded.
    """
    if not commands:
        return []
    state = state_of(client)
    backoff = Backoff(base=state.backoff_base, cap=state.backoff_cap)
    attempt = 0
    while True:
        try:
            return await _execute_many_once(client, commands)
        except ConnectionFailed:
            if not idempotent or attempt >= state.retries:
                raise
            attempt += 1
            await backoff.sleep()


async def _execute_many_once(client: AnyRedis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    try:
        if is_cluster(client):
            return await _routed_many(client, commands)  # type: ignore[arg-type]
        pipeline = _pipeline_of(client)
        if pipeline is not None:
            return await pipeline.execute_many(commands)
        async with dedicated(client) as connection:
            return await connection.batch(commands)
    except Exception as exc:
        reraise(exc)


async def execute_script(
    client: AnyRedis, sha: str, source: bytes, keys: Sequence[KeyT], args: Sequence[Arg]
) -> Any:
    """Run a Lua script by EVALSHA, re-sent as EVAL (which caches it) after NOSCRIPT.

    Raises:
        ScriptError: the script raised an error on the server.
        ConnectionFailed, CommandTimeout: as :func:`execute`.

    Cancellation: a cancelled caller's reply is discarded; what the script did on the
    server (it runs atomically) stays done.
    """
    try:
        run: Callable[..., Awaitable[Any]]
        pipeline = None if is_cluster(client) else _pipeline_of(client)
        if pipeline is not None:
            run = pipeline.execute
        elif is_cluster(client):

            async def run(*command: Arg) -> Any:
                return await _routed(client, command, {})  # type: ignore[arg-type]

        else:

            async def run(*command: Arg) -> Any:
                return await _execute_direct(client, command, {})  # type: ignore[arg-type]

        try:
            return await run("EVALSHA", sha, len(keys), *keys, *args)
        except (rex.NoScriptError, NoScriptReply):
            return await run("EVAL", source, len(keys), *keys, *args)
    except ScriptError:
        raise
    except (rex.ResponseError, CommandError) as exc:
        raise ScriptError(str(exc)) from exc
    except Exception as exc:
        reraise(exc)


async def execute_blocking(client: AnyRedis, *args: Arg, block: float, **options: Any) -> Any:
    """Run a blocking command (BLPOP, BLMOVE, XREADGROUP BLOCK ...) on a connection of its own.

    ``block`` is how many seconds the server may hold the command; the reply is awaited
    that long plus the client's socket timeout, then CommandTimeout. Errors are translated.

    Cancellation: the connection is closed (its reply can no longer be matched to a
    caller) and returned to the pool, shielded; a command the server completes after
    that is lost to this caller, so use BLMOVE into a processing list where that matters.
    """
    if not is_cluster(client):
        async with dedicated(client) as connection:
            limit = block + (connection.socket_timeout or 0.0) + 1.0
            return await connection.command(*args, timeout=limit, **options)

    async def run(node: Redis) -> Any:
        return await execute_blocking(node, *args, block=block, **options)

    async def run_asking(node: Redis) -> Any:
        async with dedicated(node) as connection:
            limit = block + (connection.socket_timeout or 0.0) + 1.0
            await connection.send("ASKING")
            await connection.read()
            return await connection.command(*args, timeout=limit, **options)

    try:
        return await _router_of(client).call(route_key(args), run, run_asking)  # type: ignore[arg-type]
    except Exception as exc:
        reraise(exc)


class Dedicated:
    """A connection of one's own, checked out of the client's pool by :func:`dedicated`.

    Every method translates errors. A read or write that fails or is cancelled marks the
    connection broken: it is closed, not reused, when :func:`dedicated` releases it.
    """

    __slots__ = (
        "_broken",
        "_client",
        "_connection",
        "_key",
        "_pending",
        "_router",
        "socket_timeout",
    )

    def __init__(
        self,
        client: Redis,
        connection: AbstractConnection,
        *,
        router: SlotRouter | None = None,
        key: KeyT | None = None,
    ) -> None:
        self._client = client
        self._connection = connection
        # On a cluster: the router and key that chose the node (see reconnect()).
        self._router = router
        self._key = key
        self._pending = 0  # replies sent for and not yet read
        self._broken = False
        self.socket_timeout: float | None = connection.socket_timeout

    @property
    def protocol(self) -> int:
        """The RESP version the connection speaks (2 or 3)."""
        return int(self._connection.protocol or 2)

    def return_invalidations(self) -> bool:
        """RESP3: have :meth:`read` (``push=True``) return ``invalidate`` pushes (client
        tracking) instead of dropping them. False when this redis-py cannot."""
        return return_invalidations(self._connection)

    @property
    def reusable(self) -> bool:
        """Whether the connection is in step (no reply outstanding, nothing failed)."""
        return not self._broken and self._pending == 0

    async def send(self, *args: Arg) -> None:
        """Write one command (its reply is read with :meth:`read`)."""
        try:
            chunks = packer_of(self._client)(args)  # bad input fails here, nothing sent
        except Exception as exc:
            reraise(exc)
        self._pending += 1
        try:
            await send(self._connection, chunks)
        except BaseException as exc:
            self._broken = True
            if isinstance(exc, Exception):
                reraise(exc)
            raise

    async def read(self, *, timeout: float | None = None, push: bool = False) -> Any:  # noqa: ASYNC109
        """Read one raw reply (no response callback).

        Args:
            timeout: seconds to wait (``None``: the socket timeout; ``math.inf``: forever,
                without the cost of a deadline per read).
            push: accept RESP3 push messages (subscriptions).

        Raises:
            CommandTimeout: nothing arrived in time (the connection is then broken).
            CommandError: an error reply (the connection stays in step).
            ConnectionFailed: the connection broke.
        """
        wait = self.socket_timeout if timeout is None else timeout
        read = self._connection.read_response
        try:
            if wait is None or wait == math.inf:
                reply = await read(timeout=math.inf, disconnect_on_error=False, push_request=push)
            else:
                with anyio.fail_after(wait):
                    reply = await read(
                        timeout=math.inf, disconnect_on_error=False, push_request=push
                    )
        except rex.ResponseError as exc:
            self._pending = max(0, self._pending - 1)
            reraise(exc)
        except TimeoutError:
            self._broken = True
            raise CommandTimeout(f"no reply within {wait:.2f} s") from None
        except BaseException as exc:
            self._broken = True
            if isinstance(exc, Exception):
                reraise(exc)
            raise
        self._pending = max(0, self._pending - 1)
        return reply

    async def command(
        self,
        *args: Arg,
        timeout: float | None = None,  # noqa: ASYNC109
        **options: Any,
    ) -> Any:
        """Send one command and read its reply, parsed by redis-py's response callback."""
        await self.send(*args)
        reply = await self.read(timeout=timeout)
        return apply_callback(self._client, args[0], reply, options)

    async def batch(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Write ``commands`` in one go and read every reply; raise the first error reply."""
        connection = self._connection
        pack = packer_of(self._client)
        try:
            packed = [chunk for command in commands for chunk in pack(tuple(command))]
        except Exception as exc:
            reraise(exc)
        self._pending += len(commands)
        try:
            await send(connection, packed)
        except BaseException as exc:
            self._broken = True
            if isinstance(exc, Exception):
                reraise(exc)
            raise
        replies: list[Any] = []
        first_error: RedisPatternsError | None = None
        for command in commands:
            try:
                reply = await self.read()
            except RedisPatternsError as exc:
                if self._broken:
                    raise
                first_error = first_error or exc
                replies.append(exc)
                continue
            replies.append(apply_callback(self._client, command[0], reply, {}))
        if first_error is not None:
            raise first_error
        return replies

    async def reconnect(self) -> None:
        """Close the socket and connect again (no retry: the caller's loop decides).

        On a cluster the slot map is re-read first, and the connection moves to the node
        that now serves the key (a primary failed over, a slot migrated), or for no key
        to a primary still in the map.
        """
        if self._router is not None:
            try:
                self._router.mark_stale()
                node = await self._router.node_for(self._key)
                if node is not self._client:
                    await self._move_to(node)
                    return
            except Exception as exc:
                self._broken = True
                reraise(exc)
        connection = self._connection
        self._pending = 0
        try:
            await connection.disconnect(nowait=True)
            await guarded(
                connection.connect_check_health(check_health=False, retry_socket_connect=False)
            )
        except BaseException as exc:
            self._broken = True
            if isinstance(exc, Exception):
                reraise(exc)
            raise
        self._broken = False

    async def disconnect(self) -> None:
        """Close the socket now: a read in progress elsewhere fails with ConnectionFailed."""
        self._broken = True
        await self._connection.disconnect(nowait=True)

    async def _move_to(self, node: Redis) -> None:
        """Take a connection of ``node``'s pool; the old one is closed and given back."""
        connection = await checkout(node.connection_pool)
        old, old_client = self._connection, self._client
        self._connection, self._client = connection, node
        self._pending = 0
        self._broken = False
        self.socket_timeout = connection.socket_timeout
        await _give_back(old_client, old, reusable=False)

    async def release(self, *, reusable: bool) -> None:
        """Give the connection back to its pool, closed first unless in step and
        ``reusable`` (shielded and bounded: it runs on every exit path)."""
        await _give_back(self._client, self._connection, reusable=reusable and self.reusable)


async def _give_back(client: Redis, connection: AbstractConnection, *, reusable: bool) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
        try:
            if not reusable:
                await connection.disconnect(nowait=True)
        finally:
            await client.connection_pool.release(connection)


async def execute_initialize(client: AnyRedis) -> None:
    """Load a cluster client's slot map if it has none yet (nothing on a standalone one).

    Raises:
        ConfigurationError: the server is not a cluster node.
        ConnectionFailed: the cluster could not be reached.
    """
    if isinstance(client, RedisCluster):
        await _loaded_router(client, None)


async def _loaded_router(client: RedisCluster, key: KeyT | None) -> SlotRouter:
    """``client``'s router, its map loaded (and the node serving ``key`` known)."""
    router = _router_of(client)
    try:
        await router.node_for(key)
    except Exception as exc:
        reraise(exc)
    return router


async def node_of(client: AnyRedis, key: KeyT) -> str | None:
    """The name (``host:port``) of the cluster node that owns ``key``; None standalone.

    Raises:
        ConnectionFailed: the cluster's slot map could not be loaded.
    """
    if not isinstance(client, RedisCluster):
        return None
    return (await _loaded_router(client, key)).node_name(key)


async def primaries(client: AnyRedis) -> list[str] | None:
    """``host:port`` of every primary that serves slots (the map is loaded if needed);
    None on a standalone server.

    Raises:
        ConnectionFailed: the cluster's slot map could not be loaded.
    """
    if not isinstance(client, RedisCluster):
        return None
    return (await _loaded_router(client, None)).primaries


def known_primaries(client: AnyRedis) -> list[str]:
    """``host:port`` of the primaries in a cluster's current map, without loading it
    (empty before the first load, and on a standalone server)."""
    if not isinstance(client, RedisCluster):
        return []
    router = state_of(client).router
    return router.primaries if router is not None else []


def topology_epoch(client: AnyRedis) -> int:
    """A number that changes whenever a cluster's slot map changes (0 standalone)."""
    if not isinstance(client, RedisCluster):
        return 0
    router = state_of(client).router
    return router.epoch if router is not None else 0


@asynccontextmanager
async def dedicated(
    client: AnyRedis,
    *,
    key: KeyT | None = None,
    node: str | None = None,
    reusable: bool = True,
) -> AsyncIterator[Dedicated]:
    """Check out a connection of one's own for the ``async with`` body.

    Args:
        key: on a cluster, the connection goes to the node that owns ``key``'s slot
            (the default node when None); ignored on a standalone server.
        node: on a cluster, ``host:port`` of the node to connect to (instead of
            ``key``); ignored on a standalone server.
        reusable: False for a connection that cannot serve anyone else afterwards
            (subscribed mode): it is always closed on release.

    Raises:
        PoolTimeout: no pooled connection became free within ``pool_timeout``.
        ConnectionFailed: the server could not be reached.

    Cancellation: the connection goes back to the pool under a shielded, bounded scope;
    one that was not in step (a reply outstanding, a failed or cancelled I/O) is closed
    first, so nobody ever reads another caller's reply.
    """
    router: SlotRouter | None = None
    try:
        if isinstance(client, RedisCluster):
            router = _router_of(client)
            if node is not None:
                host, _, port = node.rpartition(":")
                target = router.node(host, int(port))
            else:
                target = await router.node_for(key)
        else:
            target = client
        connection = await checkout(target.connection_pool)
    except Exception as exc:
        reraise(exc)
    handle = Dedicated(target, connection, router=router, key=key)
    try:
        yield handle
    finally:
        await handle.release(reusable=reusable)
