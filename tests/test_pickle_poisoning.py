"""Pickle poisoning: a payload someone else wrote to Redis never reaches ``pickle.loads``.

Each attack writes with the plain client, as an attacker with write access to the server
would, and reads through the library. The "exploit" is a harmless marker (a module-level
function that records its call) standing in for ``os.system``; a control test shows that
plain ``pickle.loads`` does run it, so its absence means the payload was refused.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioredispatterns import Cache, Message, PickleSerializer, SerializationError
from aioredispatterns.pubsub import publish, subscribe

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
SIGNED_HEADER = 33  # version byte + HMAC-SHA256

RAN: list[str] = []


def _exploit(tag: str) -> str:
    """What the attacker's pickle calls when unpickled (think ``os.system``)."""
    RAN.append(tag)
    return "pwned"


class _Payload:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_exploit, (self.tag,))


def _malicious(tag: str) -> bytes:
    return pickle.dumps(_Payload(tag))


@pytest.fixture
def unpickled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every payload that reached ``pickle.loads`` during the test (and no marker left)."""
    RAN.clear()
    seen: list[bytes] = []
    real = pickle.loads

    def spy(data: Any, /, **kwargs: Any) -> Any:
        seen.append(bytes(data))
        return real(data, **kwargs)

    monkeypatch.setattr(pickle, "loads", spy)
    yield seen
    RAN.clear()


def test_control_plain_pickle_runs_the_marker(unpickled: list[bytes]) -> None:
    assert pickle.loads(_malicious("control")) == "pwned"
    assert RAN == ["control"]
    assert len(unpickled) == 1


async def _stored_entry(redis_client: Any, key_prefix: str) -> tuple[bytes, bytes]:
    """The Redis key and raw value of the one cache entry under ``key_prefix``."""
    keys = [k async for k in redis_client.scan_iter(match=f"{key_prefix}:*")]
    assert len(keys) == 1, keys
    raw = await redis_client.get(keys[0])
    assert raw[0] == 0xA0  # a value entry: the 21-byte header, then the serializer's bytes
    return keys[0], raw


# -------------------------------------------------------------------- (a) forged cache entry


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda entry: _malicious("cache"), id="raw-pickle"),
        pytest.param(
            lambda entry: b"\x01" + entry[1:SIGNED_HEADER] + _malicious("cache"),
            id="pickle-behind-a-genuine-mac",
        ),
        pytest.param(
            lambda entry: PickleSerializer(key=OTHER_KEY).dumps(_Payload("cache")),
            id="signed-with-another-key",
        ),
    ],
)
async def test_forged_cache_entry_is_refused_before_unpickling(
    redis_client: Any,
    key_prefix: str,
    unpickled: list[bytes],
    forge: Callable[[bytes], bytes],
) -> None:
    serializer = PickleSerializer(key=KEY)
    async with Cache(redis_client, ttl=60, serializer=serializer, prefix=key_prefix) as cache:
        await cache.set("user:1", {"name": "Ada"})
        rkey, raw = await _stored_entry(redis_client, key_prefix)
        header, genuine = raw[:21], raw[21:]
        # The attacker keeps the genuine header (so the entry passes the cache's own checks
        # and reaches the serializer) and replaces the payload.
        await redis_client.set(rkey, header + forge(genuine))

        # An entry the serializer refuses is a miss: get() returns the default...
        assert await cache.get("user:1") is None
        assert await cache.get_many(["user:1"]) == {}

        async def loader() -> dict[str, str]:
            return {"name": "Grace"}

        # ...and a load replaces it, so a forged entry cannot wedge the key until its TTL.
        assert await cache.get_or_load("user:1", loader) == {"name": "Grace"}
        assert cache.stats.unreadable == 3
        assert RAN == []
        assert unpickled == []
        assert await cache.get("user:1") == {"name": "Grace"}
    assert RAN == []
    assert len(unpickled) == 1  # only the genuine value written by the load


async def test_genuine_cache_entry_round_trips(
    redis_client: Any, key_prefix: str, unpickled: list[bytes]
) -> None:
    async with Cache(
        redis_client, ttl=60, serializer=PickleSerializer(key=KEY), prefix=key_prefix
    ) as cache:
        await cache.set("user:1", {"name": "Ada", "ids": {1, 2}})
        assert await cache.get("user:1") == {"name": "Ada", "ids": {1, 2}}
    assert len(unpickled) == 1  # the spy sees what does get unpickled


# ------------------------------------------------------------------------ (b) forged publish


async def test_forged_publish_is_refused_and_signed_messages_still_arrive(
    redis_client: Any, key_prefix: str, unpickled: list[bytes]
) -> None:
    channel = f"{key_prefix}:events"
    serializer = PickleSerializer(key=KEY)
    async with subscribe(redis_client, channel, serializer=serializer) as messages:
        # One at a time: on a cluster two publishes may reach the subscriber out of order.
        with anyio.fail_after(5):
            await redis_client.publish(channel, _malicious("publish"))
            with pytest.raises(SerializationError, match="not a signed pickle"):
                await anext(messages)
            forged = PickleSerializer(key=OTHER_KEY).dumps(_Payload("k"))
            await redis_client.publish(channel, forged)
            with pytest.raises(SerializationError, match="signature does not match"):
                await anext(messages)
            await publish(redis_client, channel, {"order": 7}, serializer=serializer)
            assert await anext(messages) == Message(channel, {"order": 7})
    assert RAN == []
    assert len(unpickled) == 1


# ------------------------------------------------------------------- (c) tampered payloads


async def test_tampered_cache_entry_is_refused(
    redis_client: Any, key_prefix: str, unpickled: list[bytes]
) -> None:
    async with Cache(
        redis_client, ttl=60, serializer=PickleSerializer(key=KEY), prefix=key_prefix
    ) as cache:
        await cache.set("price", 100)
        rkey, raw = await _stored_entry(redis_client, key_prefix)
        tampered = bytearray(raw)
        tampered[-2] ^= 0x01  # one bit of the pickle (the stored int)
        await redis_client.set(rkey, bytes(tampered))
        assert await cache.get("price", "missing") == "missing"
        assert cache.stats.unreadable == 1
    assert unpickled == []


@given(data=st.data())
def test_any_single_bit_flip_is_refused(data: st.DataObject) -> None:
    serializer = PickleSerializer(key=KEY)
    payload = serializer.dumps(data.draw(st.lists(st.integers() | st.text(), max_size=5)))
    bit = data.draw(st.integers(min_value=0, max_value=len(payload) * 8 - 1))
    tampered = bytearray(payload)
    tampered[bit // 8] ^= 1 << (bit % 8)
    calls_before = len(RAN)
    with pytest.raises(SerializationError, match="refused without unpickling"):
        serializer.loads(bytes(tampered))
    assert len(RAN) == calls_before


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x01", id="version-only"),
        pytest.param(b"\x01" + b"\x00" * 32, id="mac-without-body"),
        pytest.param(b"\x02" + b"\x00" * 40, id="unknown-version"),
        pytest.param(pickle.dumps("plain"), id="unsigned"),
    ],
)
def test_unsigned_or_truncated_payloads_are_refused(payload: bytes, unpickled: list[bytes]) -> None:
    serializer = PickleSerializer(key=KEY)
    with pytest.raises(SerializationError, match="refused without unpickling"):
        serializer.loads(payload)
    signed = serializer.dumps("x")
    for cut in range(len(signed)):
        with pytest.raises(SerializationError, match="refused without unpickling"):
            serializer.loads(signed[:cut])
    assert unpickled == []
