"""What every output records about the run: server, client libraries, loop, machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

# The client libraries and the competitors whose versions every output records.
CLIENT_LIBRARIES = ("redis", "hiredis", "aioredispatterns", "anyio", "orjson", "uvloop")
COMPETITORS = (
    "broadcaster",
    "cashews",
    "aiocache",
    "limits",
    "coredis",
    "faststream",
    "saq",
    "bullmq",
)


def version_of(distribution: str) -> str | None:
    """The installed version of ``distribution``, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class RunInfo:
    """The run's context: printed above the table, in the JSON, markdown and plot."""

    server_name: str
    server_version: str
    server_where: str  # "embedded" or "--url"
    url: str
    loop: str
    hiredis: bool
    python: str = field(default_factory=platform.python_version)
    cpus: int = field(default_factory=_cpus)
    machine: str = field(default_factory=lambda: f"{platform.system()} {platform.machine()}")
    libraries: dict[str, str | None] = field(
        default_factory=lambda: {name: version_of(name) for name in CLIENT_LIBRARIES}
    )
    competitors: dict[str, str | None] = field(
        default_factory=lambda: {name: version_of(name) for name in COMPETITORS}
    )

    @property
    def server(self) -> str:
        """``valkey 9.1.2 (embedded)``."""
        return f"{self.server_name} {self.server_version} ({self.server_where})"

    @property
    def hiredis_text(self) -> str:
        version = self.libraries.get("hiredis")
        return f"hiredis {version} on" if self.hiredis else "hiredis off"

    def lines(self) -> list[str]:
        """Labelled lines: server, client, loop and machine, competitors."""
        lib = self.libraries
        competitors = ", ".join(
            f"{name} {version}" for name, version in self.competitors.items() if version
        )
        return [
            f"server: {self.server} at {self.url}",
            f"client: aioredispatterns {lib.get('aioredispatterns')}, redis-py {lib.get('redis')}"
            f", {self.hiredis_text}, anyio {lib.get('anyio')}, orjson {lib.get('orjson') or '-'}",
            f"loop: {self.loop}; Python {self.python}; {self.cpus} CPUs ({self.machine})",
            f"competitors: {competitors or 'none installed'}",
        ]

    def title(self) -> str:
        """One line for a plot or table title."""
        return f"{self.server}, {self.loop} loop, {self.hiredis_text}"

    def as_json(self) -> dict[str, Any]:
        """Everything, as plain JSON values."""
        return {**asdict(self), "server": self.server}
