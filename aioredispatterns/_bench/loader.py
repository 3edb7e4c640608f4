"""Where scenarios come from: the package's own, or a directory the user names.

The built-in scenarios are modules of ``aioredispatterns._bench.scenarios`` (shipped in
the wheel). Files of a user's directory are loaded only when ``--scenarios DIR`` names it:
nothing is ever imported from the current working directory on the runner's own initiative.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from ..errors import ConfigurationError
from .scenario import BenchEnv, Scenario

BUILTIN_PACKAGE = "aioredispatterns._bench.scenarios"


Modules = list[tuple[str, ModuleType]]  # (the file's stem, the module)


def builtin_modules() -> Modules:
    """The package's scenario modules, in name order (private ``_helpers`` skipped)."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    )
    return [(name, importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")) for name in names]


def directory_modules(directory: Path) -> Modules:
    """Import every ``*.py`` of ``directory`` (not ``_*.py``) as a module of its own."""
    if not directory.is_dir():
        raise ConfigurationError(f"--scenarios: {directory} is not a directory")
    modules: Modules = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"arp_bench_{len(sys.modules)}_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        spec.loader.exec_module(module)
        modules.append((path.stem, module))
    return modules


def collect(modules: Modules, env: BenchEnv) -> list[tuple[str, Scenario]]:
    """Every module's ``scenarios(env)`` rows, in module order, with the file's stem
    (modules whose ``TOPOLOGIES`` leave out ``env.topology`` are skipped)."""
    found: list[tuple[str, Scenario]] = []
    for stem, module in modules:
        if env.topology not in getattr(module, "TOPOLOGIES", ("standalone",)):
            continue
        factory: Callable[[BenchEnv], list[Scenario]] | None = getattr(module, "scenarios", None)
        if callable(factory):
            found.extend((stem, row) for row in factory(env))
    return found


def select(
    found: list[tuple[str, Scenario]], only: str | None, concurrency: Iterable[int] | None
) -> list[Scenario]:
    """Rows matching ``--only`` (comma-separated, case-insensitive substrings of the group,
    the name or the scenario file's name) and ``--concurrency``; the baseline of every group
    that has a selected row comes along, so each row keeps its ratio."""
    levels = set(concurrency or ())
    needles = [part.strip().lower() for part in (only or "").split(",") if part.strip()]

    def wanted(source: str, row: Scenario) -> bool:
        if levels and row.concurrency not in levels:
            return False
        text = f"{source}\n{row.group}\n{row.name}".lower()
        return not needles or any(needle in text for needle in needles)

    groups = {row.group for source, row in found if wanted(source, row)}
    return [
        row
        for source, row in found
        if wanted(source, row) or (row.baseline and row.group in groups)
    ]


def grouped(scenarios: list[Scenario]) -> list[Scenario]:
    """Rows of one group adjacent (groups in order of first appearance), baseline first."""
    order: dict[str, int] = {}
    for row in scenarios:
        order.setdefault(row.group, len(order))
    indexed = list(enumerate(scenarios))
    indexed.sort(key=lambda pair: (order[pair[1].group], not pair[1].baseline, pair[0]))
    return [row for _, row in indexed]
