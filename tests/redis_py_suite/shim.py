"""The conftest shim of ``run.py``: redis-py's asyncio test fixtures build the drop-in client.

``run.py`` patches the client factory of redis-py's ``tests/test_asyncio/conftest.py``
(``create_redis``, behind the ``r``, ``r2`` and ``decoded_r`` fixtures) to take its class
from :func:`client_class` instead of ``redis.asyncio.Redis``. ``ARP_REDIS_PY_CLIENT``
picks it:

* ``dropin`` (default): :class:`aioredispatterns.AutoPipelinedRedis`, the client
  ``connect()`` returns, counting the commands its auto-pipeline carried;
* ``plain``: ``redis.asyncio.Redis`` itself, the reference run.

Loaded with ``-p shim`` (``run.py`` puts this directory on ``PYTHONPATH``); it prints
``ARP-PIPELINED-COMMANDS: N`` at the end of the run so that a drop-in run that silently
used redis-py's own path cannot pass for one.
"""

from __future__ import annotations

import os
from typing import Any

_pipelined = 0


def client_class() -> type[Any]:
    """The class redis-py's test fixtures instantiate (``ARP_REDIS_PY_CLIENT``)."""
    import redis.asyncio

    if os.environ.get("ARP_REDIS_PY_CLIENT", "dropin") == "plain":
        return redis.asyncio.Redis
    return _counting_class()


def _counting_class() -> type[Any]:
    from aioredispatterns import pipeline_stats
    from aioredispatterns._client import AutoPipelinedRedis

    class CountingAutoPipelinedRedis(AutoPipelinedRedis):
        """The drop-in client, adding what its pipeline carried to the run's count."""

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            global _pipelined
            from aioredispatterns._connection import state_of

            stats = pipeline_stats(self)
            try:
                await super().aclose(close_connection_pool)
            finally:
                if stats is not None:
                    _pipelined += stats.commands
                    state_of(self).pipeline = None  # counted once if closed twice

    return CountingAutoPipelinedRedis


def pytest_report_header() -> str:
    return f"aioredispatterns shim: client class {client_class().__mro__[0].__qualname__}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"ARP-PIPELINED-COMMANDS: {_pipelined}")
