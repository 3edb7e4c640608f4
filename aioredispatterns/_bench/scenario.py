"""What a scenario file is made of: ``Scenario`` rows, the ``BenchEnv`` they get, ``Measured``.

A scenario file defines ``scenarios(env: BenchEnv) -> list[Scenario]``. Each ``Scenario``
is one row of the table; rows that share a ``group`` are compared with the group's
baseline row. ``setup(env)`` is an async context manager that prepares everything (clients,
keys, subscribers) and yields the *operation*: an async callable the runner calls over and
over from ``concurrency`` tasks. What happens in ``setup`` is not timed; only completed
operations are counted.

The runner may cancel an operation that is still running when a slice of the run ends
(after a short grace period), so an operation must leave nothing behind that the next
slice would trip over: use names of your own per ``setup`` for anything a cancelled call
could leave held (a lock key, say).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

Operation = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Measured:
    """Returned by an operation to report its own latency instead of its wall time.

    The lock hand-off row, for instance, times one release-to-acquire interval inside a
    cycle that also sleeps; ops/s still counts whole operations.
    """

    seconds: float


@dataclass(frozen=True)
class Scenario:
    """One row of the table.

    Attributes:
        group: rows of one group are compared with each other ("GET c64").
        name: the row's label ("redis-py pool").
        concurrency: how many tasks call the operation at once.
        setup: ``setup(env)`` is an async context manager yielding the operation.
        baseline: the row the others of its group are divided by (one per group).
        ops_per_call: how many units one call counts for (a pipeline of 100 GETs: 100).
        unit: what is counted per second ("ops", "msgs", "deliveries", "hand-offs").
        min_seconds: the shortest measuring window this row is given per round, for rows
            whose operations are slow by design (redis-py's lock polls every 0.1 s).
        role: ``"ours"`` (this library), ``"competitor"`` (another library) or
            ``"reference"`` (hand-written redis-py that is not the baseline); the plot
            colours bars by it.
    """

    group: str
    name: str
    concurrency: int
    setup: Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]
    baseline: bool = False
    ops_per_call: int = 1
    unit: str = "ops"
    min_seconds: float = 0.0
    role: str = "ours"


@dataclass
class BenchEnv:
    """What scenarios get: the measured server's URL, its description and a key prefix.

    ``topology`` is ``"standalone"`` or ``"cluster"`` (``url`` is then a
    ``redis+cluster://`` URL); a scenario module runs only on the topologies its
    ``TOPOLOGIES`` tuple names (``("standalone",)`` when it has none). On a cluster run
    with embedded servers, ``standalone_url`` is a standalone server of the same binary,
    for rows that compare the two.
    """

    url: str
    server: str
    prefix: str = "arp-bench"
    topology: str = "standalone"
    standalone_url: str | None = None

    def client(self, **options: Any) -> Any:
        """A client from :func:`aioredispatterns.connect` on the measured server."""
        from .._connection import connect

        return connect(self.url, **options)
