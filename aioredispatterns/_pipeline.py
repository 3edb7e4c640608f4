"""Auto-pipelining: the commands many coroutines issue in one event-loop iteration travel
to the server as one write, and each caller gets its own reply.

How it works (standalone server)
--------------------------------
One connection, taken from the client's pool and kept, carries all auto-pipelined traffic
as a true pipeline: batches are written back to back without waiting for earlier replies,
and replies are read in order (the server answers one connection in order).

* ``prepare()`` packs the command (redis-py's encoder) in the caller, so an argument that
  cannot be encoded fails that caller alone; ``run()`` queues it and waits on a future.
* The first caller of an iteration becomes the *writer*. If replies are outstanding
  (the connection is busy), it yields once so that every coroutine runnable in this
  iteration can queue its command, then writes the whole queue in one write (chunks of
  at most ``max_batch`` commands and ``max_batch_bytes`` bytes). On an idle connection
  it writes at once: with nothing in flight there is little concurrency to wait for, and
  the callers arriving meanwhile gather behind it.
* Writes go straight to the connection's socket, waiting (up to the socket timeout)
  only when the socket pushes back: redis-py's ``send_packed_command`` would run each
  write as a task under ``asyncio.wait_for`` (see ``_transport``).
* While the writer waits for its iteration to end, the caller that makes the queue
  ``flush_at`` long writes it at once (a plain, synchronous transport write). The server
  then starts on those commands while the rest of the iteration is still running in
  Python, instead of idling until the whole iteration has queued: with 64 callers doing
  real work between commands, client and server work overlap instead of taking turns.
  Only a connection known to be open is written to this way; otherwise the writer's
  checked path (which replaces a connection the server closed) takes the commands.
* Replies, when the connection parses with hiredis (the ``hiredis`` extra), are read by
  the socket's own callback (``_wire.Wire``): each chunk that arrives is parsed and every
  complete reply resolves its caller's future at once, with no task reading. Otherwise
  (no hiredis, or a parser class of the user's own) one caller at a time holds the
  *reader* role and reads with redis-py's ``read_response``: the writer when nobody is
  reading, else the reader hands the role to the oldest caller still waiting. Either way
  a reply whose caller is gone is read and dropped.
* The reply is parsed by redis-py's response callback in the caller, after it wakes
  (``_codec.parse_reply``), so a slow or failing callback costs only its own caller.

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
sent may or may not have run, so nothing sent is retried here). A failed connection is
closed at once (its socket aborted, synchronously) and returned to the pool by the next
task that runs here; the next batch takes a fresh one. An idle connection the server
closed is replaced before writing; one closed under replies still owed is failed, never
silently reconnected (its replies would go to the wrong callers). An error *reply*
(``-ERR``, ``NOSCRIPT``) fails only its own caller. An idle connection is health-checked
by redis-py (``health_check_interval``) before the next write, as redis-py would.

Tracing
-------
When :func:`aioredispatterns.instrument` is on, each written batch is an OpenTelemetry
span, and each command too if asked (``_tracing``); when it is off this costs one global
lookup per command.

Cluster
-------
A cluster client has no auto-pipeline of its own: the slot router (``_cluster``) gives
each node a standalone client, and each of those has its own auto-pipeline.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis import exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.typing import EncodableT

from . import _tracing
from ._codec import (
    EMPTY_RESPONSE,
    NEVER_DECODE,
    apply_callback,
    command_name,
    packer_of,
    parse_reply,
)
from ._connection import AnyRedis, state_of
from ._translate import reraise
from ._transport import (
    PUSH_TYPE,
    abort,
    checkout,
    drain,
    guarded,
    hiredis_reader_options,
    open_stream_writer,
    send,
    stream_transport,
)
from .errors import ConfigurationError

try:
    from ._wire import MORE, Wire
except ImportError:  # pragma: no cover - hiredis is an optional extra
    Wire = None  # type: ignore[assignment,misc]
    MORE = None

__all__ = (
    "BLOCKING_COMMANDS",
    "AutoPipeline",
    "PipelineStats",
    "apply_callback",
    "blocks",
    "packer_of",
    "pipeline_for",
)

# Commands that can hold their connection: they would stall every command batched
# behind them, so they never enter the shared pipeline (primitives use execute_blocking).
BLOCKING_COMMANDS = frozenset(
    {
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "WAIT", "WAITAOF", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR",
    }
)  # fmt: skip
# Blocking only when asked to (a BLOCK argument); without it they answer at once.
_BLOCKING_WITH_ARGUMENT = frozenset({"XREAD", "XREADGROUP"})

# Handed to a waiting caller's future: "you are the reader now" / "the writer now".
_DRIVE: Any = object()
_WRITE: Any = object()
_NOTHING: Any = object()  # no result taken from the future yet
_RELEASE_TIMEOUT = 2.0

# Reply types that are never awaitable (skips inspect.isawaitable on the common path).
_PLAIN = frozenset({bytes, str, int, float, bool, list, dict, set, tuple, type(None)})
# Replies that are neither errors nor pushes (a list may hold an error: checked apart).
_PLAIN_REPLIES = frozenset({bytes, str, int, float, bool, type(None)})
_Future = asyncio.Future

DEFAULT_MAX_BATCH = 1024
DEFAULT_FLUSH_AT = 16
DEFAULT_MAX_BATCH_BYTES = 1 << 20


def blocks(name: str, args: Sequence[EncodableT]) -> bool:
    """Whether the command ``name`` (upper case) with ``args`` can hold its connection."""
    if name.split(" ", 1)[0] in BLOCKING_COMMANDS:
        return True
    if name in _BLOCKING_WITH_ARGUMENT:
        return any(
            isinstance(arg, str | bytes) and arg.upper() in ("BLOCK", b"BLOCK") for arg in args
        )
    return False


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
        "batch_span",
        "command",
        "deadline",
        "failure",
        "future",
        "link",
        "name",
        "options",
        "raw",
        "sent",
        "size",
        "span",
    )

    def __init__(
        self, command: list[bytes], name: str, options: dict[str, Any], future: Any
    ) -> None:
        self.command = command
        self.name = name
        self.options = options
        self.raw = bool(options) and NEVER_DECODE in options  # read without decoding
        self.future: asyncio.Future[Any] = future
        self.size = len(command[0]) if len(command) == 1 else sum(map(len, command))
        self.deadline = math.inf  # loop time by which the reply must have arrived
        self.sent = False  # written (it may have run on the server)
        # Set when the call failed while its future held a role (see _fail_calls).
        self.failure: Exception | None = None
        # Tracing (see _tracing): this command's span, the caller's span to link to,
        # and on a batch's last call the batch's span.
        self.span: Any = None
        self.link: Any = None
        self.batch_span: Any = None


def pipeline_for(client: AnyRedis) -> AutoPipeline | None:
    """The auto-pipeline of a standalone ``client`` (created on first use), or None if
    the client opted out (``auto_pipeline=False``)."""
    state = state_of(client)
    if not state.auto_pipeline:
        return None
    pipeline = state.pipeline
    if pipeline is None:
        pipeline = state.pipeline = AutoPipeline(client)
    return pipeline


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
        settings = client.connection_pool.connection_kwargs  # type: ignore[union-attr]
        self._timeout: float | None = settings.get("socket_timeout")
        self._health_interval: float = settings.get("health_check_interval") or 0
        self._names: dict[EncodableT, str] = {}
        self._queue: list[_Call] = []  # packed, not yet written
        self._writing = False  # somebody holds the writer role
        self._gathering = False  # the writer is yielding so that the iteration can queue
        self._in_flight: collections.deque[_Call] = collections.deque()  # sent, unread
        self._reader: _Call | None = None  # the caller holding the reader role
        self._connection: AbstractConnection | None = None
        self._wire: Wire | None = None  # reads the kept connection's socket (hiredis)
        self._dead: list[AbstractConnection] = []  # failed, to be returned to the pool
        self._timer: asyncio.TimerHandle | None = None
        self._batches = 0
        self._commands = 0
        self._max_in_flight = 0
        self._connection_errors = 0
        #: redis-py's ``Retry`` of the pool's connections (known once one was taken).
        self.retry: Any = None
        #: Span attributes of this pipeline's server (``_tracing``, computed once).
        self.trace_attributes: dict[str, Any] | None = None

    @property
    def kept_connection(self) -> AbstractConnection | None:
        """The pooled connection this pipeline keeps checked out (None before first use)."""
        return self._connection

    @property
    def reads_itself(self) -> bool:
        """Whether replies are parsed by the socket's callback (hiredis) rather than by
        a caller holding the reader role (redis-py's ``read_response``)."""
        return self._wire is not None

    @property
    def client(self) -> AnyRedis:
        return self._client

    @property
    def stats(self) -> PipelineStats:
        return PipelineStats(
            batches=self._batches,
            commands=self._commands,
            max_in_flight=self._max_in_flight,
            connection_errors=self._connection_errors,
        )

    # ------------------------------------------------------------------ entry points

    def _name_of(self, first: EncodableT) -> str:
        """The command's name (cached per spelling); blocking commands are refused."""
        name = self._names.get(first)
        if name is None:
            name = command_name(first)
            if name.split(" ", 1)[0] in BLOCKING_COMMANDS:
                raise ConfigurationError(f"{name} can block its connection: use execute_blocking()")
            if len(self._names) < 1024:
                self._names[first] = name
        return name

    def prepare(self, args: Sequence[EncodableT], options: dict[str, Any]) -> _Call:
        """Pack one command for :meth:`run` (in the caller: bad input fails it alone,
        before anything is queued).

        Raises:
            ConfigurationError: a blocking command (it would stall the whole batch).
            redis.exceptions.DataError: an argument cannot be encoded.
        """
        name = self._names.get(args[0]) or self._name_of(args[0])
        if name in _BLOCKING_WITH_ARGUMENT and blocks(name, args):
            raise ConfigurationError(f"{name} BLOCK can block its connection")
        call = _Call(
            self._pack(args if args.__class__ is tuple else tuple(args)),
            name,
            options,
            # asyncio.Future directly: loop.create_future is one Python frame more.
            _Future(loop=asyncio.get_running_loop()),
        )
        if _tracing.ACTIVE is not None:
            _tracing.ACTIVE.command(call, self)
        return call

    async def run(
        self,
        call: _Call,
        *,
        retry: bool = False,
        translate: bool = False,
        callbacks: Mapping[Any, Any] | None = None,
    ) -> Any:
        """Send a prepared command with the next batch and return its parsed reply
        (the client's response callback, awaited if it is async).

        Args:
            retry: redis-py's rule for the user's own commands: a command that failed
                with a connection or timeout error *after it was written* is sent again
                as the connection's ``Retry`` says (so it may run twice). The library
                never passes True.
            translate: raise the library's errors (``_translate``) instead of redis-py's,
                as the command layer's :func:`~aioredispatterns._commands.execute` does.
            callbacks: the response callbacks to parse with (a cluster client's, for a
                command routed to one of its nodes); the pipeline's client's by default.
        """
        try:
            self._queue.append(call)
            try:
                if not self._writing:
                    self._writing = True
                    try:
                        await self._lead()
                    except BaseException:
                        self._abandon(call)
                        raise
                elif self._gathering and len(self._queue) >= self._flush_at:
                    self._flush_early()
                # The common case inline (a reply, no role handed over): one coroutine
                # less per command.
                try:
                    reply = await call.future
                except BaseException as exc:
                    self._abandon(call)
                    if self._dead and isinstance(exc, Exception):
                        await self._release_dead()
                    raise
                if reply is _DRIVE or reply is _WRITE or call.failure is not None:
                    reply = await self._wait(call, reply)
            except rex.ResponseError:
                if call.options and EMPTY_RESPONSE in call.options:
                    return call.options[EMPTY_RESPONSE]
                raise
            except (rex.ConnectionError, rex.TimeoutError) as error:
                if not retry or not call.sent or self.retry is None:
                    raise
                return await self._send_again(call, error, callbacks)
            result = parse_reply(
                self._client.response_callbacks if callbacks is None else callbacks,
                call.name,
                reply,
                call.options,
            )
            if result.__class__ not in _PLAIN and inspect.isawaitable(result):
                result = await result  # an async response callback (redis-py allows them)
            return result
        except Exception as exc:
            if not translate:
                raise
            reraise(exc)

    def execute_translated(
        self, args: Sequence[EncodableT], options: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        """:meth:`execute` raising the library's errors: the command layer's hot path
        (no coroutine of its own; bad input is raised when awaited)."""
        try:
            call = self.prepare(args, options)
        except Exception as exc:
            return _raise(exc, translated=True)
        return self.run(call, translate=True)

    async def _send_again(
        self, call: _Call, error: Exception, callbacks: Mapping[Any, Any] | None
    ) -> Any:
        """redis-py's retry of a command that failed after it was written: the
        connection's ``Retry`` decides (supported errors, attempts, backoff), as in
        redis-py's ``execute_command``."""
        failed = [error]
        latest = [call]
        loop = asyncio.get_running_loop()

        async def attempt() -> Any:
            if failed:
                raise failed.pop()
            again = _Call(call.command, call.name, call.options, loop.create_future())
            latest[0] = again
            return await self.run(again, callbacks=callbacks)

        def written(_: Exception) -> bool:
            return latest[0].sent

        return await self.retry.call_with_retry(attempt, _no_cleanup, is_retryable=written)

    def execute(self, *args: EncodableT, **options: Any) -> Coroutine[Any, Any, Any]:
        """Queue one command for the next batch; await the result for its parsed reply.

        Raises:
            ConfigurationError: a blocking command (it would stall the whole batch);
                raised at once, before anything is awaited.
        """
        return self.run(self.prepare(args, options))

    async def execute_many(self, commands: Sequence[Sequence[EncodableT]]) -> list[Any]:
        """Queue ``commands`` together and return their replies in order.

        Every reply is awaited; the first error reply is raised after that. A connection
        failure is raised at once (the rest of the batch failed with it).
        """
        calls = [self.prepare(args, {}) for args in commands]
        self._queue.extend(calls)
        results: list[Any] = []
        first_error: rex.ResponseError | None = None
        callbacks = self._client.response_callbacks
        try:
            if not self._writing:
                self._writing = True
                await self._lead()
            elif self._gathering and len(self._queue) >= self._flush_at:
                self._flush_early()
            for call in calls:
                try:
                    reply = await self._wait(call)
                except rex.ResponseError as exc:
                    first_error = first_error or exc
                    results.append(exc)
                else:
                    results.append(parse_reply(callbacks, call.name, reply, {}))
        except BaseException:
            for call in calls:
                self._abandon(call)
            raise
        if first_error is not None:
            raise first_error
        return results

    async def aclose(self) -> None:
        """Give the kept connection back to the pool (closed if replies were owed);
        commands not answered yet fail with ``ConnectionError``. The pipeline takes a
        connection again on its next command. Shielded and bounded."""
        error = rex.ConnectionError("the client was closed")
        queued, self._queue = self._queue, []
        _fail_calls(queued, error)
        connection = self._connection
        if connection is not None:
            wire = self._wire
            if not self._in_flight and (wire is None or wire.detach()):
                # In step: back to the pool as it is, for redis-py to reuse.
                self._wire = None
                self._connection = None
                await _give_back(self._client, connection, close=False)  # type: ignore[arg-type]
            else:
                self._fail_connection(connection, error)
        await self._release_dead()

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

    def _sink(self) -> asyncio.WriteTransport | asyncio.StreamWriter | None:
        """Where a synchronous write goes: the kept connection's socket if it is known
        to be open, else None."""
        wire = self._wire
        if wire is not None:
            return wire.transport if wire.open else None
        return open_stream_writer(self._connection)

    def _flush_early(self) -> None:
        """Write the queue now, mid-iteration, if the connection is known to be open.

        Synchronous, so nothing can interleave: the writer is parked in its yield and no
        other write is pending, which keeps the order of ``_in_flight`` the order on the
        wire. Without an open socket, the writer sends the queue as before.
        """
        sink = self._sink()
        if sink is None:
            return  # not known to be open: the writer's path checks and reconnects
        batch = self._take_batch()
        if batch:
            self._put_on_wire(sink, batch)

    def _put_on_wire(
        self, sink: asyncio.WriteTransport | asyncio.StreamWriter, batch: list[_Call]
    ) -> None:
        """Hand ``batch`` to the transport (synchronous) and record it as in flight."""
        self._stamp(batch)
        self._in_flight.extend(batch)
        sink.writelines([part for call in batch for part in call.command])
        self._count(batch)

    def _stamp(self, batch: list[_Call]) -> None:
        # Every command's reply is due socket_timeout after it was written.
        if self._timeout:
            deadline = asyncio.get_running_loop().time() + self._timeout
            for call in batch:
                call.sent = True
                call.deadline = deadline
        else:
            for call in batch:
                call.sent = True

    def _count(self, batch: list[_Call]) -> None:
        """Record one write of ``batch``; make sure somebody reads and the deadline ticks."""
        self._batches += 1
        self._commands += len(batch)
        self._max_in_flight = max(self._max_in_flight, len(self._in_flight))
        tracer = _tracing.ACTIVE
        if tracer is not None:
            tracer.batch(batch, self)
        if self._reader is None and self._wire is None:
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
        kept = [call for call in batch if not call.future.done()]
        if len(kept) < len(batch):
            for call in batch:
                if call.future.done() and call.span is not None:
                    _tracing.end(call, None)
        return kept

    async def _write(self, connection: AbstractConnection, batch: list[_Call]) -> None:
        wire = self._wire
        if wire is not None and wire.open:
            self._put_on_wire(wire.transport, batch)
            if wire.must_drain:
                try:
                    await wire.drain(self._timeout)
                except TimeoutError:
                    self._fail_connection(connection, rex.TimeoutError("Timeout writing to socket"))
                except Exception as exc:
                    self._fail_connection(connection, exc)
            return
        writer = open_stream_writer(connection) if wire is None else None
        if writer is None:
            self._stamp(batch)
            self._in_flight.extend(batch)
            chunks = [part for call in batch for part in call.command]
            try:
                if wire is not None:  # the socket was lost since it was checked
                    raise rex.ConnectionError(str(wire.error or "the connection was lost"))  # noqa: TRY301
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
            self.retry = connection.retry
            self._attach(connection)
            return connection
        if not self._in_flight:
            wire = self._wire
            if (
                wire is not None
                and wire.open
                and not wire.reader.has_data()
                and not self._due_for_health_check(wire)
            ):
                return connection  # the common case: no await at all
            # With no reply outstanding, a connection the server closed (restart, idle
            # timeout) shows as EOF: reconnect before writing, so nothing is lost. A
            # health check (PING) is only safe with no replies outstanding, too. Both are
            # redis-py's, on its own stream: the wire gives the socket back meanwhile.
            if wire is not None:
                self._wire = None
                if not wire.detach():
                    self._fail_connection(connection, rex.InvalidResponse("a partial reply"))
                    await self._release_dead()
                    return await self._writable_connection()
            try:
                # One guard for both calls: this runs before every write to an idle
                # connection when redis-py reads the replies.
                await guarded(_reconnect_if_closed(pool, connection))
            except BaseException as exc:
                # Cut short (cancelled, failed): the connection's state is unknown.
                self._fail_connection(connection, exc)
                raise
            if wire is not None:
                self._attach(connection)
        return connection

    def _due_for_health_check(self, wire: Wire) -> bool:
        interval = self._health_interval
        return bool(interval) and asyncio.get_running_loop().time() - wire.last_read > interval

    def _attach(self, connection: AbstractConnection) -> None:
        """Read ``connection``'s socket ourselves if its parser is hiredis (``_wire``)."""
        if Wire is None:
            return
        options = hiredis_reader_options(connection)
        transport = stream_transport(connection) if options is not None else None
        if options is None or transport is None:
            return
        self._wire = Wire(transport, options, self._on_data, self._on_lost)

    # ------------------------------------------------------------------ waiting, reading

    async def _wait(self, call: _Call, result: Any = _NOTHING) -> Any:
        """Wait for the reply of ``call``, taking up the roles handed to it on the way
        (``result``: what its future already gave, if anything)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if call.failure is not None:
                    raise call.failure  # noqa: TRY301 (handled by the except below)
                if result is _NOTHING:
                    result = await call.future
                if result is _DRIVE:
                    call.future = loop.create_future()
                    await self._read(call)
                elif result is _WRITE:
                    call.future = loop.create_future()
                    await self._lead()
                else:
                    return result
                result = _NOTHING
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

    def _on_data(self, wire: Wire) -> None:
        """Replies arrived on the wire: settle their callers in order (a socket callback:
        nothing here awaits)."""
        if wire is not self._wire:
            return
        reader = wire.reader
        in_flight = self._in_flight
        try:
            while True:
                if in_flight:
                    call = in_flight[0]
                    reply = reader.gets(False) if call.raw else reader.gets()
                else:
                    reply = reader.gets()
                if reply is MORE:
                    return
                if reply.__class__ in _PLAIN_REPLIES and in_flight:
                    # The common case, settled inline (see _settle).
                    in_flight.popleft()
                    if call.span is not None or call.batch_span is not None:
                        _tracing.end(call, None)
                    if not call.future.done():
                        call.future.set_result(reply)
                    continue
                if isinstance(reply, PUSH_TYPE):  # type: ignore[arg-type]
                    continue  # a RESP3 push (no caller's reply): redis-py drops it too
                if not in_flight:
                    raise rex.InvalidResponse(f"a reply nobody asked for: {reply!r:.80}")  # noqa: TRY301
                in_flight.popleft()
                if isinstance(reply, Exception):
                    _settle(call, exc=reply)  # an error reply: this caller's alone
                elif (
                    reply.__class__ is list and reply and isinstance(reply[0], rex.ConnectionError)
                ):
                    _settle(call, exc=reply[0])  # as redis-py's hiredis parser raises it
                else:
                    _settle(call, response=reply)
        except Exception as exc:  # a protocol error: the stream is out of step
            if self._connection is not None:
                self._fail_connection(self._connection, exc)

    def _on_lost(self, wire: Wire, error: Exception) -> None:
        """The wire's socket closed: fail whoever is still owed a reply on it."""
        if wire is not self._wire or self._connection is None:
            return
        if self._in_flight:
            self._fail_connection(
                self._connection, rex.ConnectionError(f"Error while reading from socket: {error}")
            )
        # Idle: nothing is lost; the next write sees the closed wire and reconnects.

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
                        disable_decoding=call.raw,
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
        self._wire = None
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
        """Return failed connections to the pool, closed (shielded, bounded)."""
        dead, self._dead = self._dead, []
        for connection in dead:
            await _give_back(self._client, connection, close=True)  # type: ignore[arg-type]


async def _give_back(client: Redis, connection: AbstractConnection, *, close: bool) -> None:
    """Return ``connection`` to ``client``'s pool, closed first if ``close`` (shielded,
    bounded: it runs on every exit path)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
        try:
            if close:
                await connection.disconnect(nowait=True)
        finally:
            await client.connection_pool.release(connection)


async def _raise(error: Exception, *, translated: bool) -> Any:
    if translated:
        reraise(error)
    raise error


async def _no_cleanup(*_: object) -> None:
    """redis-py's retry calls this between attempts; the failed connection is closed."""


async def _reconnect_if_closed(pool: ConnectionPool, connection: AbstractConnection) -> None:
    await pool.ensure_connection(connection)
    await connection.check_health()  # type: ignore[no-untyped-call]


def _fail_calls(calls: Iterable[_Call], exc: Exception) -> None:
    for call in calls:
        if call.span is not None or call.batch_span is not None:
            _tracing.end(call, exc, connection_failed=True)
        future = call.future
        if not future.done():
            future.set_exception(exc)
        elif not future.cancelled() and future.exception() is None:
            # Handed a role it has not taken up yet: it raises this once it wakes.
            call.failure = exc


def _settle(call: _Call, *, response: Any = None, exc: BaseException | None = None) -> None:
    if call.span is not None or call.batch_span is not None:
        _tracing.end(call, exc)
    future = call.future
    if future.done():
        return  # the caller is gone: its reply is dropped
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(response)
