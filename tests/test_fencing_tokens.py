"""fenced_set / fenced_get: every token in [0, 2**64 - 1] compared exactly (real servers).

Tokens used to be compared as Lua doubles on the server: above 2**53 two tokens could
compare equal (so a lower one overwrote a higher one), and 10**400 became inf and locked
the resource against every real token.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioredispatterns import (
    ConfigurationError,
    InvalidKeyError,
    Lock,
    ScriptError,
    connect,
    fenced_get,
    fenced_set,
)
from aioredispatterns.lock import _FENCED_SET
from aioredispatterns.testing import free_port, key_count

MAX_TOKEN = 2**64 - 1


def resource_key(prefix: str, resource: str) -> str:
    return f"{prefix}:fenced:{{{resource}}}"


# --- bad input, before any command -------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [10**400, 2**64, -1, True, False, 1.5, 1.0, None, "5", b"5"],
    ids=repr,
)
async def test_bad_tokens_raise_before_any_command(token: Any) -> None:
    # A client pointing at a closed port: any command would fail with ConnectionFailed.
    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        with pytest.raises(ConfigurationError, match="token"):
            await fenced_set(client, "r", b"v", token)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "value",
    [None, True, object(), [b"v"], {"a": 1}, bytearray(b"v")],
    ids=lambda v: type(v).__name__,
)
async def test_bad_values_raise_before_any_command(value: Any) -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        with pytest.raises(ConfigurationError, match="value"):
            await fenced_set(client, "r", value, 1)
    finally:
        await client.aclose()


async def test_bad_resources_raise_before_any_command() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=0)
    try:
        for resource in ("", "r" * 1025, 5):
            with pytest.raises(InvalidKeyError):
                await fenced_set(client, resource, b"v", 1)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_nothing_is_written_for_bad_input(redis_client: Any, key_prefix: str) -> None:
    bad: list[Any] = [10**400, -1, True, 1.5]
    for token in bad:
        with pytest.raises(ConfigurationError):
            await fenced_set(redis_client, "r", b"v", token, prefix=key_prefix)
    with pytest.raises(ConfigurationError):
        await fenced_set(redis_client, "r", None, 1, prefix=key_prefix)  # type: ignore[arg-type]
    assert await key_count(redis_client) == 0


# --- exact comparison over the whole range ------------------------------------------------


async def test_every_accepted_value_type_round_trips(redis_client: Any, key_prefix: str) -> None:
    values: list[Any] = [b"\x00bytes", "str", "é", 42, -(2**70), 1.5]
    expected = [b"\x00bytes", b"str", "é".encode(), b"42", str(-(2**70)).encode(), b"1.5"]
    for token, (value, stored) in enumerate(zip(values, expected, strict=True)):
        assert await fenced_set(redis_client, "r", value, token, prefix=key_prefix)
        got = await fenced_get(redis_client, "r", prefix=key_prefix)
        assert got is not None
        assert (got.value, got.token) == (stored, token)


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        (0, 1),
        (2**53 - 1, 2**53),
        (2**53, 2**53 + 1),  # equal as doubles
        (2**53 + 1, 2**53 + 2),
        (10**15 - 1, 10**15),  # a longer decimal
        (10**16 - 1, 10**16),  # across the script's 15-digit chunks
        (2**63 - 1, 2**63),
        (2**64 - 2**11, 2**64 - 1),  # equal as doubles
        (2**64 - 2, 2**64 - 1),
        (10**19 - 1, 10**19),  # 19 and 20 digits
        (10**19, 10**19 + 1),
    ],
    ids=lambda t: str(t),
)
async def test_a_lower_token_never_overwrites_a_higher_one(
    redis_client: Any, key_prefix: str, lower: int, higher: int
) -> None:
    assert await fenced_set(redis_client, "r", b"low", lower, prefix=key_prefix)
    assert await fenced_set(redis_client, "r", b"high", higher, prefix=key_prefix)
    assert not await fenced_set(redis_client, "r", b"late", lower, prefix=key_prefix)
    stored = await fenced_get(redis_client, "r", prefix=key_prefix)
    assert stored is not None
    assert (stored.value, stored.token) == (b"high", higher)
    # The same token again is the same holder writing twice: accepted.
    assert await fenced_set(redis_client, "r", b"again", higher, prefix=key_prefix)
    # Stored as plain decimal text, whatever its size.
    assert await redis_client.hget(resource_key(key_prefix, "r"), "token") == str(higher).encode()


async def test_the_top_of_the_range(redis_client: Any, key_prefix: str) -> None:
    assert await fenced_set(redis_client, "r", b"max", MAX_TOKEN, prefix=key_prefix)
    for token in (0, 2**53, 2**63, MAX_TOKEN - 1):
        assert not await fenced_set(redis_client, "r", b"x", token, prefix=key_prefix)
    assert await fenced_set(redis_client, "r", b"max2", MAX_TOKEN, prefix=key_prefix)
    stored = await fenced_get(redis_client, "r", prefix=key_prefix)
    assert stored is not None
    assert (stored.value, stored.token) == (b"max2", MAX_TOKEN)


async def test_lock_tokens_are_fenced_as_before(redis_client: Any, key_prefix: str) -> None:
    async with Lock(redis_client, "job", prefix=key_prefix) as first:
        token = first.token
    async with Lock(redis_client, "job", prefix=key_prefix) as second:
        assert token < second.token < 2**53
        assert await fenced_set(redis_client, "r", b"b", second.token, prefix=key_prefix)
    assert not await fenced_set(redis_client, "r", b"a", token, prefix=key_prefix)


# --- the script checks its own input, and what it finds stored -------------------------


@pytest.mark.parametrize(
    "token",
    [
        "-1",
        "01",
        "00",
        "1.5",
        "1e3",
        "",
        " 1",
        "1 ",
        "+1",
        "0x10",
        "abc",
        "inf",
        "18446744073709551616",
        "99999999999999999999",
        "1" + "0" * 400,
    ],
)
async def test_the_script_refuses_a_malformed_token(
    redis_client: Any, key_prefix: str, token: str
) -> None:
    """Called directly (past the client's checks), the script answers a clear error."""
    key = resource_key(key_prefix, "r")
    with pytest.raises(ScriptError, match="decimal integer in"):
        await _FENCED_SET.run(redis_client, [key], [b"v", token])
    assert not await redis_client.exists(key)


async def test_a_token_stored_by_the_previous_version_compares_exactly(
    redis_client: Any, key_prefix: str
) -> None:
    """The previous version stored str(token) too: the same text, compared exactly now."""
    key = resource_key(key_prefix, "r")
    await redis_client.hset(key, mapping={"value": b"old", "token": str(2**53 + 1)})
    assert not await fenced_set(redis_client, "r", b"x", 2**53, prefix=key_prefix)
    assert await fenced_set(redis_client, "r", b"new", 2**53 + 2, prefix=key_prefix)
    # A resource the old version let 10**400 into stays ahead of every token (which is
    # what 10**400 means); fenced_get shows why. Delete the key to recover.
    await redis_client.hset(key, mapping={"value": b"stuck", "token": "1" + "0" * 400})
    assert not await fenced_set(redis_client, "r", b"x", MAX_TOKEN, prefix=key_prefix)
    stored = await fenced_get(redis_client, "r", prefix=key_prefix)
    assert stored is not None
    assert stored.token == 10**400


@pytest.mark.parametrize("stored", ["abc", "-1", "1.5", "01", ""])
async def test_a_malformed_stored_token_is_a_script_error(
    redis_client: Any, key_prefix: str, stored: str
) -> None:
    key = resource_key(key_prefix, "r")
    await redis_client.hset(key, mapping={"value": b"v", "token": stored})
    with pytest.raises(ScriptError, match="stored token"):
        await fenced_set(redis_client, "r", b"x", 1, prefix=key_prefix)
    assert await redis_client.hget(key, "value") == b"v"


# --- the model: the stored token is the running maximum ----------------------------------

_EDGES = [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2, MAX_TOKEN]


def _tokens() -> st.SearchStrategy[int]:
    near_edges = st.builds(
        lambda edge, delta: min(MAX_TOKEN, max(0, edge + delta)),
        st.sampled_from(_EDGES),
        st.integers(-3, 3),
    )
    return st.one_of(
        st.sampled_from(_EDGES), near_edges, st.integers(0, MAX_TOKEN), st.integers(0, 100)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(tokens=st.lists(_tokens(), min_size=1, max_size=12))
async def test_stored_token_is_the_running_maximum(redis_url: str, tokens: list[int]) -> None:
    client = connect(redis_url)
    prefix = f"h{uuid.uuid4().hex[:10]}"  # a fresh key space per example
    stored: int | None = None
    value: bytes | None = None
    try:
        for i, token in enumerate(tokens):
            accepted = await fenced_set(client, "r", f"v{i}".encode(), token, prefix=prefix)
            assert accepted == (stored is None or token >= stored), (i, token, stored)
            if accepted:
                stored, value = token, f"v{i}".encode()
            got = await fenced_get(client, "r", prefix=prefix)
            assert got is not None
            assert (got.token, got.value) == (stored, value)
        assert stored == max(tokens)
    finally:
        await client.aclose()


async def test_a_token_written_by_something_else_is_a_typed_error(
    redis_client: Any, key_prefix: str
) -> None:
    from aioredispatterns import CommandError, fenced_get

    await redis_client.hset(f"{key_prefix}:fenced:{{r}}", mapping={"value": "v", "token": "x1"})
    with pytest.raises(CommandError, match="not a decimal integer"):
        await fenced_get(redis_client, "r", prefix=key_prefix)
