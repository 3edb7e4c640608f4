"""The Redis side of streams: scripts, reply parsing, group creation (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._commands import Arg, execute
from ._connection import AnyRedis
from ._keys import KeyT
from ._scripts import Script
from .errors import CommandError

_RECLAIM = Script.load("stream_reclaim")
_DEAD_LETTER = Script.load("stream_dead_letter")
_PRUNE = Script.load("stream_prune_consumers")
_REFRESH = Script.load("stream_refresh")

# Ids per renewal script: keeps each script short (it blocks the server while it runs).
_REFRESH_CHUNK = 500

RawEntry = tuple[bytes, dict[bytes, bytes]]


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_nogroup(exc: BaseException) -> bool:
    """The group (or the stream) does not exist: a restart without persistence, a DEL."""
    return isinstance(exc, CommandError) and "NOGROUP" in str(exc)


def pairs(flat: Sequence[Any]) -> dict[bytes, Any]:
    """``[k1, v1, k2, v2]`` (or an already parsed mapping) as a dict."""
    if isinstance(flat, dict):
        return flat
    if isinstance(flat, Mapping):
        return dict(flat)
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def read_entries(reply: Any) -> list[RawEntry]:
    """The entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 mapping)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):  # RESP3: {stream: [entries]}
        lists = [wrapped[0] for wrapped in reply.values() if wrapped]
    else:  # RESP2: [[stream, entries]]
        lists = [item[1] for item in reply]
    return [
        (entry_id, pairs(fields))
        for entries in lists
        for entry_id, fields in entries
        if fields is not None
    ]


async def create_group(client: AnyRedis, stream: KeyT, group: str, start_id: str) -> bool:
    """Create the group (and the stream, empty, if missing); False if it already existed."""
    try:
        await execute(client, "XGROUP", "CREATE", stream, group, start_id, "MKSTREAM")
    except CommandError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


async def reclaim(
    client: AnyRedis,
    stream: KeyT,
    dead: KeyT,
    *,
    group: str,
    consumer: str,
    min_idle_ms: int,
    cursor: str,
    count: int,
    max_deliveries: int,
    dead_maxlen: int,
) -> tuple[str, list[tuple[bytes, dict[bytes, bytes], int]], int]:
    """XAUTOCLAIM one page; returns (next cursor, [(id, fields, deliveries)], dead-lettered)."""
    args: list[Arg] = [
        group,
        consumer,
        min_idle_ms,
        cursor,
        count,
        max_deliveries,
        dead_maxlen,
    ]
    reply = await _RECLAIM.run(client, [stream, dead], args)
    claimed = [(entry[0], pairs(entry[1]), int(entry[2])) for entry in reply[1]]
    return text(reply[0]), claimed, int(reply[2])


async def dead_letter(
    client: AnyRedis,
    stream: KeyT,
    dead: KeyT,
    *,
    group: str,
    consumer: str,
    message_id: str,
    deliveries: int,
    error: str,
    dead_maxlen: int,
) -> bool:
    """Move one message we own to the dead-letter stream and ack it; False if not ours."""
    args: list[Arg] = [group, consumer, message_id, deliveries, error, dead_maxlen]
    return bool(await _DEAD_LETTER.run(client, [stream, dead], args))


async def prune_consumers(
    client: AnyRedis, stream: KeyT, *, group: str, min_idle_ms: int, keep: str
) -> list[str]:
    """Delete idle consumers owning no pending entry; returns their names."""
    reply = await _PRUNE.run(client, [stream], [group, min_idle_ms, keep])
    return [text(name) for name in reply]


async def refresh(
    client: AnyRedis, stream: KeyT, *, group: str, consumer: str, ids: Sequence[str]
) -> int:
    """Reset the idle time of those ``ids`` still pending for ``consumer``; returns how
    many. Counts no delivery (XCLAIM ... JUSTID); entries others own are left alone."""
    renewed = 0
    for start in range(0, len(ids), _REFRESH_CHUNK):
        chunk = ids[start : start + _REFRESH_CHUNK]
        renewed += int(await _REFRESH.run(client, [stream], [group, consumer, *chunk]))
    return renewed
