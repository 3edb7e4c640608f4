"""Auto-pipelining (placeholder: delegates to the client until the batcher lands)."""

from __future__ import annotations

from typing import Any

from redis.typing import EncodableT

from ._client import AnyRedis


class AutoPipeline:
    def __init__(self, client: AnyRedis) -> None:
        self._client = client

    async def execute(self, *args: EncodableT, **options: Any) -> Any:
        return await self._client.execute_command(*args, **options)
