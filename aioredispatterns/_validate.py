"""Every number, duration, name and key the library accepts is checked here, the same way.

Each check returns the value it accepted (normalised where that helps: a duration as a
``float``) or raises :class:`~aioredispatterns.errors.ConfigurationError` (a name or key:
:class:`~aioredispatterns.errors.InvalidKeyError`) naming the parameter and the bound. The
checks run in constructors and at the top of methods, before any command is sent, so a
rejected input never leaves anything half-written.

The bounds, once:

* a **number** is an ``int`` or ``float``, never a ``bool``, and finite;
* a **duration** is a number of seconds, > 0 (or >= 0 where zero means "off"), and at most
  :data:`MAX_SECONDS` (ten years): leases, windows and TTLs become milliseconds and
  microseconds on the server, and the server's Lua numbers are doubles, exact up to 2**53
  (a duration in µs added to the server clock in µs stays far below that);
* a **count** is an ``int`` in a stated range (by default up to :data:`MAX_COUNT`, 2**53,
  so it also survives a trip through Lua);
* a **name** (a key part, a channel, a group) is ``str`` or ``bytes``, not empty, valid
  UTF-8 when a ``str`` (no lone surrogates), and at most :data:`MAX_NAME_BYTES` bytes
  unless the caller configured another limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final, TypeVar

from .errors import ConfigurationError, InvalidKeyError

__all__ = (
    "MAX_COUNT",
    "MAX_NAME_BYTES",
    "MAX_SECONDS",
    "check_callable",
    "check_items",
    "check_pairs",
    "check_choice",
    "check_count",
    "check_flag",
    "check_name",
    "check_number",
    "check_seconds",
    "shown",
)

#: The longest duration accepted anywhere, in seconds (ten years).
MAX_SECONDS: Final = 10 * 365 * 24 * 3600.0
#: The largest count accepted by default: integers above 2**53 lose precision in Lua.
MAX_COUNT: Final = 2**53
#: The default limit of a key, name or channel, in bytes once encoded.
MAX_NAME_BYTES: Final = 1024

T = TypeVar("T")

# How much of a rejected value an error message shows.
_SHOWN = 60


def shown(value: object) -> str:
    """A short, always printable form of ``value`` for an error message.

    ``repr`` itself can fail (an int of more than 4300 digits) or be huge (a 10 MB str).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        return f"<a {type(value).__name__}>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _finite(value: int | float) -> bool:
    # math.isfinite() overflows on an int too large for a float: any int is finite.
    return isinstance(value, int) or math.isfinite(value)


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite int or float (not a bool) within ``[minimum, maximum]`` and ``> above``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, got {shown(value)}")
    if not _finite(value):
        raise ConfigurationError(f"{name} must be finite, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {shown(value)}")
    if above is not None and value <= above:
        raise ConfigurationError(f"{name} must be > {above}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be <= {maximum}, got {shown(value)}")
    return float(value) if isinstance(value, float) else value


def check_seconds(
    name: str,
    value: object,
    *,
    zero: bool = False,
    minimum: float | None = None,
    maximum: float = MAX_SECONDS,
) -> float:
    """A duration in seconds: > 0 (>= 0 with ``zero``), at least ``minimum``, finite and
    at most ``maximum`` (ten years by default)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, got {shown(value)}")
    if not _finite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds, got {shown(value)}")
    if value < 0 or (value == 0 and not zero):
        raise ConfigurationError(
            f"{name} must be {'>= 0' if zero else '> 0'} s, got {shown(value)}"
        )
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum} s, got {shown(value)}")
    if value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum:g} s, got {shown(value)}")
    return float(value)


def check_count(name: str, value: object, *, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """An ``int`` (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {shown(value)}")
    if not minimum <= value <= maximum:
        raise ConfigurationError(f"{name} must be in [{minimum}, {maximum}], got {shown(value)}")
    return value


def check_flag(name: str, value: object) -> bool:
    """A ``bool`` (``1`` or ``"no"`` are refused: they read as the opposite too easily)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {shown(value)}")
    return value


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """One of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # unhashable
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{name} must be one of {listed}, got {shown(value)}")
    return value


def check_callable(name: str, value: object) -> Callable[..., Any]:
    """A callable."""
    if not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_items(name: str, value: object) -> list[Any]:
    """The items of an iterable (a list, a tuple, a generator ...), as a list.

    A ``str`` or ``bytes`` is refused: iterating one gives characters, never what was meant.
    """
    if isinstance(value, str | bytes | bytearray | memoryview) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"{name} must be an iterable (a list, a tuple ...), got {type(value).__name__}"
        )
    return list(value)


def check_pairs(name: str, value: object) -> list[tuple[Any, Any]]:
    """``(key, value)`` pairs from a mapping or an iterable of 2-item sequences."""
    items = list(value.items()) if isinstance(value, dict) else check_items(name, value)
    pairs: list[tuple[Any, Any]] = []
    for item in items:
        if isinstance(item, str | bytes) or not isinstance(item, tuple | list) or len(item) != 2:
            raise ConfigurationError(f"{name} must hold (key, value) pairs, got {shown(item)}")
        pairs.append((item[0], item[1]))
    return pairs


def check_name(what: str, value: object, *, max_bytes: int = MAX_NAME_BYTES) -> str | bytes:
    """A key, name or channel: non-empty ``str`` (valid UTF-8) or ``bytes``, at most
    ``max_bytes`` bytes once encoded.

    Raises:
        InvalidKeyError: any of those does not hold.
    """
    if isinstance(value, str):
        if not value:
            raise InvalidKeyError(f"{what} must not be empty")
        # A str is sent as UTF-8: a lone surrogate cannot be, so refuse it here rather
        # than fail with UnicodeEncodeError inside a send.
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise InvalidKeyError(
                f"{what} is not valid Unicode (a lone surrogate): {shown(value)}"
            ) from None
    elif isinstance(value, bytes):
        if not value:
            raise InvalidKeyError(f"{what} must not be empty")
        size = len(value)
    else:
        raise InvalidKeyError(f"{what} must be str or bytes, not {type(value).__name__}")
    if size > max_bytes:
        raise InvalidKeyError(f"{what} is {size} bytes, above the limit of {max_bytes}")
    return value
