"""A command that may have reached the server is never re-sent by the library: a
connection cut as the reply starts leaves exactly one entry (it used to be 2-4 with
``auto_pipeline=False``, where redis-py's own retry re-sent the XADD)."""

from __future__ import annotations

import anyio
import pytest

from aioredispatterns import ConnectionFailed, StreamProducer, connect
from aioredispatterns.testing import FaultProxy, RedisServer


@pytest.mark.parametrize("auto_pipeline", [True, False], ids=["pipelined", "direct"])
async def test_a_cut_reply_is_never_resent(
    proxy: FaultProxy, redis_server: RedisServer, key_prefix: str, auto_pipeline: bool
) -> None:
    client = connect(proxy.url, socket_timeout=2, retries=3, auto_pipeline=auto_pipeline)
    admin = connect(redis_server.url)
    producer = StreamProducer(client, "s", prefix=key_prefix)
    try:
        await producer.add({"n": 0})  # connected (and through the handshake)
        for n in range(1, 4):
            proxy.cut_after_bytes(0)  # the connection drops as the XADD's reply starts
            with anyio.fail_after(20), pytest.raises(ConnectionFailed):
                await producer.add({"n": n})
            proxy.heal()
            # The XADD ran once; nothing re-sent it on a fresh connection.
            assert await admin.xlen(producer.key) == n + 1
    finally:
        proxy.heal()
        await client.aclose()
        await admin.aclose()
