"""Commands packed and replies parsed exactly as redis-py's own client would.

The command layer writes and reads redis-py's connections itself (``_pipeline``,
``_commands.Dedicated``), so the two ends of redis-py's ``execute_command`` live here:

* :func:`packer_of`: the client's encoder and the fastest packer that produces the same
  bytes (hiredis's when it can);
* :func:`parse_reply`: the client's response callback applied to a raw reply, with the
  per-command options redis-py understands (``NEVER_DECODE``, ``EMPTY_RESPONSE``,
  ``keys``) taken out first, as redis-py's ``parse_response`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.client import CaseInsensitiveDict
from redis.connection import PythonRespSerializer
from redis.typing import EncodableT

from ._connection import AnyRedis, state_of

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is an optional extra
    hiredis = None  # type: ignore[assignment]

__all__ = (
    "EMPTY_RESPONSE",
    "NEVER_DECODE",
    "apply_callback",
    "command_name",
    "packer_of",
    "parse_reply",
)

_BUFFER_CUTOFF = 6000  # redis-py's: larger arguments are sent as separate chunks

#: Per-command options of redis-py's ``parse_response`` (``redis.client``'s names): read
#: the reply without decoding; the value to return instead of an error reply.
NEVER_DECODE = "NEVER_DECODE"
EMPTY_RESPONSE = "EMPTY_RESPONSE"
_NOT_FOR_CALLBACKS = (NEVER_DECODE, EMPTY_RESPONSE, "keys")

Packer = Callable[[tuple[EncodableT, ...]], list[bytes]]


def command_name(first: EncodableT) -> str:
    """The upper-case name of a command from its first argument (``"client setname"``
    -> ``"CLIENT SETNAME"``)."""
    name = first if isinstance(first, str) else bytes(first).decode()  # type: ignore[arg-type]
    return name.upper()


def packer_of(client: AnyRedis) -> Packer:
    """The client's packer (built once per client): see :func:`_packer`."""
    state = state_of(client)
    if state.packer is None:
        state.packer = _packer(client)
    return state.packer


# hiredis packs ints itself and crashes the process (not an exception) on one of more
# than 4300 digits: anything outside 64 bits goes through redis-py's Python packer, which
# raises instead.
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1


def _packer(client: AnyRedis) -> Packer:
    """The fastest packer that encodes exactly as redis-py's encoder would.

    An argument that cannot be encoded (a bool, None, a lone surrogate, an int too large
    to print) raises redis-py's ``DataError`` (bad input: nothing was sent).
    """
    if isinstance(client, RedisCluster):
        encoder = client.get_encoder()
    else:
        encoder = client.connection_pool.get_encoder()  # type: ignore[no-untyped-call]
    python = PythonRespSerializer(_BUFFER_CUTOFF, encoder.encode)

    def pack_python(args: tuple[EncodableT, ...]) -> list[bytes]:
        try:
            return python.pack(*args)  # type: ignore[no-untyped-call,no-any-return]
        except (ValueError, UnicodeError) as exc:
            raise rex.DataError(f"a command argument cannot be encoded: {exc}") from None

    if hiredis is None or encoder.encoding.lower().replace("-", "") != "utf8":
        return pack_python

    pack_command = hiredis.pack_command

    def pack_hiredis(args: tuple[EncodableT, ...]) -> list[bytes]:
        first = args[0]
        if (" " in first) if isinstance(first, str) else (b" " in first):  # type: ignore[operator]
            return pack_python(args)
        buffers = False
        for arg in args:
            kind = arg.__class__
            if kind is int:
                if not _MIN_INT <= arg <= _MAX_INT:  # type: ignore[operator]
                    return pack_python(args)
            elif kind is bytearray or kind is memoryview:
                buffers = True
        if buffers:  # hiredis takes bytes only: as redis-py's HiredisRespSerializer does
            args = tuple(
                bytes(arg) if isinstance(arg, bytearray | memoryview) else arg for arg in args
            )
        try:
            return [pack_command(args)]  # type: ignore[arg-type]
        except (TypeError, UnicodeError) as exc:  # redis-py's encoder calls these DataError
            raise rex.DataError(str(exc)) from None

    return pack_hiredis


def callback_of(callbacks: Mapping[Any, Any], name: str) -> Callable[..., Any] | None:
    """The response callback of the command ``name`` (upper case) in ``callbacks``."""
    if isinstance(callbacks, CaseInsensitiveDict):
        # It keeps upper-case keys: a plain dict lookup is exact and skips its upper().
        return dict.get(callbacks, name)
    return callbacks.get(name)


def parse_reply(
    callbacks: Mapping[Any, Any], name: str, response: Any, options: dict[str, Any]
) -> Any:
    """``response`` parsed by the response callback of the command ``name``, if any.

    The result may be awaitable (redis-py's asyncio client accepts async callbacks): a
    caller that serves users awaits it, as redis-py's ``parse_response`` does.
    """
    callback = callback_of(callbacks, name)
    if callback is None:
        return response
    if options and ("keys" in options or NEVER_DECODE in options or EMPTY_RESPONSE in options):
        options = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
    return callback(response, **options)


def apply_callback(
    client: AnyRedis, first: EncodableT, response: Any, options: dict[str, Any]
) -> Any:
    """``response`` parsed by redis-py's response callback for the command ``first``."""
    return parse_reply(client.response_callbacks, command_name(first), response, options)
