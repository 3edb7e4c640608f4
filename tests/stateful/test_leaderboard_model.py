"""Hypothesis state machine: a Leaderboard against a pure-Python board, on real servers.

Each example builds one board (highest or lowest first, with or without a cap) under a
fresh key prefix and runs adds (plain and conditional), bulk adds, increments, removals and
clears on both. After every step the whole board must read back exactly as the model's,
and every read (rank, score, entry, top, page, around) must agree with the model's:

* order: by score, best first; equal scores by member name byte-wise, descending on a
  highest-first board and ascending on a lowest-first one (ordinal ranks from 1);
* the cap keeps the best ``max_size`` members after each write (a bulk add is one write);
* "around me" is a window of ``min(size, 2 * radius + 1)`` entries centred on the member,
  shifted (not shrunk) at the top and the bottom.

Scores are halves of small integers, so sums are exact and ties are frequent; member names
mix case, prefixes and non-ASCII letters, so the byte-wise tie order is exercised.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aioredispatterns import connect
from aioredispatterns.leaderboard import Leaderboard, LeaderboardEntry

T = TypeVar("T")

MEMBERS = st.sampled_from(["a", "ab", "b", "B", "é", "zz", "Ω", "a b"])
SCORES = st.integers(-6, 6).map(lambda n: n / 2)
ONLY_IF = st.sampled_from([None, "higher", "lower", "better"])

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "cluster")


class BoardModel:
    """What a board should hold, in plain Python."""

    def __init__(self, best: str, cap: int | None) -> None:
        self.best = best
        self.cap = cap
        self.scores: dict[str, float] = {}

    def order(self) -> list[LeaderboardEntry]:
        ascending = sorted(self.scores.items(), key=lambda kv: (kv[1], kv[0].encode()))
        ranked = ascending[::-1] if self.best == "highest" else ascending
        return [LeaderboardEntry(i + 1, m, s) for i, (m, s) in enumerate(ranked)]

    def _trim(self) -> None:
        if self.cap is not None:
            self.scores = {e.member: e.score for e in self.order()[: self.cap]}

    def add_many(self, scores: dict[str, float], only_if: str | None) -> int:
        if only_if == "better":
            only_if = "higher" if self.best == "highest" else "lower"
        written = []
        for member, score in scores.items():
            current = self.scores.get(member)
            if current is None:
                write = True
            elif only_if == "higher":
                write = score > current
            elif only_if == "lower":
                write = score < current
            else:
                write = score != current
            if write:
                self.scores[member] = score
                written.append(member)
        self._trim()
        return sum(member in self.scores for member in written)

    def increment(self, member: str, by: float) -> float:
        new = self.scores.get(member, 0.0) + by
        self.scores[member] = new
        self._trim()
        return new

    def remove(self, members: list[str]) -> int:
        present = {m for m in members if m in self.scores}
        for member in present:
            del self.scores[member]
        return len(present)

    def around(self, member: str, radius: int) -> list[LeaderboardEntry]:
        board = self.order()
        ranks = {e.member: e.rank - 1 for e in board}
        if member not in ranks:
            return []
        size = min(len(board), 2 * radius + 1)
        start = min(max(0, ranks[member] - radius), len(board) - size)
        return board[start : start + size]


async def _gather(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    return list(await asyncio.gather(*calls))


def _machine(url: str) -> type[RuleBasedStateMachine]:
    class LeaderboardMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.redis = connect(url)
            self.prefix = f"lb{uuid.uuid4().hex[:10]}"
            self.board: Leaderboard | None = None
            self.model = BoardModel("highest", None)

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            if self.board is not None:
                self.run(self.board.clear())
            self.run(self.redis.aclose())
            self.loop.close()

        @property
        def lb(self) -> Leaderboard:
            assert self.board is not None
            return self.board

        @initialize(
            best=st.sampled_from(["highest", "lowest"]),
            cap=st.sampled_from([None, 1, 3, 5]),
        )
        def create(self, best: str, cap: int | None) -> None:
            self.board = Leaderboard(self.redis, "m", best=best, max_size=cap,  # type: ignore[arg-type]
                                     prefix=self.prefix)  # fmt: skip
            self.model = BoardModel(best, cap)

        @rule(member=MEMBERS, score=SCORES, only_if=ONLY_IF)
        def add(self, member: str, score: float, only_if: Any) -> None:
            changed = self.run(self.lb.add(member, score, only_if=only_if))
            assert changed == (self.model.add_many({member: score}, only_if) == 1)

        @rule(scores=st.dictionaries(MEMBERS, SCORES, max_size=5), only_if=ONLY_IF)
        def add_many(self, scores: dict[str, float], only_if: Any) -> None:
            changed = self.run(self.lb.add_many(scores, only_if=only_if))
            assert changed == self.model.add_many(scores, only_if)

        @rule(member=MEMBERS, by=SCORES)
        def increment(self, member: str, by: float) -> None:
            assert self.run(self.lb.increment(member, by)) == self.model.increment(member, by)

        @rule(members=st.lists(MEMBERS, max_size=3))
        def remove(self, members: list[str]) -> None:
            assert self.run(self.lb.remove(*members)) == self.model.remove(members)

        @precondition(lambda self: len(self.model.scores) > 4)
        @rule()
        def clear(self) -> None:
            self.run(self.lb.clear())
            self.model.scores.clear()

        @rule(member=MEMBERS)
        def member_reads(self, member: str) -> None:
            expected = {e.member: e for e in self.model.order()}.get(member)
            assert self.run(self.lb.entry(member)) == expected
            assert self.run(self.lb.rank(member)) == (expected and expected.rank)
            assert self.run(self.lb.score(member)) == (expected and expected.score)

        @rule(count=st.integers(1, 10))
        def top(self, count: int) -> None:
            assert self.run(self.lb.top(count)) == self.model.order()[:count]

        @rule(number=st.integers(1, 4), size=st.integers(1, 4))
        def page(self, number: int, size: int) -> None:
            start = (number - 1) * size
            assert self.run(self.lb.page(number, size)) == self.model.order()[start : start + size]

        @rule(member=MEMBERS, radius=st.integers(0, 4))
        def around(self, member: str, radius: int) -> None:
            assert self.run(self.lb.around(member, radius)) == self.model.around(member, radius)

        @invariant()
        def whole_board_matches(self) -> None:
            if self.board is None:
                return
            assert self.run(self.lb.top(100)) == self.model.order()
            assert self.run(self.lb.size()) == len(self.model.scores)
            if self.model.cap is not None:
                assert len(self.model.scores) <= self.model.cap

        @invariant()
        def every_window_matches(self) -> None:
            # Every member's window at two radii, so the shifts at both ends are checked
            # at every step rather than only when a rule happens to draw them.
            if self.board is None:
                return
            members = list(self.model.scores)
            calls = [self.lb.around(m, r) for m in members for r in (1, 2)]
            got = self.run(_gather(calls))
            assert got == [self.model.around(m, r) for m in members for r in (1, 2)]

    return LeaderboardMachine


def test_leaderboard_against_a_model(redis_url: str) -> None:
    run_state_machine_as_test(
        _machine(redis_url),
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
