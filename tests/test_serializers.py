"""Serializers: round trips, typed failures, no pickle by default, JSON backend parity."""

from __future__ import annotations

import inspect
import json
import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aioredispatterns import (
    ConfigurationError,
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    SerializationError,
    Serializer,
)
from aioredispatterns.serializers import default_serializer

PICKLE_KEY = b"0123456789abcdef0123456789abcdef"
ORJSON = JsonSerializer(use_orjson=True)
STDLIB = JsonSerializer(use_orjson=False)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize("serializer", [JsonSerializer(), STDLIB])
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


@given(value=st.recursive(st.integers() | st.text() | st.binary(), st.frozensets, max_leaves=8))
def test_pickle_round_trip(value: Any) -> None:
    serializer = PickleSerializer(key=PICKLE_KEY)
    assert serializer.loads(serializer.dumps(value)) == value


@pytest.mark.parametrize(
    ("serializer", "value"),
    [
        (JsonSerializer(), object()),
        (STDLIB, {1j}),
        (STDLIB, float("nan")),
        (MsgpackSerializer(), object()),
        (RawSerializer(), 12),
        (PickleSerializer(key=PICKLE_KEY), lambda: None),
    ],
)
def test_unserializable_values_fail_typed(serializer: Serializer, value: Any) -> None:
    with pytest.raises(SerializationError):
        serializer.dumps(value)


@pytest.mark.parametrize("serializer", [JsonSerializer(), STDLIB, MsgpackSerializer()])
def test_corrupt_data_fails_typed(serializer: Serializer) -> None:
    with pytest.raises(SerializationError):
        serializer.loads(b"\xc1\xff not valid")


def test_default_is_json_not_pickle() -> None:
    assert isinstance(default_serializer(), JsonSerializer)
    assert SerializationError.__mro__[1].__name__ == "RedisPatternsError"


# ------------------------------------------------------------------ signed pickle: keys


@pytest.mark.parametrize(
    "key",
    [b"", b"short", "fifteen chars!!", b"x" * 15, 12345, bytearray(b"y" * 32), None],
    ids=repr,
)
def test_pickle_needs_a_real_key(key: Any) -> None:
    with pytest.raises(ConfigurationError, match="key"):
        PickleSerializer(key=key)


def test_pickle_cannot_be_built_without_a_key() -> None:
    with pytest.raises(TypeError, match="key"):
        PickleSerializer()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        PickleSerializer(5)  # type: ignore[call-arg, arg-type]  # the old positional protocol


@pytest.mark.parametrize("previous", ["a" * 32, b"a" * 32, [b"short"]], ids=repr)
def test_pickle_previous_keys_are_checked(previous: Any) -> None:
    with pytest.raises(ConfigurationError, match="previous_keys"):
        PickleSerializer(key=PICKLE_KEY, previous_keys=previous)


def test_pickle_str_key_is_its_utf8_bytes_and_never_shown() -> None:
    as_str = PickleSerializer(key="s" * 16)
    assert PickleSerializer(key=b"s" * 16).loads(as_str.dumps([1])) == [1]
    assert "s" * 16 not in repr(as_str)
    assert repr(as_str) == "PickleSerializer(key=<secret>, previous_keys=0)"


def test_pickle_key_rotation() -> None:
    old, new = b"o" * 32, b"n" * 32
    written_before = PickleSerializer(key=old).dumps({"v": 1})
    rotating = PickleSerializer(key=new, previous_keys=[old])
    assert rotating.loads(written_before) == {"v": 1}
    written_after = rotating.dumps({"v": 2})
    assert PickleSerializer(key=new).loads(written_after) == {"v": 2}  # signs with the new key
    with pytest.raises(SerializationError):
        PickleSerializer(key=old).loads(written_after)
    with pytest.raises(SerializationError):
        PickleSerializer(key=new).loads(written_before)  # old key dropped: refused


def test_pickle_layout() -> None:
    data = PickleSerializer(key=PICKLE_KEY).dumps("x")
    assert data[0] == 1
    assert pickle.loads(data[33:]) == "x"


# ------------------------------------------------------------------ JSON backend parity
#
# Whatever the value, orjson and the stdlib either both refuse it (SerializationError)
# or both write the same bytes, which both read back to the same value.


def _as_loaded(value: Any) -> Any:
    """What JSON gives back for an accepted value: tuples become lists."""
    if isinstance(value, list | tuple):
        return [_as_loaded(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_loaded(item) for key, item in value.items()}
    return value


def _dumps_or_none(serializer: JsonSerializer, value: Any) -> bytes | None:
    try:
        return serializer.dumps(value)
    except SerializationError:
        return None


def _loads_or_error(serializer: JsonSerializer, data: bytes) -> str:
    """repr() of the loaded value (tells 1 from 1.0 and -0.0 from 0.0), or "error"."""
    try:
        return repr(serializer.loads(data))
    except SerializationError:
        return "error"


def _corpus() -> tuple[list[Any], list[Any]]:
    """Values inside and outside the JSON model (self-contained: also run, from its
    source, in a subprocess with orjson blocked)."""
    import collections
    import dataclasses
    import datetime
    import decimal
    import enum
    import fractions
    import uuid

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class Color(enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    class Count(int):
        pass

    class Ratio(float):
        pass

    class Items(list):  # type: ignore[type-arg]
        pass

    class Record(dict):  # type: ignore[type-arg]
        pass

    Pair = collections.namedtuple("Pair", "a b")
    deepest: Any = None
    for _ in range(254):
        deepest = [deepest]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    inside = [
        None, True, False, 0, -1, 2**63 - 1, -(2**63), 0.0, -0.0, 1.5, 1e16, 1e15, 1e-5,
        1.2345e-5, 1e-7, 5e-324, 1.7976931348623157e308, 0.1, "", "héllo ✓ 😀", "\x00\x1f\x7f",
        "\u2028\u2029</script>", '"\\', [], {}, (), (1, "a"), [1, [2, [3, {"k": (4,)}]]],
        {"b": 1, "a": 2}, {"": None}, deepest,
    ]  # fmt: skip
    outside = [
        2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400, float("nan"), float("inf"),
        -float("inf"), "\ud800", "a\udfffb", {"\ud800": 1}, {1: "a"}, {True: 1}, {None: 1},
        {1.5: 1}, {(1, 2): 1}, {Name("k"): 1}, Point(1, 2), datetime.date(2024, 1, 2),
        datetime.datetime(2024, 1, 2, 3, 4, 5), datetime.time(1, 2), datetime.timedelta(1),
        uuid.UUID(int=1), decimal.Decimal("1.5"), fractions.Fraction(1, 3), 1j, {1, 2},
        frozenset(), b"bytes", bytearray(b"x"), memoryview(b"x"), Color.RED, Level.HIGH,
        Name("x"), Count(1), Ratio(1.5), Items([1]), Record(a=1), Pair(1, 2),
        collections.OrderedDict(a=1), collections.defaultdict(list), object(), range(3),
        [1, {2}], {"a": [uuid.UUID(int=2)]}, [deepest], cyclic,
    ]  # fmt: skip
    return inside, outside


def _documents() -> list[bytes]:
    """JSON texts, valid and not, that the two backends must read alike."""
    return [
        b"1", b" 1 ", b"\t\n\r 1", b"-0", b"-0.0", b"1E2", b"0.1e1", b"1e-400", b"1.5e308",
        b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808",
        b"-9223372036854775809", b"123456789012345678901234567890", b"1" + b"0" * 400,
        b"1e400", b"-1e400", b"1e309", b"NaN", b"Infinity", b"-Infinity", b"nan", b"01",
        b"1.", b".5", b"+1", b"-", b"0x10", b"1_000", b'"\\ud83d\\ude00"', b'"\\uD83D\\uDE00"',
        b'"\\ud800"', b'"\\udc00\\ud800"', b'{"\\ud800":1}', b'"\\\\ud800"', b'"\\u0000"',
        b'"\\/"', b'"\x01"', b'"\x7f"', b'"\xed\xa0\x80"', b"\xef\xbb\xbf1", b"\xff\xfe1\x00",
        b"\x001", b"\x00\x00\x001", b"\xff", b"\xa0 1", b"\x0c1", b"", b"[1,]", b"[1 , 2]",
        b'{"a":1,"a":2}', b'{"a":1}x', b"true false", b"[" * 200 + b"]" * 200,
        b'{"a":[1,2.5,"x",null,true,{"b":{}}]}', "\"h\u00e9llo \u2713\"".encode(),
    ]  # fmt: skip


def _scalar_outside() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=INT_MAX + 1),
        st.integers(max_value=INT_MIN - 1),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.text(st.characters(categories=["Cs"]), min_size=1),
        st.binary(),
        st.sets(st.integers(), max_size=3),
        st.dates(),
        st.datetimes(),
        st.uuids(),
        st.decimals(allow_nan=False),
        st.complex_numbers(),
        st.builds(bytearray, st.binary(max_size=3)),
    )


def _any_key() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.floats(), st.uuids())


any_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | _scalar_outside(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(), inner, max_size=4)
        | st.dictionaries(_any_key(), inner, max_size=3)
    ),
    max_leaves=12,
)

model_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT_MIN, max_value=INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(value=model_values)
def test_json_model_values_give_the_same_bytes_and_round_trip(value: Any) -> None:
    data = ORJSON.dumps(value)
    assert STDLIB.dumps(value) == data
    expected = repr(_as_loaded(value))
    assert repr(ORJSON.loads(data)) == expected
    assert repr(STDLIB.loads(data)) == expected


@given(value=any_values)
def test_json_backends_accept_and_refuse_the_same_values(value: Any) -> None:
    data = _dumps_or_none(ORJSON, value)
    assert _dumps_or_none(STDLIB, value) == data
    if data is not None:
        expected = repr(_as_loaded(value))
        assert _loads_or_error(ORJSON, data) == expected
        assert _loads_or_error(STDLIB, data) == expected


@given(value=st.floats(allow_nan=False, allow_infinity=False))
@example(1e-5)
@example(-1.2345e-5)
@example(1e-7)
@example(9.999999999999999e-5)
@example(1e16)
@example(9999999999999998.0)
@example(5e-324)
@example(-0.0)
def test_json_float_bytes_match_orjson(value: float) -> None:
    import orjson

    data = STDLIB.dumps(value)
    assert data == ORJSON.dumps(value) == orjson.dumps(value)
    assert repr(STDLIB.loads(data)) == repr(ORJSON.loads(data)) == repr(value)


@pytest.mark.parametrize("value", _corpus()[0])
def test_json_corpus_inside_the_model_is_written_alike(value: Any) -> None:
    data = ORJSON.dumps(value)
    assert STDLIB.dumps(value) == data
    assert repr(STDLIB.loads(data)) == repr(ORJSON.loads(data)) == repr(_as_loaded(value))


@pytest.mark.parametrize("value", _corpus()[1])
def test_json_corpus_outside_the_model_is_refused_by_both(value: Any) -> None:
    with pytest.raises(SerializationError):
        ORJSON.dumps(value)
    with pytest.raises(SerializationError):
        STDLIB.dumps(value)


def test_json_bytes_are_compact_utf8_in_insertion_order() -> None:
    expected = '{"z":["é",0.00001,-0.0,null,1e-7],"a":{}}'.encode()
    value = {"z": ("é", 1e-5, -0.0, None, 1e-7), "a": {}}
    assert ORJSON.dumps(value) == STDLIB.dumps(value) == expected


@pytest.mark.parametrize("depth", [254, 255])
def test_json_depth_limit_is_the_same(depth: int) -> None:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value} if depth % 2 else [value]
    results = {_dumps_or_none(ORJSON, value), _dumps_or_none(STDLIB, value)}
    assert len(results) == 1
    assert (results.pop() is None) == (depth > 254)


@pytest.mark.parametrize("data", _documents())
def test_json_documents_read_alike(data: bytes) -> None:
    assert _loads_or_error(STDLIB, data) == _loads_or_error(ORJSON, data)


@given(text=st.text(alphabet="0123456789+-.eE ", max_size=12))
def test_json_numbers_read_alike(text: str) -> None:
    data = text.encode()
    assert _loads_or_error(STDLIB, data) == _loads_or_error(ORJSON, data)


@given(data=st.binary(max_size=20))
def test_json_arbitrary_bytes_read_alike(data: bytes) -> None:
    assert _loads_or_error(STDLIB, data) == _loads_or_error(ORJSON, data)


@given(value=model_values, surrogate=st.integers(0xD800, 0xDFFF), ascii_only=st.booleans())
def test_json_foreign_escapes_read_alike(value: Any, surrogate: int, ascii_only: bool) -> None:
    # Other writers \u-escape (ensure_ascii): pairs must decode alike, lone halves fail alike.
    text = json.dumps(value, ensure_ascii=ascii_only)
    for data in (text.encode(), json.dumps([text, f"\\u{surrogate:04x}"]).encode()):
        assert _loads_or_error(STDLIB, data) == _loads_or_error(ORJSON, data)
    lone = f'["x\\u{surrogate:04X}"]'.encode()
    assert _loads_or_error(STDLIB, lone) == _loads_or_error(ORJSON, lone) == "error"


def test_json_deep_foreign_documents_fail_typed() -> None:
    # The one documented difference: orjson reads up to 1024 levels, the stdlib stops at
    # Python's recursion limit. Either way the failure is a SerializationError.
    data = b"[" * 1024 + b"]" * 1024
    assert isinstance(ORJSON.loads(data), list)
    try:
        loaded = STDLIB.loads(data)  # a SerializationError, not a RecursionError
    except SerializationError:
        pass
    else:  # only under a raised recursion limit
        assert isinstance(loaded, list)
    too_deep = b"[" * 1025 + b"]" * 1025
    assert _loads_or_error(ORJSON, too_deep) == _loads_or_error(STDLIB, too_deep) == "error"


_BLOCKED = """
from __future__ import annotations
import sys
sys.modules["orjson"] = None  # as if orjson were not installed
import json
from aioredispatterns import ConfigurationError, JsonSerializer, SerializationError

serializer = JsonSerializer()
try:
    JsonSerializer(use_orjson=True)
    required = "built"
except ConfigurationError:
    required = "ConfigurationError"

{corpus}
{documents}

def dumps(value):
    try:
        return serializer.dumps(value).hex()
    except SerializationError:
        return None

def loads(data):
    try:
        return repr(serializer.loads(data))
    except SerializationError:
        return "error"

print(json.dumps({{
    "repr": repr(serializer),
    "required": required,
    "dumps": [dumps(value) for part in _corpus() for value in part],
    "loads": [loads(data) for data in _documents()],
}}))
"""


def test_default_serializer_without_orjson_matches_orjson() -> None:
    """ "Test both installs": the default serializer in a process where orjson cannot be
    imported writes and reads exactly what orjson does here."""
    script = _BLOCKED.format(
        corpus=textwrap.dedent(inspect.getsource(_corpus)),
        documents=textwrap.dedent(inspect.getsource(_documents)),
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    seen = json.loads(done.stdout)
    assert seen["repr"] == "JsonSerializer(orjson=False)"
    assert seen["required"] == "ConfigurationError"
    here = JsonSerializer()
    assert repr(here) == "JsonSerializer(orjson=True)"
    written = [_dumps_or_none(here, value) for part in _corpus() for value in part]
    assert seen["dumps"] == [None if data is None else data.hex() for data in written]
    assert seen["loads"] == [_loads_or_error(here, data) for data in _documents()]


@pytest.mark.parametrize("protocol", [0, 1])
def test_pickle_of_an_int_too_long_for_text_is_a_serialization_error(protocol: int) -> None:
    """Protocols 0 and 1 write ints as text: one over Python's 4300-digit limit raised a
    bare ValueError (found by tests/test_fuzz_inputs.py)."""
    serializer = PickleSerializer(key=b"k" * 16, protocol=protocol)
    with pytest.raises(SerializationError, match="cannot be pickled"):
        serializer.dumps([2**16610])
