"""From per-round figures to what the reports show: medians, ratios and their spread."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .measure import Result


@dataclass(frozen=True)
class Row:
    """One row as reported.

    Attributes:
        result: the raw per-round figures.
        median: median ops/s over the rounds that completed (``None``: none did).
        ratio: ``median`` / the group baseline's median (``None`` without a baseline).
        round_ratios: this row's figure / the baseline's figure, round by round.
        p50_ms, p99_ms: latency quantiles over all rounds (NaN without samples).
    """

    result: Result
    median: float | None
    ratio: float | None
    round_ratios: tuple[float, ...]
    p50_ms: float
    p99_ms: float

    @property
    def spread(self) -> tuple[float, float] | None:
        """(min, max) of the per-round ratios, or ``None`` when there are none."""
        if not self.round_ratios:
            return None
        return min(self.round_ratios), max(self.round_ratios)


def summarise(results: list[Result]) -> list[Row]:
    """A :class:`Row` for every result, in the same order."""
    baselines = {r.group: r for r in results if r.baseline}
    rows = []
    for result in results:
        base = baselines.get(result.group)
        median = result.median
        ratio = None
        round_ratios: list[float] = []
        if base is not None and base.median and median is not None:
            ratio = median / base.median
            pairs = zip(result.ops_per_second, base.ops_per_second, strict=False)
            round_ratios = [mine / theirs for mine, theirs in pairs if mine is not None and theirs]
        rows.append(
            Row(
                result=result,
                median=median,
                ratio=ratio,
                round_ratios=tuple(round_ratios),
                p50_ms=result.percentile(0.5) * 1e3,
                p99_ms=result.percentile(0.99) * 1e3,
            )
        )
    return rows


def fmt_rate(value: float | None) -> str:
    """``12,345`` (``failed`` when no round completed)."""
    return "failed" if value is None else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    """``1.23x`` (``-`` without a baseline figure)."""
    return "-" if value is None else f"{value:.2f}x"


def fmt_spread(spread: tuple[float, float] | None) -> str:
    """``1.10-1.31`` (``-`` when there is nothing to spread)."""
    return "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}"


def fmt_ms(value: float) -> str:
    """``0.123`` (``-`` without samples)."""
    return "-" if math.isnan(value) else f"{value:.3f}"
