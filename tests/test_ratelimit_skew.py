"""Two OS processes whose wall clocks differ by 5 s share one limit exactly.

The second process runs with ``time.time`` (and ``time.time_ns``) patched 5 s ahead. A
limiter deciding on the client's clock would let that process see 5 s of refill that never
happened; ours reads the server's TIME inside the script, so both processes see one state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest

from aioredispatterns import connect
from aioredispatterns.ratelimit import GCRA, SlidingWindowLog, TokenBucket

SKEW = 5.0

WORKER = textwrap.dedent(
    """
    import json, sys, time

    skew = float(sys.argv[4])
    if skew:
        real, real_ns = time.time, time.time_ns
        time.time = lambda: real() + skew
        time.time_ns = lambda: real_ns() + int(skew * 1e9)

    import anyio
    from aioredispatterns import connect
    from aioredispatterns.ratelimit import GCRA, RateLimiter, SlidingWindowLog, TokenBucket

    POLICIES = {
        "bucket": TokenBucket(5, 0.2),
        "log": SlidingWindowLog(20, 60.0),
        "gcra": GCRA(10, 60.0),
    }

    async def main(url, prefix, plan):
        client = connect(url)
        out = {"wall": time.time(), "decisions": []}
        try:
            start_at = float(plan.get("start_at", 0))
            while time.monotonic() < start_at:  # both processes start together
                await anyio.sleep(0.001)
            for name, cost, count in plan["hits"]:
                limiter = RateLimiter(client, POLICIES[name], name=name, prefix=prefix)
                for _ in range(count):
                    d = await limiter.hit("shared", cost)
                    out["decisions"].append(
                        [name, d.allowed, d.remaining, d.retry_after, d.server_time]
                    )
        finally:
            await client.aclose()
        print(json.dumps(out))

    anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    """
)


def _spawn(url: str, prefix: str, plan: dict[str, Any], skew: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, prefix, json.dumps(plan), str(skew)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture
def only_one_server(redis_server: Any) -> None:
    if redis_server.name != "valkey-9.1":
        pytest.skip("multi-process scenario runs on valkey-9.1 only (CI budget)")


@pytest.mark.usefixtures("only_one_server")
async def test_skewed_process_sees_the_same_bucket(redis_url: str) -> None:
    prefix = f"s{uuid.uuid4().hex[:10]}"
    # Process A (true clock) drains the bucket: 5 allowed, the 6th denied.
    a = _result(_spawn(redis_url, prefix, {"hits": [["bucket", 1, 6]]}, 0.0))
    assert [d[1] for d in a["decisions"]] == [True] * 5 + [False]
    # Process B, 5 s ahead: a client-clock limiter would find 5 s of refill (a whole
    # token at 0.2/s). Ours finds what A left, refilled only by the real time that passed.
    b = _result(_spawn(redis_url, prefix, {"hits": [["bucket", 1, 2]]}, SKEW))
    assert b["wall"] - time.time() > SKEW - 1.0  # the patch is really in effect
    a_last, b_first = a["decisions"][-1], b["decisions"][0]
    elapsed = b_first[4] - a_last[4]  # server seconds between A's last and B's first hit
    assert 0 < elapsed < 4.0
    assert [d[1] for d in b["decisions"]] == [False, False]
    # One clock: B's wait is A's wait minus the real time between them, to the microsecond.
    assert b_first[3] == pytest.approx(a_last[3] - elapsed, abs=5e-6)


@pytest.mark.usefixtures("only_one_server")
async def test_concurrent_skewed_processes_share_the_limit_exactly(redis_url: str) -> None:
    prefix = f"s{uuid.uuid4().hex[:10]}"
    plan = {
        "start_at": time.monotonic() + 1.5,
        "hits": [["log", 1, 15], ["gcra", 1, 8]],
    }
    procs = [_spawn(redis_url, prefix, plan, 0.0), _spawn(redis_url, prefix, plan, SKEW)]
    results = [_result(p) for p in procs]
    decisions = [d for r in results for d in r["decisions"]]
    # Exactly as one client would: 20 of 30 through the 20/min log, 10 of 16 through GCRA.
    assert sum(1 for d in decisions if d[0] == "log" and d[1]) == 20
    assert sum(1 for d in decisions if d[0] == "gcra" and d[1]) == 10
    # Both processes got some of each (they really raced) ...
    for r in results:
        assert any(d[1] for d in r["decisions"])
    # ... and the state in Redis matches: 20 log entries, nothing more.
    client = connect(redis_url)
    try:
        from aioredispatterns.ratelimit import RateLimiter

        log = RateLimiter(client, SlidingWindowLog(20, 60.0), name="log", prefix=prefix)
        assert await client.zcard(log._keys("shared")[0]) == 20
        gcra = RateLimiter(client, GCRA(10, 60.0), name="gcra", prefix=prefix)
        assert not (await gcra.peek("shared")).allowed
        bucket = RateLimiter(client, TokenBucket(5, 0.2), name="bucket", prefix=prefix)
        assert (await bucket.peek("shared")).remaining == 5
    finally:
        await client.aclose()
