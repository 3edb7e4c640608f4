"""Writes to redis-py connections, and the one adapter for the private parts it touches.

redis-py's only write API, ``send_packed_command``, runs each write under
``asyncio.wait_for`` when a socket timeout is set. That costs a task and a timer per write
(about a third of a single caller's round trip), and on Python 3.11 ``wait_for`` *loses a
native cancellation* that arrives in the same loop step as the write completes: it
returns the result and the task runs on as if never cancelled (anyio's cancel scopes
re-deliver, a plain ``Task.cancel()`` is gone). So the command layer writes to the
connection's asyncio stream directly (:func:`send`), waiting with the socket timeout only
when the socket pushes back, and wraps the redis-py calls it cannot avoid (connect and
handshake, health checks) in :func:`guarded`, which re-raises a swallowed cancellation.

redis-py has no public synchronous write, so :func:`open_stream_writer` reads the
connection's ``_reader``/``_writer``; when they are missing (another redis-py version)
everything falls back to the public path. A test fails if a release renames them.

This module is also the one adapter for every private redis-py attribute the command
layer touches, so that a redis-py release that renames one breaks one module:

* ``connection._reader`` / ``_writer`` (the asyncio streams: the direct write, the socket
  the auto-pipeline reads itself, an abort);
* ``connection._parser`` (which parser the connection uses, and its error table, so that
  replies read without it come out exactly as redis-py would return them);
* ``connection._parser.set_invalidation_push_handler`` (RESP3 ``invalidate`` pushes are
  otherwise swallowed by redis-py's parser: a near cache's tracking connection reads them
  as replies, see :func:`return_invalidations`);
* ``StreamReader._buffer`` (asyncio's: bytes already read from the socket; redis-py reads
  it the same way to tell a dirty connection).

When one is missing, :func:`hiredis_reader_options` and :func:`stream_transport` return
None and the auto-pipeline keeps reading through redis-py's ``read_response``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from redis import exceptions as rex

try:
    import hiredis
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # pragma: no cover - hiredis is an optional extra
    hiredis = None  # type: ignore[assignment]
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection, ConnectionPool

__all__ = (
    "PUSH_TYPE",
    "abort",
    "cancel_count",
    "checkout",
    "drain",
    "guarded",
    "hiredis_reader_options",
    "open_stream_writer",
    "return_invalidations",
    "send",
    "stream_transport",
)

#: hiredis's type for RESP3 push messages (hiredis >= 3.2), or None.
PUSH_TYPE: type | None = getattr(hiredis, "PushNotification", None) if hiredis else None

T = TypeVar("T")


def open_stream_writer(connection: AbstractConnection | None) -> asyncio.StreamWriter | None:
    """The asyncio writer of ``connection`` if its stream is known to be open, else None."""
    writer = getattr(connection, "_writer", None)
    reader = getattr(connection, "_reader", None)
    if not isinstance(writer, asyncio.StreamWriter) or not isinstance(reader, asyncio.StreamReader):
        return None
    if writer.is_closing() or reader.at_eof():
        return None
    return writer


def stream_transport(connection: AbstractConnection | None) -> asyncio.Transport | None:
    """The socket transport under ``connection``'s streams, if it is open and redis-py has
    nothing buffered from it (else None: the socket cannot be read by anyone else)."""
    writer = open_stream_writer(connection)
    if writer is None:
        return None
    reader = getattr(connection, "_reader", None)
    if getattr(reader, "_buffer", None):  # bytes redis-py read and has not parsed
        return None
    transport = writer.transport
    # Duck-typed: uvloop's transports have asyncio's API without subclassing it.
    if all(hasattr(transport, name) for name in _TRANSPORT_API):
        return transport  # type: ignore[return-value]
    return None


_TRANSPORT_API = ("get_protocol", "set_protocol", "writelines", "is_closing", "abort")


def hiredis_reader_options(connection: AbstractConnection) -> dict[str, Any] | None:
    """Arguments for a ``hiredis.Reader`` that parses exactly as ``connection``'s own
    parser does, or None when the connection does not parse with hiredis (a reader of
    ours would not return the same objects) or hiredis has no push type (RESP3 pushes
    could not be told from replies)."""
    if hiredis is None or PUSH_TYPE is None or _AsyncHiredisParser is None:
        return None
    parser = getattr(connection, "_parser", None)
    if not isinstance(parser, _AsyncHiredisParser):
        return None
    # As redis-py's _AsyncHiredisParser.on_connect builds its reader.
    options: dict[str, Any] = {
        "protocolError": rex.InvalidResponse,
        "replyError": parser.parse_error,
    }
    encoder = connection.encoder
    if encoder.decode_responses:
        options["encoding"] = encoder.encoding
        options["errors"] = encoder.encoding_errors
    return options


async def _as_reply(response: Any) -> Any:
    return response


def return_invalidations(connection: AbstractConnection) -> bool:
    """Make ``connection`` return RESP3 ``invalidate`` pushes from a push read (redis-py
    hands them to a handler, or drops them). False when the parser has no such hook."""
    setter = getattr(getattr(connection, "_parser", None), "set_invalidation_push_handler", None)
    if setter is None:
        return False
    setter(_as_reply)
    return True


def abort(connection: AbstractConnection) -> None:
    """Close ``connection``'s socket at once (synchronously): a read blocked on it fails."""
    writer = getattr(connection, "_writer", None)
    if isinstance(writer, asyncio.StreamWriter):
        writer.transport.abort()


async def drain(writer: asyncio.StreamWriter, connection: AbstractConnection) -> None:
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


async def send(connection: AbstractConnection, chunks: list[bytes]) -> None:
    """Write already packed ``chunks`` to ``connection``.

    Never reconnects: a connection that is not open raises ``ConnectionError`` (a silent
    reconnect under replies still owed would hand them to the wrong callers).
    """
    writer = open_stream_writer(connection)
    if writer is not None:
        writer.writelines(chunks)
        await drain(writer, connection)
        return
    if not connection.is_connected:
        raise rex.ConnectionError("the connection is closed")
    await guarded(connection.send_packed_command(chunks, check_health=False))


def cancel_count() -> int:
    """How many cancellation requests the current task has pending (see :func:`guarded`)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


async def guarded(awaitable: Awaitable[T]) -> T:
    """Await a redis-py call that may swallow a native cancellation; re-raise it if so."""
    before = cancel_count()
    result = await awaitable
    if cancel_count() > before:
        raise asyncio.CancelledError("cancelled during a redis-py call that kept its result")
    return result


async def checkout(pool: ConnectionPool) -> AbstractConnection:
    """A connected connection from ``pool`` (redis-py connects and retries it).

    If redis-py's handshake swallowed a cancellation, the connection goes back to the pool
    (shielded) and the cancellation is raised.
    """
    before = cancel_count()
    connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
    if cancel_count() > before:
        with anyio.CancelScope(shield=True):
            await pool.release(connection)
        raise asyncio.CancelledError("cancelled while redis-py connected")
    return connection
