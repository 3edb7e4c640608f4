"""A consumer-group worker run as a subprocess by the streams crash test.

Usage: python tests/_streams_worker.py URL PREFIX STREAM GROUP CONSUMER DONE_KEY

The handler records each message id in the list DONE_KEY *before* returning (so before
its ack), then the group acknowledges it. The test SIGKILLs this process mid-batch.
"""

from __future__ import annotations

import sys

import anyio

from aioredispatterns import connect
from aioredispatterns.streams import ConsumerGroup, ConsumerPolicy, StreamMessage


async def main(url: str, prefix: str, stream: str, group: str, consumer: str, done: str) -> None:
    client = connect(url)

    async def handle(message: StreamMessage) -> None:
        await client.rpush(done, message.id)
        await anyio.sleep(0.001)  # a little work, so many messages are in flight

    policy = ConsumerPolicy(concurrency=32, max_in_flight=200, batch_size=100, claim_idle=60)
    async with ConsumerGroup(
        client, stream, group, handler=handle, consumer=consumer, prefix=prefix, policy=policy
    ):
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:7])
