"""Serializers: round trips, typed failures, no pickle by default."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioredispatterns import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    SerializationError,
    Serializer,
)
from aioredispatterns.serializers import default_serializer

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize("serializer", [JsonSerializer(), JsonSerializer(use_orjson=False)])
@given(value=json_values)
def test_json_round_trip(serializer: Serializer, value: Any) -> None:
    assert serializer.loads(serializer.dumps(value)) == value


@given(value=json_values | st.binary())
def test_msgpack_round_trip(value: Any) -> None:
    serializer = MsgpackSerializer()
    assert serializer.loads(serializer.dumps(value)) == value


@given(value=st.binary())
def test_raw_round_trip(value: bytes) -> None:
    assert RawSerializer().loads(RawSerializer().dumps(value)) == value


@pytest.mark.parametrize(
    ("serializer", "value"),
    [
        (JsonSerializer(), object()),
        (JsonSerializer(use_orjson=False), {1j}),
        (JsonSerializer(use_orjson=False), float("nan")),
        (MsgpackSerializer(), object()),
        (RawSerializer(), 12),
        (PickleSerializer(), lambda: None),
    ],
)
def test_unserializable_values_fail_typed(serializer: Serializer, value: Any) -> None:
    with pytest.raises(SerializationError):
        serializer.dumps(value)


@pytest.mark.parametrize("serializer", [JsonSerializer(), MsgpackSerializer()])
def test_corrupt_data_fails_typed(serializer: Serializer) -> None:
    with pytest.raises(SerializationError):
        serializer.loads(b"\xc1\xff not valid")


def test_default_is_json_not_pickle() -> None:
    assert isinstance(default_serializer(), JsonSerializer)
    assert SerializationError.__mro__[1].__name__ == "RedisPatternsError"
