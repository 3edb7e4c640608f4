"""Deterministic, injective cache keys built from a function's arguments.

``call_key(func, args, kwargs)`` binds the arguments to the function's signature (so
``f(1)``, ``f(x=1)`` and ``f()`` with a default of 1 give one key), then encodes every
value with a type tag and, where its length is not implied, a length prefix. No two
different argument tuples encode alike: ``1``, ``1.0``, ``True`` and ``"1"`` are four keys,
and no string can forge the encoding of another value (strings are length-prefixed, so
their content is never parsed). Encodings longer than :data:`MAX_PLAIN` characters are
replaced by a 128-bit BLAKE2b digest (injective up to a hash collision).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigurationError

MAX_PLAIN = 200


def _encode(value: object, out: list[str]) -> None:
    # bool before int: True is an int, but a different argument.
    if value is None:
        out.append("N")
    elif value is True:
        out.append("T")
    elif value is False:
        out.append("F")
    elif isinstance(value, int):
        # Decimal printing stops at 4300 digits: huge ints go in hex, under their own tag.
        out.append(f"i{int(value)};" if value.bit_length() < 10_000 else f"I{int(value):x};")
    elif isinstance(value, float):
        out.append(f"f{float(value)!r};")
    elif isinstance(value, str):
        if value.isascii():
            out.append(f"s{len(value)}:{value}")
        else:
            try:
                value.encode()
            except UnicodeEncodeError:
                # A lone surrogate cannot be part of a key: its code units, in hex.
                out.append(f"S{value.encode('utf-8', 'surrogatepass').hex()};")
            else:
                out.append(f"s{len(value)}:{value}")
    elif isinstance(value, bytes | bytearray | memoryview):
        out.append(f"b{bytes(value).hex()};")
    elif isinstance(value, tuple | list):
        out.append(f"{'t' if isinstance(value, tuple) else 'l'}{len(value)}(")
        for item in value:
            _encode(item, out)
        out.append(")")
    elif isinstance(value, Mapping):
        pairs = sorted((encode_value(k), encode_value(v)) for k, v in value.items())
        out.append(f"d{len(pairs)}(")
        for k, v in pairs:
            out.append(k)
            out.append(v)
        out.append(")")
    elif isinstance(value, set | frozenset):
        items = sorted(encode_value(item) for item in value)
        out.append(f"e{len(items)}(")
        out.extend(items)
        out.append(")")
    else:
        raise ConfigurationError(
            f"cannot build a cache key from a {type(value).__name__} argument: pass "
            "key=... to cached() (a format string or a function of the arguments)"
        )


def encode_value(value: object) -> str:
    """The injective encoding of one value (None, bool, int, float, str, bytes, and
    tuples, lists, dicts, sets of those)."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def function_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of ``func``: the part of a key that names the function."""
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def call_key(
    name: str, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """The cache key of one call: ``<name>:<encoded bound arguments>``.

    Raises:
        ConfigurationError: an argument has a type the encoding does not cover.
        TypeError: the arguments do not fit the signature (as the call itself would).
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    encoded = encode_value(tuple(bound.arguments.values()))
    if len(encoded) > MAX_PLAIN:
        encoded = "h" + hashlib.blake2b(encoded.encode(), digest_size=16).hexdigest()
    return f"{name}:{encoded}"
