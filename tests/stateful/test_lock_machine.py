"""Hypothesis state machine: clients acquire, release, stall past the TTL, crash, and write.

Checked at every step, against real servers:

* tokens strictly increase in the order they are issued;
* mutual exclusion: while a lease is certainly valid (less than its TTL since its acquire
  was answered), nobody else acquires; once every lease is certainly expired, anyone can;
* ``fenced_set`` accepts a write exactly when its token is not older than the newest
  accepted one, so accepted writes never go back in token order, however stale the
  writer (released, crashed, or paused past its TTL).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aioredispatterns import Lease, Lock, LockNotAcquired, LockNotOwned, connect, fenced_set

T = TypeVar("T")

TTL = 0.05
CLIENTS = 3
SLACK = 0.005  # PX is whole milliseconds

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "cluster")


def _machine(url: str) -> type[RuleBasedStateMachine]:
    class LockMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            # Two connections pools: clients 0 and 2 share one, client 1 has its own.
            self.redis = [connect(url), connect(url)]
            prefix = f"sm{uuid.uuid4().hex[:10]}"
            self.prefix = prefix
            self.locks = [
                Lock(self.redis[i % 2], "job", ttl=TTL, prefix=prefix) for i in range(CLIENTS)
            ]
            self.leases: list[Lease | None] = [None] * CLIENTS
            # When each live key (held or crashed) was sent and answered, by token.
            self.live: dict[int, tuple[float, float]] = {}
            self.last_token: list[int | None] = [None] * CLIENTS
            self.issued: list[int] = []
            self.accepted: list[int] = []

        def run(self, coro: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            for client in self.redis:
                self.run(client.aclose())
            self.loop.close()

        # The server set a key's TTL somewhere between the acquire's send and its answer.
        def _certainly_valid(self, now: float) -> bool:
            return any(now - sent < TTL - SLACK for sent, _ in self.live.values())

        def _certainly_expired(self, now: float) -> bool:
            return all(now - answered > TTL + SLACK for _, answered in self.live.values())

        def _holders(self) -> list[int]:
            return [i for i in range(CLIENTS) if self.leases[i] is not None]

        def _writers(self) -> list[int]:
            return [i for i in range(CLIENTS) if self.last_token[i] is not None]

        @rule(i=st.integers(0, CLIENTS - 1))
        def acquire(self, i: int) -> None:
            if self.leases[i] is not None:
                return
            sent = time.monotonic()
            expired_before = self._certainly_expired(sent)
            try:
                lease = self.run(self.locks[i].acquire(blocking=False))
            except LockNotAcquired:
                assert not expired_before, "every lease had expired, yet acquire failed"
                return
            answered = time.monotonic()
            assert not self._certainly_valid(answered), "two holders of a valid lease"
            assert not self.issued or lease.token > self.issued[-1], "token went back"
            self.issued.append(lease.token)
            self.leases[i] = lease
            self.last_token[i] = lease.token
            self.live = {t: v for t, v in self.live.items() if sent - v[1] <= TTL + SLACK}
            self.live[lease.token] = (sent, answered)

        @precondition(lambda self: self._holders())
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            i = data.draw(st.sampled_from(self._holders()))
            lease = self.leases[i]
            assert lease is not None
            self.leases[i] = None
            sent_at, answered_at = self.live.pop(lease.token, (0.0, 0.0))
            before = time.monotonic()
            try:
                self.run(lease.release())
            except LockNotOwned:
                assert time.monotonic() - sent_at >= TTL - SLACK, "a valid lease was refused"
                return
            assert before - answered_at <= TTL + SLACK, "released a lease that had expired"

        @precondition(lambda self: self._holders())
        @rule(data=st.data())
        def crash(self, data: st.DataObject) -> None:
            # The client vanishes: its key stays until the TTL, its token may still write.
            self.leases[data.draw(st.sampled_from(self._holders()))] = None

        @rule()
        def stall_past_the_ttl(self) -> None:
            time.sleep(TTL + 0.02)

        @precondition(lambda self: self._writers())
        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            i = data.draw(st.sampled_from(self._writers()))
            self._write(i, data.draw(st.binary(max_size=8)))

        @precondition(lambda self: len(self._writers()) >= 2)
        @rule(data=st.data())
        def newest_then_late_writes(self, data: st.DataObject) -> None:
            # The newest holder writes, then the older (stale) ones, in any order.
            writers = self._writers()
            newest = max(writers, key=lambda i: self.last_token[i] or -1)
            for i in [newest, *data.draw(st.permutations(writers))]:
                self._write(i, b"%d" % i)

        def _write(self, i: int, data: bytes) -> None:
            token = self.last_token[i]
            assert token is not None
            newest = max(self.accepted, default=-1)
            ok = self.run(fenced_set(self.redis[i % 2], "resource", data, token,
                                     prefix=self.prefix))  # fmt: skip
            assert ok == (token >= newest), (token, newest, ok)
            if ok:
                self.accepted.append(token)

        @invariant()
        def accepted_writes_never_go_back(self) -> None:
            assert self.accepted == sorted(self.accepted)

    return LockMachine


def test_lock_state_machine(redis_url: str) -> None:
    machine = _machine(redis_url)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=12,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
