"""SessionStore against real servers: ids, sliding and absolute expiry, field-level
updates, rotation, log out everywhere, the persist-elsewhere hook; one slot per user on
the cluster kind."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aioredispatterns import ConfigurationError, SerializationError, connect
from aioredispatterns.sessions import Session, SessionChange, SessionStore
from aioredispatterns.testing import command_calls

pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")

# Nothing listens on port 1: a call that got as far as sending would fail with
# ConnectionFailed, so ConfigurationError (or None) here proves nothing was sent.
OFFLINE = "redis://127.0.0.1:1/0"
ID = re.compile(r"\A[0-9a-f]{4}\.[A-Za-z0-9_-]{32}\Z")


def session_key(prefix: str, session_id: str, name: str = "sessions") -> str:
    tag, secret = session_id.split(".")
    return f"{prefix}:session:{{{name}:{tag}}}:s:{secret}"


async def wait_until(condition: Callable[[], Any]) -> None:
    """Poll the server (generously: CI cores are shared with CPU hogs)."""
    with anyio.fail_after(30):
        while not await condition():  # noqa: ASYNC110 - polling the server, no event to wait on
            await anyio.sleep(0.05)


async def script_calls(client: Any) -> int:
    return await command_calls(client, "evalsha") + await command_calls(client, "eval")


@pytest.mark.parametrize(
    "make",
    [
        lambda c: SessionStore(c, ttl=0),
        lambda c: SessionStore(c, ttl=-1),
        lambda c: SessionStore(c, ttl=float("nan")),
        lambda c: SessionStore(c, absolute_ttl=0),
        lambda c: SessionStore(c, name=""),
        lambda c: SessionStore(c, name=b"x"),
        lambda c: SessionStore(c, prefix="a{b"),
        lambda c: SessionStore(c, on_change=42),
        lambda c: SessionStore(object()),
    ],
)
def test_bad_configuration(make: Callable[[Any], Any]) -> None:
    client = connect(OFFLINE)
    with pytest.raises(ConfigurationError):
        make(client)


async def test_bad_input_fails_before_any_command() -> None:
    client = connect(OFFLINE)
    store = SessionStore(client)
    good = "abcd." + "A" * 32
    for malformed in ["", "x", "abcd." + "A" * 31, "ABCD." + "A" * 32, good + "\n", "a" * 5000]:
        assert await store.get(malformed) is None
        with pytest.raises(ConfigurationError):
            await store.update(malformed, {"a": 1})
        with pytest.raises(ConfigurationError):
            await store.rotate(malformed)
        with pytest.raises(ConfigurationError):
            await store.destroy(malformed)
    with pytest.raises(ConfigurationError):
        await store.get(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await store.create(user="")
    with pytest.raises(ConfigurationError):
        await store.create({"": 1})
    with pytest.raises(ConfigurationError):
        await store.create({1: 1})  # type: ignore[dict-item]
    with pytest.raises(SerializationError):
        await store.create({"a": object()})
    with pytest.raises(ConfigurationError):
        await store.update(good, {"a": 1}, delete=["a"])
    with pytest.raises(ConfigurationError):
        await store.update(good, delete="ab")
    with pytest.raises(ConfigurationError):
        await store.rotate(good, user="\ud800")
    with pytest.raises(ConfigurationError):
        await store.destroy_user(b"alice")  # type: ignore[arg-type]
    await client.aclose()


async def test_create_get_update_destroy(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix, ttl=600)
    session = await store.create({"cart": [1, 2], "theme": "light"})
    assert ID.match(session.id)
    assert session.user is None
    assert dict(session.data) == {"cart": [1, 2], "theme": "light"}
    other = await store.create()
    assert other.id != session.id

    key = session_key(key_prefix, session.id)
    assert 590_000 < await redis_client.pttl(key) <= 600_000
    assert await store.get(session.id) == session
    with pytest.raises(TypeError):
        session.data["x"] = 1  # type: ignore[index]

    assert await store.update(session.id, {"theme": "dark", "n": 3}, delete=["cart"])
    got = await store.get(session.id)
    assert got is not None
    assert dict(got.data) == {"theme": "dark", "n": 3}
    assert await store.update(session.id)  # nothing to change: still there, TTL slid

    # A well-formed id nobody issued.
    unknown = session.id[:5] + "B" * 32
    assert await store.get(unknown) is None
    assert not await store.update(unknown, {"a": 1})
    assert await redis_client.exists(session_key(key_prefix, unknown)) == 0  # not created

    assert await store.destroy(session.id)
    assert not await store.destroy(session.id)
    assert await store.get(session.id) is None
    assert not await store.update(session.id, {"a": 1})

    # A malformed id costs no command at all.
    before = await script_calls(redis_client)
    assert await store.get("not-an-id") is None
    assert await script_calls(redis_client) == before


async def test_sliding_expiry(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix, ttl=60)
    session = await store.create({"a": 1}, user="alice")
    key = session_key(key_prefix, session.id)
    # Stand in for 58 s of idleness: a read slides the TTL back to 60 s, and so does a write.
    await redis_client.pexpire(key, 2000)
    assert await store.get(session.id) is not None
    assert await redis_client.pttl(key) > 50_000
    await redis_client.pexpire(key, 2000)
    assert await store.update(session.id, {"b": 2})
    assert await redis_client.pttl(key) > 50_000

    # Left alone, a session expires whole (a short TTL, waited for generously).
    short = SessionStore(redis_client, prefix=key_prefix, ttl=0.5)
    fleeting = await short.create({"a": 1}, user="alice")
    fleeting_key = session_key(key_prefix, fleeting.id)
    assert await redis_client.exists(fleeting_key) == 1

    async def gone() -> bool:
        return await redis_client.exists(fleeting_key) == 0

    await wait_until(gone)
    assert await short.get(fleeting.id) is None
    # The user's index dropped the expired session at the next login; the live one stays.
    third = await store.create(user="alice")
    digest = hashlib.blake2b(b"alice", digest_size=16).hexdigest()
    index = f"{key_prefix}:session:{{sessions:{third.id[:4]}}}:u:{digest}"
    members = {m.decode() for m in await redis_client.smembers(index)}
    assert members == {session.id.split(".")[1], third.id.split(".")[1]}
    assert await redis_client.pttl(index) > 50_000


async def test_absolute_ttl_ends_an_active_session(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix, ttl=60, absolute_ttl=1.0)
    session = await store.create({"a": 1})
    key = session_key(key_prefix, session.id)
    assert await redis_client.pttl(key) <= 1000  # never a TTL past the deadline

    async def ended() -> bool:
        # Reading slides the TTL, yet never past the deadline.
        return await store.get(session.id) is None

    await wait_until(ended)
    assert not await store.update(session.id, {"b": 1})

    # Logging in restarts the deadline: rotation with a user.
    again = await store.create({"a": 1})
    rotated = await store.rotate(again.id, user="bob")
    assert rotated is not None
    assert 0 < await redis_client.pttl(session_key(key_prefix, rotated.id)) <= 1000


async def test_rotation_kills_the_old_id(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    anonymous = await store.create({"cart": ["book"]})
    logged_in = await store.rotate(anonymous.id, user="alice")
    assert logged_in is not None
    assert logged_in.id != anonymous.id
    assert logged_in.user == "alice"
    assert dict(logged_in.data) == {"cart": ["book"]}
    # The old id is dead for every operation; a second rotation of it finds nothing.
    assert await store.get(anonymous.id) is None
    assert not await store.update(anonymous.id, {"x": 1})
    assert await store.rotate(anonymous.id, user="alice") is None
    assert await redis_client.exists(session_key(key_prefix, anonymous.id)) == 0
    assert await store.get(logged_in.id) == logged_in

    # Every session of alice carries alice's tag (her slot), whatever it was rotated from.
    direct = await store.create(user="alice")
    assert direct.id[:4] == logged_in.id[:4]
    # Rotating again (privilege change) keeps the user and the slot: one script.
    again = await store.rotate(logged_in.id)
    assert again is not None
    assert again.user == "alice"
    assert again.id[:4] == logged_in.id[:4]
    assert await store.get(logged_in.id) is None
    # Logging in as someone else moves the session out of alice's index.
    bob = await store.rotate(again.id, user="bob")
    assert bob is not None
    assert bob.user == "bob"
    assert dict(bob.data) == {"cart": ["book"]}
    assert await store.destroy_user("alice") == 1  # only `direct` is left to alice
    assert await store.get(bob.id) == bob


async def test_destroy_user_logs_out_everywhere(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    alice = [await store.create(user="alice") for _ in range(3)]
    rotated = await store.rotate((await store.create({"a": 1})).id, user="alice")
    assert rotated is not None
    alice.append(rotated)
    bob = await store.create(user="bob")
    anonymous = await store.create({"x": 1})
    destroyed = await store.destroy(alice[0].id)
    assert destroyed

    assert await store.destroy_user("alice") == 3
    for session in alice:
        assert await store.get(session.id) is None
    assert await store.get(bob.id) == bob
    assert await store.get(anonymous.id) == anonymous
    assert await store.destroy_user("alice") == 0
    assert await store.destroy_user("nobody") == 0
    # A new login after "log out everywhere" works as usual.
    fresh = await store.create(user="alice")
    assert await store.get(fresh.id) == fresh


async def test_concurrent_field_updates_are_not_lost(redis_client: Any, key_prefix: str) -> None:
    store = SessionStore(redis_client, prefix=key_prefix)
    session = await store.create({"base": 0})

    async def write(i: int) -> None:
        assert await store.update(session.id, {f"f{i}": i})

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(write, i)
    got = await store.get(session.id)
    assert got is not None
    assert dict(got.data) == {"base": 0, **{f"f{i}": i for i in range(50)}}


async def test_on_change_follows_every_write_and_restore_brings_back(
    redis_client: Any, key_prefix: str
) -> None:
    backup: dict[str, tuple[int, Session | None]] = {}
    events: list[SessionChange] = []

    async def on_change(change: SessionChange) -> None:
        events.append(change)
        if change.previous_id is not None:
            backup[change.previous_id] = (0, None)
        known = backup.get(change.session_id, (0, None))[0]
        if change.session is None or change.version > known:
            backup[change.session_id] = (change.version, change.session)

    store = SessionStore(redis_client, prefix=key_prefix, on_change=on_change)
    session = await store.create({"a": 1})
    assert await store.update(session.id, {"b": 2}, delete=["a"])
    rotated = await store.rotate(session.id, user="carol")
    assert rotated is not None
    other = await store.create({"z": 0}, user="carol")
    assert await store.destroy_user("carol") == 2
    kinds = [e.kind for e in events]
    assert kinds == ["create", "update", "rotate", "create", "destroy", "destroy"]
    assert events[1].session is not None
    assert dict(events[1].session.data) == {"b": 2}
    assert events[1].version == 2
    assert events[2].previous_id == session.id
    assert events[2].version == 3
    assert {e.session_id for e in events[4:]} == {rotated.id, other.id}

    # Redis loses a session; the durable copy puts it back under the same id.
    kept = await store.create({"cart": [1]}, user="dave")
    assert await store.update(kept.id, {"cart": [1, 2]})
    await redis_client.delete(session_key(key_prefix, kept.id))
    assert await store.get(kept.id) is None
    version, saved = backup[kept.id]
    assert saved is not None
    assert version == 2
    assert await store.restore(saved, version=version)
    assert events[-1].kind == "restore"
    assert events[-1].version == 3  # the copy keeps following it
    assert not await store.restore(saved)  # exists now: never overwritten
    assert await store.get(kept.id) == saved
    assert await store.destroy_user("dave") == 1  # back in dave's index too
    with pytest.raises(ConfigurationError):
        await store.restore(Session(kept.id, "someone-else", {}))
