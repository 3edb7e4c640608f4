"""Server-assisted invalidation for the near layer: ``CLIENT TRACKING ... BCAST``.

One connection of its own per server (per primary on a cluster) turns tracking on in
broadcast mode for the cache's key prefix, then only reads: every write to a key under
the prefix, by any client, sends this connection the key's name, and the near layer
drops it.

Why ``BCAST PREFIX`` rather than ``OPTIN``: with ``OPTIN`` the server tracks the keys
*read on the tracked connection* (or on connections redirecting to it), so every near
miss would have to be read over that one connection, off the auto-pipeline that serves
every other command, and every connection that reconnects would have to be re-armed.
With ``BCAST`` a read can go over any connection; the price is one invalidation per
write under the prefix per tracking process, whether it held the key or not (and no
per-key tracking table on the server). A cache read far more than written, the case a
near layer is for, pays little for that. Measured (``benchmarks/near_tracking_modes.py``,
4 listeners, 1,000 keys): 1.19 us of server CPU per SET with BCAST, 0.77 us untracked,
3.16 us with OPTIN once invalidated keys are re-read to keep them tracked.

Both protocols: on RESP3 the invalidations are push messages on the tracking connection
itself; on RESP2 the connection redirects tracking to itself (``REDIRECT <own id>``)
and subscribes to ``__redis__:invalidate``.

The layer may serve an entry only while its server's tracking connection is *armed*
(tracking on, the connection alive). When it is lost, or silent past two heartbeats,
the whole near layer is flushed: it cannot know what it missed. A flush by the server
(``FLUSHDB`` / ``FLUSHALL``, a null key list) flushes it too. On a cluster a change of
the slot map also flushes it (a key may now live on a node whose invalidations this
process was not reading).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from ._backoff import Backoff
from ._commands import (
    Dedicated,
    dedicated,
    known_primaries,
    node_of,
    primaries,
    topology_epoch,
)
from ._connection import AnyRedis
from ._keys import KeyT
from ._near import NearStore
from .errors import CommandTimeout, ConnectionFailed, RedisPatternsError

__all__ = ("Tracking",)

logger: logging.Logger = logging.getLogger("aioredispatterns.cache")

_INVALIDATE = frozenset({b"invalidate", "invalidate"})
_MESSAGE = frozenset({b"message", "message"})
_CHANNEL = "__redis__:invalidate"
# How long opening a cache waits for tracking to be armed before it serves remotely.
_FIRST_ARM_WAIT = 2.0


class _Silent(ConnectionFailed):
    """A tracking connection did not answer a heartbeat in time."""


class _Tracker:
    """The tracking connection of one server (a primary, on a cluster)."""

    def __init__(self, tracking: Tracking, node: str | None) -> None:
        self._tracking = tracking
        self.node = node
        self.armed = False
        self.attempted = anyio.Event()
        self.scope = anyio.CancelScope()  # cancelled when the node stops serving slots
        self._replies = 0  # heartbeat replies read
        self._reported: str | None = None

    async def run(self) -> None:
        """Keep tracking armed until cancelled (``attempted`` is set after the first try)."""
        with self.scope:
            await self._keep_armed()

    async def _keep_armed(self) -> None:
        tracking = self._tracking
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                async with dedicated(tracking.client, node=self.node, reusable=False) as conn:
                    await self._arm(conn)
                    self.armed = True
                    self._reported = None
                    backoff.reset()
                    self.attempted.set()
                    await self._listen(conn)
            except RedisPatternsError as exc:
                self._report(exc)
            finally:
                if self.armed:
                    self.armed = False
                    tracking.store.flush()
            self.attempted.set()
            await backoff.sleep()

    async def _listen(self, conn: Dedicated) -> None:
        """Read invalidations and heartbeat replies until one of the two fails."""
        failure: RedisPatternsError | None = None
        async with anyio.create_task_group() as tg:

            async def until_failure(part: Callable[[Dedicated], Awaitable[None]]) -> None:
                nonlocal failure
                try:
                    await part(conn)
                except RedisPatternsError as exc:  # raised below, not as an ExceptionGroup
                    failure = failure or exc
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(until_failure, self._heartbeat)
            tg.start_soon(until_failure, self._read)
        if failure is not None:
            raise failure

    def _report(self, exc: BaseException) -> None:
        # One log line per kind of trouble, not one per retry.
        text = f"{type(exc).__name__}: {exc}"
        if text != self._reported:
            self._reported = text
            logger.warning(
                "near cache: no invalidations from %s (served from Redis until back): %s",
                self.node or "the server",
                text,
            )

    async def _arm(self, conn: Dedicated) -> None:
        prefix = self._tracking.prefix
        if conn.protocol >= 3 and conn.return_invalidations():
            await conn.command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", prefix)
            return
        own_id = await conn.command("CLIENT", "ID")
        await conn.command(
            "CLIENT", "TRACKING", "ON", "REDIRECT", own_id, "BCAST", "PREFIX", prefix
        )
        await conn.send("SUBSCRIBE", _CHANNEL)
        await conn.read(push=True)  # the subscription's confirmation

    async def _read(self, conn: Dedicated) -> None:
        store = self._tracking.store
        while True:
            reply = await conn.read(timeout=math.inf, push=True)
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind in _INVALIDATE:
                    keys = reply[1]
                elif kind in _MESSAGE and len(reply) == 3:
                    keys = reply[2]
                else:  # the RESP2 pong
                    self._replies += 1
                    continue
                if keys is None:  # FLUSHDB / FLUSHALL
                    store.flush()
                else:
                    store.invalidate(keys)
            else:  # the RESP3 PONG
                self._replies += 1

    async def _heartbeat(self, conn: Dedicated) -> None:
        interval = self._tracking.store.policy.heartbeat
        while True:
            before = self._replies
            await conn.send("PING")
            await anyio.sleep(2 * interval)
            if self._replies == before:
                raise _Silent(f"no heartbeat reply within {2 * interval:.2f} s")


class Tracking:
    """The tracking connections of one cache, run in its task group."""

    def __init__(self, client: AnyRedis, prefix: str, store: NearStore) -> None:
        self.client = client
        self.prefix = prefix
        self.store = store
        self.cluster = False  # set by start()
        self._trackers: dict[str | None, _Tracker] = {}
        self._tg: TaskGroup | None = None
        self._epoch = 0

    async def start(self, tg: TaskGroup) -> None:
        """Open the tracking connections; wait (bounded) for their first attempt."""
        self._tg = tg
        try:
            names = await primaries(self.client)
            nodes: list[str | None] = [None] if names is None else list(names)
        except (ConnectionFailed, CommandTimeout):
            nodes = []  # the cluster's map is not known yet: trackers start on first use
        self.cluster = nodes != [None]
        self._epoch = topology_epoch(self.client)
        for node in nodes:
            self._spawn(node)
        with anyio.move_on_after(_FIRST_ARM_WAIT):
            for tracker in list(self._trackers.values()):
                await tracker.attempted.wait()

    def _spawn(self, node: str | None) -> None:
        assert self._tg is not None
        tracker = self._trackers[node] = _Tracker(self, node)
        self._tg.start_soon(tracker.run)

    def stop(self) -> None:
        """The cache is closing: nothing is armed any more (its task group ends them)."""
        self._tg = None
        for tracker in self._trackers.values():
            tracker.armed = False

    def check_topology(self) -> None:
        """On a cluster: if the slot map changed since last time, flush the near layer and
        retire the trackers of nodes that no longer serve slots (a failed-over primary);
        new primaries get theirs on first use."""
        epoch = topology_epoch(self.client)
        if epoch != self._epoch:
            self._epoch = epoch
            self.store.flush()
            serving = set(known_primaries(self.client))
            for node, tracker in list(self._trackers.items()):
                if node is not None and node not in serving:
                    tracker.scope.cancel()
                    del self._trackers[node]

    async def ticket(self, key: KeyT) -> int | None:
        """A ticket for a read of ``key`` about to be sent, or None when its server's
        tracking is not armed (the reply must then not be kept)."""
        node: str | None = None
        if self.cluster:
            self.check_topology()
            try:
                node = await node_of(self.client, key)
            except RedisPatternsError:
                return None
        tracker = self._trackers.get(node)
        if tracker is None:
            if self._tg is not None and (self.cluster or node is None):
                # A primary this cache has not tracked yet (a promoted replica).
                self._spawn(node)
            return None
        if not tracker.armed:
            return None
        return self.store.begin(key)
