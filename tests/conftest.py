"""Test configuration: real throwaway servers from aioredispatterns.testing.

``--redis-servers valkey-9.1`` (or ``ARP_REDIS_SERVERS``) narrows the matrix;
``--redis-url URL`` (or ``ARP_TEST_REDIS_URL``) runs against one external server instead,
which is flushed only with ``--redis-allow-flush`` (``ARP_TEST_ALLOW_FLUSH=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the plugin itself: importing it here first would
    # keep pytest from rewriting its assertions
    from aioredispatterns.testing import FaultProxy, RedisServer

pytest_plugins = ["aioredispatterns.testing"]


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
