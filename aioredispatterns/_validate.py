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
from collections.abc import Callable, Collection
from typing import Any, Final, TypeVar

from .errors import ConfigurationError, InvalidKeyError

__all__ = (
    "MAX_COUNT",
    "MAX_NAME_BYTES",
    "MAX_SECONDS",
    "check_callable",
    "check_choice",
    "check_count",
    "check_flag",
    "check_name",
    "check_number",
    "check_seconds",
)

#: The longest duration accepted anywhere, in seconds (ten years).
MAX_SECONDS: Final = 10 * 365 * 24 * 3600.0
#: The largest count accepted by default: integers above 2**53 lose precision in Lua.
MAX_COUNT: Final = 2**53
#: The default limit of a key, name or channel, in bytes once encoded.
MAX_NAME_BYTES: Final = 1024

T = TypeVar("T")


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
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigurationError(f"{name} must be > {above}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be <= {maximum}, got {value!r}")
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
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if zero else '> 0'} s, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum} s, got {value!r}")
    if value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum:g} s, got {value!r}")
    return float(value)


def check_count(name: str, value: object, *, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """An ``int`` (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, got {value!r}")
    if not minimum <= value <= maximum:
        raise ConfigurationError(f"{name} must be in [{minimum}, {maximum}], got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """A ``bool`` (``1`` or ``"no"`` are refused: they read as the opposite too easily)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """One of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # unhashable
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_callable(name: str, value: object) -> Callable[..., Any]:
    """A callable."""
    if not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {type(value).__name__}")
    return value


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
                f"{what} is not valid Unicode (a lone surrogate): {value[:40]!r}"
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
