"""Test configuration: real throwaway servers from aioredispatterns.testing.

``--redis-servers valkey-9.1`` (or ``ARP_REDIS_SERVERS``) narrows the matrix;
``--redis-servers cluster`` runs on a local 3-primary cluster only; ``--redis-url URL``
(or ``ARP_TEST_REDIS_URL``) runs against one external server instead, which is flushed
only with ``--redis-allow-flush`` (``ARP_TEST_ALLOW_FLUSH=1``).

Tests that need one server process are skipped on a cluster through one mechanism, the
plugin's ``standalone_only`` mark; every test using ``own_server`` or ``proxy`` gets it.
A test that fails on a cluster because of a known library bug carries
``xfail_on_cluster(reason=...)``: a strict xfail there, an ordinary test elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the plugin itself: importing it here first would
    # keep pytest from rewriting its assertions
    from aioredispatterns.testing import FaultProxy, RedisServer

pytest_plugins = ["aioredispatterns.testing"]

# Fixtures that stand for one server process, and why a cluster cannot stand in for it.
_ONE_PROCESS_FIXTURES = {
    "own_server": "stops, pauses or kills a private server of the current kind",
    "proxy": "a FaultProxy sits in front of one server's port",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "xfail_on_cluster(reason): a known library bug fails the test on a cluster (the "
        "cluster kind, or an external cluster URL): a strict xfail there",
    )
    config.addinivalue_line(
        "markers",
        "budget_kinds(*kinds): in a run over every server kind (no --redis-servers), this "
        "slow or heavily parametrized test runs on these kinds only; it still runs on any "
        "kind named with --redis-servers / ARP_REDIS_SERVERS",
    )


def _kind_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    kind = callspec.params.get("redis_server") if callspec is not None else None
    return kind if isinstance(kind, str) else None


# tryfirst: the plugin turns the standalone_only mark into a skip in its own (trylast) hook.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from aioredispatterns.testing import _runs_on_cluster  # the kind, or a cluster URL

    # The suite must finish within CI's 20 minutes on 2 shared cores: in a run over every
    # kind, tests marked budget_kinds skip the others (they are named on the command line
    # to run there).
    chosen = config.getoption("redis_servers", None) or os.environ.get("ARP_REDIS_SERVERS")
    for item in items:
        budget = item.get_closest_marker("budget_kinds")
        kind = _kind_of(item)
        if budget is not None and not chosen and kind is not None and kind not in budget.args:
            item.add_marker(
                pytest.mark.skip(reason=f"CI budget: runs on {', '.join(budget.args)} only")
            )
        for name, reason in _ONE_PROCESS_FIXTURES.items():
            uses = name in getattr(item, "fixturenames", ())
            if uses and not item.get_closest_marker("standalone_only"):
                item.add_marker(pytest.mark.standalone_only(reason=reason))
        known_bug = item.get_closest_marker("xfail_on_cluster")
        if known_bug is not None and _runs_on_cluster(item):
            reason = known_bug.kwargs.get("reason", "")
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"on the cluster: {reason}"))


@pytest.fixture
def own_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A private server of the current matrix kind, for tests that stop, pause or kill
    it (never the shared one, never an external one)."""
    if not redis_server.owned:
        pytest.skip("stops or pauses a server: needs one this suite started")
    with type(redis_server)(redis_server.binary, name="private") as server:
        yield server


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the current matrix server (one this suite
    started: faults through an external server's proxy would be the user's own)."""
    from aioredispatterns.testing import FaultProxy

    if not redis_server.owned:
        pytest.skip("needs a server this suite started (a proxy in front of it)")
    with FaultProxy(redis_server.port) as running:
        yield running
