"""Leaderboard: ranks, ties, pages, around-me, conditional writes, the cap (real servers).

The model-based check of every operation against a pure-Python board lives in
``tests/stateful/test_leaderboard_model.py``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import anyio
import pytest

from aioredispatterns import ConfigurationError, InvalidKeyError, connect
from aioredispatterns._commands import execute
from aioredispatterns._connection import is_cluster
from aioredispatterns.leaderboard import Leaderboard, LeaderboardEntry, LeaderboardStats
from aioredispatterns.testing import borrowed_connections

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}:leaderboard:{{{name}}}:scores"


async def _exists(client: Any, key: str) -> bool:
    return bool(await execute(client, "EXISTS", key))


# ------------------------------------------------------------------------ basics


async def test_top_rank_score_and_entry(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "game", prefix=key_prefix)
    assert await board.add_many({"alice": 9870, "bob": 8420, "carol": 9999.5}) == 3
    assert await board.top(2) == [
        LeaderboardEntry(1, "carol", 9999.5),
        LeaderboardEntry(2, "alice", 9870.0),
    ]
    assert await board.rank("bob") == 3
    assert await board.score("alice") == 9870.0
    assert await board.entry("alice") == LeaderboardEntry(2, "alice", 9870.0)
    assert await board.rank("nobody") is None
    assert await board.score("nobody") is None
    assert await board.entry("nobody") is None
    assert await board.size() == 3
    # The seed's commands see the same board: a plain sorted set.
    assert await execute(redis_client, "ZREVRANK", _key(key_prefix, "game"), "alice") == 1


async def test_lowest_first_board(redis_client: Any, key_prefix: str) -> None:
    race = Leaderboard(redis_client, "100m", best="lowest", prefix=key_prefix)
    await race.add_many({"bolt": 9.58, "gay": 9.69, "blake": 9.69, "powell": 9.72})
    assert [e.member for e in await race.top(4)] == ["bolt", "blake", "gay", "powell"]
    assert await race.rank("powell") == 4
    assert await race.add("powell", 9.71, only_if="better")
    assert not await race.add("powell", 9.80, only_if="better")
    assert await race.score("powell") == 9.71


async def test_ties_one_order_everywhere(redis_client: Any, key_prefix: str) -> None:
    """Equal scores: a highest-first board ranks the name that sorts last (byte-wise)
    first, a lowest-first board the one that sorts first; every read agrees."""
    names = ["alice", "bob", "Bob", "b", "é", "zed", "ab"]
    for best in ("highest", "lowest"):
        board = Leaderboard(redis_client, f"ties-{best}", best=best, prefix=key_prefix)
        await board.add_many(dict.fromkeys(names, 7))
        expected = sorted(names, key=str.encode, reverse=best == "highest")
        top = await board.top(100)
        assert [e.member for e in top] == expected
        assert [e.rank for e in top] == list(range(1, len(names) + 1))
        for entry in top:
            assert await board.rank(entry.member) == entry.rank
            assert await board.entry(entry.member) == entry
        pages = [await board.page(n, 3) for n in (1, 2, 3)]
        assert [e for page in pages for e in page] == top
        assert await board.around(expected[3], 1) == top[2:5]


async def test_scores_round_trip_exactly(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "exact", prefix=key_prefix)
    values = [0.1, 1 / 3, -2.5e-300, 2.0**53, 1e308, -0.0, 123456789.123456789]
    await board.add_many({f"m{i}": v for i, v in enumerate(values)})
    for i, value in enumerate(values):
        assert await board.score(f"m{i}") == value
    assert await board.increment("m0", 0.2) == 0.1 + 0.2


async def test_increment(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "inc", prefix=key_prefix)
    assert await board.increment("alice") == 1.0
    assert await board.increment("alice", 41) == 42.0
    assert await board.increment("alice", -2.5) == 39.5
    assert await board.increment("bob", 0) == 0.0  # a new member starts from 0
    assert await board.top(5) == [LeaderboardEntry(1, "alice", 39.5), LeaderboardEntry(2, "bob", 0)]


async def test_concurrent_increments_all_count(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "many", prefix=key_prefix)

    async def player(n: int) -> None:
        for _ in range(25):
            await board.increment(f"p{n % 4}", n % 4 + 1)

    async with anyio.create_task_group() as tg:
        for n in range(16):
            tg.start_soon(player, n)
    assert await board.top(10) == [
        LeaderboardEntry(1, "p3", 400.0),
        LeaderboardEntry(2, "p2", 300.0),
        LeaderboardEntry(3, "p1", 200.0),
        LeaderboardEntry(4, "p0", 100.0),
    ]


# ------------------------------------------------------------------ conditional writes


@pytest.mark.parametrize("max_size", [None, 100], ids=["zadd", "script"])
async def test_only_if(redis_client: Any, key_prefix: str, max_size: int | None) -> None:
    board = Leaderboard(redis_client, "best", max_size=max_size, prefix=key_prefix)
    assert await board.add("ann", 50)
    assert not await board.add("ann", 50)  # the same score changes nothing
    assert not await board.add("ann", 40, only_if="higher")
    assert await board.add("ann", 60, only_if="higher")
    assert not await board.add("ann", 70, only_if="lower")
    assert await board.add("ann", 55, only_if="lower")
    assert not await board.add("ann", 54, only_if="better")  # better = higher here
    assert await board.add("ann", 56, only_if="better")
    assert await board.add("new", -1, only_if="higher")  # a newcomer is always added
    assert await board.add_many({"ann": 99, "new": -5, "x": 1}, only_if="higher") == 2
    assert {e.member: e.score for e in await board.top(10)} == {"ann": 99, "new": -1, "x": 1}


# ------------------------------------------------------------------------ the cap


@pytest.mark.parametrize("best", ["highest", "lowest"])
async def test_cap_keeps_the_best(redis_client: Any, key_prefix: str, best: str) -> None:
    board = Leaderboard(redis_client, "capped", best=best, max_size=3, prefix=key_prefix)  # type: ignore[arg-type]
    assert await board.add_many({"a": 1, "b": 2, "c": 3, "d": 4}) == 3
    kept = ["d", "c", "b"] if best == "highest" else ["a", "b", "c"]
    assert [e.member for e in await board.top(10)] == kept
    worst = 0 if best == "highest" else 5
    assert not await board.add("e", worst)  # does not make the cut: dropped at once
    assert await board.rank("e") is None
    assert await board.size() == 3
    # A newcomer tying the last entry is ranked by name, like any tie: "bb" beats "b"
    # on a highest board (it sorts later), loses to it on a lowest board.
    tie = 2 if best == "highest" else 3
    last = "b" if best == "highest" else "c"
    made_it = await board.add("bb" if best == "highest" else "cc", tie)
    assert made_it == (best == "highest")
    assert await board.size() == 3
    assert (await board.rank(last) is None) == (best == "highest")
    assert board.stats.trimmed == 3


async def test_cap_holds_under_concurrent_writers(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "race", max_size=10, prefix=key_prefix)
    rng = random.Random(7)
    scores = {f"player{i}": rng.randrange(10_000) for i in range(300)}
    items = list(scores.items())

    async def writer(part: list[tuple[str, int]]) -> None:
        for member, score in part:
            await board.add(member, score)
            assert await board.size() <= 10

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(writer, items[i::8])
    expected = sorted(items, key=lambda kv: (kv[1], kv[0].encode()), reverse=True)[:10]
    assert [(e.member, e.score) for e in await board.top(20)] == expected


async def test_a_board_written_without_the_cap_is_trimmed_by_the_next_write(
    redis_client: Any, key_prefix: str
) -> None:
    free = Leaderboard(redis_client, "shared", prefix=key_prefix)
    await free.add_many({f"m{i}": i for i in range(20)})
    capped = Leaderboard(redis_client, "shared", max_size=5, prefix=key_prefix)
    await capped.increment("m19")
    assert [e.member for e in await free.top(100)] == ["m19", "m18", "m17", "m16", "m15"]


# ---------------------------------------------------------------- windows and pages


async def test_around_me_window(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "window", prefix=key_prefix)
    await board.add_many({f"p{i:02d}": 100 - i for i in range(20)})  # p00 ranks 1 ... p19 20
    middle = await board.around("p10", 2)
    assert [(e.rank, e.member) for e in middle] == [
        (9, "p08"), (10, "p09"), (11, "p10"), (12, "p11"), (13, "p12"),
    ]  # fmt: skip
    # At the edges the window shifts and keeps its 2 * radius + 1 entries.
    assert [e.rank for e in await board.around("p00", 2)] == [1, 2, 3, 4, 5]
    assert [e.rank for e in await board.around("p01", 2)] == [1, 2, 3, 4, 5]
    assert [e.rank for e in await board.around("p19", 2)] == [16, 17, 18, 19, 20]
    assert [e.rank for e in await board.around("p05", 0)] == [6]
    assert len(await board.around("p05", 100)) == 20
    assert await board.around("nobody", 3) == []


async def test_pages_cover_the_board_once(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "pages", prefix=key_prefix)
    await board.add_many({f"u{i}": i % 7 for i in range(23)})
    everyone = await board.top(100)
    pages = [await board.page(n, 5) for n in range(1, 6)]
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [e for page in pages for e in page] == everyone
    assert await board.page(6, 5) == []
    assert await board.page(1, 100) == everyone


# -------------------------------------------------------------- removal, keys, stats


async def test_remove_and_clear(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "rm", prefix=key_prefix)
    await board.add_many({"a": 1, "b": 2, "c": 3})
    assert await board.remove("a", "zz") == 1
    assert await board.remove() == 0
    assert [e.member for e in await board.top(5)] == ["c", "b"]
    await board.clear()
    assert await board.size() == 0
    assert not await _exists(redis_client, _key(key_prefix, "rm"))


async def test_one_key_under_the_boards_hash_tag(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "tagged", max_size=2, prefix=key_prefix)
    await board.add_many({"a": 1, "b": 2, "c": 3})
    await board.around("b")
    # On a cluster KEYS runs on the node of its pattern's slot: the tag picks the board's.
    pattern = f"{key_prefix}:*{{tagged}}*" if is_cluster(redis_client) else f"{key_prefix}:*"
    keys = await execute(redis_client, "KEYS", pattern)
    assert [k.decode() for k in keys] == [_key(key_prefix, "tagged")]


async def test_stats(redis_client: Any, key_prefix: str) -> None:
    board = Leaderboard(redis_client, "stats", max_size=1, prefix=key_prefix)
    await board.add_many({"a": 1, "b": 2})
    await board.increment("c", 5)
    await board.top()
    await board.around("c")
    assert board.stats == LeaderboardStats(writes=2, reads=2, trimmed=2, errors=0)


async def test_works_on_resp3_with_decoded_replies(redis_url: str, key_prefix: str) -> None:
    async with connect(redis_url, protocol=3, decode_responses=True) as client:
        board = Leaderboard(client, "resp3", prefix=key_prefix)
        await board.add_many({"a": 1.5, "b": 2, "c": 2})
        expected = [LeaderboardEntry(1, "c", 2.0), LeaderboardEntry(2, "b", 2.0)]
        assert await board.top(2) == expected
        assert await board.around("b", 0) == expected[1:]
        assert await board.increment("a", 1) == 2.5
        await board.clear()


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.add("m", math.nan), ConfigurationError),
        (lambda b: b.add("m", math.inf), ConfigurationError),
        (lambda b: b.add("m", True), ConfigurationError),
        (lambda b: b.add("m", "1"), ConfigurationError),
        (lambda b: b.add("", 1), InvalidKeyError),
        (lambda b: b.add(b"m", 1), ConfigurationError),
        (lambda b: b.add("m", 1, only_if="gt"), ConfigurationError),
        (lambda b: b.add_many([("m", 1)]), ConfigurationError),
        (lambda b: b.add_many({"ok": 1, "bad": math.nan}), ConfigurationError),
        (lambda b: b.increment("m", -math.inf), ConfigurationError),
        (lambda b: b.top(0), ConfigurationError),
        (lambda b: b.page(0), ConfigurationError),
        (lambda b: b.page(1, 0), ConfigurationError),
        (lambda b: b.page(2**52, 2**20), ConfigurationError),
        (lambda b: b.around("m", -1), ConfigurationError),
        (lambda b: b.rank("x" * 2000), InvalidKeyError),
    ],
)
async def test_bad_input_is_refused_before_any_command(
    redis_client: Any, key_prefix: str, call: Any, error: type[Exception]
) -> None:
    board = Leaderboard(redis_client, "bad", max_size=5, prefix=key_prefix)
    with pytest.raises(error):
        await call(board)
    assert not await _exists(redis_client, _key(key_prefix, "bad"))
    assert board.stats == LeaderboardStats()


async def test_bad_construction(redis_client: Any) -> None:
    with pytest.raises(ConfigurationError):
        Leaderboard(redis_client, "b", best="high")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Leaderboard(redis_client, "b", max_size=0)
    with pytest.raises(InvalidKeyError):
        Leaderboard(redis_client, "")


# ------------------------------------------------------------------ cancellation


async def test_cancelled_writers_leave_whole_writes_and_no_connection(
    redis_client: Any, key_prefix: str
) -> None:
    board = Leaderboard(redis_client, "cancel", max_size=20, prefix=key_prefix)
    batches = [{f"b{n}-{i}": n for i in range(5)} for n in range(400)]
    done = 0

    async def writer(part: list[dict[str, int]], scope: anyio.CancelScope) -> None:
        nonlocal done
        for batch in part:
            await board.add_many(batch)
            done += 1
            if done == 100:  # the other writers are mid-call: cancel them there
                scope.cancel()

    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(writer, batches[i::16], tg.cancel_scope)
    assert 100 <= done < 400
    top = await board.top(100)
    assert len(top) == 20
    # Each batch is one script and its five members share a score, so the cap always
    # drops whole batches: the board holds four whole batches, however cancelled.
    by_score: dict[float, set[str]] = {}
    for entry in top:
        by_score.setdefault(entry.score, set()).add(entry.member)
    assert len(by_score) == 4
    for score, members in by_score.items():
        assert members == {f"b{int(score)}-{i}" for i in range(5)}
    assert borrowed_connections(redis_client) == []
