"""What the server can do, detected once per client and cached."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from redis import exceptions as rex

from ._client import AnyRedis, is_cluster, state_of
from ._translate import map_redis_errors

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

    Cancellation: safe at any point; a cancelled detection is simply redone next time.
    """
    state = state_of(client)
    if state.info is not None:
        return state.info
    if state.info_lock is None:
        state.info_lock = anyio.Lock()
    async with state.info_lock:
        if state.info is None:
            with map_redis_errors():
                state.info = await _detect(client)
        return state.info


def _node_options(client: AnyRedis) -> dict[str, Any]:
    if is_cluster(client):
        return {"target_nodes": client.get_default_node()}  # type: ignore[union-attr]
    return {}


async def _detect(client: AnyRedis) -> ServerInfo:
    options = _node_options(client)
    info: dict[str, Any] = await client.execute_command("INFO", "server", **options)
    if "valkey_version" in info or info.get("server_name") == "valkey":
        name = "valkey"
        version_text = str(info.get("valkey_version", info.get("redis_version", "0")))
    else:
        name = str(info.get("server_name") or "redis")
        version_text = str(info.get("redis_version", "0"))
    version = tuple(int(part) for part in version_text.split(".") if part.isdigit())
    present = await _commands_present(client, options)
    return ServerInfo(
        name=name,
        version=version,
        set_ifeq=await _has_set_ifeq(client),
        delifeq=present["delifeq"],
        hexpire=present["hexpire"],
        xautoclaim=present["xautoclaim"],
        blmove=present["blmove"],
        sharded_pubsub=present["spublish"],
    )


async def _commands_present(client: AnyRedis, options: dict[str, Any]) -> dict[str, bool]:
    try:
        reply = await client.execute_command("COMMAND INFO", *_PROBED_COMMANDS, **options)
    except rex.ResponseError:
        # Servers without COMMAND INFO: assume none of the optional commands.
        return dict.fromkeys(_PROBED_COMMANDS, False)
    if isinstance(reply, dict):  # RESP3 / some callbacks return a mapping
        found = {str(k).lower() for k, v in reply.items() if v}
        return {name: name in found for name in _PROBED_COMMANDS}
    return {name: bool(entry) for name, entry in zip(_PROBED_COMMANDS, reply, strict=False)}


async def _has_set_ifeq(client: AnyRedis) -> bool:
    # IFEQ is an option of SET, not a command, so COMMAND INFO cannot tell. A conditional
    # SET on a random key that does not exist writes nothing where IFEQ is understood
    # and is a syntax error where it is not.
    probe = f"arp:probe:{{{uuid.uuid4().hex}}}"
    try:
        await client.execute_command("SET", probe, "1", "IFEQ", "0")
    except rex.ResponseError:
        return False
    return True
