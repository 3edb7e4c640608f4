"""The clients :func:`~aioredispatterns.connect` returns: redis-py's asyncio ``Redis`` (and
``RedisCluster``), whose users' own commands ride the auto-pipeline too.

:class:`AutoPipelinedRedis` is a ``redis.asyncio.Redis`` (``isinstance``, typing and
every redis-py method keep working); it overrides one method, ``execute_command``, which
every redis-py command method calls. A short command (``await client.get(key)``) is
packed as redis-py packs it, queued on the client's auto-pipeline (``_pipeline``) with
the library's own commands, and its reply is parsed by the client's response callbacks,
exactly as redis-py would parse it (``decode_responses``, RESP2 and RESP3, callbacks you
set yourself, ``NEVER_DECODE`` and ``EMPTY_RESPONSE``).

Commands that need a connection of their own take one from the pool, through redis-py's
own ``execute_command``, as before:

* blocking commands (BLPOP, BLMOVE, BZPOPMIN, WAIT, XREAD/XREADGROUP with BLOCK ...):
  they would stall every command behind them;
* commands that change or read the state of *their* connection: transactions and
  WATCH (``pipeline()`` / ``transaction()`` are redis-py's own objects anyway), SELECT,
  AUTH, HELLO, RESET, CLIENT SETNAME / GETNAME / ID / INFO / TRACKING / CACHING / REPLY /
  NO-EVICT / NO-TOUCH / SETINFO, READONLY / READWRITE, HIMPORT;
* SUBSCRIBE and MONITOR (``pubsub()`` and ``monitor()`` are redis-py's objects too),
  SHUTDOWN, DEBUG, MIGRATE, SYNC / PSYNC.

``lock()`` needs nothing of the sort: redis-py's ``Lock`` is SET NX and scripts, which
ride the pipeline. A client made with ``client()`` (``single_connection_client``), or
given a connection of its own, keeps redis-py's path whole.

Retries follow redis-py's rule for your commands: a command that failed with an error
the connection's ``Retry`` supports (``ConnectionError`` by default with
:func:`~aioredispatterns.connect`, plus ``TimeoutError`` with redis-py's defaults or
``retry_on_timeout``) is sent again with its backoff, so it may run twice. A command that
was never written (the connection could not be made) is not retried here: redis-py
already retried the connect. The library's own commands never get this retry.

On a cluster, :class:`AutoPipelinedRedisCluster` sends the commands on one key
(``CLUSTER_KEYED_COMMANDS``) through the library's slot router, on the auto-pipeline of
the node that serves the key; everything else keeps redis-py's cluster path.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT

from ._cluster import route_key
from ._codec import command_name
from ._connection import STATE_ATTRIBUTE, ClientState, ClusterClient, state_of
from ._pipeline import blocks, pipeline_for
from .errors import RedisPatternsError

__all__ = (
    "CLUSTER_KEYED_COMMANDS",
    "OWN_CONNECTION_COMMANDS",
    "AutoPipelinedRedis",
    "AutoPipelinedRedisCluster",
    "rides_pipeline",
    "rides_slot_router",
)

#: Commands that keep redis-py's pooled path (a connection of their own), besides the
#: blocking ones (``_pipeline.blocks``). A name with a space is a sub-command.
OWN_CONNECTION_COMMANDS = frozenset(
    {
        "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
        "SELECT", "AUTH", "HELLO", "RESET", "QUIT",
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
        "SUNSUBSCRIBE", "MONITOR", "SYNC", "PSYNC", "REPLCONF",
        "READONLY", "READWRITE", "ASKING",
        "SHUTDOWN", "DEBUG", "MIGRATE", "HIMPORT",
        "CLIENT SETNAME", "CLIENT GETNAME", "CLIENT ID", "CLIENT INFO", "CLIENT TRACKING",
        "CLIENT TRACKINGINFO", "CLIENT GETREDIR", "CLIENT CACHING", "CLIENT REPLY",
        "CLIENT NO-EVICT", "CLIENT NO-TOUCH", "CLIENT SETINFO",
    }
)  # fmt: skip
_CONTAINERS = frozenset({"CLIENT"})

# Per spelling of a command's first argument: whether it rides the pipeline, or None
# when that depends on its arguments (XREAD BLOCK).
_ROUTES: dict[EncodableT, bool | None] = {}
_MAX_ROUTES = 4096


def _full_name(args: tuple[EncodableT, ...]) -> str:
    name = command_name(args[0])
    if name in _CONTAINERS and len(args) > 1 and isinstance(args[1], str | bytes):
        return f"{name} {command_name(args[1])}"  # execute_command("CLIENT", "SETNAME", ...)
    return name


def rides_pipeline(args: tuple[EncodableT, ...]) -> bool:
    """Whether the command ``args`` goes through the auto-pipeline (else redis-py's pool)."""
    first = args[0]
    route = _ROUTES.get(first)
    if route is not None:
        return route
    name = _full_name(args)
    if name.split(" ", 1)[0] in OWN_CONNECTION_COMMANDS or name in OWN_CONNECTION_COMMANDS:
        decided: bool | None = False
    elif name in ("XREAD", "XREADGROUP"):
        decided = None
    else:
        decided = not blocks(name, args)
    if len(_ROUTES) < _MAX_ROUTES and not (name in _CONTAINERS and len(args) > 1):
        _ROUTES[first] = decided
    return not blocks(name, args) if decided is None else decided


class AutoPipelinedRedis(Redis):
    """A ``redis.asyncio.Redis`` whose short commands share the library's auto-pipeline.

    :func:`~aioredispatterns.connect` returns one (``connect(auto_pipeline=False)`` a
    plain ``redis.asyncio.Redis``); ``AutoPipelinedRedis(...)``, ``from_url`` and
    ``from_pool`` work as for any redis-py client. Every redis-py method works and
    returns what redis-py returns (response callbacks, ``decode_responses``, RESP2 and
    RESP3); the commands issued in one event-loop iteration, yours and the library's,
    travel to the server in one write on one kept connection
    (:func:`~aioredispatterns.pipeline_stats` counts them).

    These keep a pooled connection of their own, through redis-py's own path: blocking
    commands (BLPOP, BLMOVE, BZPOPMIN, WAIT, XREAD / XREADGROUP with BLOCK ...);
    transactions, ``pipeline()`` and WATCH; SELECT, AUTH, HELLO, RESET and the ``CLIENT``
    sub-commands that set or read the connection's own state (SETNAME, GETNAME, ID, INFO,
    TRACKING, CACHING, REPLY, NO-EVICT, NO-TOUCH, SETINFO); ``pubsub()``, ``monitor()``,
    SHUTDOWN, DEBUG, MIGRATE, HIMPORT. A ``client()`` (``single_connection_client``) keeps
    redis-py's path whole. ``lock()`` rides the pipeline: it is SET NX and scripts.

    Errors are redis-py's own (``redis.exceptions``), as from any redis-py client; the
    library's primitives on the same client raise the library's errors. A command that
    failed with a connection error after it was written is retried as redis-py retries
    it (the connection's ``Retry``: ``retries`` of :func:`~aioredispatterns.connect`), so
    it may run twice; one that was never written is not (redis-py retried the connect).

    Cancellation: a cancelled ``await client.get(...)`` leaves at once; if its command
    was already written, its reply is read and dropped, and the shared connection stays
    in use (redis-py closes a connection whose command was cancelled).
    """

    def execute_command(self, *args: EncodableT, **options: Any) -> Coroutine[Any, Any, Any]:
        """Run one command: on the auto-pipeline when it can share a connection, else on
        a pooled connection of its own (redis-py's path).

        Not a coroutine function itself (one coroutine less per command): it returns
        the awaitable that runs the command, and raises nothing before it is awaited.
        """
        if (_ROUTES.get(args[0]) is not True and not rides_pipeline(args)) or (
            self.connection is not None or self.single_connection_client
        ):
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        state: ClientState | None = self.__dict__.get(STATE_ATTRIBUTE)
        pipeline = state.pipeline if state is not None else None
        if pipeline is None:
            pipeline = pipeline_for(self)
            if pipeline is None:  # the client's state says auto_pipeline=False
                return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        try:
            call = pipeline.prepare(args, options)
        except Exception as exc:  # bad input: raised when awaited, as redis-py does
            return _raise(exc)
        return pipeline.run(call, retry=True)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the client: its auto-pipeline gives its connection back (commands still
        waiting fail with ``ConnectionError``), then redis-py closes as usual."""
        pipeline = state_of(self).pipeline
        try:
            if pipeline is not None:
                await pipeline.aclose()
        finally:
            await super().aclose(close_connection_pool)


async def _raise(error: Exception) -> Any:
    raise error


# Commands a cluster client sends to the primary serving their one key (``args[1]``):
# these ride that node's auto-pipeline through the slot router (``_cluster``). Anything
# else (several keys, no key, several nodes, a sub-command, ``target_nodes=``, reads from
# replicas) keeps redis-py's ``RedisCluster`` path: its request and response policies,
# cross-slot checks and aggregation are redis-py's to keep.
CLUSTER_KEYED_COMMANDS = frozenset(
    {
        "GET", "SET", "SETNX", "SETEX", "PSETEX", "GETSET", "GETDEL", "GETEX", "INCR",
        "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY", "APPEND", "STRLEN", "GETRANGE",
        "SETRANGE", "SETBIT", "GETBIT", "BITCOUNT", "BITPOS",
        "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "EXPIRETIME", "PEXPIRETIME", "TTL",
        "PTTL", "PERSIST", "TYPE", "DUMP", "RESTORE",
        "HGET", "HSET", "HSETNX", "HMGET", "HMSET", "HGETALL", "HDEL", "HEXISTS", "HINCRBY",
        "HINCRBYFLOAT", "HKEYS", "HVALS", "HLEN", "HSTRLEN", "HRANDFIELD", "HSCAN",
        "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LRANGE", "LLEN", "LINDEX",
        "LSET", "LREM", "LTRIM", "LINSERT", "LPOS",
        "SADD", "SREM", "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SPOP",
        "SRANDMEMBER", "SSCAN",
        "ZADD", "ZREM", "ZSCORE", "ZMSCORE", "ZINCRBY", "ZRANGE", "ZRANGEBYSCORE",
        "ZREVRANGE", "ZREVRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGEBYLEX", "ZRANK",
        "ZREVRANK", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZPOPMIN", "ZPOPMAX", "ZRANDMEMBER",
        "ZREMRANGEBYRANK", "ZREMRANGEBYSCORE", "ZREMRANGEBYLEX", "ZSCAN",
        "XADD", "XLEN", "XRANGE", "XREVRANGE", "XACK", "XDEL", "XTRIM", "XPENDING",
        "XCLAIM", "XAUTOCLAIM",
        "PFADD", "GEOADD", "GEOPOS", "GEODIST", "GEOHASH", "GEOSEARCH",
        "DEL", "EXISTS", "UNLINK", "TOUCH", "PFCOUNT",
    }
)  # fmt: skip
# Keyed commands that take several keys: with one they ride, with more redis-py splits
# them by slot (or checks the slots) itself.
_ONE_KEY_ONLY = frozenset({"DEL", "EXISTS", "UNLINK", "TOUCH", "PFCOUNT"})
# Per spelling of a command's first argument: 0 redis-py's path, 1 the slot router,
# _ONE_KEY the slot router when it names one key.
_CLUSTER_ROUTES: dict[EncodableT, int] = {}
_ONE_KEY = 2


def rides_slot_router(cluster: RedisCluster, args: tuple[EncodableT, ...], options: Any) -> bool:
    """Whether the command ``args`` of a cluster client's user goes through the slot
    router (else redis-py's ``RedisCluster``)."""
    if len(args) < 2 or (options and "target_nodes" in options):
        return False
    if cluster.read_from_replicas or cluster.load_balancing_strategy:
        return False
    first = args[0]
    route = _CLUSTER_ROUTES.get(first)
    if route is None:
        name = command_name(first)
        route = _ONE_KEY if name in _ONE_KEY_ONLY else int(name in CLUSTER_KEYED_COMMANDS)
        if len(_CLUSTER_ROUTES) < _MAX_ROUTES:
            _CLUSTER_ROUTES[first] = route
    return route == 1 or (route == _ONE_KEY and len(args) == 2)


class AutoPipelinedRedisCluster(ClusterClient):
    """A ``redis.asyncio.cluster.RedisCluster`` whose single-key commands ride the
    auto-pipeline of the node that serves their key.

    :func:`~aioredispatterns.connect` returns one for a cluster URL. ``await
    client.get(key)``, ``hset``, ``incr``, ``zadd``, ``xadd`` and the other commands on one
    key (``CLUSTER_KEYED_COMMANDS``) go through the library's slot router: to the primary
    that serves the key, on that node's auto-pipeline, following MOVED and ASK, parsed by
    this client's response callbacks. Everything else keeps redis-py's cluster path
    (several keys, no key, ``target_nodes=``, ``pipeline()``, pub/sub, blocking commands,
    a client reading from replicas).

    Errors are redis-py's own. A command whose connection broke after it was written is
    retried as redis-py retries it (so it may run twice); a cluster that keeps answering
    TRYAGAIN or CLUSTERDOWN beyond ``socket_timeout`` raises that error.

    Cancellation: as :class:`AutoPipelinedRedis`.
    """

    def execute_command(self, *args: EncodableT, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Run one command: a single-key one on its node's auto-pipeline, anything else
        as redis-py's ``RedisCluster`` does."""
        state: ClientState | None = self.__dict__.get(STATE_ATTRIBUTE)
        if (state is None or state.auto_pipeline) and rides_slot_router(self, args, kwargs):
            return _on_slot_owner(self, args, kwargs)
        return super().execute_command(*args, **kwargs)


async def _on_slot_owner(
    cluster: RedisCluster, args: tuple[EncodableT, ...], options: dict[str, Any]
) -> Any:
    from ._commands import _asking, _router_of  # the command layer sits above this module

    callbacks = cluster.response_callbacks

    async def run(node: Redis) -> Any:
        pipeline = pipeline_for(node)
        assert pipeline is not None  # a cluster's node clients share its auto_pipeline
        return await pipeline.run(pipeline.prepare(args, options), retry=True, callbacks=callbacks)

    async def run_asking(node: Redis) -> Any:
        return await _asking(node, args, options)

    try:
        return await _router_of(cluster).call(route_key(args), run, run_asking)
    except RedisPatternsError as exc:
        # The router's own verdicts (TRYAGAIN past the budget ...) and the dedicated
        # connection of an ASK come as the library's errors: a user of redis-py's client
        # gets redis-py's error they stand for.
        if isinstance(exc.__cause__, rex.RedisError):
            raise exc.__cause__ from None
        raise
