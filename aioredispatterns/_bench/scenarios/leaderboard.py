"""Leaderboard updates per second: Leaderboard.increment vs raw redis-py ZINCRBY.

Every operation adds 1 to the score of one of 10,000 players (round robin), the write a
game server sends after each point scored.

Groups ``leaderboard c1`` / ``leaderboard c64``: the baseline is redis-py's ``zincrby`` on
its own pool (what a user writes from the seed's ``ZADD`` / ``ZREVRANGE`` example); our
rows are ``Leaderboard.increment`` through ``connect()``'s client (auto-pipelined), the
same on the baseline's plain redis-py client (the library's own cost), and a board capped
at its best 1,000 players (one Lua script per update that increments and trims). The
capped row's hand-written counterpart is a redis-py ``MULTI`` of ``ZINCRBY`` and
``ZREMRANGEBYRANK`` (a reference row: two commands in a transaction per update).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ...leaderboard import Leaderboard
from ..redis_py import redis_py
from ..scenario import BenchEnv, Operation, Scenario

PLAYERS = 10_000
CAP = 1_000

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _players() -> Callable[[], str]:
    names = itertools.cycle([f"player{i}" for i in range(PLAYERS)])
    return lambda: next(names)


def _raw(concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
        key = f"{env.prefix}:raw:leaderboard"
        player = _players()
        try:
            yield lambda: client.zincrby(key, 1, player())
        finally:
            await client.aclose()

    return setup


def _raw_capped(concurrency: int) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        client = redis_py(env.url, concurrency)
        key = f"{env.prefix}:raw:leaderboard-capped"
        player = _players()

        async def operation() -> object:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zincrby(key, 1, player())
                pipe.zremrangebyrank(key, 0, -(CAP + 1))
                return await pipe.execute()

        try:
            yield operation
        finally:
            await client.aclose()

    return setup


def _ours(concurrency: int, *, cap: int | None = None, plain: bool = False) -> Setup:
    @asynccontextmanager
    async def setup(env: BenchEnv) -> AsyncIterator[Operation]:
        # connect()'s client by default; `plain`: the baseline's own redis-py client.
        client: Any = (
            redis_py(env.url, concurrency) if plain else env.client(max_connections=concurrency + 4)
        )
        name = "bench" if cap is None else "bench-capped"
        board = Leaderboard(client, name, max_size=cap, prefix=env.prefix)
        player = _players()
        try:
            yield lambda: board.increment(player())
        finally:
            await client.aclose()

    return setup


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Score updates per second at c1 and c64."""
    rows: list[Scenario] = []
    for concurrency in (1, 64):
        group = f"leaderboard c{concurrency}"
        rows += [
            Scenario(group, "redis-py ZINCRBY", concurrency, _raw(concurrency), baseline=True,
                     unit="updates"),
            Scenario(group, "Leaderboard.increment", concurrency, _ours(concurrency),
                     unit="updates"),
            Scenario(group, "Leaderboard.increment, plain redis-py client", concurrency,
                     _ours(concurrency, plain=True), unit="updates"),
            Scenario(group, f"Leaderboard.increment, capped at {CAP}", concurrency,
                     _ours(concurrency, cap=CAP), unit="updates"),
            Scenario(group, "redis-py MULTI ZINCRBY + ZREMRANGEBYRANK", concurrency,
                     _raw_capped(concurrency), unit="updates", role="reference"),
        ]  # fmt: skip
    return rows
