"""``doctor``: find the seed's common mistakes on a live server, read-only, and say what to
change.

::

    report = await doctor(redis, role="queue")
    for finding in report.findings:
        print(finding.severity.label, finding.summary, "->", finding.fix)
    raise SystemExit(report.exit_code)   # 0 clean, 1 warnings, 2 errors

Or from a shell, before an incident: ``python -m aioredispatterns doctor --url
redis://host:6379/0 --role queue`` (``--json`` for machines; the exit code gates CI).

What it looks at, on every primary of a cluster:

* **keys** (a sample): keys without a TTL per prefix, knowing which of the library's own
  keys have none by design (counters, fencing counters, leaderboards, queues, streams)
  and which must have one (cache entries, lock leases, rate-limit state); keys over
  1 MiB (``MEMORY USAGE``) and collections over 10,000 elements, per prefix;
* **commands**: ``KEYS``, ``FLUSHALL`` / ``FLUSHDB`` and slow O(N) commands (``SMEMBERS``,
  ``HGETALL`` ... on big keys) in ``INFO commandstats`` and ``SLOWLOG``;
* **persistence** against the role: off, RDB only, AOF ``everysec`` / ``always``; a cache
  may run without, queues, streams and locks need AOF and replicas;
* **memory**: ``maxmemory`` and an evicting ``maxmemory-policy`` (which silently drops
  locks, jobs and stream entries; no limit at all on a cache);
* **replication**: no replica under a lock, queue or stream role; ``min-replicas-to-write``;
* **clients**: connections against ``maxclients``, rejected connections, pub/sub clients
  cut off by ``client-output-buffer-limit``, blocked and idle clients;
* **this process**: an exhausted connection pool, unpipelined traffic (the auto-pipeline's
  mean batch size), and the dropped messages of the subscriptions passed as ``watch``.

Read-only by design: it never writes and never runs ``KEYS``; the keyspace is walked with
``SCAN`` in small pages, each key asked ``PTTL`` and ``MEMORY USAGE`` (which samples a few
elements, never all; ``TYPE`` and the length only for keys large enough to be big), at
most 1,250 keys a second per server, up to ``sample`` keys and ``time_limit`` seconds; the
report says how much it saw. On 1,000,000 keys the default run (10,000 keys) takes about
8 s, of which the server spends under 10 ms on the doctor's commands. A check the
user may not run (an ACL without ``INFO`` or ``CONFIG``) becomes a "skipped: needs
<command>" finding, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from ._commands import primaries
from ._connection import AnyRedis, check_client, state_of
from ._doctor_keys import KeySample, check_keys, sample_keys
from ._doctor_local import check_local, check_watch, read_local
from ._doctor_model import ROLES, Finding, NodeProbe, Role, Severity, plural, text
from ._doctor_server import ServerFacts, check_server, read_facts
from ._validate import check_choice, check_count, check_name, check_seconds
from .errors import (
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    RedisPatternsError,
)

__all__ = (
    "DoctorReport",
    "Finding",
    "Role",
    "Severity",
    "doctor",
)

_DEFAULT_SAMPLE = 10_000
_DEFAULT_TIME_LIMIT = 20.0


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """What :func:`doctor` found, worst first, and how much of the keyspace it saw.

    Attributes:
        role: the role the server was judged against.
        findings: every finding, sorted by severity (errors first), then check and node.
        server: the server's name and version (``"valkey 9.1.2"``), if INFO was allowed.
        nodes: ``host:port`` of each cluster primary examined (empty on a single server).
        prefix: the key prefix the sample was limited to, if any.
        keys_total: keys on the server(s) (``DBSIZE``, summed over primaries), if known.
        keys_sampled: keys examined (``PTTL``, ``MEMORY USAGE``).
        sample_complete: whether ``SCAN`` went through the whole keyspace.
        timed_out: whether the sample stopped at the time limit.
        duration: seconds the run took.
        notes: what the run could not see or measure (never a finding).
    """

    role: Role
    findings: tuple[Finding, ...]
    server: str | None
    nodes: tuple[str, ...]
    prefix: str | None
    keys_total: int | None
    keys_sampled: int
    sample_complete: bool
    timed_out: bool
    duration: float
    notes: tuple[str, ...] = ()

    @property
    def worst(self) -> Severity | None:
        """The severity of the worst finding (None if there is none)."""
        return max((f.severity for f in self.findings), default=None)

    @property
    def exit_code(self) -> int:
        """0 when clean (at most info and skipped checks), 1 for warnings, 2 for errors."""
        worst = self.worst
        if worst is Severity.ERROR:
            return 2
        return 1 if worst is Severity.WARNING else 0

    def count(self, severity: Severity) -> int:
        """How many findings have ``severity``."""
        return sum(1 for f in self.findings if f.severity is severity)

    @property
    def coverage(self) -> str:
        """One line on how much of the keyspace was sampled."""
        where = f" matching {self.prefix}*" if self.prefix else ""
        if self.sample_complete:
            return f"sampled every key{where} ({plural(self.keys_sampled, 'key')})"
        total = self.keys_total
        share = f" ({self.keys_sampled / total:.1%})" if total else ""
        of = f" of {total:,}" if total is not None else ""
        why = "the time limit" if self.timed_out else "the sample size"
        return f"sampled {self.keys_sampled:,}{of} keys{where}{share}, stopped by {why}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "role": self.role,
            "server": self.server,
            "nodes": list(self.nodes),
            "prefix": self.prefix,
            "keys_total": self.keys_total,
            "keys_sampled": self.keys_sampled,
            "sample_complete": self.sample_complete,
            "timed_out": self.timed_out,
            "duration": round(self.duration, 3),
            "coverage": self.coverage,
            "exit_code": self.exit_code,
            "counts": {s.label: self.count(s) for s in reversed(Severity)},
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        from ._doctor_report import plain

        return plain(self)


async def _primaries(client: AnyRedis) -> list[tuple[str | None, AnyRedis]]:
    """The servers to examine: the client itself, or one node client per cluster primary
    (the library's own node clients, auto-pipelined like every other command)."""
    names = await primaries(client)
    router = state_of(client).router
    if names is None or router is None:
        return [(None, client)]
    nodes: list[tuple[str | None, AnyRedis]] = []
    for name in names:
        host, _, port = name.rpartition(":")
        nodes.append((name, router.node(host, int(port))))
    return nodes


@dataclass(slots=True)
class _NodeResult:
    findings: list[Finding]
    facts: ServerFacts
    sample: KeySample


async def _examine(
    node: AnyRedis,
    name: str | None,
    *,
    role: Role,
    prefix: str | None,
    sample: int,
    deadline: float,
    big_bytes: int,
    big_length: int,
    idle_seconds: float,
) -> _NodeResult:
    probe = NodeProbe(node, name)
    facts = await read_facts(probe)  # before the sample: its commands would show up
    found = check_server(facts, role, name, idle_seconds=idle_seconds)
    try:
        keys = await sample_keys(
            probe,
            sample=sample,
            prefix=prefix,
            deadline=deadline,
            big_bytes=big_bytes,
            big_length=big_length,
        )
    except CommandError as exc:
        probe.skip("SCAN", str(exc))
        keys = KeySample(name)
    found += check_keys(keys, big_bytes=big_bytes, big_length=big_length)
    found += probe.skipped.values()
    return _NodeResult(found, facts, keys)


def _unreachable(name: str | None, exc: RedisPatternsError) -> _NodeResult:
    finding = Finding(
        "node.unreachable",
        Severity.ERROR,
        f"cluster node {name} did not answer ({exc})",
        "the slots it serves are unavailable, and nothing on it could be checked",
        "bring it back or fail it over; run the doctor again",
        node=name,
    )
    return _NodeResult([finding], ServerFacts(), KeySample(name))


def _server_name(facts: ServerFacts) -> str | None:
    info = facts.info
    if info is None:
        return None
    name = text(info.get("server_name", "redis"))
    version = info.get(f"{name}_version") or info.get("redis_version")
    return f"{name} {text(version)}" if version is not None else name


async def doctor(
    client: AnyRedis,
    *,
    role: Role = "mixed",
    prefix: str | None = None,
    sample: int = _DEFAULT_SAMPLE,
    time_limit: float = _DEFAULT_TIME_LIMIT,
    big_bytes: int = 1 << 20,
    big_length: int = 10_000,
    idle_seconds: float = 300.0,
    watch: Iterable[object] = (),
) -> DoctorReport:
    """Examine the server behind ``client`` (every primary of a cluster), read-only.

    Args:
        client: a client from :func:`~aioredispatterns.connect` (or any redis-py asyncio
            client); its own counters (pool, auto-pipeline) are read first.
        role: what the server is for (``"cache"``, ``"queue"``, ``"lock"``,
            ``"streams"``, or ``"mixed"``, the strictest); persistence, eviction and
            replication are judged against it.
        prefix: sample only keys that start with this (SCAN ``MATCH <prefix>*``).
        sample: examine at most this many keys (over all primaries of a cluster).
        time_limit: stop sampling after this many seconds (the other checks take a few
            round trips).
        big_bytes: a key above this many bytes (``MEMORY USAGE``) is big.
        big_length: a collection above this many elements is big.
        idle_seconds: a connection idle this long counts as idle.
        watch: primitives whose ``.stats`` to check, such as subscriptions from
            :func:`~aioredispatterns.subscribe` (dropped messages, gaps).

    Returns:
        The :class:`DoctorReport`; ``exit_code`` is 0 (clean), 1 (warnings), 2 (errors).

    Raises:
        ConfigurationError: a bad argument (before any command is sent).
        ConnectionFailed, CommandTimeout: a single server could not be reached (a
            cluster node that cannot is reported as a finding instead).

    Nothing is written, so a cancelled run leaves the server as it was; the commands it
    had in flight are discarded.
    """
    client = check_client(client)
    role = check_choice("role", role, ROLES)
    if prefix is not None and not isinstance(check_name("prefix", prefix), str):
        raise ConfigurationError("prefix must be a str")
    sample = check_count("sample", sample, minimum=0)
    time_limit = check_seconds("time_limit", time_limit)
    big_bytes = check_count("big_bytes", big_bytes, minimum=1)
    big_length = check_count("big_length", big_length, minimum=1)
    idle_seconds = check_seconds("idle_seconds", idle_seconds)
    watched = check_watch(watch)

    started = anyio.current_time()
    local = read_local(client, watched)
    nodes = await _primaries(client)
    per_node = math.ceil(sample / len(nodes)) if nodes else 0
    deadline = started + time_limit
    results: dict[int, _NodeResult] = {}

    async def run(index: int, name: str | None, node: AnyRedis) -> None:
        try:
            results[index] = await _examine(
                node,
                name,
                role=role,
                prefix=prefix,
                sample=per_node,
                deadline=deadline,
                big_bytes=big_bytes,
                big_length=big_length,
                idle_seconds=idle_seconds,
            )
        except (ConnectionFailed, CommandTimeout) as exc:
            if name is None:
                raise
            results[index] = _unreachable(name, exc)

    if len(nodes) == 1:
        await run(0, *nodes[0])
    else:
        async with anyio.create_task_group() as group:
            for index, (name, node) in enumerate(nodes):
                group.start_soon(run, index, name, node)

    ordered = [results[i] for i in sorted(results)]
    findings = check_local(local) + [f for r in ordered for f in r.findings]
    findings.sort(key=lambda f: (-f.severity, f.check, f.node or "", f.group or ""))
    totals = [r.sample.keys_total for r in ordered]
    notes = sorted({note for r in ordered for note in r.facts.notes})
    return DoctorReport(
        role=role,
        findings=tuple(findings),
        server=next((n for r in ordered if (n := _server_name(r.facts))), None),
        nodes=tuple(name for name, _ in nodes if name is not None),
        prefix=prefix,
        keys_total=None if None in totals else sum(t or 0 for t in totals),
        keys_sampled=sum(r.sample.sampled for r in ordered),
        sample_complete=bool(ordered) and all(r.sample.complete for r in ordered),
        timed_out=any(r.sample.timed_out for r in ordered),
        duration=anyio.current_time() - started,
        notes=tuple(notes),
    )
