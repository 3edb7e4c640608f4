"""OpenTelemetry spans for the library's own traffic (the auto-pipelines).

The auto-pipeline writes to redis-py's connections itself, so instrumentations that wrap
redis-py's ``execute_command`` (``opentelemetry-instrumentation-redis``) never see its
commands: neither the primitives' nor, on the client :func:`~aioredispatterns.connect`
returns, your own auto-pipelined ``await client.get(...)``. :func:`instrument` is the one
hook that shows them:

* **one span per batch** (one write, many commands): named ``PIPELINE``, kind CLIENT,
  from the write until the batch's last reply; ``db.operation.batch.size`` is the number
  of commands, ``aioredispatterns.commands`` their names in order (the first 128), plus
  ``db.system.name``, ``server.address``, ``server.port`` and ``db.namespace``. A batch
  carries many callers' commands, so its span is a root span of its own, *linked* to the
  span that was current in each caller (the first 32); its status is ERROR when the
  connection failed under it (error replies fail only their own command).
* **one span per command**, when asked (``per_command=True``): named after the command
  (``GET``), a child of the span current in the caller, from the moment the command is
  queued until its reply arrives, with ERROR status and the exception on an error reply
  or a failure.

Off (the default), this costs the pipeline one global lookup per command and per batch.
Commands that take a pooled connection instead of the pipeline (blocking commands,
transactions, pub/sub) go through redis-py's ``execute_command``, where redis-py's own
instrumentation sees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._pipeline import AutoPipeline, _Call

__all__ = ("ACTIVE", "PipelineTracer", "end", "instrument", "uninstrument")

_MAX_NAMES = 128
_MAX_LINKS = 32


class PipelineTracer:
    """Starts the spans of :func:`instrument` (one instance is active at a time)."""

    def __init__(self, tracer: Any, *, per_command: bool) -> None:
        from opentelemetry import context, trace

        self._tracer = tracer
        self._per_command = per_command
        self._current_span = trace.get_current_span
        self._link = trace.Link
        self._client_kind = trace.SpanKind.CLIENT
        self._root = context.Context()  # batch spans have no parent (see module docstring)

    def _attributes(self, pipeline: AutoPipeline) -> dict[str, Any]:
        found: dict[str, Any] | None = pipeline.trace_attributes
        if found is None:
            settings = pipeline.client.connection_pool.connection_kwargs  # type: ignore[union-attr]
            found = {"db.system.name": "redis"}
            if settings.get("host") is not None:
                found["server.address"] = str(settings["host"])
                found["server.port"] = int(settings.get("port") or 6379)
            elif settings.get("path") is not None:
                found["server.address"] = str(settings["path"])
            found["db.namespace"] = str(settings.get("db") or 0)
            pipeline.trace_attributes = found
        return found

    def command(self, call: _Call, pipeline: AutoPipeline) -> None:
        """A command was prepared: start its span, or remember the caller's to link to."""
        if self._per_command:
            attributes = dict(self._attributes(pipeline))
            attributes["db.operation.name"] = call.name
            call.span = self._tracer.start_span(
                call.name, kind=self._client_kind, attributes=attributes
            )
            return
        context = self._current_span().get_span_context()
        if context.is_valid:
            call.link = context

    def batch(self, batch: list[_Call], pipeline: AutoPipeline) -> None:
        """``batch`` was written: start its span (ended by its last call's reply)."""
        links = []
        for call in batch:
            context = call.span.get_span_context() if call.span is not None else call.link
            if context is not None:
                links.append(self._link(context))
                if len(links) >= _MAX_LINKS:
                    break
        attributes = dict(self._attributes(pipeline))
        attributes["db.operation.name"] = "PIPELINE"
        attributes["db.operation.batch.size"] = len(batch)
        attributes["aioredispatterns.commands"] = [call.name for call in batch[:_MAX_NAMES]]
        batch[-1].batch_span = self._tracer.start_span(
            "PIPELINE",
            context=self._root,
            kind=self._client_kind,
            attributes=attributes,
            links=links,
        )


#: The tracer in use, or None (read by the auto-pipeline on every command).
ACTIVE: PipelineTracer | None = None


def instrument(tracer_provider: Any = None, *, per_command: bool = False) -> None:
    """Trace the auto-pipelines of every client with OpenTelemetry (see the module doc).

    Args:
        tracer_provider: the ``TracerProvider`` to use (the global one when None).
        per_command: also start one span per command, as a child of the caller's span.

    Calling it again replaces the settings; :func:`uninstrument` turns it off. Spans of
    commands already queued are ended normally either way. Nothing is sent, nothing to
    cancel.

    Raises:
        ConfigurationError: ``opentelemetry-api`` is not installed (the ``otel`` extra).
    """
    global ACTIVE
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigurationError(
            "tracing needs opentelemetry-api: pip install 'aioredispatterns[otel]'"
        ) from None
    if not isinstance(per_command, bool):
        raise ConfigurationError(f"per_command must be a bool, got {per_command!r}")
    from . import __version__

    tracer = trace.get_tracer("aioredispatterns", __version__, tracer_provider=tracer_provider)
    ACTIVE = PipelineTracer(tracer, per_command=per_command)


def uninstrument() -> None:
    """Stop tracing the auto-pipelines (spans already started still end)."""
    global ACTIVE
    ACTIVE = None


def end(call: _Call, error: BaseException | None, *, connection_failed: bool = False) -> None:
    """``call`` is answered (or failed with ``error``): end its spans."""
    span = call.span
    if span is not None:
        call.span = None
        if error is not None:
            _mark_failed(span, error)
        span.end()
    batch_span = call.batch_span
    if batch_span is not None:
        call.batch_span = None
        if error is not None and connection_failed:
            _mark_failed(batch_span, error)
        batch_span.end()


def _mark_failed(span: Any, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
