"""How values become bytes in Redis and back.

JSON is the default (orjson when installed, else the standard library; both accept the
same values and write the same bytes). MessagePack is optional (the ``msgpack`` extra).
:class:`RawSerializer` stores bytes/str untouched.

Pickle is never used unless you ask for it, and then only signed: a
:class:`PickleSerializer` needs a secret key, signs every payload with HMAC-SHA256 and
refuses (``SerializationError``) to unpickle anything whose signature does not check out,
before ``pickle.loads`` sees a byte. Unpickling runs code, so an unsigned pickle in Redis
would let anyone who can write a key or publish a message run theirs in your process.

Every serializer raises :class:`~aioredispatterns.errors.SerializationError` for a value
it cannot encode, so a primitive fails *before* it writes anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import json.encoder
import math
import pickle
import re
from collections.abc import Iterable
from typing import Any, Final, Protocol, runtime_checkable

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


# --------------------------------------------------------------------------- JSON
#
# One gate decides what JSON accepts (``_check_json``, a walk over the value), whichever
# backend then writes it: orjson natively writes values outside the JSON model (UUID,
# Enum, ints up to 2**64 - 1, NaN as ``null``) and the stdlib accepts subclasses and
# non-str keys, and neither can be told not to. The stdlib path writes the bytes itself
# (``_write_json``) because its C encoder spells small floats differently (``1e-05``
# where orjson writes ``0.00001``) and offers no hook for floats.

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_MAX_DEPTH: Final = 254  # orjson's own limit: deeper nesting (or a cycle) is refused
_LOADS_INT_MAX: Final = 2**64 - 1  # orjson.loads keeps ints up to here, floats beyond
_ACCEPTED: Final = "None, bool, int, float, str, list, tuple, dict with str keys"
# A \uD800-\uDFFF escape in a document: the stdlib decodes a lone one, orjson refuses it.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
# What json.dumps(..., ensure_ascii=False) quotes strings with (C-accelerated).
_quote: Final = json.encoder.encode_basestring


def _not_json(value: object) -> SerializationError:
    return SerializationError(
        f"JSON cannot encode {type(value).__qualname__} (it takes {_ACCEPTED}; "
        "subclasses of these are refused too)"
    )


def _bad_int(value: int) -> SerializationError:
    return SerializationError(
        f"int {value} is outside the JSON range [-2**63, 2**63 - 1] (encode it as a str)"
    )


def _bad_float(value: float) -> SerializationError:
    return SerializationError(f"JSON has no {value!r}: floats must be finite")


def _bad_key(key: object) -> SerializationError:
    return SerializationError(f"JSON object keys must be str, got {type(key).__qualname__}")


def _too_deep() -> SerializationError:
    return SerializationError(
        f"value nests deeper than {_MAX_DEPTH} lists/dicts (or contains itself)"
    )


def _check_json(value: Any, depth: int) -> None:
    """Raise SerializationError unless ``value`` is in the JSON model (exact types)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _bad_int(value)
    elif kind is float:
        if not math.isfinite(value):
            raise _bad_float(value)
    elif kind is list or kind is tuple:
        if depth >= _MAX_DEPTH:
            raise _too_deep()
        for item in value:
            if type(item) is not str:  # strings are the common leaf: skip the call
                _check_json(item, depth + 1)
    elif kind is dict:
        if depth >= _MAX_DEPTH:
            raise _too_deep()
        for key, item in value.items():
            if type(key) is not str:
                raise _bad_key(key)
            if type(item) is not str:
                _check_json(item, depth + 1)
    else:
        raise _not_json(value)


def _float_text(value: float) -> str:
    """``value`` as orjson writes it: the shortest repr, with exponent -5 spelled out
    (``0.00001234``) and negative exponents unpadded (``1e-7``, not ``1e-07``)."""
    if not math.isfinite(value):
        raise _bad_float(value)
    text = float.__repr__(value)
    mantissa, _, exponent = text.partition("e")
    if not exponent or exponent[0] == "+":
        return text
    if exponent == "-05":
        sign = "-" if mantissa[0] == "-" else ""
        return f"{sign}0.0000{mantissa.lstrip('-').replace('.', '')}"
    return f"{mantissa}e-{exponent[1:].lstrip('0')}"


def _write_json(value: Any, depth: int, out: list[str]) -> None:
    """Append ``value``'s JSON text to ``out``, exactly as orjson would write it."""
    kind = type(value)
    if kind is str:
        out.append(_quote(value))
    elif value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise _bad_int(value)
        out.append(int.__repr__(value))
    elif kind is float:
        out.append(_float_text(value))
    elif kind is list or kind is tuple:
        if depth >= _MAX_DEPTH:
            raise _too_deep()
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write_json(item, depth + 1, out)
        out.append("]")
    elif kind is dict:
        if depth >= _MAX_DEPTH:
            raise _too_deep()
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if type(key) is not str:
                raise _bad_key(key)
            out.append(f",{_quote(key)}:" if index else f"{_quote(key)}:")
            _write_json(item, depth + 1, out)
        out.append("}")
    else:
        raise _not_json(value)


def _parse_int(text: str) -> int | float:
    # As orjson.loads: an int when it fits in [-2**63, 2**64 - 1], else the nearest float.
    if len(text) < 19:  # below 10**18: always in range
        return int(text)
    if len(text) <= 21:  # "-9223372036854775808" or "18446744073709551615" at most
        number = int(text)
        if _INT_MIN <= number <= _LOADS_INT_MAX:
            return number
    return _parse_float(text)


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:40]} is out of the float range")
    return number


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _refuse_surrogates(value: Any) -> None:
    """Raise ValueError if a str in ``value`` holds a lone surrogate (orjson refuses them)."""
    if type(value) is str:
        value.encode()  # UnicodeEncodeError (a ValueError) on a lone surrogate
    elif type(value) is list:
        for item in value:
            _refuse_surrogates(item)
    elif type(value) is dict:
        for key, item in value.items():
            key.encode()
            _refuse_surrogates(item)


def _stdlib_loads(data: bytes | bytearray | memoryview | str) -> Any:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    # Strict UTF-8, as orjson: no BOM, no UTF-16/32 sniffing, no encoded surrogates.
    text = raw.decode()
    value = json.loads(
        text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant
    )
    if _SURROGATE_ESCAPE.search(text) is not None:
        _refuse_surrogates(value)
    return value


class JsonSerializer:
    """JSON via orjson when installed (fast), else the standard ``json`` module.

    Both backends accept exactly the same values and write exactly the same bytes, so a
    fleet that mixes installs reads and writes one format. Accepted: ``None``, ``bool``,
    ``int`` in [-2**63, 2**63 - 1], finite ``float``, ``str`` (no lone surrogates),
    ``list``, ``tuple`` (read back as a list) and ``dict`` with ``str`` keys, nested at most
    254 deep. Exact types only: anything else, subclasses included (``IntEnum``,
    ``OrderedDict``, named tuples, ``str`` subclasses), dataclasses, ``datetime``,
    ``UUID``, ``set``, ``bytes`` and ``Decimal`` raise ``SerializationError`` before
    anything is written; convert them yourself (``uuid.hex``, ``date.isoformat()``). The
    bytes are compact (no spaces), UTF-8 (not ``\\u`` escaped), keys in insertion order.

    Reading accepts standard JSON (RFC 8259) in strict UTF-8 and refuses ``NaN`` and
    ``Infinity``, numbers beyond the float range and lone surrogate escapes, with either
    backend. Integers in [-2**63, 2**64 - 1] come back as ``int``, larger ones as the
    nearest ``float`` (orjson's rule, mirrored by the stdlib path). One difference
    remains: documents nested more than a few hundred levels deep (which ``dumps`` never
    writes) load with orjson up to 1024 levels, while the stdlib stops at Python's
    recursion limit (``SerializationError``).

    Args:
        use_orjson: ``None`` (default) uses orjson if it is installed; ``True`` requires it
            (``ConfigurationError`` when missing); ``False`` always uses the stdlib.
    """

    __slots__ = ("_orjson",)

    def __init__(self, *, use_orjson: bool | None = None) -> None:
        if use_orjson is not None and not isinstance(use_orjson, bool):
            kind = type(use_orjson).__name__
            raise ConfigurationError(f"use_orjson must be None, True or False, got a {kind}")
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
        """Encode ``value`` as compact UTF-8 JSON; SerializationError if it is not JSON."""
        try:
            if self._orjson is not None:
                _check_json(value, 0)
                return bytes(self._orjson.dumps(value))
            out: list[str] = []
            _write_json(value, 0, out)
            return "".join(out).encode()
        except SerializationError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            # orjson's JSONEncodeError is a TypeError; a lone surrogate fails the stdlib's
            # UTF-8 encode (UnicodeEncodeError) as orjson fails it.
            raise SerializationError(f"value is not JSON-serializable: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        """Decode a JSON document; SerializationError if ``data`` is not valid JSON."""
        _check_bytes(data)
        try:
            if self._orjson is not None:
                return self._orjson.loads(data)
            return _stdlib_loads(data)
        except (TypeError, ValueError, RecursionError) as exc:
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
        """Encode ``value`` as MessagePack; SerializationError if it cannot be packed."""
        try:
            return bytes(self._msgpack.packb(value, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"value is not msgpack-serializable: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        """Decode MessagePack; SerializationError if ``data`` is not valid MessagePack."""
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
        """``bytes`` as they are, ``str`` as UTF-8; SerializationError for anything else."""
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            try:
                return value.encode()
            except UnicodeEncodeError as exc:
                raise SerializationError(f"str is not valid Unicode: {exc}") from None
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise SerializationError(f"RawSerializer stores bytes or str, not {type(value).__name__}")

    def loads(self, data: bytes) -> bytes:
        """The stored bytes, unchanged."""
        _check_bytes(data)
        return bytes(data)

    def __repr__(self) -> str:
        return "RawSerializer()"


_PICKLE_VERSION: Final = b"\x01"
_MAC_SIZE: Final = hashlib.sha256().digest_size
_PICKLE_HEADER_SIZE: Final = len(_PICKLE_VERSION) + _MAC_SIZE
_MIN_KEY_BYTES: Final = 16


def _check_bytes(data: object) -> None:
    # What Redis hands back is bytes; anything else is a caller's mistake.
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SerializationError(f"loads() takes bytes, got {type(data).__name__}")


def _pickle_key(key: object, name: str) -> bytes:
    if isinstance(key, str):
        try:
            key = key.encode()
        except UnicodeEncodeError:
            raise ConfigurationError(f"{name} is not valid Unicode") from None
    if not isinstance(key, bytes):
        raise ConfigurationError(f"{name} must be bytes or str, got {type(key).__name__}")
    if len(key) < _MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{name} must be at least {_MIN_KEY_BYTES} bytes (use secrets.token_bytes(32)), "
            f"got {len(key)}"
        )
    return key


class PickleSerializer:
    """Pickle, signed: any Python object, for deployments where only you write to Redis.

    Every payload is signed with HMAC-SHA256 under ``key``; stored form: one version byte
    (1), the 32-byte MAC (over the version byte and the pickle), then the pickle bytes.
    :meth:`loads` checks the signature with :func:`hmac.compare_digest` and raises
    ``SerializationError`` for an unsigned, truncated, altered or foreign payload
    *before* ``pickle.loads`` runs, so nothing of it is executed.

    What it protects against: anyone who can write a key or publish a message but does
    not hold the key (a compromised neighbour service on the same Redis, a mis-scoped
    ACL user, an exposed port) cannot make your process unpickle their bytes, whether
    forged from scratch or altered from a genuine payload.

    What it does not protect against:

    - anyone holding the key: every process that can sign can run code in every process
      that reads. Give the key only to processes you would let do that, keep it out of
      Redis and out of the code, and use a key for this purpose only.
    - replay: a genuine signed payload stays valid. Whoever can write to Redis can copy
      one to another key or channel, or store an old value again (the signature does not
      cover the Redis key, the channel or a time).
    - reading: the payload is signed, not encrypted.

    Args:
        key: the secret that signs and verifies, bytes or str (UTF-8), at least 16 bytes
            (``secrets.token_bytes(32)`` is a good one). Required: there is no default.
        previous_keys: keys that still verify but no longer sign, for rotation: deploy the
            new key with the old one here, wait until every old payload has expired or been
            rewritten, then drop it.
        protocol: the pickle protocol for :meth:`dumps` (None: pickle's default).

    Raises:
        ConfigurationError: a key that is too short or neither bytes nor str (leaving
            ``key`` out is a ``TypeError``, as for any missing argument).
    """

    __slots__ = ("_keys", "_protocol")

    def __init__(
        self,
        *,
        key: bytes | str,
        previous_keys: Iterable[bytes | str] = (),
        protocol: int | None = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        if isinstance(previous_keys, bytes | str) or not isinstance(previous_keys, Iterable):
            raise ConfigurationError("previous_keys must be a list of keys, not one key")
        self._keys = (
            _pickle_key(key, "key"),
            *(_pickle_key(old, "previous_keys[]") for old in previous_keys),
        )
        if protocol is not None and (
            isinstance(protocol, bool)
            or not isinstance(protocol, int)
            or not 0 <= protocol <= pickle.HIGHEST_PROTOCOL
        ):
            raise ConfigurationError(f"protocol must be an int in [0, {pickle.HIGHEST_PROTOCOL}]")
        self._protocol = protocol

    @staticmethod
    def _sign(key: bytes, body: bytes | memoryview) -> bytes:
        mac = hmac.new(key, _PICKLE_VERSION, hashlib.sha256)
        mac.update(body)
        return mac.digest()

    def dumps(self, value: Any) -> bytes:
        """Pickle ``value`` and sign it with the current key (HMAC-SHA256)."""
        try:
            body = pickle.dumps(value, protocol=self._protocol)
        except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as exc:
            # ValueError: e.g. protocol 0 writes ints as text, and an int over Python's
            # int_max_str_digits (4300 digits) cannot become text.
            raise SerializationError(f"value cannot be pickled: {exc}") from exc
        return _PICKLE_VERSION + self._sign(self._keys[0], body) + body

    def loads(self, data: bytes) -> Any:
        """Unpickle ``data`` only if a known key signed it; else SerializationError."""
        _check_bytes(data)
        view = memoryview(data)
        if len(view) <= _PICKLE_HEADER_SIZE or view[0] != _PICKLE_VERSION[0]:
            raise SerializationError(
                "stored data is not a signed pickle (unsigned, truncated or another format): "
                "refused without unpickling"
            )
        mac, body = view[1:_PICKLE_HEADER_SIZE], view[_PICKLE_HEADER_SIZE:]
        if not any(hmac.compare_digest(self._sign(key, body), mac) for key in self._keys):
            raise SerializationError(
                "pickle signature does not match (forged, altered, or signed with another "
                "key): refused without unpickling"
            )
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise SerializationError(f"stored data cannot be unpickled: {exc}") from exc

    def __repr__(self) -> str:
        return f"PickleSerializer(key=<secret>, previous_keys={len(self._keys) - 1})"


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
