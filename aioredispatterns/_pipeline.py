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
  write as a task under ``asyncio.wait_for`` (see ``_transport``).
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
Nothing here is shielded, so a caller leaves at once when cancelled, whatever it was
doing. A caller that is neither writer nor reader just stops waiting; its reply (if its
command was already sent) is read and dropped later, so the connection stays in sync and
is never thrown away for it. A writer cancelled while it connects, yields or waits for the
socket hands the writer role to the oldest caller still queued (bytes already given to the
transport go out regardless); a reader cancelled mid-read hands the reader role to the
oldest caller still waiting, and redis-py's parsers keep partial input across a cancelled
read, so the next reader resumes where it stopped. A role handed to a caller whose command
then failed is never lost: the failure is kept on the call and raised when it wakes.

Deadlines and failures
----------------------
Every command's reply is due ``socket_timeout`` after it was written. One timer for the
whole pipeline, armed for the oldest command in flight (and re-armed as replies come),
fails the connection when that reply is overdue: every caller in flight on it gets
:class:`~aioredispatterns.errors.CommandTimeout` within ``socket_timeout`` of its write.
A connection error likewise fails exactly the callers whose commands were in flight on
that connection (:class:`~aioredispatterns.errors.ConnectionFailed`; a command that was
sent may or may not have run, so nothing sent is retried). A failed connection is closed
at once (its socket aborted, synchronously) and returned to the pool by the next task
that runs here; the next batch takes a fresh one. An idle connection the server closed is
replaced before writing; one closed under replies still owed is failed, never silently
reconnected (its replies would go to the wrong callers). An error *reply* (``-ERR``,
``NOSCRIPT``) fails only its own caller.

Cluster
-------
A cluster client has no auto-pipeline of its own: the slot router (``_cluster``) gives
each node a standalone client, and each of those has its own auto-pipeline.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.connection import PythonRespSerializer
from redis.typing import EncodableT

from ._connection import AnyRedis, state_of
from ._transport import abort, checkout, drain, guarded, open_stream_writer, send
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

# Handed to a waiting caller's future: "you are the reader now" / "the writer now".
_DRIVE: Any = object()
_WRITE: Any = object()
_RELEASE_TIMEOUT = 2.0

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
    __slots__ = (
        "args",
        "callback",
        "command",
        "deadline",
        "failure",
        "future",
        "name",
        "options",
        "size",
    )

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
        self.deadline = math.inf  # loop time by which the reply must have arrived
        # Set when the call failed while its future held a role (see _fail_calls).
        self.failure: Exception | None = None


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
        self._max_batch = max_batch
        self._max_bytes = max_batch_bytes
        self._flush_at = flush_at
        self._pack = packer_of(client)
        self._timeout: float | None = client.connection_pool.connection_kwargs.get(  # type: ignore[union-attr]
            "socket_timeout"
        )
        self._commands_seen: dict[EncodableT, tuple[str, Callable[..., Any] | None]] = {}
        self._queue: list[_Call] = []  # packed, not yet written
        self._writing = False  # somebody holds the writer role
        self._gathering = False  # the writer is yielding so that the iteration can queue
        self._in_flight: collections.deque[_Call] = collections.deque()  # sent, unread
        self._reader: _Call | None = None  # the caller holding the reader role
        self._connection: AbstractConnection | None = None
        self._dead: list[AbstractConnection] = []  # failed, to be returned to the pool
        self._timer: asyncio.TimerHandle | None = None
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

    # ------------------------------------------------------------------ entry points

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

    def _call(self, args: Sequence[EncodableT], options: dict[str, Any]) -> _Call:
        name, callback = self._describe(args[0])
        # Packed here, in the caller: an unencodable argument fails this caller alone,
        # before anything is queued.
        call = _Call(
            self._pack(tuple(args)), name, options, asyncio.get_running_loop().create_future()
        )
        call.callback = callback
        return call

    async def execute(self, *args: EncodableT, **options: Any) -> Any:
        """Queue one command for the next batch and return its parsed reply.

        Raises:
            ConfigurationError: a blocking command (it would stall the whole batch).
        """
        call = self._call(args, options)
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

    async def execute_many(self, commands: Sequence[Sequence[EncodableT]]) -> list[Any]:
        """Queue ``commands`` together and return their replies in order.

        Every reply is awaited; the first error reply is raised after that. A connection
        failure is raised at once (the rest of the batch failed with it).
        """
        calls = [self._call(args, {}) for args in commands]
        self._queue.extend(calls)
        results: list[Any] = []
        first_error: rex.ResponseError | None = None
        try:
            if not self._writing:
                self._writing = True
                await self._lead()
            elif self._gathering and len(self._queue) >= self._flush_at:
                self._flush_early()
            for call in calls:
                try:
                    results.append(await self._wait(call))
                except rex.ResponseError as exc:
                    first_error = first_error or exc
                    results.append(exc)
        except BaseException:
            for call in calls:
                self._abandon(call)
            raise
        if first_error is not None:
            raise first_error
        return results

    # ------------------------------------------------------------------ writer

    async def _lead(self) -> None:
        """Write what is queued, and what queues while writing.

        Nothing here is shielded: a writer cancelled while it connects, yields or waits
        for the socket hands the role to the oldest caller still queued (bytes already
        handed to the transport go out regardless).
        """
        try:
            # On an idle connection (nothing in flight: little concurrency) waiting for
            # company only adds latency; on a busy one the iteration's commands gather.
            if self._in_flight:
                self._gathering = True
                try:
                    await asyncio.sleep(0)  # let the rest of this iteration queue up
                finally:
                    self._gathering = False
            try:
                connection = await self._writable_connection()
            except Exception as exc:
                # Nothing queued was sent: every queued caller gets the error (a new
                # caller becomes the next writer and tries again).
                queued, self._queue = self._queue, []
                _fail_calls(queued, exc)
                return
            while self._queue and connection is self._connection:
                batch = self._take_batch()
                if batch:
                    await self._write(connection, batch)
        finally:
            self._writing = False
            if self._queue:
                self._hand_off_writing()

    def _hand_off_writing(self) -> None:
        """Make the oldest caller still queued the writer (if there is one)."""
        for call in self._queue:
            if not call.future.done():
                self._writing = True
                call.future.set_result(_WRITE)
                return
        self._queue.clear()  # only callers that left: nothing to write

    def _flush_early(self) -> None:
        """Write the queue now, mid-iteration, if the connection is known to be open.

        Synchronous, so nothing can interleave: the writer is parked in its yield and no
        other write is pending, which keeps the order of ``_in_flight`` the order on the
        wire. Without an open stream, the writer sends the queue as before.
        """
        writer = open_stream_writer(self._connection)
        if writer is None:
            return  # not known to be open: the writer's path checks and reconnects
        batch = self._take_batch()
        if batch:
            self._put_on_wire(writer, batch)

    def _put_on_wire(self, writer: asyncio.StreamWriter, batch: list[_Call]) -> None:
        """Hand ``batch`` to the transport (synchronous) and record it as in flight."""
        self._stamp(batch)
        self._in_flight.extend(batch)
        writer.writelines([part for call in batch for part in call.command])
        self._count(batch)

    def _stamp(self, batch: list[_Call]) -> None:
        # Every command's reply is due socket_timeout after it was written.
        if self._timeout:
            deadline = asyncio.get_running_loop().time() + self._timeout
            for call in batch:
                call.deadline = deadline

    def _count(self, batch: list[_Call]) -> None:
        """Record one write of ``batch``; make sure somebody reads and the deadline ticks."""
        self._batches += 1
        self._commands += len(batch)
        self._max_in_flight = max(self._max_in_flight, len(self._in_flight))
        if self._reader is None:
            self._hand_off_reading()
        if self._timer is None:
            self._arm()

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

    async def _write(self, connection: AbstractConnection, batch: list[_Call]) -> None:
        writer = open_stream_writer(connection)
        if writer is None:
            self._stamp(batch)
            self._in_flight.extend(batch)
            chunks = [part for call in batch for part in call.command]
            try:
                await send(connection, chunks)
            except BaseException as exc:
                # A write cut short leaves the stream in an unknown state.
                self._fail_connection(connection, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            self._count(batch)
            return
        self._put_on_wire(writer, batch)
        try:
            await drain(writer, connection)
        except Exception as exc:
            self._fail_connection(connection, exc)

    async def _writable_connection(self) -> AbstractConnection:
        if self._dead:
            await self._release_dead()
        client: Redis = self._client  # type: ignore[assignment]
        pool = client.connection_pool
        connection = self._connection
        if connection is not None and self._in_flight and not connection.is_connected:
            # Closed under replies still owed (pool.disconnect(), say): those callers
            # failed with it; a silent reconnect would hand their replies to others.
            self._fail_connection(connection, rex.ConnectionError("the connection was closed"))
            await self._release_dead()
            connection = None
        if connection is None:
            # redis-py retries the connect itself (the client's ``retries``): nothing
            # has been sent, so that is always safe.
            connection = await checkout(pool)
            self._connection = connection
            return connection
        if not self._in_flight:
            # With no reply outstanding, a connection the server closed (restart, idle
            # timeout) shows as EOF: reconnect before writing, so nothing is lost. A
            # health check (PING) is only safe with no replies outstanding, too.
            try:
                # One guard for both calls: this runs before every write to an idle
                # connection (every command of a lone caller).
                await guarded(_reconnect_if_closed(pool, connection))
            except BaseException as exc:
                # Cut short (cancelled, failed): the connection's state is unknown.
                self._fail_connection(connection, exc)
                raise
        return connection

    # ------------------------------------------------------------------ waiting, reading

    async def _wait(self, call: _Call) -> Any:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if call.failure is not None:
                    raise call.failure  # noqa: TRY301 (handled by the except below)
                result = await call.future
                if result is _DRIVE:
                    call.future = loop.create_future()
                    await self._read(call)
                elif result is _WRITE:
                    call.future = loop.create_future()
                    await self._lead()
                else:
                    return result
        except BaseException as exc:
            self._abandon(call)
            if self._dead and isinstance(exc, Exception):
                await self._release_dead()
            raise

    def _abandon(self, call: _Call) -> None:
        """The caller of ``call`` is leaving: drop its reply, pass on a role it was given."""
        future = call.future
        if not future.done():
            future.cancel()  # its reply, if one comes, is read and dropped
            return
        if future.cancelled() or future.exception() is not None:
            return
        role = future.result()
        if role is _DRIVE and self._reader is call:
            # Made the reader just as it left: someone else must read.
            self._reader = None
            self._hand_off_reading()
        elif role is _WRITE:
            self._writing = False
            self._hand_off_writing()

    def _hand_off_reading(self) -> None:
        """Make the oldest caller still waiting the reader (if there is one)."""
        for call in self._in_flight:
            if not call.future.done():
                self._reader = call
                call.future.set_result(_DRIVE)
                return
        # Only abandoned replies are left: the next batch's reader drains them.

    async def _read(self, own: _Call) -> None:
        """Read replies in order, up to the last one in flight when we started.

        Not shielded: a reader that is cancelled leaves at once and hands the role to
        the oldest caller still waiting; redis-py's parsers keep a partly read reply, so
        the next reader resumes where this one stopped.
        """
        connection = self._connection
        try:
            if connection is None or not self._in_flight:
                return
            target = self._in_flight[-1]
            while self._in_flight and connection is self._connection:
                call = self._in_flight[0]
                try:
                    response = await connection.read_response(
                        disable_decoding=_NEVER_DECODE in call.options,
                        timeout=math.inf,
                        disconnect_on_error=False,
                    )
                except rex.ResponseError as exc:
                    self._in_flight.popleft()
                    _settle(call, exc=exc)
                except Exception as exc:
                    self._fail_connection(connection, exc)
                    break
                else:
                    self._in_flight.popleft()
                    _settle(call, response=response)
                if call is target:
                    break
        finally:
            if self._reader is own:
                self._reader = None
                if self._in_flight:
                    self._hand_off_reading()
        if self._dead:
            await self._release_dead()

    # ------------------------------------------------------------------ deadlines, failures

    def _arm(self) -> None:
        if self._timeout is None or not self._in_flight:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._in_flight[0].deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        """The oldest reply in flight is due: fail the connection if it has not come.

        One timer for the whole pipeline (not one per command): it is armed for the
        oldest command in flight and, when replies kept coming, re-armed for the new
        oldest one. So every caller hears within ``socket_timeout`` of its write.
        """
        self._timer = None
        if not self._in_flight or self._connection is None:
            return
        if self._in_flight[0].deadline > asyncio.get_running_loop().time():
            self._arm()
            return
        self._fail_connection(
            self._connection,
            rex.TimeoutError(f"no reply within socket_timeout={self._timeout} s"),
        )

    def _fail_connection(self, connection: AbstractConnection, exc: BaseException) -> None:
        """Fail every caller in flight on ``connection`` and close it (synchronously).

        The socket is aborted at once, so a reader blocked on it wakes with an error; the
        connection goes back to the pool (``_release_dead``) from the next task that runs
        here, since returning it is a coroutine.
        """
        if connection is not self._connection:
            return
        self._connection = None
        self._connection_errors += 1
        self._reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        failed, self._in_flight = self._in_flight, collections.deque()
        _fail_calls(failed, exc if isinstance(exc, Exception) else rex.ConnectionError(repr(exc)))
        abort(connection)
        self._dead.append(connection)

    async def _release_dead(self) -> None:
        """Return failed connections to the pool (shielded, bounded)."""
        dead, self._dead = self._dead, []
        client: Redis = self._client  # type: ignore[assignment]
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
            for connection in dead:
                try:
                    await connection.disconnect(nowait=True)
                finally:
                    await client.connection_pool.release(connection)


async def _reconnect_if_closed(pool: ConnectionPool, connection: AbstractConnection) -> None:
    await pool.ensure_connection(connection)
    await connection.check_health()  # type: ignore[no-untyped-call]


def packer_of(client: AnyRedis) -> Callable[[tuple[EncodableT, ...]], list[bytes]]:
    """The client's packer (built once per client): see :func:`_packer`."""
    state = state_of(client)
    if state.packer is None:
        state.packer = _packer(client)
    return state.packer


# hiredis packs ints itself and crashes the process (not an exception) on one of more
# than 4300 digits: anything outside 64 bits goes through redis-py's Python packer, which
# raises instead.
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1


def _packer(client: AnyRedis) -> Callable[[tuple[EncodableT, ...]], list[bytes]]:
    """The fastest packer that encodes exactly as redis-py's encoder would.

    An argument that cannot be encoded (a bool, None, a lone surrogate, an int too large
    to print) raises redis-py's ``DataError`` (bad input: nothing was sent).
    """
    if isinstance(client, RedisCluster):
        encoder = client.get_encoder()
    else:
        encoder = client.connection_pool.get_encoder()  # type: ignore[no-untyped-call]
    python = PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode)

    def pack_python(args: tuple[EncodableT, ...]) -> list[bytes]:
        try:
            return python.pack(*args)  # type: ignore[no-untyped-call,no-any-return]
        except (ValueError, UnicodeError) as exc:
            raise rex.DataError(f"a command argument cannot be encoded: {exc}") from None

    if hiredis is None or encoder.encoding.lower().replace("-", "") != "utf8":
        return pack_python

    pack_command = hiredis.pack_command

    def pack_hiredis(args: tuple[EncodableT, ...]) -> list[bytes]:
        first = args[0]
        if (" " in first) if isinstance(first, str) else (b" " in first):  # type: ignore[operator]
            return pack_python(args)
        for arg in args:
            if arg.__class__ is int and not _MIN_INT <= arg <= _MAX_INT:
                return pack_python(args)
        try:
            return [pack_command(args)]  # type: ignore[arg-type]
        except (TypeError, UnicodeError) as exc:  # redis-py's encoder calls these DataError
            raise rex.DataError(str(exc)) from None

    return pack_hiredis


def _fail_calls(calls: Iterable[_Call], exc: Exception) -> None:
    for call in calls:
        future = call.future
        if not future.done():
            future.set_exception(exc)
        elif not future.cancelled() and future.exception() is None:
            # Handed a role it has not taken up yet: it raises this once it wakes.
            call.failure = exc


def _settle(call: _Call, *, response: Any = None, exc: BaseException | None = None) -> None:
    future = call.future
    if future.done():
        return  # the caller is gone: its reply is dropped
    if exc is not None:
        future.set_exception(exc)
        return
    callback = call.callback
    if callback is not None:
        try:
            response = _run_callback(callback, response, call.options)
        except Exception as error:
            future.set_exception(error)
            return
    future.set_result(response)


def _run_callback(callback: Callable[..., Any], response: Any, options: dict[str, Any]) -> Any:
    if options and (_EMPTY_RESPONSE in options or _NEVER_DECODE in options or "keys" in options):
        options = {
            k: v for k, v in options.items() if k not in (_EMPTY_RESPONSE, _NEVER_DECODE, "keys")
        }
    return callback(response, **options)


def apply_callback(
    client: AnyRedis, first: EncodableT, response: Any, options: dict[str, Any]
) -> Any:
    """``response`` parsed by redis-py's response callback for the command ``first``."""
    name = first if isinstance(first, str) else bytes(first).decode()  # type: ignore[arg-type]
    callback = client.response_callbacks.get(name.upper())
    return response if callback is None else _run_callback(callback, response, options)
