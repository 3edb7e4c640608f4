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

from ._capabilities import server_info
from ._commands import Arg, execute, execute_script
from ._connection import AnyRedis
from ._keys import KeyT
from .errors import ConfigurationError


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

    async def run(self, client: AnyRedis, keys: Sequence[KeyT], args: Sequence[Arg] = ()) -> Any:
        """Run the script on the server that owns ``keys`` and return its raw reply.

        Raises:
            ScriptError: the script raised an error on the server.
            ConnectionFailed, CommandTimeout: the server could not be reached in time.

        Cancellation: a cancelled caller's reply is discarded; what the script did on
        the server (it runs atomically) stays done.
        """
        return await execute_script(client, self.sha, self.source, keys, args)


_COMPARE_AND_DELETE = Script.load("compare_and_delete")


async def delete_if_equal(client: AnyRedis, key: KeyT, value: Arg) -> bool:
    """Delete ``key`` only if it holds ``value``; True if it was deleted.

    Uses ``DELIFEQ`` where the server has it (Valkey 9+), a Lua script elsewhere.
    """
    info = await server_info(client)
    if info.delifeq:
        return bool(await execute(client, "DELIFEQ", key, value))
    return bool(await _COMPARE_AND_DELETE.run(client, [key], [value]))
