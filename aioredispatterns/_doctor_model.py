"""What the doctor reports (:class:`Finding`, :class:`Severity`) and how a check asks a
server: one node at a time, read-only, a denied command turned into a "skipped" finding.

The checks live in ``_doctor_server`` (INFO, CONFIG GET, SLOWLOG, CLIENT LIST),
``_doctor_keys`` (the sampled keyspace) and ``_doctor_local`` (this process's own
counters); ``doctor`` runs them and builds the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ._commands import Arg, execute
from ._connection import AnyRedis
from .errors import CommandError

__all__ = (
    "ROLES",
    "Finding",
    "NodeProbe",
    "Role",
    "Severity",
    "is_denied",
    "plural",
    "text",
)

#: What the server is for: the checks of persistence, eviction and replication depend on
#: it. ``"mixed"`` holds the server to the strictest of them.
Role: TypeAlias = Literal["cache", "queue", "lock", "streams", "mixed"]
ROLES: tuple[Role, ...] = ("cache", "queue", "lock", "streams", "mixed")


class Severity(enum.IntEnum):
    """How bad a finding is; the report's exit code is that of its worst finding.

    ``SKIPPED``: a check could not run (the user lacks a permission, the server lacks the
    command); ``INFO``: worth knowing, nothing to fix; ``WARNING``: a mistake that costs
    data, memory or latency under some conditions; ``ERROR``: one that does already, or
    will on the next restart, failover or full memory.
    """

    SKIPPED = 0
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        """The lower-case name (``"warning"``), as the JSON report spells it."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the doctor found.

    Attributes:
        check: a stable id of the check (``"keys.no_ttl"``, ``"persistence"``,
            ``"commands.keys"``, ...), for code that filters or silences findings.
        severity: how bad it is.
        summary: what was found, with counts.
        why: why it matters.
        fix: what to change.
        node: ``host:port`` of the cluster node it was found on (None on a single server
            and for findings about this process).
        group: the key group it is about (``"user:*"``, ``"arp:cache:{*}"``), if any.
        count: how many keys, calls, clients ... it concerns, if countable.
        examples: a few key names, commands or clients that show it.
    """

    check: str
    severity: Severity
    summary: str
    why: str
    fix: str
    node: str | None = None
    group: str | None = None
    count: int | None = None
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the finding (severity as its lower-case name)."""
        return {
            "check": self.check,
            "severity": self.severity.label,
            "summary": self.summary,
            "why": self.why,
            "fix": self.fix,
            "node": self.node,
            "group": self.group,
            "count": self.count,
            "examples": list(self.examples),
        }


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 key"``, ``"3 keys"`` (``words`` for an irregular plural)."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def text(value: Any) -> str:
    """A reply value as text (replies are bytes unless the client decodes them)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


# What each read-only command the doctor sends is needed for (said in "skipped" findings).
_NEEDED_FOR = {
    "INFO": "persistence, memory, replication, client and command-statistics checks",
    "CONFIG GET": "persistence, eviction, replication and output-buffer settings",
    "SLOWLOG GET": "the slow-command check",
    "CLIENT LIST": "the idle-client check",
    "SCAN": "every key check (TTLs, big keys)",
    "DBSIZE": "the keyspace size (how much was sampled)",
    "MEMORY USAGE": "the big-key check",
}
_ACL_NAMES = {
    "CONFIG GET": "config|get",
    "SLOWLOG GET": "slowlog|get",
    "CLIENT LIST": "client|list",
    "MEMORY USAGE": "memory|usage",
}


def _is_denied(message: str) -> bool:
    return message.startswith("NOPERM") or "no permissions" in message.lower()


def _is_unknown(message: str) -> bool:
    lowered = message.lower()
    return "unknown command" in lowered or "unknown subcommand" in lowered


class NodeProbe:
    """Sends the doctor's read-only commands to one server (one cluster primary).

    A command the server refuses for lack of permission (``NOPERM``), does not know
    (renamed or disabled) or fails is recorded once as a ``SKIPPED`` finding and
    answered with None, so one denied command never stops the other checks.
    Connection errors propagate: a server that cannot be reached cannot be examined.
    """

    __slots__ = ("client", "name", "skipped")

    def __init__(self, client: AnyRedis, name: str | None) -> None:
        self.client = client
        self.name = name
        self.skipped: dict[str, Finding] = {}

    async def ask(self, command: str, *args: Arg) -> Any:
        """The reply of ``command`` (one or two words, sent as separate arguments: raw
        replies, except where redis-py parses a one-word command such as INFO), or None
        if it was refused."""
        if command in self.skipped:
            return None
        try:
            return await execute(self.client, *command.split(), *args)
        except CommandError as exc:
            self.skip(command, str(exc))
            return None

    def skip(self, command: str, message: str) -> None:
        """Record that ``command`` could not run (the first reason is kept)."""
        if command in self.skipped:
            return
        needed = _NEEDED_FOR.get(command, "a check")
        if _is_denied(message):
            acl = _ACL_NAMES.get(command, command.lower())
            summary = f"skipped: needs {command}"
            why = f"the user may not run {command}, so {needed} did not run ({message})"
            fix = (
                f"run the doctor as a user that may run it (ACL SETUSER <user> +{acl}), "
                "or accept that these checks are not made"
            )
        elif _is_unknown(message):
            summary = f"skipped: {command} is not available"
            why = f"the server does not know {command} (renamed or disabled), so {needed} "
            why += "did not run"
            fix = "run the doctor where the command is available, or accept the gap"
        else:
            summary = f"skipped: {command} failed"
            why = f"the server answered {command} with an error ({message}), so {needed} "
            why += "did not run"
            fix = "see the server's log; run the doctor again"
        self.skipped[command] = Finding(
            check="access",
            severity=Severity.SKIPPED,
            summary=summary,
            why=why,
            fix=fix,
            node=self.name,
            examples=(command,),
        )


def is_denied(exc: CommandError) -> bool:
    """Whether ``exc`` is a permission refusal (``NOPERM``)."""
    return _is_denied(str(exc))
