"""Leaderboards on a sorted set: scores, ranks, top N, pages, "around me", an optional cap.

One sorted set per board (``ZADD leaderboard 9870 alice``, ``ZREVRANGE ... WITHSCORES``,
``ZREVRANK``), with what hand-written code tends to get wrong done once:

* **One order everywhere.** ``best="highest"`` (the default) ranks the highest score
  first and reads the set in reverse (``ZREVRANK`` / ``ZREVRANGE``); ``best="lowest"``
  (race times, golf) ranks the lowest first (``ZRANK`` / ``ZRANGE``). Ranks are ordinal
  and start at 1: no two members share one.
* **Ties, deterministic and documented.** Redis orders equal scores by member name,
  byte-wise ascending. A ``"highest"`` board reads that order backwards, so among equal
  scores the member whose name sorts *last* ranks first (``"bob"`` above ``"alice"``); a
  ``"lowest"`` board reads it forwards, so the name that sorts *first* ranks first. Every
  read (:meth:`~Leaderboard.rank`, :meth:`~Leaderboard.top`, :meth:`~Leaderboard.page`,
  :meth:`~Leaderboard.around`) and the cap follow that one order.
* **A cap kept atomically.** With ``max_size=K`` every write is one Lua script
  (``_lua/leaderboard_write.lua``) that writes, then drops the entries ranked below K, so
  the board never holds more than K members, whoever writes and however they are
  cancelled. Without a cap a write is a single ``ZADD`` / ``ZINCRBY``, auto-pipelined.
* **Conditional writes.** ``add(..., only_if="better")`` keeps a personal best
  (``ZADD GT`` / ``LT`` on servers that have them, Redis 6.2+ and Valkey; the same
  comparison in the script elsewhere).

Scores are doubles (as in Redis): integers are exact up to 2**53; NaN and infinities are
refused. Members are non-empty ``str`` (UTF-8, at most 1024 bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeAlias

from ._capabilities import server_info
from ._commands import Arg, execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, keyspace
from ._scripts import Script
from ._validate import MAX_COUNT, check_choice, check_count, check_name, check_number, shown
from .errors import ConfigurationError, RedisPatternsError

__all__ = (
    "Best",
    "Leaderboard",
    "LeaderboardEntry",
    "LeaderboardStats",
    "OnlyIf",
)

_WRITE = Script.load("leaderboard_write")
_AROUND = Script.load("leaderboard_around")

#: Which scores rank first: ``"highest"`` (points) or ``"lowest"`` (times, strokes).
Best: TypeAlias = Literal["highest", "lowest"]
#: When :meth:`Leaderboard.add` writes over an existing score: only a ``"higher"`` one,
#: only a ``"lower"`` one, or only a ``"better"`` one (higher on a ``"highest"`` board,
#: lower on a ``"lowest"`` one). A member not on the board is always added.
OnlyIf: TypeAlias = Literal["higher", "lower", "better"]

_BEST = ("highest", "lowest")
_ONLY_IF = ("higher", "lower", "better")
# The largest cap: the script compares it with ZCARD as a Lua double.
_MAX_SIZE: Final = 2**53


class LeaderboardEntry(NamedTuple):
    """One row of a board.

    Attributes:
        rank: the position on the board, 1 for the best entry (ordinal: ties are broken
            by member name, see the module docstring).
        member: who holds it.
        score: their score.
    """

    rank: int
    member: str
    score: float


@dataclass(frozen=True, slots=True)
class LeaderboardStats:
    """Counters of one :class:`Leaderboard` in this process (a snapshot).

    Attributes:
        writes: writes answered (add, add_many, increment, remove, clear).
        reads: reads answered (score, rank, entry, top, page, around, size).
        trimmed: members the cap removed during this process's writes.
        errors: calls that failed on the way to or at the server.
    """

    writes: int = 0
    reads: int = 0
    trimmed: int = 0
    errors: int = 0


class _Counts:
    __slots__ = ("errors", "reads", "trimmed", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0
        self.trimmed = 0
        self.errors = 0


def _member(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"member must be a str, got {shown(value)}")
    check_name("member", value)
    return value


def _score(name: str, value: object) -> str:
    # repr() of a float is the shortest string that parses back to the same double, and
    # the server parses it with strtod: the stored score is exactly the caller's float.
    return repr(float(check_number(name, value)))


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entries(reply: Sequence[Any], first_rank: int) -> list[LeaderboardEntry]:
    """``ZRANGE ... WITHSCORES`` replies as entries: flat (RESP2, scripts) or pairs (RESP3)."""
    if not reply:
        return []
    if isinstance(reply[0], list | tuple):
        pairs: Sequence[Any] = reply
    else:
        pairs = list(zip(reply[::2], reply[1::2], strict=True))
    return [
        LeaderboardEntry(first_rank + i, _text(member), float(score))
        for i, (member, score) in enumerate(pairs)
    ]


class Leaderboard:
    """A ranked board of members and scores (one sorted set).

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the board's name; two boards with the same name and prefix are one board.
        best: ``"highest"`` (default) ranks the highest score first; ``"lowest"`` the
            lowest (race times). Ties: see the module docstring.
        max_size: keep only the best ``max_size`` members (None: no cap). Enforced by
            every write of this object, atomically; a board written elsewhere without the
            cap is trimmed by this object's next write.
        prefix: the key namespace.

    Keys: ``<prefix>:leaderboard:{<name>}:scores`` (a sorted set, member -> score; it has
    no TTL: call :meth:`clear`, or set one yourself on a board that should expire).

    Cancellation: every write is one command or one script, so a cancelled caller leaves
    the board either untouched or fully written (the reply is lost, not the write).
    Nothing runs in the background and nothing is held.

    Raises:
        ConfigurationError: ``best`` or ``max_size`` is out of range (before any command).
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
    """

    def __init__(
        self,
        client: AnyRedis,
        name: str,
        *,
        best: Best = "highest",
        max_size: int | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._client = check_client(client)
        self.name: Final[str] = name
        self.best: Final[Best] = check_choice("best", best, _BEST)
        if max_size is not None:
            check_count("max_size", max_size, minimum=1, maximum=_MAX_SIZE)
        self.max_size: Final[int | None] = max_size
        self._key = keyspace(prefix, "leaderboard", name).key("scores")
        high = best == "highest"
        self._end = "high" if high else "low"
        self._rank_command = "ZREVRANK" if high else "ZRANK"
        self._range_command = "ZREVRANGE" if high else "ZRANGE"
        self._conditions = {
            "higher": "gt",
            "lower": "lt",
            "better": "gt" if high else "lt",
        }
        self._cap = str(self.max_size or 0)
        self._native_conditions: bool | None = None  # ZADD GT / LT, detected on first use
        self._counts = _Counts()

    def __repr__(self) -> str:
        cap = "" if self.max_size is None else f" max_size={self.max_size}"
        return f"<Leaderboard {self.name!r} best={self.best!r}{cap}>"

    @property
    def stats(self) -> LeaderboardStats:
        """A snapshot of this board's counters (this process only; sends nothing)."""
        counts = self._counts
        return LeaderboardStats(counts.writes, counts.reads, counts.trimmed, counts.errors)

    async def _command(self, *args: Arg, write: bool = False) -> Any:
        try:
            reply = await execute(self._client, *args)
        except RedisPatternsError:
            self._counts.errors += 1
            raise
        if write:
            self._counts.writes += 1
        else:
            self._counts.reads += 1
        return reply

    async def _script(self, script: Script, args: Sequence[Arg], *, write: bool) -> Any:
        try:
            reply = await script.run(self._client, [self._key], args)
        except RedisPatternsError:
            self._counts.errors += 1
            raise
        if write:
            self._counts.writes += 1
        else:
            self._counts.reads += 1
        return reply

    async def _write(self, mode: str, condition: str, pairs: Sequence[Arg]) -> list[Any]:
        """The capped write (or a conditional one where ZADD lacks GT / LT)."""
        reply = await self._script(
            _WRITE, [mode, condition, self._cap, self._end, *pairs], write=True
        )
        self._counts.trimmed += int(reply[1])
        return list(reply)

    async def _has_native_conditions(self) -> bool:
        if self._native_conditions is None:
            info = await server_info(self._client)
            # ZADD GT / LT arrived in Redis 6.2; every Valkey has them.
            self._native_conditions = info.name == "valkey" or info.version >= (6, 2)
        return self._native_conditions

    def _condition(self, only_if: OnlyIf | None) -> str:
        if only_if is None:
            return ""
        return self._conditions[check_choice("only_if", only_if, _ONLY_IF)]

    async def add(self, member: str, score: float, *, only_if: OnlyIf | None = None) -> bool:
        """Set ``member``'s score (adding the member if new).

        Args:
            only_if: write over an existing score only when the new one is ``"higher"``,
                ``"lower"`` or ``"better"`` (a personal best); None: always.

        Returns:
            True if this call changed the board: the member is new, or has a new score
            (and, on a capped board, made the cut). False if the score was the same, the
            condition kept the old one, or the cap dropped the member at once.

        Raises:
            ConfigurationError: ``member`` is not a non-empty str, ``score`` is not a
                finite number, or ``only_if`` is unknown (before any command).
            ConnectionFailed, CommandTimeout: the server did not answer (the write may
                or may not have happened).

        Cancellation: one command (or one script): done entirely or not at all.
        """
        return await self.add_many({member: score}, only_if=only_if) == 1

    async def add_many(self, scores: Mapping[str, float], *, only_if: OnlyIf | None = None) -> int:
        """Set the scores of several members at once, atomically (one command or script).

        Args:
            scores: member -> score.
            only_if: as :meth:`add`, for each member.

        Returns:
            How many members this call changed (see :meth:`add`).

        Raises:
            ConfigurationError: ``scores`` is not a mapping, or holds a bad member or score
                (nothing is sent).

        Cancellation: one command (or one script): all written or none.
        """
        if not isinstance(scores, Mapping):
            raise ConfigurationError(f"scores must be a mapping, got {type(scores).__name__}")
        condition = self._condition(only_if)
        pairs: list[Arg] = []
        for member, score in scores.items():
            pairs += (_member(member), _score("score", score))
        if not pairs:
            return 0
        if self.max_size is None and (not condition or await self._has_native_conditions()):
            zadd: list[Arg] = ["ZADD", self._key]
            if condition:
                zadd.append(condition.upper())
            zadd.append("CH")
            # ZADD takes score, member: the pairs are member, score.
            for i in range(0, len(pairs), 2):
                zadd += (pairs[i + 1], pairs[i])
            return int(await self._command(*zadd, write=True))
        return int((await self._write("set", condition, pairs))[0])

    async def increment(self, member: str, by: float = 1.0) -> float:
        """Add ``by`` (may be negative) to ``member``'s score (from 0 if new); return the
        new score.

        On a capped board the member may be dropped at once if the new score does not make
        the cut (check :meth:`rank`); its score is then lost and a later increment starts
        from 0 again.

        Raises:
            ConfigurationError: ``member`` or ``by`` is invalid (before any command).
            ConnectionFailed, CommandTimeout: as :meth:`add`.

        Cancellation: one command (or one script): done entirely or not at all.
        """
        checked = _member(member)
        amount = _score("by", by)
        if self.max_size is None:
            return float(await self._command("ZINCRBY", self._key, amount, checked, write=True))
        return float((await self._write("incr", "", [checked, amount]))[2])

    async def remove(self, *members: str) -> int:
        """Take members off the board; return how many were on it.

        Cancellation: one command: all removed or none.
        """
        checked = [_member(member) for member in members]
        if not checked:
            return 0
        return int(await self._command("ZREM", self._key, *checked, write=True))

    async def clear(self) -> None:
        """Delete the whole board.

        Cancellation: one command: the board is gone or untouched.
        """
        await self._command("DEL", self._key, write=True)

    async def size(self) -> int:
        """How many members are on the board."""
        return int(await self._command("ZCARD", self._key))

    async def score(self, member: str) -> float | None:
        """``member``'s score, or None if it is not on the board."""
        reply = await self._command("ZSCORE", self._key, _member(member))
        return None if reply is None else float(reply)

    async def rank(self, member: str) -> int | None:
        """``member``'s rank (1 is the best), or None if it is not on the board."""
        reply = await self._command(self._rank_command, self._key, _member(member))
        return None if reply is None else int(reply) + 1

    async def entry(self, member: str) -> LeaderboardEntry | None:
        """``member``'s rank and score, read together atomically; None if not on the board."""
        window = await self.around(member, 0)
        return window[0] if window else None

    async def top(self, count: int = 10) -> list[LeaderboardEntry]:
        """The best ``count`` entries, best first (fewer if the board is smaller).

        Raises:
            ConfigurationError: ``count`` is not an int >= 1.
        """
        check_count("count", count, minimum=1)
        return await self._range(0, count - 1)

    async def page(self, number: int, size: int = 10) -> list[LeaderboardEntry]:
        """Page ``number`` (1 is the top) of ``size`` entries: ranks
        ``(number - 1) * size + 1`` to ``number * size``; empty past the end.

        Pages are read one command each: a write between two reads can move a member
        from one page to the next (it then shows on both, or on neither).

        Raises:
            ConfigurationError: ``number`` or ``size`` is not an int >= 1, or the page
                lies beyond rank 2**53.
        """
        check_count("number", number, minimum=1)
        check_count("size", size, minimum=1)
        start = (number - 1) * size
        if start + size > MAX_COUNT:
            raise ConfigurationError(f"page {number} of size {size} lies beyond rank 2**53")
        return await self._range(start, start + size - 1)

    async def _range(self, start: int, stop: int) -> list[LeaderboardEntry]:
        reply = await self._command(self._range_command, self._key, start, stop, "WITHSCORES")
        return _entries(reply, start + 1)

    async def around(self, member: str, radius: int = 5) -> list[LeaderboardEntry]:
        """``member`` and up to ``radius`` entries above and below it, best first.

        Near the top or the bottom the window shifts instead of shrinking, so it holds
        ``2 * radius + 1`` entries whenever the board has that many (the best member gets
        the ``2 * radius`` entries below it). Read atomically, in one script.

        Returns:
            The window, or an empty list if ``member`` is not on the board.

        Raises:
            ConfigurationError: ``member`` is invalid or ``radius`` is not an int >= 0.
        """
        checked = _member(member)
        check_count("radius", radius, minimum=0)
        reply = await self._script(_AROUND, [self._end, checked, radius], write=False)
        if reply is None:
            return []
        start, flat = reply
        return _entries(flat, int(start) + 1)
