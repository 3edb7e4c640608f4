"""Keys: one hash tag per instance, validation before anything is sent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from aioredispatterns import ConfigurationError, InvalidKeyError
from aioredispatterns._keys import check_key, keyspace

names = st.one_of(st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40))
parts = st.lists(st.one_of(st.text(max_size=10), st.integers()), min_size=1, max_size=3)


def _encode(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


@given(names, parts, parts)
def test_all_keys_of_an_instance_share_one_slot(
    name: str | bytes, first: list[str | int], second: list[str | int]
) -> None:
    space = keyspace("arp", "lock", name)
    assert key_slot(_encode(space.key(*first))) == key_slot(_encode(space.key(*second)))
    assert key_slot(_encode(space.key(*first))) == key_slot(_encode(space.base))


@given(names, names)
def test_different_names_give_different_keys(a: str | bytes, b: str | bytes) -> None:
    if _encode(a) == _encode(b):
        return
    assert _encode(keyspace("arp", "lock", a).key("x")) != _encode(
        keyspace("arp", "lock", b).key("x")
    )


def test_primitive_and_prefix_are_part_of_the_key() -> None:
    assert keyspace("arp", "lock", "x").key("a") != keyspace("arp", "cache", "x").key("a")
    assert keyspace("p1", "lock", "x").key("a") != keyspace("p2", "lock", "x").key("a")
    assert keyspace("arp", "lock", "orders").key("fence") == "arp:lock:{orders}:fence"
    assert keyspace("arp", "lock", b"orders").key("fence") == b"arp:lock:{orders}:fence"


@pytest.mark.parametrize("bad", ["", b"", None, 12, 1.5, ["a"], object()])
def test_bad_names_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidKeyError):
        keyspace("arp", "lock", bad)
    with pytest.raises(InvalidKeyError):
        check_key(bad)


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", None, 3])
def test_bad_prefixes_are_rejected(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        keyspace(bad, "lock", "x")  # type: ignore[arg-type]
