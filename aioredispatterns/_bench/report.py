"""The reports: the terminal table, markdown and JSON, each with the run's context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TextIO

from .metadata import RunInfo
from .rows import Row, fmt_ms, fmt_rate, fmt_ratio, fmt_spread

LEGEND = (
    "group: rows measured side by side; its first row (the baseline) is what the others are "
    "divided by",
    "median/s: units per second (see unit) completed inside the measuring window, median "
    "over rounds; every round runs every row once, in a rotated order",
    "x baseline: the row's median / the baseline's median (2.00x = twice the baseline's rate)",
    "spread: lowest-highest of the per-round ratios (row and baseline from the same round)",
    "p50/p99 ms: latency of one operation over all rounds: a pubsub op receives 100 messages, "
    "a fan-out op is one publish until its 100th delivery, a lock hand-off is release to acquire",
)

HEADER = (
    "group",
    "scenario",
    "conc",
    "unit",
    "median/s",
    "x baseline",
    "spread",
    "p50 ms",
    "p99 ms",
)


@dataclass(frozen=True)
class RunSummary:
    """How the run went: rounds, the budget and what it took, the noise it caught."""

    rounds: int
    duration: float
    announced: float
    took: float
    windows: tuple[float, ...]
    noise: tuple[str, ...]
    reference: dict[str, float]

    def line(self) -> str:
        low, high = min(self.windows, default=0.0), max(self.windows, default=0.0)
        window = f"{low:.3f} s" if abs(high - low) < 5e-4 else f"{low:.3f}-{high:.3f} s"
        return (
            f"run: {self.rounds} rounds, measuring window {window} per row and round; "
            f"--duration {self.duration:g} s, announced ~{self.announced:.0f} s in all, "
            f"measured in {self.took:.1f} s (before the reports)"
        )


def _cells(row: Row) -> tuple[str, ...]:
    r = row.result
    return (
        r.group,
        r.name,
        str(r.concurrency),
        r.unit,
        fmt_rate(row.median),
        "baseline" if r.baseline else fmt_ratio(row.ratio),
        "-" if r.baseline else fmt_spread(row.spread),
        fmt_ms(row.p50_ms),
        fmt_ms(row.p99_ms),
    )


def _footer(summary: RunSummary) -> list[str]:
    lines = [summary.line()]
    for name, figure in summary.reference.items():
        lines.append(f"reference: redis-benchmark {name} (-c 64, unpipelined): {figure:,.0f} ops/s")
    lines += [f"legend: {text}" for text in LEGEND]
    if summary.noise:
        lines.append("noise caught from the scenarios (counted, not shown; examples in --json):")
        lines += [f"noise: {text}" for text in summary.noise]
    else:
        lines.append("noise: none (no warning, log record, task error or stderr output)")
    return lines


def print_table(rows: list[Row], info: RunInfo, summary: RunSummary, out: TextIO) -> None:
    """The table with the run's context above it and the legend below."""
    cells = [_cells(row) for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for line in info.lines():
            print(line, file=out)
        widths = [max(len(c) for c in column) for column in zip(HEADER, *cells, strict=True)]
        for line_cells in (HEADER, *cells):
            print("  ".join(c.ljust(w) for c, w in zip(line_cells, widths, strict=True)), file=out)
        for line in _footer(summary):
            print(line, file=out)
        return
    console = Console(file=out, width=200, highlight=False, soft_wrap=True)
    for line in info.lines():
        console.print(line, markup=False)
    table = Table(title=f"aioredispatterns bench: {info.title()}")
    for index, name in enumerate(HEADER):
        table.add_column(name, justify="right" if index >= 4 else "left", no_wrap=True)
    group = None
    for row, line_cells in zip(rows, cells, strict=True):
        if group is not None and row.result.group != group:
            table.add_section()
        group = row.result.group
        table.add_row(*line_cells)
    console.print(table)
    for line in _footer(summary):
        console.print(line, markup=False)


def markdown(rows: list[Row], info: RunInfo, summary: RunSummary) -> str:
    """The same report as a markdown document."""
    out = ["# aioredispatterns bench", ""]
    out += [f"- {line}" for line in info.lines()]
    out += [f"- {summary.line()}", ""]
    out.append("| " + " | ".join(HEADER) + " |")
    out.append("|" + "|".join("---" if i < 4 else "---:" for i in range(len(HEADER))) + "|")
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    out += ["", "Legend:", ""]
    out += [f"- {text}" for text in LEGEND]
    for name, figure in summary.reference.items():
        out.append(f"- reference: redis-benchmark {name} (-c 64, unpipelined): {figure:,.0f} ops/s")
    out += ["", "Noise caught from the scenarios (counted, not shown):", ""]
    out += [f"- {text}" for text in summary.noise] or ["- none"]
    return "\n".join(out) + "\n"


def as_json(
    rows: list[Row], info: RunInfo, summary: RunSummary, noise_examples: list[dict[str, Any]]
) -> str:
    """Everything, machine-readable."""
    payload = {
        "metadata": info.as_json(),
        "server": info.server,
        "rounds": summary.rounds,
        "duration": summary.duration,
        "announced_seconds": summary.announced,
        "took_seconds": summary.took,
        "windows": list(summary.windows),
        "results": [
            {
                "group": row.result.group,
                "name": row.result.name,
                "concurrency": row.result.concurrency,
                "baseline": row.result.baseline,
                "unit": row.result.unit,
                "role": "baseline" if row.result.baseline else row.result.role,
                "ops_per_call": row.result.ops_per_call,
                "ops_per_second": row.result.ops_per_second,
                "median_ops_per_second": row.median,
                "ratio_to_baseline": row.ratio,
                "round_ratios": list(row.round_ratios),
                "p50_ms": None if row.p50_ms != row.p50_ms else row.p50_ms,
                "p99_ms": None if row.p99_ms != row.p99_ms else row.p99_ms,
                "latency_samples": len(row.result.latencies),
            }
            for row in rows
        ],
        "reference": summary.reference,
        "noise": noise_examples,
    }
    return json.dumps(payload, indent=2)
