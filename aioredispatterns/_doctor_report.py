"""The doctor's report for people: plain text, or a rich table when rich is installed."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

from ._doctor_model import Finding, Severity

if TYPE_CHECKING:
    from .doctor import DoctorReport

__all__ = ("plain", "print_report")

_ORDER = (Severity.ERROR, Severity.WARNING, Severity.INFO, Severity.SKIPPED)
_STYLES = {
    Severity.ERROR: "bold red",
    Severity.WARNING: "yellow",
    Severity.INFO: "cyan",
    Severity.SKIPPED: "dim",
}
_WIDTH = 96


def _header(report: DoctorReport, target: str | None) -> list[str]:
    where = target or "the server"
    server = f" ({report.server})" if report.server else ""
    nodes = f", {len(report.nodes)} primaries" if report.nodes else ""
    return [
        f"aioredispatterns doctor: {where}{server}{nodes}, role {report.role}",
        f"{report.coverage} in {report.duration:.1f} s",
    ]


def _verdict(report: DoctorReport) -> str:
    counts = [
        f"{report.count(s)} {s.label}{'s' if report.count(s) != 1 else ''}"
        for s in _ORDER
        if report.count(s)
    ]
    if not counts:
        return "clean: nothing to change (exit 0)"
    return ", ".join(counts) + f" (exit {report.exit_code})"


def _place(finding: Finding) -> str:
    parts = [finding.check]
    if finding.node:
        parts.append(f"@{finding.node}")
    return " ".join(parts)


def plain(report: DoctorReport, target: str | None = None) -> str:
    """The report as plain text, grouped by severity (worst first)."""
    lines = _header(report, target)
    wrap = textwrap.TextWrapper(width=_WIDTH, initial_indent="", subsequent_indent=" " * 8)
    for severity in _ORDER:
        group = [f for f in report.findings if f.severity is severity]
        if not group:
            continue
        lines += ["", f"{severity.name} ({len(group)})"]
        for finding in group:
            lines.append(f"  [{_place(finding)}] {finding.summary}")
            for example in finding.examples:
                lines.append(f"        - {example}")
            lines += wrap.wrap(f"   why: {finding.why}")
            lines += wrap.wrap(f"   fix: {finding.fix}")
    for note in report.notes:
        lines += ["", f"note: {note}"]
    lines += ["", _verdict(report)]
    return "\n".join(lines)


def print_report(report: DoctorReport, target: str | None = None) -> None:
    """Print the report: a rich table per severity when rich is installed, else text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain(report, target))
        return
    # Key names are data: no markup ("[x]"), no emoji codes (":lock:") read into them.
    console: Any = Console(markup=False, emoji=False, highlight=False)
    for line in _header(report, target):
        console.print(line, highlight=False)
    for severity in _ORDER:
        group = [f for f in report.findings if f.severity is severity]
        if not group:
            continue
        table: Any = Table(
            title=f"{severity.name} ({len(group)})",
            title_style=_STYLES[severity],
            title_justify="left",
            show_lines=True,
            expand=True,
        )
        table.add_column("check", style=_STYLES[severity], no_wrap=True)
        table.add_column("found", ratio=1)
        table.add_column("why it matters, and the fix", ratio=1)
        for finding in group:
            found = finding.summary + "".join(f"\n- {e}" for e in finding.examples)
            table.add_row(_place(finding), found, f"{finding.why}\nfix: {finding.fix}")
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    worst = report.worst
    style = _STYLES[worst] if worst is not None and worst >= Severity.WARNING else "bold green"
    console.print(_verdict(report), style=style, highlight=False)
