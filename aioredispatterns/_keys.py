"""Every Redis key the library touches is built here.

A key looks like ``<prefix>:<primitive>:{<name>}:<part>``. The ``{<name>}`` hash tag is
the same for every key of one primitive instance (a lock, a limiter identity, a stream
group, one cache entry), so on Redis Cluster all keys a script or MULTI touches together
live in one slot, while different instances spread over the cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import ConfigurationError, InvalidKeyError

DEFAULT_PREFIX = "arp"

KeyT = str | bytes


def check_key(value: object, what: str = "key") -> KeyT:
    """Return ``value`` if it is a non-empty str or bytes, else raise InvalidKeyError."""
    if not isinstance(value, str | bytes):
        raise InvalidKeyError(f"{what} must be str or bytes, not {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"{what} must not be empty")
    return value


def check_prefix(prefix: object) -> str:
    """Validate a namespace prefix: a non-empty str without hash-tag braces."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError("prefix must be a non-empty str")
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


def keyspace(prefix: str, primitive: str, name: object) -> KeySpace:
    """Build the key space of one instance; ``name`` is the user's name for it.

    Raises:
        InvalidKeyError: ``name`` is empty or neither str nor bytes.
        ConfigurationError: ``prefix`` is empty or contains braces.
    """
    check_prefix(prefix)
    checked = check_key(name, f"{primitive} name")
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
