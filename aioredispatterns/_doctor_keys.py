"""The doctor's key checks: a paced, time-boxed sample of the keyspace.

``SCAN`` with a small ``COUNT`` walks the keyspace page by page; for each key of a page one
pipelined batch asks ``PTTL`` and ``MEMORY USAGE`` (which samples a few elements of a
collection, never all); only the keys large enough to be big are then asked ``TYPE`` and
their length (``LLEN``, ``SCARD`` ...: O(1)).
Each batch is small, so the server never spends more than some tens of microseconds on
the doctor in one go, and the doctor rests between batches (at most 1,250 keys a second),
so it takes a tiny share of the server's time and of the machine's CPU. It stops at
``sample`` keys or at the time limit, whichever comes first, and says how much it saw.
Nothing is written.

Keys are grouped by prefix: the library's own keys (``<prefix>:<primitive>:{<name>}:<part>``,
see ``_keys``) by primitive and part, with the TTL policy each has by design; any other
key by its first ``:``-separated word.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from ._commands import Arg, execute_many
from ._doctor_model import Finding, NodeProbe, Severity, is_denied, plural, text
from .errors import ClusterUnavailable, CommandError

__all__ = ("KeySample", "check_keys", "group_of", "sample_keys")

# TTL policies of the library's key families.
_EXPECTED: Final = "expected"  # always written with a TTL: none is a mistake
_OPTIONAL: Final = "optional"  # no TTL by design, or by the user's choice

# (primitive, part) -> (TTL policy, big by design, severity of a missing TTL).
# part None: the instance's base key; "*": any part not listed.
_FAMILIES: dict[tuple[str, str | None], tuple[str, bool, Severity]] = {
    ("cache", None): (_EXPECTED, False, Severity.WARNING),
    ("cache", "*"): (_EXPECTED, False, Severity.WARNING),
    ("lock", "owner"): (_EXPECTED, False, Severity.ERROR),
    ("lock", "fence"): (_OPTIONAL, False, Severity.INFO),
    ("lock", "*"): (_EXPECTED, False, Severity.WARNING),
    ("semaphore", "holders"): (_EXPECTED, False, Severity.ERROR),
    ("semaphore", "fence"): (_OPTIONAL, False, Severity.INFO),
    ("semaphore", "*"): (_EXPECTED, False, Severity.WARNING),
    ("fenced", None): (_OPTIONAL, False, Severity.INFO),
    ("ratelimit", "*"): (_EXPECTED, False, Severity.WARNING),
    ("counter", None): (_OPTIONAL, False, Severity.INFO),
    ("hashcounter", None): (_OPTIONAL, False, Severity.INFO),
    ("bucketed", "*"): (_EXPECTED, False, Severity.WARNING),
    ("unique", "*"): (_EXPECTED, False, Severity.WARNING),
    ("leaderboard", "*"): (_OPTIONAL, True, Severity.INFO),
    ("geo", "*"): (_OPTIONAL, True, Severity.INFO),
    ("listqueue", None): (_OPTIONAL, True, Severity.INFO),
    ("queue", None): (_OPTIONAL, True, Severity.INFO),
    ("queue", "*"): (_OPTIONAL, True, Severity.INFO),
    ("stream", None): (_OPTIONAL, True, Severity.INFO),
    ("stream", "*"): (_OPTIONAL, True, Severity.INFO),
}
_PRIMITIVES = frozenset(primitive for primitive, _ in _FAMILIES)

_LENGTH = {"list": "LLEN", "set": "SCARD", "zset": "ZCARD", "hash": "HLEN", "stream": "XLEN"}
_UNITS = {"list": "items", "set": "members", "zset": "members", "hash": "fields"}

# SCAN's COUNT: small pages keep each batch short on the server; grown (up to the cap)
# while a MATCH finds few keys per page.
_PAGE: Final = 50
_PAGE_CAP: Final = 1000
# The pace: at most this many keys a second per server. The server spends well under a
# microsecond on each key's commands; the doctor's own process about 12 us of CPU, which
# on a machine shared with the server (or its clients) is what others would feel
# (benchmarks/doctor_load.py): 1,250 keys/s keeps that near 1.5% of one core.
_KEYS_PER_SECOND: Final = 1250.0
# And rest at least this many times as long as each page took (a MATCH that finds few
# keys still walks the keyspace: SCAN's own work is paced too).
_REST_RATIO: Final = 4.0
_EXAMPLES: Final = 5


@dataclass(frozen=True, slots=True)
class Group:
    """A key's group: a label and the TTL policy of the family it belongs to."""

    label: str
    library: bool = False
    ttl: str = _EXPECTED
    big_ok: bool = False
    no_ttl_severity: Severity = Severity.WARNING


def _part_label(part: str) -> str:
    if not part:
        return ""
    first, _, rest = part.partition(":")
    first = "*" if first.isdigit() else first
    return f":{first}" + (":*" if rest else "")


def group_of(key: str) -> Group:
    """The group of ``key``: a library key family, or the key's first word."""
    head, brace, tail = key.partition("{")
    if brace and head.endswith(":") and "}" in tail:
        prefix, _, primitive = head[:-1].rpartition(":")
        primitive = primitive.removesuffix("#")
        if prefix and primitive in _PRIMITIVES:
            part = tail.partition("}")[2].removeprefix(":")
            first = part.partition(":")[0] or None
            family = (
                _FAMILIES.get((primitive, first))
                or _FAMILIES.get((primitive, "*" if first else None))
                or _FAMILIES.get((primitive, "*"))
            )
            if family is not None:
                ttl, big_ok, severity = family
                label = f"{prefix}:{primitive}:{{*}}{_part_label(part)}"
                return Group(label, True, ttl, big_ok, severity)
    word, colon, _ = key.partition(":")
    return Group(f"{word}:*" if colon else "(keys without ':')")


@dataclass(slots=True)
class _GroupStats:
    group: Group
    sampled: int = 0
    no_ttl: list[str] = field(default_factory=list)
    big: list[tuple[int, str]] = field(default_factory=list)  # (sort weight, description)


@dataclass(slots=True)
class KeySample:
    """What the sample of one server saw."""

    node: str | None
    keys_total: int | None = None  # DBSIZE
    scanned: int = 0  # keys SCAN returned (matching the prefix)
    sampled: int = 0  # keys examined (TYPE, PTTL, MEMORY USAGE)
    complete: bool = False  # SCAN came back to cursor 0
    timed_out: bool = False
    denied: int = 0  # keys the ACL user may not read
    filtered: bool = False  # SCAN ran with MATCH <prefix>*: DBSIZE is not the population
    groups: dict[str, _GroupStats] = field(default_factory=dict)


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


class _Sampler:
    def __init__(
        self,
        probe: NodeProbe,
        sample: KeySample,
        *,
        big_bytes: int,
        big_length: int,
        memory: bool,
    ) -> None:
        self.probe = probe
        self.sample = sample
        self.big_bytes = big_bytes
        self.big_length = big_length
        self.memory = memory

    def _commands(self, key: Arg) -> list[list[Arg]]:
        if self.memory:
            return [["PTTL", key], ["MEMORY", "USAGE", key]]
        return [["PTTL", key], ["TYPE", key]]

    async def _batch(self, keys: Sequence[Any]) -> list[list[Any] | None]:
        """The replies of each key's commands (None for a key the user may not read)."""
        commands = [c for key in keys for c in self._commands(key)]
        try:
            flat = await execute_many(self.probe.client, commands, idempotent=True)
        except CommandError as exc:
            if self.memory and "memory" in str(exc).lower():
                # MEMORY USAGE denied or unknown: every key's type and length instead.
                self.memory = False
                self.probe.skip("MEMORY USAGE", str(exc))
                return await self._batch(keys)
            if not is_denied(exc):
                raise
            # A key outside the ACL user's key patterns: key by key.
            return [await self._one(key) for key in keys]
        return [flat[i : i + 2] for i in range(0, len(flat), 2)]

    async def _one(self, key: Any) -> list[Any] | None:
        try:
            return await execute_many(self.probe.client, self._commands(key), idempotent=True)
        except CommandError as exc:
            if not is_denied(exc):
                raise
            self.sample.denied += 1
            return None

    async def _ask_each(self, commands: list[list[Arg]]) -> list[Any]:
        """Replies in order; a refused batch (a key's type changed meanwhile, a command
        denied) counts as nothing found."""
        if not commands:
            return []
        try:
            return await execute_many(self.probe.client, commands, idempotent=True)
        except CommandError:
            return [None] * len(commands)

    async def page(self, keys: Sequence[Any]) -> None:
        """Examine one SCAN page: TTL and size of every key; type and length only of the
        keys large enough to be big (one or two more small batches, rarely sent)."""
        # A collection of more than big_length elements takes at least a byte per element
        # (a listpack of tiny integers): below that size a key is neither big nor long.
        floor = min(self.big_length, self.big_bytes)
        sizable: list[tuple[Any, str, int | None]] = []  # (key, name, size): TYPE needed
        for key, reply in zip(keys, await self._batch(keys), strict=True):
            if reply is None or int(reply[0]) == -2:  # denied, or deleted since SCAN
                continue
            name = text(key)
            self._record(name, int(reply[0]))
            if not self.memory:
                sizable.append((key, name, None))
            elif reply[1] is not None and int(reply[1]) >= floor:
                sizable.append((key, name, int(reply[1])))
        kinds = await self._ask_each([["TYPE", key] for key, _, _ in sizable])
        lengths: list[tuple[str, str, int | None]] = []
        commands: list[list[Arg]] = []
        for (key, name, size), kind_reply in zip(sizable, kinds, strict=True):
            kind = text(kind_reply) if kind_reply is not None else "none"
            if kind in _LENGTH:
                lengths.append((name, kind, size))
                commands.append([_LENGTH[kind], key])
            elif size is not None and size > self.big_bytes:
                self._stats(name).big.append((size, f"{name} ({kind}, {_size(size)})"))
        counts = await self._ask_each(commands)
        for (name, kind, size), count in zip(lengths, counts, strict=True):
            self._length(name, kind, size, int(count or 0))

    def _stats(self, name: str) -> _GroupStats:
        group = group_of(name)
        stats = self.sample.groups.get(group.label)
        if stats is None:
            stats = self.sample.groups[group.label] = _GroupStats(group)
        return stats

    def _record(self, name: str, ttl: int) -> None:
        self.sample.sampled += 1
        stats = self._stats(name)
        stats.sampled += 1
        if ttl == -1:
            stats.no_ttl.append(name)

    def _length(self, name: str, kind: str, size: int | None, count: int) -> None:
        big_memory = size is not None and size > self.big_bytes
        if not big_memory and count <= self.big_length:
            return
        unit = _UNITS.get(kind, "entries")
        shown = f"{name} ({kind}, {count:,} {unit}" + (f", {_size(size)})" if size else ")")
        self._stats(name).big.append((size or count, shown))


async def sample_keys(
    probe: NodeProbe,
    *,
    sample: int,
    prefix: str | None,
    deadline: float,
    big_bytes: int,
    big_length: int,
) -> KeySample:
    """Walk one server's keyspace until ``sample`` keys were examined, SCAN is done, or
    the monotonic ``deadline`` passes."""
    result = KeySample(probe.name, filtered=bool(prefix))
    size = await probe.ask("DBSIZE")
    result.keys_total = None if size is None else int(size)
    sampler = _Sampler(probe, result, big_bytes=big_bytes, big_length=big_length, memory=True)
    match: list[Arg] = []
    if prefix:  # SCAN's MATCH is a glob: the prefix's own glob characters match literally
        escaped = "".join(f"\\{c}" if c in "*?[]" else c for c in prefix.replace("\\", "\\\\"))
        match = ["MATCH", escaped + "*"]
    cursor: Any = 0
    count = _PAGE
    while result.sampled < sample:
        if anyio.current_time() >= deadline:
            result.timed_out = True
            break
        started = anyio.current_time()
        reply = await probe.ask("SCAN", cursor, *match, "COUNT", count)
        if reply is None:
            break
        cursor, keys = reply
        keys = list(keys)[: sample - result.sampled]
        result.scanned += len(keys)
        if keys:
            # A slot moved under the page: its keys are sampled where they went.
            with contextlib.suppress(ClusterUnavailable):
                await sampler.page(keys)
        if int(cursor) == 0:
            result.complete = True
            break
        if prefix and len(keys) < count // 4:
            count = min(count * 2, _PAGE_CAP)
        elif len(keys) > _PAGE:
            count = max(_PAGE, count // 2)
        took = anyio.current_time() - started
        await anyio.sleep(max(took * _REST_RATIO, len(keys) / _KEYS_PER_SECOND - took))
    return result


def _estimate(count: int, sample: KeySample) -> str:
    if sample.complete or sample.filtered or not sample.keys_total or not sample.sampled:
        return ""
    share = sample.keys_total / sample.sampled
    return f", about {math.ceil(count * share):,} in the whole keyspace"


def check_keys(sample: KeySample, *, big_bytes: int, big_length: int) -> list[Finding]:
    """The TTL and big-key findings of one server's sample, per group."""
    found: list[Finding] = []
    for label in sorted(sample.groups):
        stats = sample.groups[label]
        group = stats.group
        if stats.no_ttl and group.ttl == _EXPECTED:
            n = len(stats.no_ttl)
            if group.library:
                why = (
                    "the library always writes these keys with a TTL, unless told not to "
                    "(Cache(ttl=None)) or a key was written by hand; without one they "
                    "live forever and memory only grows"
                )
                if group.no_ttl_severity is Severity.ERROR:
                    why = (
                        "a lock or semaphore lease without a TTL is never released if its "
                        "holder dies: every later acquire waits forever"
                    )
                fix = (
                    "find who writes them without a TTL; delete or EXPIRE the stray keys "
                    "(SCAN + PTTL -1)"
                )
            else:
                why = (
                    "keys without a TTL live forever: stale data stays and memory only "
                    "grows (the seed's first common mistake)"
                )
                fix = (
                    "write them with a TTL (SET ... EX, EXPIRE after HSET / SADD), or "
                    "delete the ones nobody reads"
                )
            found.append(
                Finding(
                    "keys.no_ttl",
                    group.no_ttl_severity,
                    f"{n:,} of {plural(stats.sampled, 'sampled key')} in {label} "
                    + ("has" if stats.sampled == 1 else "have")
                    + " no TTL"
                    + _estimate(n, sample),
                    why,
                    fix,
                    node=sample.node,
                    group=label,
                    count=n,
                    examples=tuple(sorted(stats.no_ttl)[:_EXAMPLES]),
                )
            )
        if stats.big:
            n = len(stats.big)
            biggest = tuple(text for _, text in sorted(stats.big, reverse=True)[:_EXAMPLES])
            if group.big_ok:
                severity = Severity.INFO
                why = (
                    "big by design (a board, an index, a queue or a stream), but deleting "
                    "one blocks the server unless lazyfree-lazy-user-del is yes, and a "
                    "stream or queue that only grows has no retention"
                )
                fix = (
                    "cap it (max_size, StreamRetention, trim dead letters) and set "
                    "lazyfree-lazy-user-del yes"
                )
            else:
                severity = Severity.WARNING
                why = (
                    f"keys over {_size(big_bytes)} or collections over {big_length:,} "
                    "elements make single commands slow (GET, HGETALL, SMEMBERS, DEL "
                    "block every other client meanwhile), fragment memory and stall "
                    "replication and cluster migrations"
                )
                fix = (
                    "split them (one key per item or per bucket, hash tags keep them "
                    "together), read collections in pages (HSCAN / SSCAN), or keep blobs "
                    "outside Redis"
                )
            found.append(
                Finding(
                    "keys.big",
                    severity,
                    f"{plural(n, 'big key')} in {label}" + _estimate(n, sample),
                    why,
                    fix,
                    node=sample.node,
                    group=label,
                    count=n,
                    examples=biggest,
                )
            )
    if sample.denied:
        found.append(
            Finding(
                "access",
                Severity.SKIPPED,
                f"skipped: {plural(sample.denied, 'sampled key')} outside the user's key patterns",
                "the ACL user may not read those keys, so their TTL and size are unknown",
                "run the doctor as a user with ~* (read access to every key), or with "
                "--prefix set to the user's own prefix",
                node=sample.node,
                count=sample.denied,
            )
        )
    return found
