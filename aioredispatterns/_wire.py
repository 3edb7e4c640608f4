"""The auto-pipeline's read path: it reads its kept connection's socket itself.

redis-py reads a reply with ``await connection.read_response()``: a coroutine, a timeout
context and an error-message string per reply, and one task at a time doing the reading
(the auto-pipeline's *reader* role). With many callers in flight that is most of the
client's time. Instead, once redis-py has connected a pooled connection (TLS, AUTH,
HELLO, SELECT: all its own), :class:`Wire` puts itself between the socket and redis-py's
stream: every chunk the socket delivers is fed to a ``hiredis.Reader`` built exactly as
the connection's own parser builds its reader, and the replies it completes are handed
to the pipeline right there, in the event loop's callback: no task reads, no role is
handed on, and a reply wakes its caller in the same loop iteration it arrived in.

Nothing is lost for redis-py: end of stream and a lost connection are passed on to its
stream (so closing the connection, and redis-py's own checks, work as before), and
:meth:`Wire.detach` gives the socket back to it when the pipeline is idle (health
checks, reconnects, returning the connection to the pool).

The private redis-py attributes this needs are read in ``_transport`` (the adapter);
here only asyncio's public protocol API is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import hiredis

__all__ = ("MORE", "Wire")

#: What ``Wire.reader.gets()`` returns when no complete reply is buffered (a sentinel:
#: ``False`` is a RESP3 reply of its own).
MORE: Any = object()


class Wire(asyncio.Protocol):
    """Reads one connection's socket for the auto-pipeline (see the module docstring).

    Args:
        transport: the connection's socket transport (redis-py's stream protocol on it).
        options: ``hiredis.Reader`` arguments matching the connection's parser.
        on_data: called with this wire after each chunk is fed (the replies are parsed
            by the caller, which knows which of them want decoding).
        on_lost: called with this wire and the error once the socket is closed or at
            end of stream (nothing more will be read).
    """

    __slots__ = (
        "_drained",
        "_on_data",
        "_on_lost",
        "_original",
        "_paused",
        "error",
        "last_read",
        "lost",
        "reader",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        options: dict[str, Any],
        on_data: Callable[[Wire], None],
        on_lost: Callable[[Wire, Exception], None],
    ) -> None:
        self.transport = transport
        self.reader = hiredis.Reader(notEnoughData=MORE, **options)
        self.lost = False
        self.error: Exception | None = None
        self.last_read = asyncio.get_running_loop().time()
        self._on_data = on_data
        self._on_lost = on_lost
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._original = transport.get_protocol()
        transport.set_protocol(self)

    # ------------------------------------------------------------------ the socket's calls

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self.last_read = asyncio.get_running_loop().time()
        self._on_data(self)

    def eof_received(self) -> bool | None:
        keep_open = self._original.eof_received()  # type: ignore[attr-defined]
        self._lose(ConnectionError("the server closed the connection"))
        return keep_open  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc or ConnectionError("the connection was closed"))
        self._wake_writer()
        self._original.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True
        self._original.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()
        self._original.resume_writing()

    # ------------------------------------------------------------------ the pipeline's calls

    @property
    def open(self) -> bool:
        """Whether commands may be written (not lost, not closing)."""
        return not self.lost and not self.transport.is_closing()

    @property
    def must_drain(self) -> bool:
        """Whether the socket pushed back: the writer should wait (:meth:`drain`)."""
        return self._paused

    async def drain(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Wait until the socket takes the buffered bytes (at most ``timeout`` seconds).

        Raises:
            TimeoutError: the socket did not take them in time.
            ConnectionError: the connection was lost meanwhile.
        """
        # anyio's deadline, not asyncio.wait_for (which can lose a cancellation on 3.11).
        with anyio.fail_after(timeout):
            while self._paused and not self.lost:
                if self._drained is None or self._drained.done():
                    self._drained = asyncio.get_running_loop().create_future()
                await self._drained
        if self.lost:
            raise self.error or ConnectionError("the connection was closed")

    def detach(self) -> bool:
        """Give the socket back to redis-py's stream; False if a partial reply is
        buffered here (the connection is then out of step and must be closed)."""
        if self.transport.get_protocol() is self:
            self.transport.set_protocol(self._original)
        self._on_data = _ignore
        self._on_lost = _ignore
        return not self.reader.has_data()

    # ------------------------------------------------------------------ internals

    def _lose(self, error: Exception) -> None:
        if self.lost:
            return
        self.lost = True
        self.error = error
        self._on_lost(self, error)

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


def _ignore(*_: object) -> None:
    return None
