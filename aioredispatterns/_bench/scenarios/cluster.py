"""Redis Cluster: cache hits and rate-limit decisions through the slot router.

Runs only with ``bench --cluster`` (an embedded 3-primary Valkey cluster, or ``--url
redis+cluster://...``). The baselines are redis-py's own ``RedisCluster`` doing by hand what
the primitive does (a GET + JSON decode; the seed token-bucket script by EVALSHA), at the
same concurrency, over keys spread across every primary. With embedded servers, a row runs
the same primitive on a standalone server of the same binary, to show what the cluster
costs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace

from ..scenario import BenchEnv, Operation, Scenario
from . import cache, ratelimit

TOPOLOGIES = ("cluster",)

CONCURRENCY = 64
KEYS = 64  # cache entries: each its own hash tag, so spread over the primaries

Setup = Callable[[BenchEnv], AbstractAsyncContextManager[Operation]]


def _on_standalone(setup: Setup) -> Setup:
    """``setup`` run against the standalone server of the same binary."""

    @asynccontextmanager
    async def standalone(env: BenchEnv) -> AsyncIterator[Operation]:
        assert env.standalone_url is not None
        async with setup(replace(env, url=env.standalone_url, topology="standalone")) as op:
            yield op

    return standalone


def scenarios(env: BenchEnv) -> list[Scenario]:
    """Cache hits and token-bucket decisions at c64 on the cluster."""
    c = CONCURRENCY
    hits = f"cluster cache hit c{c} {KEYS} keys"
    limits = f"cluster ratelimit c{c}"
    rows = [
        Scenario(
            hits, "redis-py RedisCluster GET + json", c, cache.raw(c, KEYS), baseline=True
        ),
        Scenario(hits, "Cache.get_or_load (slot router)", c, cache.ours(c, KEYS)),
        Scenario(
            limits, "redis-py RedisCluster EVALSHA seed bucket", c, ratelimit.seed_script(c),
            baseline=True, unit="decisions",
        ),
        Scenario(
            limits, "arp token bucket (slot router)", c,
            ratelimit.ours(ratelimit.POLICIES["token bucket"], c), unit="decisions",
        ),
    ]  # fmt: skip
    if env.standalone_url is not None:
        rows += [
            Scenario(
                hits, "Cache.get_or_load, standalone", c,
                _on_standalone(cache.ours(c, KEYS)), role="reference",
            ),
            Scenario(
                limits, "arp token bucket, standalone", c,
                _on_standalone(ratelimit.ours(ratelimit.POLICIES["token bucket"], c)),
                role="reference", unit="decisions",
            ),
        ]  # fmt: skip
    return rows
