"""Export the primitives' counters to Prometheus (the ``prometheus`` extra).

Every primitive keeps its counters the same way: a ``.stats`` property returning a
snapshot dataclass (``Cache.stats``, ``Lock.stats``, ``RateLimiter.stats``,
``ConsumerGroup.stats``, ``Subscription.stats`` ...), and a client's auto-pipeline has
:func:`~aioredispatterns.pipeline_stats`. :class:`PrometheusCollector` reads those
snapshots at scrape time (nothing is counted twice, nothing runs between scrapes)::

    from prometheus_client import REGISTRY
    from aioredispatterns.metrics import PrometheusCollector

    collector = PrometheusCollector()
    collector.track("users", cache)        # aioredispatterns_cache_hits_total{name="users"}
    collector.track("api", limiter)
    collector.track("main", redis)         # the client's auto-pipeline counters
    REGISTRY.register(collector)

Metric names are ``<namespace>_<kind>_<field>_total`` for counters and
``<namespace>_<kind>_<field>`` for gauges (how many are in flight or buffered now), with
the name given to :meth:`~PrometheusCollector.track` as the ``name`` label. Tracked
objects are held weakly: a primitive that is garbage-collected disappears from the
scrape.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._commands import pipeline_stats
from ._connection import is_client
from ._validate import check_name
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ("PrometheusCollector",)

# Fields that say how much there is *now* (gauges); every other field only grows.
_GAUGES = frozenset(
    {"in_flight", "buffered", "max_in_flight", "held", "waiting", "near_bytes", "near_entries"}
)
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _kind(source: object) -> str:
    if is_client(source):
        return "pipeline"
    name = type(source).__name__
    # CamelCase class names to snake_case: ConsumerGroup -> consumer_group.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _snapshot(source: object) -> Any:
    if is_client(source):
        return pipeline_stats(source)  # type: ignore[arg-type]
    return getattr(source, "stats", None)


class PrometheusCollector:
    """A ``prometheus_client`` collector for the counters of the primitives you track.

    Args:
        namespace: the first part of every metric name.

    Raises:
        ConfigurationError: ``prometheus_client`` is not installed
            (``pip install 'aioredispatterns[prometheus]'``), or a bad namespace.

    Nothing here is a coroutine and nothing talks to Redis: a scrape reads the snapshots
    the primitives keep in memory, so there is nothing to cancel.
    """

    def __init__(self, namespace: str = "aioredispatterns") -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "prometheus_client is not installed (pip install 'aioredispatterns[prometheus]')"
            ) from None
        if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
            raise ConfigurationError(f"namespace must be a metric-name word, got {namespace!r}")
        self._namespace = namespace
        self._sources: dict[tuple[str, str], weakref.ref[Any]] = {}

    def track(self, name: str, source: object) -> None:
        """Export ``source``'s counters under the label ``name`` (replacing one of the
        same kind and name).

        ``source`` is a primitive with a ``.stats`` snapshot, or a client from
        :func:`~aioredispatterns.connect` (its auto-pipeline's counters).

        Raises:
            ConfigurationError: ``source`` has no stats, or ``name`` is not a valid name.
        """
        check_name("name", name, max_bytes=200)
        if not is_client(source) and not dataclasses.is_dataclass(_snapshot(source)):
            raise ConfigurationError(f"{type(source).__name__} has no .stats snapshot to export")
        self._sources[(_kind(source), name)] = weakref.ref(source)

    def untrack(self, name: str, source: object) -> None:
        """Stop exporting ``source`` (nothing happens if it was not tracked)."""
        self._sources.pop((_kind(source), name), None)

    def collect(self) -> Iterator[Metric]:
        """Called by ``prometheus_client`` at each scrape: one family per counter."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for (kind, name), ref in list(self._sources.items()):
            source = ref()
            if source is None:
                del self._sources[(kind, name)]
                continue
            snapshot = _snapshot(source)
            if snapshot is None or not dataclasses.is_dataclass(snapshot):
                continue  # e.g. a client whose auto-pipeline has not been used yet
            for field in dataclasses.fields(snapshot):
                value = getattr(snapshot, field.name)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                base = f"{self._namespace}_{kind}_{field.name}"
                family = families.get(base)
                if family is None:
                    text = f"{kind} {field.name.replace('_', ' ')}"
                    if field.name in _GAUGES:
                        family = GaugeMetricFamily(base, text, labels=["name"])
                    else:
                        family = CounterMetricFamily(base, text, labels=["name"])
                    families[base] = family
                family.add_metric([name], value)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: the families depend on what is tracked at scrape time."""
        return iter(())
