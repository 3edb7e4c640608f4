"""What the user sees while the run goes: round, scenario, elapsed / expected total.

On a terminal with ``rich`` installed a live progress bar (erased at the end); elsewhere
(a pipe, a CI log, no rich) one labelled line per round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TextIO


class Progress:
    """Reports the run's progress to ``out`` (the terminal's stderr)."""

    def __init__(self, out: TextIO, live: Any = None) -> None:
        self._out = out
        self._live = live
        self._task: Any = None
        self._round = -1

    def show(
        self, round_index: int, rounds: int, label: str, elapsed: float, expected: float
    ) -> None:
        """The slice now starting, and the clock."""
        clock = f"{elapsed:4.0f} s / ~{expected:.0f} s"
        where = f"round {round_index + 1}/{rounds}"
        if self._live is not None:
            if self._task is None:
                self._task = self._live.add_task(label, total=expected, where=where, clock=clock)
            self._live.update(
                self._task, description=label, total=expected, completed=elapsed, where=where,
                clock=clock,
            )  # fmt: skip
        elif round_index != self._round:
            print(f"progress: {where}, {elapsed:.1f} s elapsed, ~{expected:.0f} s in all",
                  file=self._out, flush=True)  # fmt: skip
        self._round = round_index


@contextlib.contextmanager
def progress(out: TextIO) -> Iterator[Progress]:
    """A :class:`Progress` on ``out``; live when ``out`` is a terminal and rich is there."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress
    except ImportError:
        yield Progress(out)
        return
    console = Console(file=out)
    if not console.is_terminal:
        yield Progress(out)
        return
    live = RichProgress(
        TextColumn("[bold]{task.fields[where]}"),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        console=console,
        transient=True,
        refresh_per_second=4,
    )
    with live:
        yield Progress(out, live)
