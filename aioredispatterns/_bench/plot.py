"""``--plot FILE.png``: ratios to each group's baseline as grouped horizontal bars.

matplotlib is imported only here, and only when a plot is asked for (the ``bench`` extra
installs it); the figure is drawn on an Agg canvas, so no GUI backend or pyplot state is
touched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigurationError
from .metadata import RunInfo
from .report import RunSummary
from .rows import Row

_COLOURS = {
    "baseline": "#9e9e9e",
    "ours": "#1f77b4",
    "competitor": "#ff7f0e",
    "reference": "#2ca02c",
}
_BAR = 0.8


def require_matplotlib() -> None:
    """Fail before the run, not after it, when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigurationError(
            "--plot needs matplotlib: pip install 'aioredispatterns[bench]' (or matplotlib)"
        )


def _role(row: Row) -> str:
    return "baseline" if row.result.baseline else row.result.role


def plot(rows: list[Row], info: RunInfo, summary: RunSummary, path: Path) -> None:
    """Write the PNG: one bar group per scenario group, bars = ratio to the group baseline."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    drawn = [row for row in rows if row.ratio is not None]
    groups: list[str] = []
    for row in drawn:
        if row.result.group not in groups:
            groups.append(row.result.group)
    # Top to bottom: a heading slot per group, then its bars.
    positions: list[float] = []
    headings: list[tuple[float, str]] = []
    y = 0.0
    for group in groups:
        headings.append((y, group))
        y += 1
        for row in drawn:
            if row.result.group == group:
                positions.append(y)
                y += 1
        y += 0.4
    height = max(4.0, 0.26 * y + 2.2)
    figure = Figure(figsize=(11, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ratios = [row.ratio or 0.0 for row in drawn]
    low = [max(0.0, (row.ratio or 0.0) - (row.spread or (0.0, 0.0))[0]) for row in drawn]
    high = [max(0.0, (row.spread or (0.0, 0.0))[1] - (row.ratio or 0.0)) for row in drawn]
    axes.barh(
        positions,
        ratios,
        height=_BAR,
        color=[_COLOURS.get(_role(row), _COLOURS["ours"]) for row in drawn],
        xerr=[low, high],
        error_kw={"ecolor": "#333333", "capsize": 2, "elinewidth": 0.8},
    )
    axes.set_xscale("log")
    axes.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    axes.set_yticks(positions, [f"{row.result.name} (c{row.result.concurrency})" for row in drawn])
    axes.tick_params(axis="y", labelsize=7)
    for position, row in zip(positions, drawn, strict=True):
        end = max(row.ratio or 0.0, (row.spread or (0.0, 0.0))[1])
        axes.annotate(
            f"{row.ratio:.2f}x",
            (end, position),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=6,
        )
    for position, group in headings:
        axes.annotate(
            group,
            (0, position),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=8,
            fontweight="bold",
        )
    axes.set_ylim(y, -1)
    axes.set_xlabel("median rate / the group baseline's median rate (log scale; 1 = baseline)")
    axes.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    axes.legend(
        handles=[Patch(color=colour, label=role) for role, colour in _COLOURS.items()],
        loc="lower right",
        fontsize=7,
    )
    figure.suptitle(f"aioredispatterns bench: {info.title()}", fontsize=11, y=1 - 0.2 / height)
    axes.set_title(
        "error bars: lowest to highest per-round ratio; rows of one group ran side by side",
        fontsize=8,
    )
    footnote = "\n".join([*info.lines()[1:], summary.line()])
    figure.text(0.01, 0.005, footnote, fontsize=6.5, va="bottom", ha="left", family="monospace")
    # Inches kept free: the footnote below, the title above.
    figure.tight_layout(rect=(0.0, 1.0 / height, 1.0, 1.0 - 0.5 / height))
    figure.savefig(path)
