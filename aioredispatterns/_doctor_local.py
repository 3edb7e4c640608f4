"""The doctor's in-process checks: what this process's own client and primitives counted.

Read before the doctor sends anything (its own commands would count too): the
auto-pipeline's counters (:func:`~aioredispatterns.pipeline_stats`: how many commands
share a round trip), the connection pools (how many connections are checked out of how
many), and the ``.stats`` of the primitives the caller asks to watch (a subscription's
dropped messages and gaps). Nothing here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._commands import pipeline_stats
from ._connection import AnyRedis
from ._doctor_model import Finding, Severity
from ._pipeline import PipelineStats
from .errors import ConfigurationError
from .health import PoolUsage, _pool_usage

__all__ = ("LocalFacts", "check_local", "check_watch", "read_local")

# Below this many commands the pipeline's mean batch size says nothing yet.
_MIN_COMMANDS = 1000
_UNPIPELINED_MEAN = 1.2


@dataclass(slots=True)
class LocalFacts:
    """A snapshot of this process's counters, taken before the doctor's own commands."""

    pipeline: PipelineStats | None = None
    pool: PoolUsage | None = None
    watched: list[tuple[str, Any]] = field(default_factory=list)  # (what, stats)


def check_watch(watch: Iterable[object]) -> list[object]:
    """The objects to watch, each with a ``.stats`` snapshot (ConfigurationError if not)."""
    if isinstance(watch, str | bytes):
        raise ConfigurationError("watch must be an iterable of primitives, not a string")
    objects = list(watch)
    for obj in objects:
        if getattr(obj, "stats", None) is None:
            raise ConfigurationError(f"{type(obj).__name__} has no .stats to watch")
    return objects


def read_local(client: AnyRedis, watch: list[object]) -> LocalFacts:
    """Snapshot the counters (a plain read of attributes: nothing is sent)."""
    facts = LocalFacts(pipeline=pipeline_stats(client), pool=_pool_usage(client))
    for obj in watch:
        facts.watched.append((_describe(obj), obj.stats))  # type: ignore[attr-defined]
    return facts


def _describe(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else type(obj).__name__


def check_local(facts: LocalFacts) -> list[Finding]:
    """Findings about this process: pools, pipelining, watched primitives."""
    found: list[Finding] = []
    pool = facts.pool
    if pool is not None and pool.exhausted:
        found.append(
            Finding(
                "client.pool",
                Severity.WARNING,
                f"the connection pool is exhausted: {pool.in_use} of "
                f"{pool.max_connections} connections checked out",
                "callers wait for a free connection while Redis may be idle, then fail "
                "with PoolTimeout (the seed's 'pool too small')",
                "raise max_connections in connect() (count one per blocking consumer and "
                "subscription on top of the short commands), or find who holds "
                "connections (a subscription per request: share a Broadcast)",
                count=pool.in_use,
            )
        )
    stats = facts.pipeline
    if (
        stats is not None
        and stats.commands >= _MIN_COMMANDS
        and stats.mean_batch_size < _UNPIPELINED_MEAN
    ):
        found.append(
            Finding(
                "client.unpipelined",
                Severity.INFO,
                f"{stats.commands:,} commands in {stats.batches:,} round trips "
                f"({stats.mean_batch_size:.2f} per round trip)",
                "commands that each wait for the previous reply add a round trip each: "
                "a page that makes 50 calls in a row waits 50 round trips (the seed's "
                "'sync calls during page load')",
                "issue independent calls concurrently (asyncio.gather / a task group: the "
                "auto-pipeline batches them) or send them as one execute_many batch",
                count=stats.commands,
            )
        )
    for what, snapshot in facts.watched:
        dropped = getattr(snapshot, "dropped", 0) or 0
        gaps = getattr(snapshot, "gaps", 0) or 0
        if dropped or gaps:
            parts = []
            if dropped:
                parts.append(f"{dropped:,} messages dropped by the buffer policy")
            if gaps:
                parts.append(f"{gaps} gaps (reconnections)")
            found.append(
                Finding(
                    "pubsub.drops",
                    Severity.WARNING,
                    f"{what}: " + ", ".join(parts),
                    "pub/sub is fire-and-forget: a subscriber slower than its publishers "
                    "drops messages, and one that reconnects misses what was published "
                    "meanwhile",
                    "consume faster (or in a task of its own), enlarge BufferPolicy.size, "
                    "resync on a Gap; use streams for messages that must not be lost",
                    count=dropped or gaps,
                    examples=(what,),
                )
            )
    return found
