"""How values become bytes in Redis and back.

JSON is the default (orjson when installed, else the standard library). MessagePack is
optional (the ``msgpack`` extra). :class:`RawSerializer` stores bytes/str untouched.
Pickle is never used unless you pass :class:`PickleSerializer` yourself: unpickling data
that someone else could write to Redis runs their code.

Every serializer raises :class:`~aioredispatterns.errors.SerializationError` for a value
it cannot encode, so a primitive fails *before* it writes anything.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigurationError, SerializationError

__all__ = (
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "RawSerializer",
    "Serializer",
    "default_serializer",
)


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back. Implementations must be stateless and pure."""

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise SerializationError if it cannot be encoded."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; raise SerializationError if it is not valid."""
        ...


class JsonSerializer:
    """JSON via orjson when installed (fast, strict), else the standard ``json`` module.

    Tuples come back as lists and dict keys must be str: JSON has no other shapes.
    """

    __slots__ = ("_orjson",)

    def __init__(self, *, use_orjson: bool | None = None) -> None:
        module: Any = None
        if use_orjson is not False:
            try:
                import orjson

                module = orjson
            except ImportError:
                if use_orjson:
                    raise ConfigurationError(
                        "orjson is not installed (pip install 'aioredispatterns[orjson]')"
                    ) from None
        self._orjson = module

    def dumps(self, value: Any) -> bytes:
        try:
            if self._orjson is not None:
                return bytes(self._orjson.dumps(value))
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"value is not JSON-serializable: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            if self._orjson is not None:
                return self._orjson.loads(data)
            return json.loads(data)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"stored data is not valid JSON: {exc}") from exc

    def __repr__(self) -> str:
        return f"JsonSerializer(orjson={self._orjson is not None})"


class MsgpackSerializer:
    """MessagePack (the ``msgpack`` extra): compact, keeps bytes distinct from str."""

    __slots__ = ("_msgpack",)

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError:
            raise ConfigurationError(
                "msgpack is not installed (pip install 'aioredispatterns[msgpack]')"
            ) from None
        self._msgpack = msgpack

    def dumps(self, value: Any) -> bytes:
        try:
            return bytes(self._msgpack.packb(value, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"value is not msgpack-serializable: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return self._msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise SerializationError(f"stored data is not valid msgpack: {exc}") from exc

    def __repr__(self) -> str:
        return "MsgpackSerializer()"


class RawSerializer:
    """Bytes in, bytes out; str is stored as UTF-8 (and read back as bytes)."""

    __slots__ = ()

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise SerializationError(f"RawSerializer stores bytes or str, not {type(value).__name__}")

    def loads(self, data: bytes) -> Any:
        return bytes(data)

    def __repr__(self) -> str:
        return "RawSerializer()"


class PickleSerializer:
    """Pickle. Opt-in only: never unpickle data that anyone you do not trust can write."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        self._protocol = protocol

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=self._protocol)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"value cannot be pickled: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"stored data cannot be unpickled: {exc}") from exc

    def __repr__(self) -> str:
        return "PickleSerializer()"


def default_serializer() -> Serializer:
    """The serializer primitives use when none is given: JSON."""
    return JsonSerializer()


def check_serializer(serializer: object) -> Serializer:
    """Return ``serializer`` if it has dumps/loads, else raise ConfigurationError."""
    if not isinstance(serializer, Serializer):
        raise ConfigurationError(
            f"serializer must have dumps() and loads(), got {type(serializer).__name__}"
        )
    return serializer
