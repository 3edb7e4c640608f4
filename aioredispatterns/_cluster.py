"""The slot router: how the command layer talks to a Redis Cluster.

redis-py's asyncio ``RedisCluster`` stays the client users hold (for their own commands);
the library's commands never go through it. Instead, per cluster client:

* **A slot map** read from ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` where SHARDS is unknown,
  as on Redis 6.2): slot -> the primary that serves it.
* **One standalone client per node**, with its own bounded pool and its own auto-pipeline
  (``_pipeline``): a node that hangs, dies or is paused fails or delays exactly the
  callers whose commands went to that node, never those of its healthy neighbours, and
  deadlines and cancellation work exactly as on a standalone server.
* **Redirections.** ``MOVED``: the command did not run; the slot is re-pointed at once,
  the whole map is re-read (single flight, rate limited) and the command re-sent.
  ``ASK`` (a slot being migrated): ``ASKING`` and the command go back to back on one
  connection of the target node. ``TRYAGAIN`` and ``CLUSTERDOWN``: the command did not
  run; back off and retry while the caller's budget lasts (``socket_timeout``), then
  :class:`~aioredispatterns.errors.ClusterUnavailable`.
* **Errors on the wire** (a connection lost, a reply overdue) are never retried here: the
  command may have run. They mark the map stale, so the next call re-reads it (a failed
  primary's replica is found as soon as the cluster has promoted it).

Cancellation: the router holds nothing across a caller's awaits but the node clients'
own machinery (see ``_pipeline``); a map refresh is done by one caller at a time and a
cancelled refresh is simply redone by the next caller.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ._backoff import Backoff
from .errors import ClusterUnavailable, CommandError

__all__ = ("SlotRouter", "route_key")

T = TypeVar("T")

NodeFactory = Callable[[str, int], Redis]

# How many redirections (MOVED / ASK) one call follows before giving up.
_MAX_REDIRECTS = 8
# The least time between two refreshes of the map that were not asked for by a MOVED.
_REFRESH_INTERVAL = 0.1
# How long one node may take to answer CLUSTER SHARDS before the next one is asked.
_REFRESH_NODE_TIMEOUT = 1.0
# The retry budget for TRYAGAIN / CLUSTERDOWN when the client has no socket_timeout.
_DEFAULT_BUDGET = 5.0

# Commands with no key: any node can answer them. (PUBLISH is not one of them: any node
# would relay it, but one publisher's messages must all go through one node to keep their
# order, so it is routed by its channel's slot like a key.)
_KEYLESS = frozenset(
    {
        "PING", "ECHO", "INFO", "HELLO", "COMMAND", "TIME", "SCRIPT", "FUNCTION", "CLUSTER",
        "CLIENT", "ACL", "CONFIG", "DBSIZE", "LASTSAVE", "PUBSUB", "MEMORY DOCTOR",
        "LATENCY", "SLOWLOG", "READONLY", "READWRITE", "RANDOMKEY", "WAIT", "WAITAOF",
    }
)  # fmt: skip
# Container commands whose key is the argument after the sub-command.
_SUBCOMMAND_KEYED = frozenset({"XGROUP", "XINFO", "OBJECT", "MEMORY"})
_SCRIPTS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_STREAM_READS = frozenset({"XREAD", "XREADGROUP"})


def _name(first: Any) -> str:
    text = first if isinstance(first, str) else bytes(first).decode(errors="replace")
    return text.upper()


def route_key(args: Sequence[Any]) -> Any | None:
    """The argument that decides which slot ``args`` goes to, or None for any node.

    Multi-key commands must keep their keys in one slot (the library's keys share a hash
    tag), so the first key decides.
    """
    name = _name(args[0])
    if " " in name:  # "XGROUP CREATE", "COMMAND INFO": the key (if any) comes next
        head = name.split(" ", 1)[0]
        if head in _KEYLESS or len(args) < 2:
            return None
        return args[1]
    if name in _KEYLESS or len(args) < 2:
        return None
    if name in _SCRIPTS:
        numkeys = int(args[2]) if len(args) > 2 else 0
        return args[3] if numkeys > 0 and len(args) > 3 else None
    if name in _STREAM_READS:
        for index, arg in enumerate(args):
            if isinstance(arg, str | bytes) and _name(arg) == "STREAMS":
                return args[index + 1] if index + 1 < len(args) else None
        return None
    if name in _SUBCOMMAND_KEYED:
        return args[2] if len(args) > 2 else None
    return args[1]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_slots(reply: Any, asked_host: str) -> dict[int, tuple[str, int]]:
    """``CLUSTER SLOTS`` -> {first slot of a range: primary}, ranges as (first, last)."""
    ranges: dict[int, tuple[str, int]] = {}
    for entry in reply:
        first, last, primary = int(entry[0]), int(entry[1]), entry[2]
        host = _text(primary[0]) or asked_host
        for slot in range(first, last + 1):
            ranges[slot] = (host, int(primary[1]))
    return ranges


def _pairs(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        return {_text(k): v for k, v in flat.items()}
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _parse_shards(reply: Any, asked_host: str) -> dict[int, tuple[str, int]]:
    """``CLUSTER SHARDS`` -> {slot: the shard's online primary}."""
    owners: dict[int, tuple[str, int]] = {}
    for shard in reply:
        fields = _pairs(shard)
        bounds = [int(b) for b in fields.get("slots", [])]
        primary: tuple[str, int] | None = None
        for node in fields.get("nodes", []):
            info = _pairs(node)
            if _text(info.get("role", "")) != "master":
                continue
            if _text(info.get("health", "online")) != "online":
                continue
            host = _text(info.get("ip") or info.get("endpoint") or "") or asked_host
            port = info.get("port") or info.get("tls-port")
            if port is not None:
                primary = (host, int(port))
        if primary is None:
            continue
        for first, last in zip(bounds[::2], bounds[1::2], strict=False):
            for slot in range(first, last + 1):
                owners[slot] = primary
    return owners


class SlotRouter:
    """Routes the library's commands over one client per cluster node (module docstring)."""

    def __init__(self, cluster: RedisCluster, node_factory: NodeFactory) -> None:
        self._cluster = cluster
        self._factory = node_factory
        self._encode = cluster.get_encoder().encode
        timeout = cluster.connection_kwargs.get("socket_timeout")
        self._budget = float(timeout) if timeout else _DEFAULT_BUDGET
        self._slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._primaries: list[str] = []  # the nodes that serve slots
        self._nodes: dict[str, Redis] = {}
        self._seeds = [(node.host, int(node.port)) for node in cluster.startup_nodes]
        self._stale = True
        self._refreshed_at = -math.inf
        self._refreshing: anyio.Event | None = None
        self._use_shards = True
        self._closed = False
        # Nodes whose connection failed lately: asked for the map last.
        self._suspects: set[tuple[str, int]] = set()
        #: Bumped whenever the map changes (a refresh that moved slots, a MOVED): state
        #: kept per node elsewhere (a near cache's tracking) checks it to know it is stale.
        self.epoch = 0

    # ------------------------------------------------------------------ nodes

    def node(self, host: str, port: int) -> Redis:
        """The client of node ``host:port`` (created on first use)."""
        name = f"{host}:{port}"
        client = self._nodes.get(name)
        if client is None:
            if self._closed:
                raise rex.ConnectionError("the cluster client is closed")
            client = self._nodes[name] = self._factory(host, port)
        return client

    @property
    def nodes(self) -> list[Redis]:
        """Every node client created so far."""
        return list(self._nodes.values())

    def _owner(self, slot: int) -> Redis | None:
        name = self._slots[slot]
        if name is None:
            return None
        host, _, port = name.rpartition(":")
        return self.node(host, int(port))

    def slot_of(self, key: Any) -> int:
        return int(key_slot(self._encode(key)))  # type: ignore[no-untyped-call]

    async def node_for(self, key: Any | None) -> Redis:
        """The client of the node that serves ``key``'s slot (any primary for None)."""
        # A stale map is re-read by one caller; while that runs, the others keep using
        # the map they have (a redirection or a failed node sorts out what changed), so a
        # refresh slowed by a sick node never holds up callers of the healthy ones.
        if self._stale and (self._refreshing is None or not self._primaries):
            await self.refresh()
        if key is None:
            return self._any_primary()
        owner = self._owner(self.slot_of(key))
        if owner is None:
            await self.refresh(force=True)
            owner = self._owner(self.slot_of(key))
            if owner is None:
                raise ClusterUnavailable(f"no node serves the slot of {key!r}")
        return owner

    def _any_primary(self) -> Redis:
        if not self._primaries:
            seed_host, seed_port = random.choice(self._seeds)
            return self.node(seed_host, seed_port)
        host, _, port = random.choice(self._primaries).rpartition(":")
        return self.node(host, int(port))

    @property
    def primaries(self) -> list[str]:
        """``host:port`` of every node that serves slots in the current map."""
        return list(self._primaries)

    def node_name(self, key: Any) -> str | None:
        """``host:port`` of the node the map says serves ``key`` (None if unknown)."""
        return self._slots[self.slot_of(key)]

    # ------------------------------------------------------------------ the map

    def mark_stale(self) -> None:
        """Re-read the map before the next call (a connection to a node failed)."""
        self._stale = True

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the slot map: one caller at a time; others wait for its result.

        Raises:
            ClusterUnavailable: no known node answered.
        """
        while self._refreshing is not None:
            await self._refreshing.wait()
            if not force or not self._stale:
                return
        if not force and time.monotonic() - self._refreshed_at < _REFRESH_INTERVAL:
            self._stale = False
            return
        done = self._refreshing = anyio.Event()
        try:
            await self._reload()
        finally:
            self._refreshing = None
            done.set()

    async def _reload(self) -> None:
        from ._commands import dedicated  # the command layer sits above this module

        known = [name.rpartition(":") for name in self._primaries]
        candidates = [(host, int(port)) for host, _, port in known] + self._seeds
        random.shuffle(candidates)
        candidates.sort(key=lambda node: node in self._suspects)  # stable: healthy first
        candidates = list(dict.fromkeys(candidates))  # once each, order kept
        errors: list[str] = []
        for index, (host, port) in enumerate(candidates):
            # A slow node is left quickly for the next one; the last one gets the whole
            # budget (on a busy machine a first map load can take longer than a second).
            last = index == len(candidates) - 1
            wait = max(_REFRESH_NODE_TIMEOUT, self._budget) if last else _REFRESH_NODE_TIMEOUT
            with anyio.move_on_after(wait):
                try:
                    async with dedicated(self.node(host, port)) as connection:
                        owners = await self._ask_map(connection, host)
                except (rex.RedisError, OSError, CommandError, ConnectionError) as exc:
                    errors.append(f"{host}:{port}: {exc}")
                    continue
                if owners:
                    self._install(owners)
                    self._suspects.clear()
                    return
                errors.append(f"{host}:{port}: serves no slots yet")
                continue
            errors.append(f"{host}:{port}: no answer within {wait} s")
        self._refreshed_at = time.monotonic()
        raise ClusterUnavailable("no cluster node gave its slot map: " + "; ".join(errors))

    async def _ask_map(self, connection: Any, host: str) -> dict[int, tuple[str, int]]:
        if self._use_shards:
            await connection.send("CLUSTER", "SHARDS")
            try:
                return _parse_shards(await connection.read(), host)
            except CommandError:
                self._use_shards = False  # before 7.0: no CLUSTER SHARDS
        await connection.send("CLUSTER", "SLOTS")
        return _parse_slots(await connection.read(), host)

    def _install(self, owners: dict[int, tuple[str, int]]) -> None:
        slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for slot, (host, port) in owners.items():
            slots[slot] = f"{host}:{port}"
        if slots != self._slots:
            self.epoch += 1
        self._slots = slots
        self._primaries = sorted({name for name in slots if name is not None})
        self._stale = False
        self._refreshed_at = time.monotonic()

    def _moved(self, error: rex.AskError) -> None:
        host, port = error.node_addr
        self._slots[error.slot_id] = f"{host}:{port}"
        self.epoch += 1
        self._stale = True  # more slots have probably moved with it

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        key: Any | None,
        run: Callable[[Redis], Awaitable[T]],
        run_asking: Callable[[Redis], Awaitable[T]],
    ) -> T:
        """``run(node)`` on the node serving ``key``, following redirections.

        ``run_asking(node)`` must send ``ASKING`` and the command back to back on one
        connection (after an ``ASK`` redirection).

        Raises:
            ClusterUnavailable: TRYAGAIN / CLUSTERDOWN past the budget, or too many
                redirections (the command did not run).
        """
        node = await self.node_for(key)
        asking = False
        redirects = 0
        backoff: Backoff | None = None
        give_up = time.monotonic() + self._budget
        while True:
            try:
                return await (run_asking(node) if asking else run(node))
            except Exception as exc:
                # The node clients' own path may have translated the reply already.
                raw = exc.__cause__ if isinstance(exc, ClusterUnavailable) else exc
                if isinstance(raw, rex.AskError):  # MovedError is an AskError
                    redirects += 1
                    if redirects > _MAX_REDIRECTS:
                        raise ClusterUnavailable(f"too many redirections: {raw}") from raw
                    asking = not isinstance(raw, rex.MovedError)
                    if not asking:
                        self._moved(raw)
                    node = self.node(*raw.node_addr)
                    continue
                if isinstance(raw, rex.TryAgainError | rex.ClusterDownError):
                    if isinstance(raw, rex.ClusterDownError):
                        self._stale = True
                    if backoff is None:
                        backoff = Backoff(base=0.02, cap=0.25)
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise ClusterUnavailable(
                            f"the cluster could not serve the command in time: {raw}"
                        ) from raw
                    await anyio.sleep(min(backoff.next_delay(), left))  # last try at the end
                    asking = False
                    redirects = 0  # a migration may ASK, then TRYAGAIN, many times over
                    node = await self.node_for(key)
                    continue
                if isinstance(raw, rex.ConnectionError | rex.TimeoutError | OSError):
                    # OSError covers our ConnectionFailed / CommandTimeout too. The node
                    # may have failed over: re-read the map before the next call.
                    self._stale = True
                    kwargs = node.connection_pool.connection_kwargs
                    self._suspects.add((kwargs["host"], int(kwargs["port"])))
                raise

    async def close(self) -> None:
        """Close every node client (shielded, bounded by each client's own close)."""
        self._closed = True
        nodes, self._nodes = list(self._nodes.values()), {}
        with anyio.CancelScope(shield=True):
            for client in nodes:
                await client.aclose()
