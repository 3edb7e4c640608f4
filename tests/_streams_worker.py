"""A consumer-group worker run as a subprocess by the streams crash and stall tests.

Usage: python tests/_streams_worker.py URL PREFIX STREAM GROUP CONSUMER DONE_KEY
       [CLAIM_IDLE [HANDLER_SECONDS]]

The handler records each message id in the list DONE_KEY *before* returning (so before
its ack), then works HANDLER_SECONDS (0.001 by default) and the group acknowledges it.
The crash test SIGKILLs this process mid-batch; the stall test SIGSTOPs it while its
handlers hold their messages (CLAIM_IDLE is the group's claim_idle, 60 s by default).
"""

from __future__ import annotations

import sys

import anyio

from aioredispatterns import connect
from aioredispatterns.streams import ConsumerGroup, ConsumerPolicy, StreamMessage


async def main(argv: list[str]) -> None:
    url, prefix, stream, group, consumer, done = argv[:6]
    claim_idle = float(argv[6]) if len(argv) > 6 else 60.0
    work = float(argv[7]) if len(argv) > 7 else 0.001
    client = connect(url)

    async def handle(message: StreamMessage) -> None:
        await client.rpush(done, message.id)
        await anyio.sleep(work)  # a little work, so many messages are in flight

    policy = ConsumerPolicy(
        concurrency=32, max_in_flight=200, batch_size=100, claim_idle=claim_idle
    )
    async with ConsumerGroup(
        client, stream, group, handler=handle, consumer=consumer, prefix=prefix, policy=policy
    ):
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
