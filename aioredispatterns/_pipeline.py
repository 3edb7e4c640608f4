"""Auto-pipelining: the commands many coroutines issue in one event-loop iteration travel
to the server as one write, and each caller gets its own reply.

How it works (standalone server)
--------------------------------
One connection, taken from the client's pool and kept, carries all auto-pipelined traffic
as a true pipeline: batches are written back to back without waiting for earlier replies,
and replies are read in order (the server answers one connection in order).

* ``execute()`` packs the command (redis-py's encoder), queues it and waits on a future.
* The first caller of an iteration becomes the *writer*. If replies are outstanding
  (the connection is busy), it yields once so that every coroutine runnable in this
  iteration can queue its command, then writes the whole queue in one write (chunks of
  at most ``max_batch`` commands and ``max_batch_bytes`` bytes). On an idle connection
  it writes at once: with nothing in flight there is little concurrency to wait for, and
  the callers arriving meanwhile gather behind it.
* Writes go straight to the connection's stream, waiting (up to the socket timeout)
  only when the socket pushes back: redis-py's ``send_packed_command`` would run each
  write as a task under ``asyncio.wait_for`` (see ``_open_stream_writer``).
* While the writer waits for its iteration to end, the caller that makes the queue
  ``flush_at`` long writes it at once (a plain, synchronous transport write). The server
  then starts on those commands while the rest of the iteration is still running in
  Python, instead of idling until the whole iteration has queued: with 64 callers doing
  real work between commands, client and server work overlap instead of taking turns.
  Only a connection known to be open is written to this way; otherwise the writer's
  checked path (which replaces a connection the server closed) takes the commands.
* Replies are read by one *reader* at a time: the writer when nobody is reading, else the
  reader hands the role to the oldest caller still waiting. The reader reads replies in
  order and resolves each caller's future; a reply whose caller is gone is discarded.

Cancellation
------------
A cancelled caller that is neither writer nor reader just stops waiting; its reply (if
its command was already sent) is read and dropped later, so the connection stays in sync
and is never thrown away for it. A writer or reader that is cancelled finishes its part
of the I/O first (anyio cancellation cannot reach it: the part runs in a shielded scope;
a native ``Task.cancel()`` is caught, the I/O is finished, and the cancellation is
re-raised), so its cancellation is delayed by at most one round trip, bounded by the
socket timeout. redis-py's parsers keep partial input across a cancelled read, which is
why an interrupted read can simply be resumed.

Failures
--------
A connection error fails exactly the callers whose commands were in flight on that
connection (they get :class:`~aioredispatterns.errors.ConnectionFailed`; a command that
was sent may or may not have run, so nothing sent is retried); the connection is dropped
and the next batch takes a fresh one. An error *reply* (``-ERR``, ``NOSCRIPT``) fails only
its own caller.

Cluster
-------
On a :class:`~redis.asyncio.cluster.RedisCluster` the commands of one iteration go out as
one redis-py cluster pipeline, which groups them by slot owner (one batch per node) and
follows MOVED/ASK redirections.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.connection import PythonRespSerializer
from redis.typing import EncodableT

from ._client import AnyRedis
from .errors import ConfigurationError

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is an optional extra
    hiredis = None  # type: ignore[assignment]

# Commands that can hold their connection: they would stall every command batched
# behind them, so they never enter the shared pipeline (primitives use execute_blocking).
BLOCKING_COMMANDS = frozenset(
    {
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "XREAD", "XREADGROUP", "WAIT", "WAITAOF", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
        "MONITOR",
    }
)  # fmt: skip

# Handed to a waiting caller's future: "you are the reader now".
_DRIVE: Any = object()

DEFAULT_MAX_BATCH = 1024
DEFAULT_FLUSH_AT = 16
DEFAULT_MAX_BATCH_BYTES = 1 << 20
_BUFFER_CUTOFF = 6000  # redis-py's: larger arguments are sent as separate chunks

# Options redis-py's parse_response understands but a response callback does not.
_NEVER_DECODE = "NEVER_DECODE"
_EMPTY_RESPONSE = "EMPTY_RESPONSE"


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """Counters of one client's auto-pipeline.

    Attributes:
        batches: writes sent (one write carries many commands).
        commands: commands sent through the auto-pipeline.
        max_in_flight: the most commands ever awaiting replies at once.
        connection_errors: connections dropped after an I/O error.
    """

    batches: int
    commands: int
    max_in_flight: int
    connection_errors: int

    @property
    def mean_batch_size(self) -> float:
        """Commands per write, on average."""
        return self.commands / self.batches if self.batches else 0.0


class _Call:
    __slots__ = ("args", "callback", "command", "future", "name", "options", "size")

    def __init__(
        self, command: list[bytes], name: str, options: dict[str, Any], future: Any
    ) -> None:
        self.args: tuple[EncodableT, ...] = ()
        self.callback: Callable[..., Any] | None = None
        self.command = command
        self.name = name
        self.options = options
        self.future: asyncio.Future[Any] = future
        self.size = sum(len(part) for part in command)


class AutoPipeline:
    """The auto-pipelined command path of one client (see the module docstring)."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        flush_at: int = DEFAULT_FLUSH_AT,
    ) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._max_batch = max_batch
        self._max_bytes = max_batch_bytes
        self._flush_at = flush_at
        self._pack = _packer(client)
        self._commands_seen: dict[EncodableT, tuple[str, Callable[..., Any] | None]] = {}
        self._queue: list[_Call] = []  # packed, not yet written
        self._writing = False
        self._gathering = False  # the writer is yielding so that the iteration can queue
        self._in_flight: collections.deque[_Call] = collections.deque()  # sent, unread
        self._reading = False
        self._connection: AbstractConnection | None = None
        self._batches = 0
        self._commands = 0
        self._max_in_flight = 0
        self._connection_errors = 0

    @property
    def kept_connection(self) -> AbstractConnection | None:
        """The pooled connection this pipeline keeps checked out (None before first use)."""
        return self._connection

    @property
    def stats(self) -> PipelineStats:
        return PipelineStats(
            batches=self._batches,
            commands=self._commands,
            max_in_flight=self._max_in_flight,
            connection_errors=self._connection_errors,
        )

    # ------------------------------------------------------------------ entry point

    def _describe(self, first: EncodableT) -> tuple[str, Callable[..., Any] | None]:
        """Name and response callback of a command (cached per spelling)."""
        try:
            return self._commands_seen[first]
        except KeyError:
            pass
        name = first if isinstance(first, str) else bytes(first).decode()  # type: ignore[arg-type]
        name = name.upper()
        if name.split(" ")[0] in BLOCKING_COMMANDS:
            raise ConfigurationError(f"{name} can block its connection: use execute_blocking()")
        found = (name, self._client.response_callbacks.get(name))
        if len(self._commands_seen) < 1024:
            self._commands_seen[first] = found
        return found

    async def execute(self, *args: EncodableT, **options: Any) -> Any:
        """Queue one command for the next batch and return its parsed reply.

        Raises:
            ConfigurationError: a blocking command (it would stall the whole batch).
        """
        name, callback = self._describe(args[0])
        if self._cluster:
            return await self._execute_cluster(args, options)
        # Packed here, in the caller: an unencodable argument fails this caller alone,
        # before anything is queued.
        call = _Call(self._pack(args), name, options, asyncio.get_running_loop().create_future())
        call.callback = callback
        self._queue.append(call)
        if not self._writing:
            self._writing = True
            try:
                await self._lead()
            except BaseException:
                self._abandon(call)
                raise
        elif self._gathering and len(self._queue) >= self._flush_at:
            self._flush_early()
        return await self._wait(call)

    # ------------------------------------------------------------------ writer

    async def _lead(self) -> None:
        """Write everything queued in this iteration (and whatever queues meanwhile)."""
        cancelled: BaseException | None = None
        with anyio.CancelScope(shield=True):
            # On an idle connection (nothing in flight: little concurrency) waiting for
            # company only adds latency; on a busy one the iteration's commands gather.
            if self._in_flight:
                self._gathering = True
                try:
                    await asyncio.sleep(0)  # let the rest of this iteration queue up
                except asyncio.CancelledError as exc:
                    cancelled = exc
                finally:
                    self._gathering = False
            try:
                while self._queue:
                    batch = self._take_batch()
                    if not batch:
                        continue
                    try:
                        await self._send(batch)
                    except asyncio.CancelledError as exc:
                        cancelled = exc  # native cancel: the batch's callers were failed
                    except Exception as exc:
                        # The batch's callers get the error; what queued behind it goes
                        # out on a fresh connection rather than wait for another caller.
                        _fail_calls(batch, exc)
            finally:
                self._writing = False
        if cancelled is not None:
            # Our own command may have gone out: its reply will be read and dropped.
            raise cancelled

    def _flush_early(self) -> None:
        """Write the queue now, mid-iteration, if the connection is known to be open.

        Synchronous, so nothing can interleave: the writer is parked in its yield and no
        other write is pending, which keeps the order of ``_in_flight`` the order on the
        wire. Without an open stream, the writer sends the queue as before.
        """
        writer = _open_stream_writer(self._connection)
        if writer is None:
            return  # not known to be open: the writer's path checks and reconnects
        batch = self._take_batch()
        if not batch:
            return
        self._in_flight.extend(batch)
        writer.writelines([part for call in batch for part in call.command])
        self._count(batch)

    def _count(self, batch: list[_Call]) -> None:
        """Record one write of ``batch`` and make sure somebody reads its replies."""
        self._batches += 1
        self._commands += len(batch)
        self._max_in_flight = max(self._max_in_flight, len(self._in_flight))
        if not self._reading:
            self._hand_off_reading()

    def _take_batch(self) -> list[_Call]:
        batch: list[_Call] = []
        size = 0
        for call in self._queue:
            if batch and (len(batch) >= self._max_batch or size >= self._max_bytes):
                break
            batch.append(call)
            size += call.size
        del self._queue[: len(batch)]
        # A caller cancelled before its command was sent: it never reaches the server.
        return [call for call in batch if not call.future.done()]

    async def _send(self, batch: list[_Call]) -> None:
        idle = not self._in_flight
        try:
            connection = await self._ensure_connection(idle)
        except Exception as exc:
            _fail_calls(batch, exc)
            return
        chunks = [part for call in batch for part in call.command]
        self._in_flight.extend(batch)
        try:
            if idle:
                # A health check (PING) is only safe with no replies outstanding.
                await connection.check_health()  # type: ignore[no-untyped-call]
            writer = _open_stream_writer(connection)
            if writer is None:
                await connection.send_packed_command(chunks, check_health=False)
            else:
                writer.writelines(chunks)
                await _drain(writer, connection)
        except BaseException as exc:
            await self._fail_connection(connection, exc)
            raise
        self._count(batch)

    async def _ensure_connection(self, idle: bool) -> AbstractConnection:
        client: Redis = self._client  # type: ignore[assignment]
        pool = client.connection_pool
        connection = self._connection
        if connection is None:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._connection = connection
        elif idle:
            # With no reply outstanding, a connection the server closed (restart,
            # idle timeout) shows as EOF: reconnect before writing, so nothing is lost.
            await pool.ensure_connection(connection)
        return connection

    # ------------------------------------------------------------------ reader

    async def _wait(self, call: _Call) -> Any:
        while True:
            try:
                result = await call.future
            except BaseException:
                self._abandon(call)
                raise
            if result is not _DRIVE:
                return result
            call.future = asyncio.get_running_loop().create_future()
            await self._read(call)

    def _abandon(self, call: _Call) -> None:
        """The caller of ``call`` is leaving: drop its reply, pass on a role it was given."""
        future = call.future
        if not future.done():
            future.cancel()  # its reply, if one comes, is read and dropped
            return
        handed_the_role = (
            not future.cancelled() and future.exception() is None and future.result() is _DRIVE
        )
        if handed_the_role:
            # Made the reader just as it left: someone else must read.
            self._reading = False
            self._hand_off_reading()

    def _hand_off_reading(self) -> None:
        """Make the oldest caller still waiting the reader (if there is one)."""
        for call in self._in_flight:
            if not call.future.done():
                self._reading = True
                call.future.set_result(_DRIVE)
                return
        # Only abandoned replies are left: the next batch's reader drains them.

    async def _read(self, own: _Call) -> None:
        """Read replies in order, up to the last one in flight when we started."""
        cancelled: BaseException | None = None
        connection = self._connection
        target = self._in_flight[-1] if self._in_flight else own
        # One watchdog per turn instead of a timer per reply: it fires when no reply
        # arrived for a whole socket_timeout, and then interrupts the read.
        watchdog = _Watchdog(connection.socket_timeout if connection else None)
        with anyio.CancelScope(shield=True):
            while self._in_flight and connection is not None and connection is self._connection:
                call = self._in_flight[0]
                try:
                    response = await connection.read_response(
                        disable_decoding=_NEVER_DECODE in call.options,
                        timeout=math.inf,
                        disconnect_on_error=False,
                    )
                except asyncio.CancelledError as exc:
                    if watchdog.fired():
                        await self._fail_connection(
                            connection, rex.TimeoutError("Timeout reading from socket")
                        )
                        break
                    cancelled = exc  # native cancel: the read resumes where it stopped
                    continue
                except rex.ResponseError as exc:
                    self._in_flight.popleft()
                    _settle(call, exc=exc)
                except Exception as exc:
                    await self._fail_connection(connection, exc)
                    break
                except BaseException as exc:  # KeyboardInterrupt and the like
                    await self._fail_connection(connection, exc)
                    raise
                else:
                    self._in_flight.popleft()
                    _settle(call, response=response)
                watchdog.progress += 1
                if call is target:
                    break
            watchdog.stop()
            self._reading = False
            if self._in_flight:
                self._hand_off_reading()
        if cancelled is not None:
            raise cancelled

    async def _fail_connection(self, connection: AbstractConnection, exc: BaseException) -> None:
        """Fail every caller in flight on ``connection``, then drop it."""
        if connection is not self._connection:
            return
        self._connection = None
        self._connection_errors += 1
        failed, self._in_flight = self._in_flight, collections.deque()
        self._reading = False
        _fail_calls(failed, exc if isinstance(exc, Exception) else rex.ConnectionError(repr(exc)))
        client: Redis = self._client  # type: ignore[assignment]
        with anyio.CancelScope(shield=True):
            try:
                await connection.disconnect(nowait=True)
            finally:
                await client.connection_pool.release(connection)

    # ------------------------------------------------------------------ cluster

    async def _execute_cluster(self, args: tuple[EncodableT, ...], options: dict[str, Any]) -> Any:
        call = _Call([], "", options, asyncio.get_running_loop().create_future())
        call.args = args
        self._queue.append(call)
        if not self._writing:
            self._writing = True
            await self._lead_cluster()
        return await call.future

    async def _lead_cluster(self) -> None:
        cancelled: BaseException | None = None
        with anyio.CancelScope(shield=True):
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError as exc:
                cancelled = exc
            batch, self._queue = self._queue, []
            self._writing = False
            live = [call for call in batch if not call.future.done()]
            if live:
                cluster: RedisCluster = self._client  # type: ignore[assignment]
                pipe = cluster.pipeline(transaction=False)
                for call in live:
                    pipe.execute_command(*call.args, **call.options)
                self._batches += 1
                self._commands += len(live)
                self._max_in_flight = max(self._max_in_flight, len(live))
                results: list[Any]
                try:
                    results = await pipe.execute(raise_on_error=False)
                except asyncio.CancelledError as exc:
                    cancelled = exc
                    results = [rex.ConnectionError("cancelled mid-batch")] * len(live)
                except Exception as exc:
                    results = [exc] * len(live)
                for call, result in zip(live, results, strict=True):
                    if call.future.done():
                        continue
                    if isinstance(result, Exception):
                        call.future.set_exception(result)
                    else:
                        call.future.set_result(result)
        if cancelled is not None:
            raise cancelled


def _packer(client: AnyRedis) -> Callable[[tuple[EncodableT, ...]], list[bytes]]:
    """The fastest packer that encodes exactly as redis-py's encoder would."""
    if isinstance(client, RedisCluster):
        encoder = client.get_encoder()
    else:
        encoder = client.connection_pool.get_encoder()  # type: ignore[no-untyped-call]
    python = PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode)
    if hiredis is None or encoder.encoding.lower().replace("-", "") != "utf8":

        def pack_python(args: tuple[EncodableT, ...]) -> list[bytes]:
            return python.pack(*args)  # type: ignore[no-untyped-call,no-any-return]

        return pack_python

    pack_command = hiredis.pack_command

    def pack_hiredis(args: tuple[EncodableT, ...]) -> list[bytes]:
        first = args[0]
        if (" " in first) if isinstance(first, str) else (b" " in first):  # type: ignore[operator]
            return python.pack(*args)  # type: ignore[no-untyped-call,no-any-return]
        try:
            return [pack_command(args)]  # type: ignore[arg-type]
        except TypeError as exc:  # what redis-py's encoder calls DataError (e.g. a bool)
            raise rex.DataError(str(exc)) from None

    return pack_hiredis


class _Watchdog:
    """Interrupts the current task when ``progress`` stops moving for ``timeout`` s."""

    __slots__ = ("_fired", "_handle", "_loop", "_seen", "_task", "_timeout", "progress")

    def __init__(self, timeout: float | None) -> None:
        self.progress = 0
        self._seen = 0
        self._fired = False
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._handle: asyncio.TimerHandle | None = None
        if timeout:
            self._handle = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        if self.progress != self._seen:
            self._seen = self.progress
            self._handle = self._loop.call_later(self._timeout or 0, self._check)
            return
        self._fired = True
        self._handle = None
        if self._task is not None:
            self._task.cancel()

    def fired(self) -> bool:
        """True once if the watchdog interrupted the task (and undoes that cancel)."""
        if not self._fired:
            return False
        self._fired = False
        if self._task is not None:
            self._task.uncancel()
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _open_stream_writer(connection: AbstractConnection | None) -> asyncio.StreamWriter | None:
    """The asyncio writer of ``connection`` if its stream is known to be open, else None.

    redis-py's only write API, ``send_packed_command``, runs each write under
    ``asyncio.wait_for`` when a socket timeout is set: a task and a timer per batch,
    which costs a single caller about a third of its round trip. Writing to the stream
    directly (and waiting, with the timeout, only when the socket pushes back) avoids
    that; redis-py has no public synchronous write, so this reads its connection's
    ``_reader``/``_writer`` and returns None if they are missing or closed.
    """
    writer = getattr(connection, "_writer", None)
    reader = getattr(connection, "_reader", None)
    if not isinstance(writer, asyncio.StreamWriter) or not isinstance(reader, asyncio.StreamReader):
        return None
    if writer.is_closing() or reader.at_eof():
        return None
    return writer


async def _drain(writer: asyncio.StreamWriter, connection: AbstractConnection) -> None:
    """Wait until the socket takes the buffered bytes, if it must, for at most the
    connection's socket timeout. Below the transport's high-water mark nothing waits."""
    transport = writer.transport
    if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
        return
    try:
        with anyio.fail_after(connection.socket_timeout):
            await writer.drain()
    except TimeoutError:
        raise rex.TimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        raise rex.ConnectionError(f"Error while writing to socket: {exc}") from exc


def _fail_calls(calls: Iterable[_Call], exc: Exception) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(exc)


def _settle(call: _Call, *, response: Any = None, exc: BaseException | None = None) -> None:
    future = call.future
    if future.done():
        return  # the caller is gone: its reply is dropped
    if exc is not None:
        future.set_exception(exc)
        return
    callback = call.callback
    if callback is not None:
        options = call.options
        if options and (
            _EMPTY_RESPONSE in options or _NEVER_DECODE in options or "keys" in options
        ):
            options = {
                k: v
                for k, v in options.items()
                if k not in (_EMPTY_RESPONSE, _NEVER_DECODE, "keys")
            }
        try:
            response = callback(response, **options)
        except Exception as error:
            future.set_exception(error)
            return
    future.set_result(response)
