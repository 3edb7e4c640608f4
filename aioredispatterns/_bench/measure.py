"""One slice: set a scenario up, warm it, count the operations completed in a window.

Tasks call the operation back to back from the start. The window opens once every task
completed one call (connections opened, scripts loaded) or the warm-up cap passed,
whichever is first, and stays open for ``window`` seconds: ops/s is the number of calls
completed inside it divided by its length. Then no task starts another call; calls still
running get a short grace period and are cancelled after it, so a slow row (redis-py's
polling lock) never stretches a slice beyond its plan.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from .scenario import BenchEnv, Measured, Operation, Scenario

# Latency samples kept per slice; ops/s counts every call regardless.
MAX_SAMPLES_PER_SLICE = 5_000


@dataclass
class Result:
    """A row's figures over all rounds (``None`` for a round whose slice failed)."""

    group: str
    name: str
    concurrency: int
    baseline: bool
    unit: str
    ops_per_call: int
    role: str
    ops_per_second: list[float | None] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, scenario: Scenario) -> Result:
        return cls(
            scenario.group,
            scenario.name,
            scenario.concurrency,
            scenario.baseline,
            scenario.unit,
            scenario.ops_per_call,
            scenario.role,
        )

    @property
    def measured(self) -> list[float]:
        """The per-round figures of the rounds that completed."""
        return [value for value in self.ops_per_second if value is not None]

    @property
    def median(self) -> float | None:
        """The median ops/s over rounds, or ``None`` when no round completed."""
        values = self.measured
        return statistics.median(values) if values else None

    def percentile(self, q: float) -> float:
        """The ``q`` quantile of the latency samples, in seconds (NaN without samples)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Window:
    """The slice's shared state: the window's bounds, the count, the tasks' progress."""

    def __init__(self, tasks: int) -> None:
        self.start = math.inf
        self.end = math.inf
        self.stopping = False
        self.calls = 0
        self.samples: list[float] = []
        self.unwarmed = tasks
        self.all_warm = anyio.Event()
        self.running = tasks
        self.all_done = anyio.Event()

    def completed(self, started: float, done: float, outcome: object) -> None:
        if self.start <= done <= self.end:
            self.calls += 1
            if len(self.samples) < MAX_SAMPLES_PER_SLICE:
                seconds = outcome.seconds if isinstance(outcome, Measured) else done - started
                self.samples.append(seconds)


# Calls between two explicit yields of a worker to the event loop.
_YIELD_EVERY = 64


async def _worker(operation: Operation, window: _Window) -> None:
    clock = time.perf_counter
    first = True
    calls = 0
    try:
        while not window.stopping:
            started = clock()
            outcome = await operation()
            window.completed(started, clock(), outcome)
            calls += 1
            if calls % _YIELD_EVERY == 0:
                # An operation served from memory never suspends: let the loop run the
                # timer that ends the window (and the other workers).
                await anyio.lowlevel.checkpoint()
            if first:
                first = False
                window.unwarmed -= 1
                if window.unwarmed == 0:
                    window.all_warm.set()
    finally:
        window.running -= 1
        if window.running == 0:
            window.all_done.set()


async def measure_slice(
    scenario: Scenario,
    env: BenchEnv,
    *,
    window: float,
    warm_min: float,
    warm_cap: float,
    grace: float,
    result: Result,
) -> None:
    """Run one slice of ``scenario`` and append its ops/s and latencies to ``result``."""
    clock = time.perf_counter
    seconds = max(window, scenario.min_seconds)
    state = _Window(scenario.concurrency)
    async with scenario.setup(env) as operation, anyio.create_task_group() as tg:
        for _ in range(scenario.concurrency):
            tg.start_soon(_worker, operation, state)
        await anyio.sleep(warm_min)
        with anyio.move_on_after(max(0.0, warm_cap - warm_min)):
            await state.all_warm.wait()
        state.start = clock()
        state.end = state.start + seconds
        await anyio.sleep(seconds)
        state.stopping = True
        # Calls in flight finish on their own unless they are slow; those are cancelled.
        with anyio.move_on_after(grace):
            await state.all_done.wait()
        tg.cancel_scope.cancel()
    result.ops_per_second.append(state.calls * scenario.ops_per_call / seconds)
    result.latencies.extend(state.samples)
