"""Lua scripts: read from ``_lua/*.lua`` once, run by EVALSHA.

A script's SHA1 is computed from its text, so nothing has to be registered up front:
the first EVALSHA on a server that has never seen the script (or lost it to SCRIPT
FLUSH, a restart or a failover) answers NOSCRIPT, and that one call is re-sent as EVAL,
which also caches the script on that server (on a cluster, on the node that owns the
keys). Every later call is a plain EVALSHA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from redis import exceptions as rex
from redis.typing import EncodableT

from ._capabilities import server_info
from ._client import AnyRedis
from ._commands import execute_raw
from ._keys import KeyT
from ._translate import map_redis_errors, reraise
from .errors import ConfigurationError, ScriptError


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script of ``_lua/``; call :meth:`run` with its KEYS and ARGV."""

    name: str
    source: bytes = field(repr=False)
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        """Read ``_lua/<name>.lua`` from the package (call once, at import time)."""
        resource = files(__package__).joinpath("_lua", f"{name}.lua")
        if not resource.is_file():
            raise ConfigurationError(f"no Lua script named {name!r}")
        source = resource.read_bytes()
        return cls(name=name, source=source, sha=hashlib.sha1(source).hexdigest())

    async def run(
        self, client: AnyRedis, keys: Sequence[KeyT], args: Sequence[EncodableT] = ()
    ) -> Any:
        """Run the script on the server that owns ``keys`` and return its raw reply.

        Raises:
            ScriptError: the script raised an error on the server.
            ConnectionFailed, CommandTimeout: the server could not be reached in time.

        Cancellation: a cancelled caller's reply is discarded; what the script did on
        the server (it runs atomically) stays done.
        """
        # Plain try/except rather than map_redis_errors(): this is every primitive's hot path.
        try:
            try:
                return await execute_raw(client, "EVALSHA", self.sha, len(keys), *keys, *args)
            except rex.NoScriptError:
                return await execute_raw(client, "EVAL", self.source, len(keys), *keys, *args)
        except rex.ResponseError as exc:
            raise ScriptError(str(exc)) from exc
        except Exception as exc:
            reraise(exc)


_COMPARE_AND_DELETE = Script.load("compare_and_delete")


async def delete_if_equal(client: AnyRedis, key: KeyT, value: EncodableT) -> bool:
    """Delete ``key`` only if it holds ``value``; True if it was deleted.

    Uses ``DELIFEQ`` where the server has it (Valkey 9+), a Lua script elsewhere.
    """
    info = await server_info(client)
    if info.delifeq:
        with map_redis_errors():
            return bool(await execute_raw(client, "DELIFEQ", key, value))
    return bool(await _COMPARE_AND_DELETE.run(client, [key], [value]))
