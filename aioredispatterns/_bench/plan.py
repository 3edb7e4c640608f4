"""The time budget: ``--duration`` is the wall time of the whole run, setup included.

Every slice costs its setup and teardown (connections, subscribers, a broker), a warm-up,
its measuring window and a short grace period. The plan learns each scenario's overhead
(everything but the window and the minimum warm-up) from its previous slice, a guess
before the first, and at the start of every round gives all slices of the round the same
window: the longest that still fits what is left of the budget. When even the shortest
window does not fit (a budget too small for the number of rows), the expected total grows
past the budget, and the runner says so up front and in its progress display.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .scenario import Scenario

# Below this a window counts too few calls of a c1 row (~10k ops/s) to be worth reporting.
MIN_WINDOW = 0.02
MAX_WINDOW = 30.0
# The warm-up lasts at least this share of the window, and at most WARM_CAP seconds when
# some task has not completed a call by then (a polling lock's waiters).
WARM_SHARE = 0.2
WARM_FLOOR = 0.01
WARM_CAP = 0.25
GRACE = 0.05


def guessed_overhead(scenario: Scenario) -> float:
    """Setup and teardown before anything was measured: a client and its connections."""
    return 0.01 + 0.0005 * scenario.concurrency


def warm_for(window: float) -> float:
    """The minimum warm-up of a slice with this window."""
    return max(WARM_FLOOR, WARM_SHARE * window)


@dataclass
class Plan:
    """How long the rest of the run should take, and the window of the next round."""

    scenarios: list[Scenario]
    rounds: int
    budget: float
    overhead: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.overhead = [guessed_overhead(row) for row in self.scenarios]

    def measured(self, index: int, window: float) -> float:
        """The window scenario ``index`` gets when the round's window is ``window``."""
        return max(window, self.scenarios[index].min_seconds)

    def learn(self, index: int, window: float, wall: float) -> None:
        """Record what a slice of scenario ``index`` with this window cost in all."""
        self.overhead[index] = max(0.0, wall - warm_for(window) - self.measured(index, window))

    def slice_seconds(self, index: int, window: float) -> float:
        """The expected wall time of one slice of scenario ``index``."""
        return self.overhead[index] + warm_for(window) + self.measured(index, window)

    def remaining(self, slices: list[int], window: float) -> float:
        """Expected seconds for these slices (scenario indexes, repeats allowed)."""
        return sum(self.slice_seconds(index, window) for index in slices)

    def window(self, slices: list[int], time_left: float) -> float:
        """The longest window (between MIN_WINDOW and MAX_WINDOW) whose slices fit."""
        low, high = MIN_WINDOW, MAX_WINDOW
        if self.remaining(slices, low) >= time_left:
            return low
        if self.remaining(slices, high) <= time_left:
            return high
        for _ in range(40):  # the cost grows with the window: bisect
            middle = (low + high) / 2
            if self.remaining(slices, middle) <= time_left:
                low = middle
            else:
                high = middle
        return low
