"""Entering a subscription is bounded and typed: a server that never confirms, or that
hangs up mid-confirmation, gives one library error in time (through a fault proxy)."""

from __future__ import annotations

import time

import anyio
import pytest

from aioredispatterns import (
    CommandTimeout,
    ConnectionFailed,
    ReconnectPolicy,
    connect,
    subscribe,
)
from aioredispatterns.testing import FaultProxy, borrowed_connections


async def test_a_server_that_never_confirms_fails_entry_within_confirm_timeout(
    proxy: FaultProxy, key_prefix: str
) -> None:
    client = connect(proxy.url, socket_timeout=10, retries=0, auto_pipeline=False)
    try:
        await client.ping()  # a pooled connection, already through its handshake
        proxy.drop_replies()
        started = time.monotonic()
        with anyio.fail_after(30), pytest.raises(CommandTimeout):
            async with subscribe(
                client, f"{key_prefix}:c", reconnect=ReconnectPolicy(confirm_timeout=1.0)
            ):
                pass
        # Bounded by confirm_timeout (1 s), not the socket timeout (10 s).
        assert time.monotonic() - started < 5.0
        proxy.heal()
        assert borrowed_connections(client) == []
    finally:
        proxy.heal()
        await client.aclose()


async def test_a_server_that_hangs_up_mid_confirmation_is_connection_failed(
    proxy: FaultProxy, key_prefix: str
) -> None:
    client = connect(proxy.url, socket_timeout=10, retries=0, auto_pipeline=False)
    try:
        await client.ping()
        proxy.cut_after_bytes(0)  # the connection drops as the confirmation starts
        with anyio.fail_after(30), pytest.raises(ConnectionFailed):
            async with subscribe(client, f"{key_prefix}:c"):
                pass
        proxy.heal()
        assert borrowed_connections(client) == []
        async with subscribe(client, f"{key_prefix}:c") as messages:  # works again
            assert messages.channels == (f"{key_prefix}:c",)
    finally:
        proxy.heal()
        await client.aclose()
