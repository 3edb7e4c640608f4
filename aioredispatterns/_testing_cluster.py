"""A local Redis Cluster for tests, and the cluster faults a client must survive.

:func:`start_cluster` starts primaries (and replicas), each a
:class:`~aioredispatterns.testing.RedisServer` process this process owns. The
:class:`ClusterServers` it returns answers topology questions (who owns a slot, which nodes
are primaries, which replicas follow a primary) and injects the faults of a real cluster: a
primary SIGKILLed until a replica is promoted (:meth:`ClusterServers.kill_primary`), a
manual ``CLUSTER FAILOVER`` (:meth:`ClusterServers.failover`), a live slot migration while
a workload runs (:meth:`ClusterServers.start_migration`), a frozen primary
(:meth:`ClusterServers.pause_primary`).

Every method is synchronous and blocks the calling thread until the cluster has settled
(every running node reports ``cluster_state:ok`` and all of them agree on roles and slot
owners). An async test keeps its event loop, and so its workload, running by calling them
in a worker thread: ``await anyio.to_thread.run_sync(cluster.kill_primary, slot)``. A
slot migration can also run in a thread of its own (:meth:`ClusterServers.start_migration`).

The servers talk to each other through the cluster bus; the harness reaches them with
redis-py's synchronous client, one small pool per node, never with retries (a poll that
fails is simply polled again).
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import TracebackType

    from .testing import RedisServer

SLOT_COUNT = 16384

# Generous: these waits run on a busy 2-core machine, and a deadline that passes there is a
# false failure. The condition, not the time, is what a test asserts.
_SETTLE_TIMEOUT = 45.0
_POLL_INTERVAL = 0.1
# Longer than MIGRATE's own timeout, so a slow MIGRATE reports its own error.
_SOCKET_TIMEOUT = 15.0
_MIGRATE_TIMEOUT_MS = 10_000

_log = logging.getLogger("aioredispatterns.testing")


def _slot_of_key(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOT_COUNT


# ------------------------------------------------------------------------------ topology


@dataclass(frozen=True)
class _Entry:
    """One line of ``CLUSTER NODES``: a node as another node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    connected: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def _parse_nodes(text: str) -> dict[str, _Entry]:
    # <id> <ip:port@cport[,hostname]> <flags> <primary|-> <ping> <pong> <epoch> <link> <slot>...
    entries: dict[str, _Entry] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags, primary = fields[:4]
        port_text = address.split("@", 1)[0].rsplit(":", 1)[-1]
        slots = []
        for token in fields[8:]:
            if token.startswith("["):  # an open migration: "[slot->-id]" / "[slot-<-id]"
                continue
            first, _, last = token.partition("-")
            slots.append((int(first), int(last or first)))
        entries[node_id] = _Entry(
            node_id=node_id,
            port=int(port_text) if port_text.isdigit() else 0,
            flags=frozenset(flags.split(",")),
            primary_id=None if primary == "-" else primary,
            connected=fields[7] == "connected",
            slots=tuple(sorted(slots)),
        )
    return entries


@dataclass(frozen=True)
class _NodeView:
    """What one running node reports: its cluster table, its state, its replication link."""

    own_id: str
    entries: dict[str, _Entry]
    state_ok: bool
    link_up: bool | None  # None on a primary


@dataclass(frozen=True)
class _Topology:
    """The cluster as every running node agrees it is (entries of running nodes only)."""

    entries: dict[str, _Entry]

    def owner_id(self, slot: int) -> str | None:
        for entry in self.entries.values():
            if entry.is_primary and entry.owns(slot):
                return entry.node_id
        return None


def _disagreement(views: dict[int, _NodeView]) -> str | None:
    """Why the running nodes do not (yet) agree on one healthy topology, or None."""
    if not views:
        return "no node is running"
    running = {view.own_id for view in views.values()}
    reference: tuple[int, frozenset[Any]] | None = None
    for port, view in views.items():
        if not view.state_ok:
            return f"node :{port} does not report cluster_state:ok"
        if view.link_up is False:
            return f"replica :{port} has master_link_status down"
        missing = running - view.entries.keys()
        if missing:
            return f"node :{port} does not know {sorted(missing)}"
        for node_id in running:
            entry = view.entries[node_id]
            if entry.failing:
                return f"node :{port} flags :{entry.port} {sorted(entry.flags)}"
            if not entry.connected:
                return f"node :{port} has no link to :{entry.port}"
            if not entry.is_primary and entry.primary_id not in running:
                return f"node :{port} sees :{entry.port} replicate a node that is not running"
        shape = frozenset(
            (e.node_id, e.is_primary, e.primary_id, e.slots)
            for e in (view.entries[node_id] for node_id in running)
        )
        if reference is None:
            reference = (port, shape)
        elif shape != reference[1]:
            return f"nodes :{reference[0]} and :{port} disagree on roles or slots"
        covered = sum(
            last - first + 1
            for node_id in running
            for first, last in view.entries[node_id].slots
            if view.entries[node_id].is_primary
        )
        if covered != SLOT_COUNT:
            return f"node :{port} sees {covered} of {SLOT_COUNT} slots served by running nodes"
    return None


def _running(node: RedisServer) -> bool:
    """Alive and not paused (a SIGSTOPped node answers nothing until resumed)."""
    process = node.process
    if process is None or process.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:  # not Linux, or reaped meanwhile
        return process.poll() is None
    return stat.rsplit(")", 1)[-1].split()[0] not in ("T", "t", "Z")


# ------------------------------------------------------------------------------ results


@dataclass
class ClusterFailover:
    """A primary's slots passing to another node: :meth:`ClusterServers.kill_primary` or
    :meth:`ClusterServers.failover`.

    Attributes:
        old_primary: the primary that lost its slots (killed, or now a replica).
        new_primary: the node that serves them now; None until :meth:`wait` returned.
        seconds: from the kill (or the ``CLUSTER FAILOVER``) until every running node
            agreed on the new owner; None until :meth:`wait` returned.
    """

    old_primary: RedisServer
    new_primary: RedisServer | None = None
    seconds: float | None = None
    _cluster: ClusterServers | None = field(default=None, repr=False)
    _old_id: str = field(default="", repr=False)
    _slot: int = field(default=0, repr=False)
    _began: float = field(default=0.0, repr=False)

    def wait(self, timeout: float | None = None) -> RedisServer:
        """Block until a new primary serves the old primary's slots, as every running node
        agrees, and each running node reports ``cluster_state:ok``; returns the new primary.

        Raises:
            RuntimeError: not settled within ``timeout`` seconds (default: generous); the
                message says what was still missing.
        """
        if self.new_primary is not None:
            return self.new_primary
        assert self._cluster is not None
        cluster, old_id, slot = self._cluster, self._old_id, self._slot

        def promoted(topology: _Topology) -> str | None:
            owner = topology.owner_id(slot)
            if owner is None or owner == old_id:
                return f"slot {slot} is still served by the old primary"
            old = topology.entries.get(old_id)  # None when the old primary is not running
            if old is not None and old.primary_id != owner:
                return "the old primary does not replicate the new one yet"
            return None

        topology = cluster._settle(f"a new primary for slot {slot}", promoted, timeout)
        owner = topology.owner_id(slot)
        assert owner is not None
        self.new_primary = cluster._node_by_id(owner)
        self.seconds = time.monotonic() - self._began
        _log.info(
            "cluster: slots of :%d served by :%d after %.2f s",
            self.old_primary.port,
            self.new_primary.port,
            self.seconds,
        )
        return self.new_primary


class SlotMigration:
    """A live migration of one slot from its owner to another primary.

    Runs the steps ``redis-cli --cluster reshard`` runs: ``CLUSTER SETSLOT <slot> IMPORTING``
    on the target, ``MIGRATING`` on the source, then ``CLUSTER GETKEYSINSLOT`` + ``MIGRATE
    ... KEYS`` in batches of ``batch`` keys with ``step_delay`` seconds between batches (the
    window in which clients get ``ASK`` redirections and ``TRYAGAIN``), then ``SETSLOT <slot>
    NODE <target>`` on the target, the source and every other primary, and waits until every
    node agrees.

    Made by :meth:`ClusterServers.migrate_slot` (already finished) or
    :meth:`ClusterServers.start_migration` (running in a background thread: :meth:`join` it,
    or use it as a context manager, which joins on exit). If a step fails, the slot is left
    in its IMPORTING / MIGRATING state and :meth:`join` raises the error.

    Attributes:
        slot, source, target: what moves, from where, to where.
        keys_moved: keys moved so far (updated while it runs).
        seconds: duration of the whole migration; None until it finished.
    """

    def __init__(
        self,
        cluster: ClusterServers,
        slot: int,
        target: RedisServer,
        *,
        batch: int,
        step_delay: float,
        timeout: float | None,
    ) -> None:
        if not 0 <= slot < SLOT_COUNT:
            raise ValueError(f"slot must be in [0, {SLOT_COUNT}), got {slot!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        if not step_delay >= 0:
            raise ValueError(f"step_delay must be >= 0, got {step_delay!r}")
        self.slot = slot
        self.source: RedisServer = cluster.owner_of_slot(slot)
        self.target = target
        if self.source.port == target.port:
            raise ValueError(f"slot {slot} is already served by :{target.port}")
        if target.port not in {node.port for node in cluster.primaries()}:
            raise ValueError(f"the target :{target.port} is not a running primary")
        self.keys_moved: int = 0
        self.seconds: float | None = None
        self._cluster = cluster
        self._batch = batch
        self._step_delay = step_delay
        self._timeout = timeout
        self._window_open = threading.Event()
        self._finished = threading.Event()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None

    @property
    def moving(self) -> bool:
        """True while keys are moving (the ASK window): IMPORTING / MIGRATING are set and
        the slot is not yet assigned to the target."""
        return self._window_open.is_set()

    @property
    def done(self) -> bool:
        """True once the migration finished, successfully or not."""
        return self._finished.is_set()

    def run(self) -> SlotMigration:
        """Run the migration in the calling thread (what :meth:`ClusterServers.migrate_slot`
        does); returns when every node agrees the target serves the slot."""
        try:
            self._migrate()
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._window_open.clear()
            self._finished.set()
        return self

    def start(self) -> SlotMigration:
        """Run the migration in a daemon thread; :meth:`join` waits for it."""
        self._thread = threading.Thread(
            target=self._run_in_thread, name=f"slot-migration-{self.slot}", daemon=True
        )
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> SlotMigration:
        """Wait until the migration finished; re-raise its error, if any.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the migration of slot {self.slot} is still running")
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    def _run_in_thread(self) -> None:
        # The error is kept for join(), which raises it in the test's thread.
        with contextlib.suppress(Exception):
            self.run()

    def _migrate(self) -> None:
        began = time.monotonic()
        cluster, slot = self._cluster, self.slot
        source_id, target_id = cluster.node_id(self.source), cluster.node_id(self.target)
        cluster._call(self.target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        cluster._call(self.source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        self._window_open.set()
        while True:
            keys = cluster._call(self.source, "CLUSTER", "GETKEYSINSLOT", slot, self._batch)
            if not keys:
                break
            # REPLACE: while the slot is MIGRATING, a key the source still holds is the live
            # copy (writes to it are served there), so it wins over any leftover.
            cluster._call(
                self.source,
                "MIGRATE", "127.0.0.1", self.target.port, "", 0, _MIGRATE_TIMEOUT_MS,
                "REPLACE", "KEYS", *keys,
            )  # fmt: skip
            self.keys_moved += len(keys)
            if self._step_delay:
                time.sleep(self._step_delay)
        # The target first: once it owns the slot, the source's redirections point right.
        others = [node for node in cluster.primaries() if node.port != self.target.port]
        others.sort(key=lambda node: node.port != self.source.port)
        for node in [self.target, *others]:
            cluster._call(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self._window_open.clear()  # what follows is gossip

        def assigned(topology: _Topology) -> str | None:
            owner = topology.owner_id(slot)
            return None if owner == target_id else f"slot {slot} not yet served by the target"

        cluster._settle(f"slot {slot} to move to :{self.target.port}", assigned, self._timeout)
        self.seconds = time.monotonic() - began

    def __enter__(self) -> SlotMigration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.join()
            return
        # The body failed: still wait for the thread (no stray migration outlives the
        # block), but let the body's own exception be the one that leaves.
        with contextlib.suppress(Exception):
            self.join()


# ------------------------------------------------------------------------------ the cluster


@dataclass
class ClusterServers:
    """A local Redis Cluster: every node a :class:`~aioredispatterns.testing.RedisServer`
    this process started and owns. Made by :func:`start_cluster`; :meth:`stop` it (or use
    it as a context manager).

    ``nodes`` lists every node in start order, primaries first; which of them are primaries
    *now* (after failovers) is :meth:`primaries`. Every method blocks the calling thread;
    from an async test call them through ``anyio.to_thread.run_sync`` so the event loop
    keeps running. Methods that change the topology return once every running node reports
    ``cluster_state:ok`` and all agree on roles and slot owners, or raise
    :class:`RuntimeError` saying what was still missing after a generous deadline.
    """

    nodes: list[RedisServer]
    node_timeout_ms: int = 2000
    _ids: dict[int, str] = field(default_factory=dict, repr=False)
    _clients: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL (of a running node) for :func:`aioredispatterns.connect`."""
        node = next((node for node in self.nodes if _running(node)), self.nodes[0])
        return f"redis+cluster://127.0.0.1:{node.port}/0"

    # -- topology ----------------------------------------------------------------------

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The slot of ``key``: CRC16 of its hash tag (``{...}``) if it has one, else of all
        of it (what ``CLUSTER KEYSLOT`` answers, computed here)."""
        return _slot_of_key(key)

    def node_id(self, node: RedisServer) -> str:
        """The cluster node id of ``node`` (kept across :meth:`restart`)."""
        return self._ids[node.port]

    def primaries(self) -> list[RedisServer]:
        """The primaries now, ordered by the first slot they serve (slotless ones last).

        As one running node sees them: during a failover or right after a fault, nodes may
        briefly disagree; the methods that inject faults return once they agree.
        """
        entries = self._view().entries.values()
        alive = [e for e in entries if e.is_primary and not e.failing]
        alive.sort(key=lambda e: (e.slots[0][0] if e.slots else SLOT_COUNT, e.port))
        return [self._node_by_id(e.node_id) for e in alive]

    def replicas_of(self, node: RedisServer) -> list[RedisServer]:
        """The nodes replicating ``node`` now (failed ones excluded), in port order."""
        own_id = self.node_id(node)
        entries = self._view().entries.values()
        found = [e for e in entries if e.primary_id == own_id and not e.failing]
        return [self._node_by_id(e.node_id) for e in sorted(found, key=lambda e: e.port)]

    def owner_of_slot(self, slot: int) -> RedisServer:
        """The primary serving ``slot`` now."""
        owner = _Topology(self._view().entries).owner_id(slot)
        if owner is None:
            raise RuntimeError(f"no node serves slot {slot}")
        return self._node_by_id(owner)

    def node_for_key(self, key: str | bytes) -> RedisServer:
        """The primary serving ``key``'s slot now."""
        return self.owner_of_slot(_slot_of_key(key))

    # -- faults ------------------------------------------------------------------------

    def kill_primary(
        self, node_or_slot: RedisServer | int, *, wait: bool = True, timeout: float | None = None
    ) -> ClusterFailover:
        """SIGKILL a primary (given, or the one serving a slot), as in a crash.

        With ``wait`` (the default), returns once a replica was promoted and every running
        node agrees on it: ``result.new_primary`` serves the slots, ``result.seconds`` is
        how long the promotion took (``node_timeout_ms`` plus an election: 3-5 s with the
        default 2 s on an idle machine).
        Without, returns right after the kill; ``result.wait()`` waits later. The killed
        node keeps its port and directory (with its ``nodes.conf``): :meth:`restart` brings
        it back as a replica.

        Raises:
            ValueError: the node is not a primary serving slots, or has no running
                replica to promote (a failover also needs a majority of primaries alive:
                at least 3 primaries).
            RuntimeError: ``wait`` and no promotion within ``timeout`` (default: generous).
        """
        node = self._resolve(node_or_slot)
        failover = self._prepare_failover(node)
        if not any(_running(replica) for replica in self.replicas_of(node)):
            raise ValueError(f"primary :{node.port} has no running replica to promote")
        failover._began = time.monotonic()
        node.kill()
        if wait:
            failover.wait(timeout)
        return failover

    def failover(
        self, replica: RedisServer, *, force: bool = False, timeout: float | None = None
    ) -> ClusterFailover:
        """``CLUSTER FAILOVER [FORCE]`` on ``replica``: it becomes the primary of its slots
        and its old primary its replica. Returns once every running node agrees.

        Without ``force`` the replica first catches up with its primary (no write is
        lost); ``force`` skips that handshake, for a primary that is down or paused.

        Raises:
            ValueError: ``replica`` is not a replica.
            RuntimeError: the roles did not swap within ``timeout`` (default: generous).
        """
        entry = self._view().entries.get(self.node_id(replica))
        if entry is None or entry.is_primary or entry.primary_id is None:
            raise ValueError(f":{replica.port} is not a replica")
        failover = self._prepare_failover(self._node_by_id(entry.primary_id))
        failover._began = time.monotonic()
        self._call(replica, "CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        failover.wait(timeout)
        return failover

    def restart(self, node: RedisServer, *, timeout: float | None = None) -> RedisServer:
        """Start a node that was killed (by :meth:`kill_primary` or its own ``kill()``)
        again, on its port.

        It keeps its node id (its ``nodes.conf`` stays in its directory) but not its data;
        a primary whose slots were taken over rejoins as a replica of the new owner and
        resyncs. Returns once every running node agrees (replication links up).
        Restarting a primary whose slots nobody took over brings it back empty.

        Raises:
            RuntimeError: the cluster did not settle within ``timeout`` (default: generous).
        """
        node.restart()
        self._settle(f":{node.port} to rejoin", None, timeout)
        return node

    def pause_primary(
        self, node_or_slot: RedisServer | int, seconds: float | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """SIGSTOP a primary (given, or the one serving a slot) for a ``with`` block, or for
        ``seconds`` if shorter (:meth:`aioredispatterns.testing.RedisServer.paused`).

        Paused for longer than ``node_timeout_ms``, a primary with a replica is failed over;
        resumed, it rejoins as a replica (see :meth:`settle`).
        """
        return self._resolve(node_or_slot).paused(seconds)

    def settle(self, timeout: float | None = None) -> None:
        """Block until every running node reports ``cluster_state:ok``, every replica's link
        is up, and all agree on roles and slot owners (e.g. after a pause)."""
        self._settle("the cluster to settle", None, timeout)

    def migrate_slot(
        self,
        slot: int,
        target: RedisServer,
        *,
        batch: int = 100,
        step_delay: float = 0.0,
        timeout: float | None = None,
    ) -> SlotMigration:
        """Move ``slot`` and its keys to the primary ``target``, in the calling thread.

        See :class:`SlotMigration` for the steps; ``step_delay`` seconds between batches of
        ``batch`` keys keep the ASK window open for a controllable time.

        Raises:
            ValueError: bad slot, batch or delay; ``target`` already serves the slot or is
                not a primary.
            RuntimeError: a step failed, or the nodes did not agree within ``timeout``.
        """
        return SlotMigration(
            self, slot, target, batch=batch, step_delay=step_delay, timeout=timeout
        ).run()

    def start_migration(
        self,
        slot: int,
        target: RedisServer,
        *,
        batch: int = 100,
        step_delay: float = 0.0,
        timeout: float | None = None,
    ) -> SlotMigration:
        """Like :meth:`migrate_slot`, in a background thread, so a workload (sync, or an
        event loop in this thread) runs during the migration::

            with cluster.start_migration(slot, target, batch=50, step_delay=0.2) as migration:
                while not migration.done:
                    ...  # the workload
            # here the target serves the slot, or the migration's error was raised

        An async test waits without blocking its loop: ``await
        anyio.to_thread.run_sync(migration.join)``.
        """
        return SlotMigration(
            self, slot, target, batch=batch, step_delay=step_delay, timeout=timeout
        ).start()

    def stop(self) -> None:
        """Stop every node (by pid), killed or not, and remove their directories."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ClusterServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- machinery ---------------------------------------------------------------------

    def _client(self, node: RedisServer) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        with self._lock:
            client = self._clients.get(node.port)
            if client is None:
                client = redis.Redis(
                    host="127.0.0.1",
                    port=node.port,
                    socket_timeout=_SOCKET_TIMEOUT,
                    socket_connect_timeout=_SOCKET_TIMEOUT,
                    retry=Retry(NoBackoff(), 0),
                )
                self._clients[node.port] = client
            return client

    def _call(self, node: RedisServer, *args: Any) -> Any:
        # Commands given as separate words ("CLUSTER", "NODES"): redis-py then applies no
        # response callback and returns the raw reply.
        return self._client(node).execute_command(*args)

    def _own_view(self, node: RedisServer) -> _NodeView:
        entries = _parse_nodes(self._call(node, "CLUSTER", "NODES").decode())
        own = next(e for e in entries.values() if "myself" in e.flags)
        state_ok = b"cluster_state:ok" in self._call(node, "CLUSTER", "INFO")
        link_up = None
        if not own.is_primary:
            replication = self._call(node, "INFO", "replication")  # parsed into a dict
            link_up = replication.get("master_link_status") == "up"
        return _NodeView(own.node_id, entries, state_ok, link_up)

    def _view(self) -> _NodeView:
        """The view of the first running node that answers."""
        errors = []
        for node in self.nodes:
            if _running(node):
                try:
                    return self._own_view(node)
                except Exception as exc:  # try the next node
                    errors.append(f":{node.port}: {exc!r}")
        raise RuntimeError(f"no running node answered: {errors}")

    def _settle(
        self,
        what: str,
        condition: Callable[[_Topology], str | None] | None,
        timeout: float | None,
    ) -> _Topology:
        limit = _SETTLE_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            reason = "no node answered"
            try:
                views = {node.port: self._own_view(node) for node in self.nodes if _running(node)}
                found = _disagreement(views)
                if found is None:
                    running = {view.own_id for view in views.values()}
                    some_view = next(iter(views.values()))
                    topology = _Topology({i: some_view.entries[i] for i in running})
                    found = condition(topology) if condition is not None else None
                    if found is None:
                        return topology
                reason = found
            except Exception as exc:  # a node restarting or busy: poll again
                reason = repr(exc)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"timed out after {limit:.0f} s waiting for {what}: {reason}")
            time.sleep(_POLL_INTERVAL)

    def _node_by_id(self, node_id: str) -> RedisServer:
        for node in self.nodes:
            if self._ids.get(node.port) == node_id:
                return node
        raise RuntimeError(f"node {node_id} is not one this cluster started")

    def _resolve(self, node_or_slot: RedisServer | int) -> RedisServer:
        if isinstance(node_or_slot, int):
            return self.owner_of_slot(node_or_slot)
        return node_or_slot

    def _prepare_failover(self, primary: RedisServer) -> ClusterFailover:
        entry = self._view().entries.get(self.node_id(primary))
        if entry is None or not entry.is_primary or not entry.slots:
            raise ValueError(f":{primary.port} is not a primary serving slots")
        return ClusterFailover(
            old_primary=primary,
            _cluster=self,
            _old_id=entry.node_id,
            _slot=entry.slots[0][0],
        )

    def _form(self, masters: int, replicas: int) -> None:
        """Split the slots over the first ``masters`` nodes, join everyone, attach replicas."""
        for node in self.nodes:
            own = next(
                e
                for e in _parse_nodes(self._call(node, "CLUSTER", "NODES").decode()).values()
                if "myself" in e.flags
            )
            self._ids[node.port] = own.node_id
        per_primary = SLOT_COUNT // masters
        for index, node in enumerate(self.nodes[:masters]):
            # Distinct epochs up front: no epoch-collision round before the cluster is ok.
            self._call(node, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            first = index * per_primary
            last = SLOT_COUNT - 1 if index == masters - 1 else first + per_primary - 1
            self._call(node, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for node in self.nodes[1:]:
            self._call(node, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)

        def all_known() -> bool:
            for node in self.nodes:
                entries = _parse_nodes(self._call(node, "CLUSTER", "NODES").decode())
                if len(entries) != len(self.nodes) or any(e.failing for e in entries.values()):
                    return False
            return True

        _poll_until(all_known, "every node to know every other", _SETTLE_TIMEOUT)
        for index in range(masters):
            primary_id = self._ids[self.nodes[index].port]
            for replica in self._replicas_started_for(index, masters, replicas):
                self._call(replica, "CLUSTER", "REPLICATE", primary_id)

        def expected_roles(topology: _Topology) -> str | None:
            primaries = sum(1 for e in topology.entries.values() if e.is_primary)
            return None if primaries == masters else f"{primaries} primaries, not {masters}"

        self._settle("the cluster to form", expected_roles, None)

    def _replicas_started_for(self, index: int, masters: int, replicas: int) -> list[RedisServer]:
        first = masters + index * replicas
        return self.nodes[first : first + replicas]


def _poll_until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # a node still starting: poll again
            if predicate():
                return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


def start_cluster(
    binary: Path,
    masters: int = 3,
    replicas: int = 0,
    *,
    node_timeout_ms: int = 2000,
    name: str = "cluster",
) -> ClusterServers:
    """Start a local cluster: ``masters`` primaries splitting the 16384 slots evenly, each
    with ``replicas`` replicas (``CLUSTER REPLICATE``).

    Returns once every node reports ``cluster_state:ok``, every replica's link to its
    primary is up and all nodes agree on roles and slot owners. The caller owns it and must
    :meth:`ClusterServers.stop` it (or use it as a context manager). Works with every
    server kind of :data:`~aioredispatterns.testing.SERVER_KINDS` (Redis 6.2 and later).

    Args:
        binary: a server binary, e.g. from :func:`~aioredispatterns.testing.find_server_binary`.
        masters: number of primaries (a failover after a primary dies needs a majority of
            primaries alive: use 3 or more for :meth:`ClusterServers.kill_primary`).
        replicas: replicas per primary.
        node_timeout_ms: ``cluster-node-timeout``: how long a silent node takes to be
            considered failed (and a replica promoted).
        name: prefix of the nodes' names (their directories and error messages).

    Raises:
        ValueError: bad counts or timeout.
        RuntimeError: a node did not start, or the cluster did not form; the nodes
            started so far are stopped.
    """
    from .testing import RedisServer

    if masters < 1 or replicas < 0:
        raise ValueError(f"need masters >= 1 and replicas >= 0, got {masters}, {replicas}")
    if node_timeout_ms < 100:
        raise ValueError(f"node_timeout_ms must be >= 100, got {node_timeout_ms!r}")
    args = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        # Any replica may be promoted, however long its link was down (a busy test box).
        "--cluster-replica-validity-factor", "0",
        # Replicas sync at once (the default waits 5 s for more replicas to share a fork).
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip
    cluster = ClusterServers([], node_timeout_ms=node_timeout_ms)
    try:
        for index in range(masters):
            cluster.nodes.append(RedisServer(binary, name=f"{name}-{index}", extra_args=args))
            cluster.nodes[-1].start()
        for index in range(masters):
            for number in range(replicas):
                replica_name = f"{name}-{index}-replica-{number}"
                cluster.nodes.append(RedisServer(binary, name=replica_name, extra_args=args))
                cluster.nodes[-1].start()
        cluster._form(masters, replicas)
    except BaseException:
        cluster.stop()
        raise
    return cluster
