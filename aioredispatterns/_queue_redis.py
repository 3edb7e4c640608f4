"""The Redis side of the reliable queue: its keys, its scripts, their replies (private).

Every change that spans keys is one Lua script (``_lua/queue_*.lua``), so a caller
cancelled at any await leaves each job in exactly one place: waiting (``ready`` or
``prio``), ``delayed``, leased to a consumer (``leases``) or ``dead``, or acknowledged
and gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._commands import Arg
from ._connection import AnyRedis
from ._keys import KeySpace, KeyT
from ._scripts import Script

__all__ = ("QueueKeys", "RawJob")

_PUSH = Script.load("queue_push")
_POP = Script.load("queue_pop")
_ACK = Script.load("queue_ack")
_NACK = Script.load("queue_nack")
_RENEW = Script.load("queue_renew")
_REAP = Script.load("queue_reap")
_RELEASE = Script.load("queue_release")
_FORGET = Script.load("queue_forget")
_DEAD_LETTERS = Script.load("queue_dead_letters")
_REQUEUE_DEAD = Script.load("queue_requeue_dead")

# Ids per acknowledgement or renewal script: keeps each script short (it blocks the
# server while it runs).
CHUNK = 500
# Due delayed jobs one pop moves at most (the next pop moves the rest).
_PROMOTE_LIMIT = 1000

#: (id, payload, deliveries, priority, last error) as a pop returns them.
RawJob = tuple[str, bytes, int, int, str | None]


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_text(value: object) -> str | None:
    return None if value is None else text(value)


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one reliable queue, all under its one hash tag."""

    space: KeySpace
    ready: KeyT
    prio: KeyT
    delayed: KeyT
    leases: KeyT
    jobs: KeyT
    deliveries: KeyT
    owners: KeyT
    errors: KeyT
    priorities: KeyT
    dead: KeyT
    wake: KeyT
    seq: KeyT
    consumers: KeyT

    @classmethod
    def of(cls, space: KeySpace) -> QueueKeys:
        names = [
            "ready",
            "prio",
            "delayed",
            "leases",
            "jobs",
            "deliveries",
            "owners",
            "errors",
            "priorities",
            "dead",
            "wake",
            "seq",
            "consumers",
        ]
        return cls(space, *(space.key(name) for name in names))

    def processing(self, consumer: str) -> KeyT:
        """The consumer's processing list: the ids of the jobs it holds."""
        return self.space.key("processing", consumer)

    def all_fixed(self) -> list[KeyT]:
        """Every key but the processing lists."""
        return [
            self.ready,
            self.prio,
            self.delayed,
            self.leases,
            self.jobs,
            self.deliveries,
            self.owners,
            self.errors,
            self.priorities,
            self.dead,
            self.wake,
            self.seq,
            self.consumers,
        ]


async def push(client: AnyRedis, keys: QueueKeys, jobs: Sequence[Sequence[Arg]]) -> list[bool]:
    """Add ``(id, payload, priority, delay_us)`` jobs; True for each one that was new."""
    args: list[Arg] = [len(jobs)]
    for job in jobs:
        args.extend(job)
    reply = await _PUSH.run(
        client,
        [keys.ready, keys.prio, keys.delayed, keys.jobs, keys.priorities, keys.wake, keys.seq],
        args,
    )
    return [bool(added) for added in reply]


async def pop(
    client: AnyRedis,
    keys: QueueKeys,
    *,
    consumer: str,
    count: int,
    lease_ms: int,
    max_deliveries: int,
    dead_max: int,
) -> tuple[list[RawJob], int]:
    """Lease up to ``count`` jobs to ``consumer``; returns them and the ms until the next
    delayed job is due (-1: none)."""
    reply = await _POP.run(
        client,
        [*keys.all_fixed(), keys.processing(consumer)],
        [consumer, count, lease_ms, max_deliveries, dead_max, _PROMOTE_LIMIT],
    )
    raw, wait_ms = reply[0], int(reply[1])
    jobs = [
        (text(entry[0]), entry[1], int(entry[2]), int(entry[3]), _optional_text(_at(entry, 4)))
        for entry in raw
    ]
    return jobs, wait_ms


def _at(entry: Sequence[Any], index: int) -> Any:
    # A trailing nil may be dropped from a Lua table's reply.
    return entry[index] if len(entry) > index else None


async def ack(client: AnyRedis, keys: QueueKeys, consumer: str, ids: Sequence[str]) -> int:
    """Acknowledge ``ids``; returns how many were still held by ``consumer``."""
    done = 0
    for start in range(0, len(ids), CHUNK):
        done += int(
            await _ACK.run(
                client,
                [
                    keys.leases,
                    keys.jobs,
                    keys.deliveries,
                    keys.owners,
                    keys.errors,
                    keys.priorities,
                    keys.processing(consumer),
                ],
                [consumer, *ids[start : start + CHUNK]],
            )
        )
    return done


async def nack(
    client: AnyRedis,
    keys: QueueKeys,
    *,
    consumer: str,
    job_id: str,
    error: str,
    retry_us: int,
    max_deliveries: int,
    dead_max: int,
) -> int:
    """0: not held any more; 1: returned to the queue; 2: dead-lettered."""
    fixed = keys.all_fixed()[:-1]  # all but consumers
    return int(
        await _NACK.run(
            client,
            [*fixed, keys.processing(consumer)],
            [consumer, job_id, error, retry_us, max_deliveries, dead_max],
        )
    )


async def renew(
    client: AnyRedis, keys: QueueKeys, *, consumer: str, lease_ms: int, ids: Sequence[str]
) -> list[str]:
    """Renew the leases of ``ids`` (and the heartbeat); returns the ids no longer held."""
    lost: list[str] = []
    starts = range(0, len(ids), CHUNK) if ids else range(1)
    for start in starts:
        reply = await _RENEW.run(
            client,
            [keys.leases, keys.owners, keys.consumers, keys.processing(consumer)],
            [consumer, lease_ms, *ids[start : start + CHUNK]],
        )
        lost += [text(job_id) for job_id in reply]
    return lost


async def reap(
    client: AnyRedis,
    keys: QueueKeys,
    *,
    count: int,
    max_deliveries: int,
    dead_max: int,
    silent_ms: int,
) -> tuple[int, int, int, list[str]]:
    """Return expired leases' jobs; (returned, dead-lettered, ms to the next expiry,
    consumers silent for ``silent_ms``)."""
    reply = await _REAP.run(
        client,
        [
            keys.ready,
            keys.prio,
            keys.leases,
            keys.jobs,
            keys.deliveries,
            keys.owners,
            keys.errors,
            keys.priorities,
            keys.dead,
            keys.wake,
            keys.seq,
            keys.consumers,
        ],
        [count, max_deliveries, dead_max, silent_ms],
    )
    silent = [text(name) for name in reply[3]]
    return int(reply[0]), int(reply[1]), int(reply[2]), silent


async def release(
    client: AnyRedis,
    keys: QueueKeys,
    *,
    consumer: str,
    max_deliveries: int,
    dead_max: int,
    stopping: bool,
    why: str,
    started: Sequence[str] = (),
) -> tuple[int, int]:
    """Return every job ``consumer`` holds to the front of the queue; (returned, dead)."""
    reply = await _RELEASE.run(
        client,
        [
            keys.ready,
            keys.prio,
            keys.leases,
            keys.jobs,
            keys.deliveries,
            keys.owners,
            keys.errors,
            keys.priorities,
            keys.dead,
            keys.wake,
            keys.seq,
            keys.consumers,
            keys.processing(consumer),
        ],
        [consumer, max_deliveries, dead_max, "stop" if stopping else "start", why, *started],
    )
    return int(reply[0]), int(reply[1])


async def forget(client: AnyRedis, keys: QueueKeys, *, consumer: str, silent_ms: int) -> bool:
    """Drop a silent consumer's processing list once it holds no lease; True if dropped."""
    reply = await _FORGET.run(
        client, [keys.owners, keys.consumers, keys.processing(consumer)], [consumer, silent_ms]
    )
    return bool(reply)


async def dead_letters(
    client: AnyRedis, keys: QueueKeys, count: int
) -> list[tuple[str, bytes, int, str | None]]:
    """The newest ``count`` dead-lettered jobs: (id, payload, deliveries, error)."""
    reply = await _DEAD_LETTERS.run(
        client, [keys.dead, keys.jobs, keys.deliveries, keys.errors], [count]
    )
    return [
        (
            text(entry[0]),
            entry[1],
            int(_at(entry, 2) or 0),
            _optional_text(_at(entry, 3)),
        )
        for entry in reply
    ]


async def requeue_dead(
    client: AnyRedis, keys: QueueKeys, *, ids: Sequence[str], oldest: int
) -> int:
    """Requeue ``ids`` (or, with none, the ``oldest`` dead jobs); returns how many."""
    return int(
        await _REQUEUE_DEAD.run(
            client,
            [
                keys.dead,
                keys.ready,
                keys.prio,
                keys.jobs,
                keys.deliveries,
                keys.priorities,
                keys.wake,
                keys.seq,
            ],
            [oldest, *ids],
        )
    )
