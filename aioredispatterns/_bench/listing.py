"""``bench --list``: the rows a run would measure, without starting a server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import loader
from .scenario import BenchEnv


def print_rows(
    scenario_dir: Path | None, only: str | None, concurrency: Sequence[int] | None
) -> None:
    """Print ``group | row | concurrency`` for every selected row, grouped."""
    modules = (
        loader.builtin_modules() if scenario_dir is None else loader.directory_modules(scenario_dir)
    )
    env = BenchEnv(url="redis://not-connected", server="(listing only)")
    rows = loader.grouped(loader.select(loader.collect(modules, env), only, concurrency))
    for row in rows:
        mark = " (baseline)" if row.baseline else ""
        print(f"{row.group} | {row.name}{mark} | c{row.concurrency}")
    print(f"{len(rows)} rows")
