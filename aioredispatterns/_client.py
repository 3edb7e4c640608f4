"""Per-client state: what the library remembers about one redis-py client.

The state hangs off the client object itself (no module-level registry), so it lives
and dies with the client, and two clients never share it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._capabilities import ServerInfo
    from ._pipeline import AutoPipeline

AnyRedis: TypeAlias = "Redis | RedisCluster"

_ATTR = "_aioredispatterns_state"


class ClientState:
    """What the library caches for one client: server capabilities, the auto-pipeline."""

    __slots__ = ("auto_pipeline", "client", "info", "info_lock", "pipeline")

    def __init__(self, client: AnyRedis, *, auto_pipeline: bool = True) -> None:
        self.client = client
        self.auto_pipeline = auto_pipeline
        self.info: ServerInfo | None = None
        self.info_lock: anyio.Lock | None = None
        self.pipeline: AutoPipeline | None = None


def check_client(client: object) -> AnyRedis:
    """Return ``client`` if it is a redis.asyncio client, else raise ConfigurationError."""
    if not isinstance(client, Redis | RedisCluster):
        raise ConfigurationError(
            "expected a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster "
            f"(see aioredispatterns.connect()), got {type(client).__name__}"
        )
    return client


def state_of(client: AnyRedis) -> ClientState:
    """The state of ``client``, created on first use."""
    state: ClientState | None = client.__dict__.get(_ATTR)
    if state is None:
        state = ClientState(check_client(client))
        client.__dict__[_ATTR] = state
    return state


def set_state(client: AnyRedis, **options: Any) -> ClientState:
    """Create or update the state of ``client`` with ``options`` (used by connect())."""
    state = state_of(client)
    for name, value in options.items():
        setattr(state, name, value)
    return state


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)
