"""What the server can do, detected once per client and cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from ._commands import execute, execute_initialize
from ._connection import AnyRedis, is_cluster, state_of
from .errors import CommandError

# Commands whose presence changes how a primitive works (native command vs Lua fallback).
_PROBED_COMMANDS = ("delifeq", "hexpire", "xautoclaim", "blmove", "spublish")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server a client talks to and the optional commands it has.

    Attributes:
        name: ``"valkey"``, ``"redis"``, or what the server calls itself.
        version: the version as a tuple of ints, e.g. ``(7, 0, 15)``.
        set_ifeq: ``SET key value IFEQ old`` (Valkey 8.1+).
        delifeq: ``DELIFEQ key value`` (Valkey 9.0+).
        hexpire: per-field hash TTLs (Redis 7.4+, Valkey 9.0+).
        xautoclaim: ``XAUTOCLAIM`` (Redis 6.2+).
        blmove: ``BLMOVE`` (Redis 6.2+).
        sharded_pubsub: ``SPUBLISH`` / ``SSUBSCRIBE`` (Redis 7.0+).
    """

    name: str
    version: tuple[int, ...]
    set_ifeq: bool
    delifeq: bool
    hexpire: bool
    xautoclaim: bool
    blmove: bool
    sharded_pubsub: bool

    @property
    def version_string(self) -> str:
        return ".".join(str(part) for part in self.version)

    def __str__(self) -> str:
        return f"{self.name} {self.version_string}"


async def server_info(client: AnyRedis) -> ServerInfo:
    """Detect (once per client, then cached) the server's name, version and commands.

    Detection is read-only and needs no ``@dangerous`` command: ``HELLO`` (name and
    version; ``INFO server`` only where HELLO is missing), ``COMMAND INFO`` (which
    optional commands exist) and ``COMMAND DOCS SET`` (whether SET takes ``IFEQ``). It
    writes no key, so it works under an ACL limited to the application's key prefix.
    A command the ACL denies counts as "not available" (the portable fallback is used).

    Raises:
        ConnectionFailed, CommandTimeout: the server could not be asked (nothing is
            cached; the next call asks again).

    Cancellation: safe at any point; a cancelled detection is simply redone next time.
    """
    state = state_of(client)
    if state.info is not None:
        return state.info
    if state.info_lock is None:
        state.info_lock = anyio.Lock()
    async with state.info_lock:
        if state.info is None:
            state.info = await _detect(client)
        return state.info


async def _node_options(client: AnyRedis) -> dict[str, Any]:
    # On a cluster the slot router sends keyless commands to one of the primaries
    # (they all run the same server).
    if is_cluster(client):
        await execute_initialize(client)
    return {}


async def _detect(client: AnyRedis) -> ServerInfo:
    options = await _node_options(client)
    name, version = await _name_and_version(client, options)
    present = await _commands_present(client, options)
    return ServerInfo(
        name=name,
        version=version,
        set_ifeq=await _has_set_ifeq(client, options),
        delifeq=present["delifeq"],
        hexpire=present["hexpire"],
        xautoclaim=present["xautoclaim"],
        blmove=present["blmove"],
        sharded_pubsub=present["spublish"],
    )


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def _name_and_version(
    client: AnyRedis, options: dict[str, Any]
) -> tuple[str, tuple[int, ...]]:
    try:
        reply = await execute(client, "HELLO", **options)
    except CommandError:
        reply = None  # no HELLO (before 6.0, some forks) or denied: INFO is the fallback
    if reply is not None:
        fields = reply if isinstance(reply, dict) else _pairs(reply)
        found = {_text(k).lower(): v for k, v in fields.items()}
        name = _text(found.get("server", "redis")).lower()
        version_text = _text(found.get("version", "0"))
    else:
        try:
            info: dict[str, Any] = await execute(client, "INFO", "server", **options)
        except CommandError:
            info = {}
        if "valkey_version" in info or info.get("server_name") == "valkey":
            name = "valkey"
            version_text = str(info.get("valkey_version", info.get("redis_version", "0")))
        else:
            name = str(info.get("server_name") or "redis")
            version_text = str(info.get("redis_version", "0"))
    version = tuple(int(part) for part in version_text.split(".") if part.isdigit())
    return name, version


def _pairs(flat: Any) -> dict[Any, Any]:
    if not isinstance(flat, list | tuple):
        return {}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


async def _commands_present(client: AnyRedis, options: dict[str, Any]) -> dict[str, bool]:
    try:
        reply = await execute(client, "COMMAND INFO", *_PROBED_COMMANDS, **options)
    except CommandError:
        # No COMMAND INFO (or denied): assume none of the optional commands.
        return dict.fromkeys(_PROBED_COMMANDS, False)
    if isinstance(reply, dict):  # RESP3 / some callbacks return a mapping
        found = {str(k).lower() for k, v in reply.items() if v}
        return {name: name in found for name in _PROBED_COMMANDS}
    return {name: bool(entry) for name, entry in zip(_PROBED_COMMANDS, reply, strict=False)}


async def _has_set_ifeq(client: AnyRedis, options: dict[str, Any]) -> bool:
    # IFEQ is an option of SET, not a command, so COMMAND INFO cannot tell; the command's
    # documentation lists its arguments (Redis 7+, Valkey). Where COMMAND DOCS is missing
    # (Redis 6.2, which has no IFEQ either) or denied, the Lua fallback is used.
    try:
        reply = await execute(client, "COMMAND DOCS", "SET", **options)
    except CommandError:
        return False
    return _mentions(reply, b"ifeq")


def _mentions(reply: Any, word: bytes) -> bool:
    if isinstance(reply, bytes | str):
        text = reply.encode() if isinstance(reply, str) else reply
        return text.lower() == word
    if isinstance(reply, dict):
        return any(_mentions(k, word) or _mentions(v, word) for k, v in reply.items())
    if isinstance(reply, list | tuple):
        return any(_mentions(item, word) for item in reply)
    return False
