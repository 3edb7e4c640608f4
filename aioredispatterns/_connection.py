"""connect(): the one place that builds a client and its connection pool, and the state
the library keeps per client.

The state hangs off the client object itself (no module-level registry), so it lives
and dies with the client, and two clients never share it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload
from urllib.parse import parse_qs, urlsplit, urlunsplit

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ._backoff import full_jitter
from ._validate import check_choice, check_count, check_flag, check_seconds
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._capabilities import ServerInfo
    from ._cluster import SlotRouter
    from ._pipeline import AutoPipeline

AnyRedis: TypeAlias = "Redis | RedisCluster"

_ATTR = STATE_ATTRIBUTE = "_aioredispatterns_state"


class ClientState:
    """What the library caches for one client: server capabilities, the auto-pipeline."""

    __slots__ = (
        "auto_pipeline",
        "backoff_base",
        "backoff_cap",
        "client",
        "info",
        "info_lock",
        "node_factory",
        "packer",
        "pipeline",
        "retries",
        "router",
    )

    def __init__(self, client: AnyRedis, *, auto_pipeline: bool = True) -> None:
        self.client = client
        self.auto_pipeline = auto_pipeline
        # The retry rule of the command layer (see _commands): connect() sets these.
        self.retries = 3
        self.backoff_base = 0.05
        self.backoff_cap = 1.0
        self.info: ServerInfo | None = None
        self.info_lock: anyio.Lock | None = None
        self.pipeline: AutoPipeline | None = None
        self.packer: Callable[[tuple[Any, ...]], list[bytes]] | None = None
        # Cluster clients: the slot router, and how it builds a client per node.
        self.router: SlotRouter | None = None
        self.node_factory: Callable[[str, int], Redis] | None = None


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


def is_client(value: object) -> bool:
    """Whether ``value`` is a redis.asyncio client (standalone or cluster)."""
    return isinstance(value, Redis | RedisCluster)


def is_cluster(client: AnyRedis) -> bool:
    """Whether ``client`` is a cluster client (on every command: cached per class, since
    redis-py's ``RedisCluster`` is a Protocol and ``isinstance`` on it is slow)."""
    kind = client.__class__
    found = _IS_CLUSTER.get(kind)
    if found is None:
        found = _IS_CLUSTER[kind] = issubclass(kind, RedisCluster)
    return found


_IS_CLUSTER: dict[type, bool] = {}


_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SCHEMES = {"redis", "rediss", "unix"}

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_MAX_CONNECTIONS = 100_000
_MAX_RETRIES = 100
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _split_cluster_url(url: str) -> tuple[str, bool]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        return urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES[scheme])), True
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unsupported URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or rediss+cluster://"
        )
    values = parse_qs(parts.query).get("cluster")
    if values is None:
        return url, False
    # redis-py does not know this option: take it out of the query whatever its value.
    flag = values[-1].lower()
    if flag not in _TRUE | _FALSE:
        raise ConfigurationError(f"?cluster= must be true or false, got {values[-1]!r}")
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("cluster="))
    return urlunsplit(parts._replace(query=query)), flag in _TRUE


@overload
def connect(
    url: str = ...,
    *,
    cluster: Literal[True],
    max_connections: int = ...,
    pool_timeout: float = ...,
    socket_timeout: float | None = ...,
    connect_timeout: float = ...,
    retries: int = ...,
    backoff_base: float = ...,
    backoff_cap: float = ...,
    health_check_interval: float = ...,
    protocol: Literal[2, 3] = ...,
    username: str | None = ...,
    password: str | None = ...,
    auto_pipeline: bool = ...,
    **redis_options: Any,
) -> RedisCluster: ...


@overload
def connect(
    url: str = ...,
    *,
    cluster: Literal[False],
    max_connections: int = ...,
    pool_timeout: float = ...,
    socket_timeout: float | None = ...,
    connect_timeout: float = ...,
    retries: int = ...,
    backoff_base: float = ...,
    backoff_cap: float = ...,
    health_check_interval: float = ...,
    protocol: Literal[2, 3] = ...,
    username: str | None = ...,
    password: str | None = ...,
    auto_pipeline: bool = ...,
    **redis_options: Any,
) -> Redis: ...


@overload
def connect(
    url: str = ...,
    *,
    cluster: bool | None = ...,
    max_connections: int = ...,
    pool_timeout: float = ...,
    socket_timeout: float | None = ...,
    connect_timeout: float = ...,
    retries: int = ...,
    backoff_base: float = ...,
    backoff_cap: float = ...,
    health_check_interval: float = ...,
    protocol: Literal[2, 3] = ...,
    username: str | None = ...,
    password: str | None = ...,
    auto_pipeline: bool = ...,
    **redis_options: Any,
) -> Redis | RedisCluster: ...


def connect(
    url: str = DEFAULT_URL,
    *,
    cluster: bool | None = None,
    max_connections: int = 32,
    pool_timeout: float = 5.0,
    socket_timeout: float | None = 5.0,
    connect_timeout: float = 2.0,
    retries: int = 3,
    backoff_base: float = 0.05,
    backoff_cap: float = 1.0,
    health_check_interval: float = 15.0,
    protocol: Literal[2, 3] = 2,
    username: str | None = None,
    password: str | None = None,
    auto_pipeline: bool = True,
    **redis_options: Any,
) -> Redis | RedisCluster:
    """Build a redis-py asyncio client on a bounded connection pool.

    Args:
        url: ``redis://[user:pass@]host:port/db``, ``rediss://`` for TLS, ``unix://``;
            ``redis+cluster://`` (or ``?cluster=true``, or ``cluster=True``) for Redis
            Cluster, which returns a :class:`redis.asyncio.cluster.RedisCluster`.
        max_connections: the pool's size (per node on a cluster).
        pool_timeout: how long a caller waits for a free pooled connection before
            :class:`~aioredispatterns.errors.PoolTimeout` (a cluster node's pool does not
            wait: it raises at once when all its connections are busy).
        socket_timeout: how long to wait for a reply (``None``: forever).
        connect_timeout: how long to wait for a TCP/TLS connect.
        retries: how many times establishing a connection is retried, with exponential
            backoff and full jitter between ``backoff_base`` and ``backoff_cap`` seconds
            (nothing was sent, so this is always safe). The library never re-sends one of
            its own commands that may have reached the server, unless it is idempotent
            (a batch of reads, say). Commands you send yourself through the returned
            redis-py client follow redis-py's rule: they are retried this many times after
            a connection error, so such a command may run twice (at least once); this
            holds for the auto-pipelined ones too.
        health_check_interval: idle seconds after which a connection is PINGed before use.
        protocol: 2 (RESP2, default) or 3 (RESP3).
        username, password: ACL credentials (they may also be in the URL).
        auto_pipeline: batch the short commands issued in one event-loop iteration
            into one round trip (see README): the library's and your own
            (``await client.get(key)``). The client is then an
            :class:`~aioredispatterns.AutoPipelinedRedis` (a ``redis.asyncio.Redis``
            subclass), or on a cluster an :class:`~aioredispatterns.AutoPipelinedRedisCluster`
            (a ``RedisCluster`` subclass whose single-key commands ride the auto-pipeline
            of their key's node). ``False``: plain redis-py clients for your commands.
        **redis_options: passed through to redis-py (e.g. ``ssl_ca_certs``). No
            ``CLIENT SETINFO`` is sent on connect (it is denied under least-privilege
            ACLs on Redis 6.2); pass ``driver_info=redis.DriverInfo(...)`` to send it.

    The client uses hiredis for parsing when it is installed. Close it with
    ``await client.aclose()`` or ``async with``. This is not a coroutine (nothing to
    cancel): no connection is opened until the first command.

    Raises:
        ConfigurationError: an option is out of range or the URL scheme is unknown.
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError("url must be a non-empty str")
    try:
        url, cluster_from_url = _split_cluster_url(url)
    except ValueError as exc:  # urlsplit: an unbalanced IPv6 bracket and the like
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"malformed URL {url!r}: {exc}") from None
    use_cluster = cluster_from_url if cluster is None else cluster
    if cluster is not None:
        check_flag("cluster", cluster)
    check_count("max_connections", max_connections, minimum=1, maximum=_MAX_CONNECTIONS)
    check_seconds("pool_timeout", pool_timeout)
    if socket_timeout is not None:
        check_seconds("socket_timeout", socket_timeout)
    check_seconds("connect_timeout", connect_timeout)
    check_seconds("backoff_base", backoff_base)
    check_seconds("backoff_cap", backoff_cap)
    check_seconds("health_check_interval", health_check_interval)
    check_count("retries", retries, maximum=_MAX_RETRIES)
    check_choice("protocol", protocol, (2, 3))
    check_flag("auto_pipeline", auto_pipeline)

    # Only connection errors are retried: a timed-out command may still be running on
    # the server, and re-sending a non-idempotent one (INCR, XADD) would apply it twice.
    # The library's own commands never reach redis-py's command retry (the command layer
    # decides, see _commands); this policy retries their connection set-up (nothing was
    # sent yet) and the commands you send yourself through the returned client.
    retry = Retry(
        _JitterBackoff(backoff_base, backoff_cap),
        retries,
        supported_errors=(RedisConnectionError,),
    )
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": health_check_interval,
        "protocol": protocol,
        # No CLIENT SETINFO on connect: CLIENT is @dangerous on Redis 6.2, so it would be
        # denied (and logged) under a least-privilege ACL. Pass driver_info=... to send it.
        "driver_info": None,
        **redis_options,
    }
    for name, credential in (("username", username), ("password", password)):
        if credential is not None:
            if not isinstance(credential, str):
                raise ConfigurationError(f"{name} must be a str, got {type(credential).__name__}")
            try:
                credential.encode()
            except UnicodeEncodeError:
                raise ConfigurationError(f"{name} is not valid Unicode") from None
            options[name] = credential

    client: Redis | RedisCluster
    try:
        if use_cluster:
            client = _cluster_class(auto_pipeline).from_url(
                url, max_connections=max_connections, retry=retry, **options
            )
            node_options = _node_options(client, timeout=pool_timeout, retry=retry)
        else:
            pool = BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=pool_timeout, retry=retry, **options
            )
            # from_pool: closing the client closes the pool it owns. With the
            # auto-pipeline on, the user's own short commands ride it too (_client).
            client = _standalone_class(auto_pipeline).from_pool(pool)
    except (ValueError, TypeError) as exc:
        # redis-py parses the URL and options here (a port out of range, a bad query).
        raise ConfigurationError(f"cannot build a client for {url!r}: {exc}") from None
    rules = {
        "auto_pipeline": auto_pipeline,
        "retries": retries,
        "backoff_base": backoff_base,
        "backoff_cap": backoff_cap,
    }
    set_state(client, **rules)
    if use_cluster:

        def node_client(host: str, port: int) -> Redis:
            node = Redis.from_pool(BlockingConnectionPool(host=host, port=port, **node_options))
            set_state(node, **rules)
            return node

        set_state(client, node_factory=node_client)
    return client


def _cluster_class(auto_pipeline: bool) -> type[ClusterClient]:
    if not auto_pipeline:
        return ClusterClient
    from ._client import AutoPipelinedRedisCluster  # it imports the pipeline, which imports us

    return AutoPipelinedRedisCluster


def _standalone_class(auto_pipeline: bool) -> type[Redis]:
    if not auto_pipeline:
        return Redis
    from ._client import AutoPipelinedRedis  # it imports the pipeline, which imports us

    return AutoPipelinedRedis


# What a cluster client's connection options hold that a node's pool must not get.
_CLUSTER_ONLY = frozenset({"response_callbacks", "himport_registry", "host", "port"})


def _node_options(cluster: RedisCluster, **pool: Any) -> dict[str, Any]:
    """The pool options of one cluster node: the cluster client's connection options
    (parsed from the URL: credentials, TLS, timeouts) on a blocking bounded pool."""
    options = {k: v for k, v in cluster.connection_kwargs.items() if k not in _CLUSTER_ONLY}
    options.update(pool)
    return options


def node_factory_of(cluster: RedisCluster) -> Callable[[str, int], Redis]:
    """How the slot router builds a client for one node of ``cluster``.

    Clients from :func:`connect` carry their own; for any other ``RedisCluster`` the
    nodes get its connection options and its retry policy for connecting.
    """
    state = state_of(cluster)
    if state.node_factory is not None:
        return state.node_factory
    options = _node_options(cluster, retry=cluster.retry)

    def node_client(host: str, port: int) -> Redis:
        node = Redis.from_pool(BlockingConnectionPool(host=host, port=port, **options))
        set_state(
            node,
            auto_pipeline=state.auto_pipeline,
            retries=state.retries,
            backoff_base=state.backoff_base,
            backoff_cap=state.backoff_cap,
        )
        return node

    state.node_factory = node_client
    return node_client


class ClusterClient(RedisCluster):
    """redis-py's ``RedisCluster`` for your own commands; :func:`connect` returns it with
    ``auto_pipeline=False`` (by default its subclass ``AutoPipelinedRedisCluster``).

    The library's commands go through its slot router instead (``_cluster``), whose
    per-node pools are closed with the client.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """redis-py's ``execute_command``, remembering (for :meth:`aclose`) that redis-py
        is running a command."""
        return self._redis_py_command(*args, **kwargs)

    async def _redis_py_command(self, *args: Any, **kwargs: Any) -> Any:
        inside = _INSIDE_REDIS_PY.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            _INSIDE_REDIS_PY.reset(inside)

    async def aclose(self) -> None:
        """Close the client and the slot router's node pools (a later command of the
        library's opens a new router, as redis-py reconnects a client used again).

        redis-py also calls this itself, in the middle of a command, to reset its view of
        the cluster (CLUSTERDOWN, a node's pool full, every ``reinitialize_steps`` MOVED):
        that resets redis-py's nodes only, and the library's traffic goes on.
        """
        state: ClientState | None = self.__dict__.get(_ATTR)
        try:
            if state is not None and state.router is not None and not _INSIDE_REDIS_PY.get():
                router, state.router = state.router, None
                await router.close()
        finally:
            await super().aclose()


# True while redis-py runs a command of a ClusterClient (see ClusterClient.aclose).
_INSIDE_REDIS_PY: ContextVar[bool] = ContextVar("arp_inside_redis_py_cluster", default=False)


class _JitterBackoff(AbstractBackoff):
    """redis-py's backoff interface over the library's one backoff (``_backoff``)."""

    def __init__(self, base: float, cap: float) -> None:
        self._base = base
        self._cap = cap

    def reset(self) -> None:
        return None

    def compute(self, failures: int) -> float:
        return full_jitter(failures - 1, base=self._base, cap=self._cap)
