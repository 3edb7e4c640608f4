"""Competitors' noise, counted and summarised instead of dumped on the terminal.

While the scenarios run, warnings, log records, asyncio's "Task exception was never
retrieved" reports (through the loop's exception handler) and anything else written to
stderr are caught here. Each kind is counted, with the scenarios it came from and one
full example; the runner prints one line per kind at the end (and the JSON keeps the
examples).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

_EXAMPLE_CHARS = 4000


@dataclass
class Noise:
    """One kind of noise: how often it came, from which scenarios, one example."""

    kind: str
    count: int = 0
    scenarios: list[str] = field(default_factory=list)
    example: str = ""

    def summary(self) -> str:
        """One labelled line: count, kind, where."""
        where = ", ".join(self.scenarios[:3]) + (", ..." if len(self.scenarios) > 3 else "")
        return f"{self.count} x {self.kind} (in: {where})"


_ADDRESS = re.compile(r"\b(?:0x)?[0-9a-f]{8,16}\b")


class NoiseCollector:
    """Counts noise by kind; ``current`` names the scenario running now."""

    def __init__(self) -> None:
        self.current = "runner"
        self.kinds: dict[str, Noise] = {}

    def add(self, kind: str, example: str) -> None:
        """Count one occurrence of ``kind`` in the current scenario (object addresses in
        the kind are blanked, so one leak seen a hundred times is one line)."""
        kind = _ADDRESS.sub("0x...", kind)
        noise = self.kinds.get(kind)
        if noise is None:
            noise = self.kinds[kind] = Noise(kind, example=example[:_EXAMPLE_CHARS])
        noise.count += 1
        if self.current not in noise.scenarios:
            noise.scenarios.append(self.current)

    def summary(self) -> list[str]:
        """One line per kind, the most frequent first."""
        ordered = sorted(self.kinds.values(), key=lambda noise: (-noise.count, noise.kind))
        return [noise.summary() for noise in ordered]

    # ------------------------------------------------------------------ the sources

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An asyncio loop exception handler (set with ``loop.set_exception_handler``)."""
        message = str(context.get("message") or "unhandled exception in the event loop")
        error = context.get("exception")
        kind = message
        if isinstance(error, BaseException):
            kind += f": {type(error).__module__}.{type(error).__qualname__}"
        task = context.get("task") or context.get("future")
        coroutine = getattr(task, "get_coro", lambda: None)()
        where = getattr(coroutine, "__qualname__", None)
        if where:
            kind += f" in {where}"
        example = message
        if isinstance(error, BaseException):
            example += "\n" + "".join(traceback.format_exception(error))
        self.add(kind, example)

    def _warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = str(message).splitlines()[0] if str(message) else ""
        self.add(f"{category.__name__}: {text[:120]}", f"{filename}:{lineno}: {message}")

    def _stderr(self, text: str) -> None:
        lines = [line for line in text.splitlines() if line.strip()]
        for _ in lines:
            self.add("line printed on stderr", text)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Catch warnings, log records (WARNING and up) and stderr writes until exit."""
        handler = _CountingHandler(self)
        root = logging.getLogger()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self._warning
            root.addHandler(handler)
            try:
                with contextlib.redirect_stderr(_LineSink(self._stderr)):
                    yield
            finally:
                root.removeHandler(handler)


class _CountingHandler(logging.Handler):
    def __init__(self, collector: NoiseCollector) -> None:
        super().__init__(level=logging.WARNING)
        self.collector = collector

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.getMessage().splitlines()[0] if record.getMessage() else ""
            example = logging.Formatter().format(record)
        except Exception:  # a record that cannot be formatted is still counted
            first, example = record.msg if isinstance(record.msg, str) else "?", ""
        self.collector.add(f"log {record.levelname} from {record.name}: {first[:120]}", example)


class _LineSink(io.TextIOBase):
    """A text stream that hands complete lines to a callback."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            complete, _, self._pending = self._pending.rpartition("\n")
            self._callback(complete)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._callback(self._pending)
            self._pending = ""
