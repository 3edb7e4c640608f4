"""Every Redis key the library touches is built here.

A key looks like ``<prefix>:<primitive>:{<name>}:<part>``. The ``{<name>}`` hash tag is
the same for every key of one primitive instance (a lock, a limiter identity, a stream
group, one cache entry), so on Redis Cluster all keys a script or MULTI touches together
live in one slot, while different instances spread over the cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from ._validate import MAX_NAME_BYTES, check_name
from .errors import ConfigurationError

DEFAULT_PREFIX = "arp"
# A prefix is part of every key: keep it short.
_MAX_PREFIX_BYTES = 128

KeyT: TypeAlias = str | bytes

V = TypeVar("V")


def check_key(value: object, what: str = "key", *, max_bytes: int = MAX_NAME_BYTES) -> KeyT:
    """Return ``value`` if it is a valid key part (see ``_validate.check_name``).

    Raises:
        InvalidKeyError: empty, not str/bytes, not valid UTF-8, or above ``max_bytes``.
    """
    return check_name(what, value, max_bytes=max_bytes)


def check_prefix(prefix: object) -> str:
    """Validate a namespace prefix: a non-empty str without hash-tag braces."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError("prefix must be a non-empty str")
    check_name("prefix", prefix, max_bytes=_MAX_PREFIX_BYTES)
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError("prefix must not contain '{' or '}' (they mark hash tags)")
    return prefix


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The keys of one primitive instance, all in one cluster hash slot."""

    base: KeyT

    def key(self, *parts: str | int) -> KeyT:
        """The key ``<base>:<part>:<part>...`` (the base itself when no part is given)."""
        if not parts:
            return self.base
        suffix = ":".join(str(p) for p in parts)
        if isinstance(self.base, bytes):
            return self.base + b":" + suffix.encode()
        return f"{self.base}:{suffix}"


def keyspace(
    prefix: str, primitive: str, name: object, *, max_bytes: int = MAX_NAME_BYTES
) -> KeySpace:
    """Build the key space of one instance; ``name`` is the user's name for it.

    Raises:
        InvalidKeyError: ``name`` is empty, neither str nor bytes, not valid UTF-8, or
            longer than ``max_bytes`` bytes.
        ConfigurationError: ``prefix`` is empty or contains braces.
    """
    check_prefix(prefix)
    checked = check_key(name, f"{primitive} name", max_bytes=max_bytes)
    raw = checked.encode() if isinstance(checked, str) else checked
    if b"{" in raw or b"}" in raw:
        # A brace inside the name would cut the hash tag short (or empty it, and then
        # Redis hashes the whole key): tag a digest instead. The '#' keeps these keys
        # apart from plain names, which can never produce this shape.
        digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
        return KeySpace(f"{prefix}:{primitive}#:{{{digest}}}")
    if isinstance(checked, bytes):
        return KeySpace(f"{prefix}:{primitive}:{{".encode() + checked + b"}")
    return KeySpace(f"{prefix}:{primitive}:{{{checked}}}")


class BoundedMemo(dict[KeyT, V], Generic[V]):
    """A memo of built keys (user key -> key space or key list), bounded in entries and
    in bytes: building and validating keys costs about a microsecond a call, so primitives
    remember recent ones. When full it is cleared wholesale (cheap, and rare); an entry
    larger than ``max_entry_bytes`` is never kept, so one huge key cannot evict the rest.
    """

    def __init__(self, max_entries: int, max_bytes: int, max_entry_bytes: int) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bytes = 0

    def put(self, key: KeyT, value: V, size: int) -> None:
        """Remember ``value`` for ``key``; ``size`` is its cost in bytes."""
        if size > self.max_entry_bytes:
            return
        if len(self) >= self.max_entries or self.bytes + size > self.max_bytes:
            self.clear()
            self.bytes = 0
        self[key] = value
        self.bytes += size
