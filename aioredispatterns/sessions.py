"""Sessions: server-side session data in Redis, with sliding expiry, id rotation on login
and "log out everywhere".

The seed's pattern: session data in a hash keyed by a session id, with a TTL. Done once::

    store = SessionStore(client, ttl=1800)        30 minutes of inactivity end a session
    session = await store.create({"cart": []})    a fresh id (192 random bits)
    session = await store.get(session.id)         reads it and slides its TTL
    await store.update(session.id, {"theme": "dark"}, delete=["cart"])   field by field
    session = await store.rotate(session.id, user="alice")   login: new id, old id dead
    await store.destroy(session.id)               logout
    await store.destroy_user("alice")             log out everywhere

**The caveat.** If Redis is the only place sessions live, losing Redis (a restart
without persistence, a failover to a replica that was behind, a flush) logs everybody
out. Where that matters, persist them elsewhere too: ``on_change`` is awaited after every
write with a :class:`SessionChange` (what changed, the session's data after it, its
version), so a durable store can follow; :meth:`SessionStore.restore` puts a saved
session back under its own id (for example when :meth:`SessionStore.get` misses after an
outage and the durable store still has it). Events of concurrent writes to one session
may reach the hook in any order: keep the highest ``version`` per id, and treat a
``destroy`` as final.

**Ids.** A session id is ``<tag>.<secret>``: ``secret`` is 32 characters of
``secrets.token_urlsafe`` (192 random bits: the id's whole unguessability, far above the
128 bits asked of a session id), ``tag`` 4 hex digits that only place the session on a
cluster. A string of another shape is not an id: :meth:`~SessionStore.get` answers None
for it without a command.

**Keys and hash tags.** One session is one hash; its user index a set::

    <prefix>:session:{<name>:<tag>}:s:<secret>     the session (a hash), expiring whole
    <prefix>:session:{<name>:<tag>}:u:<user hash>  the user's sessions (a set of secrets)

An anonymous session's tag is random. An authenticated session's tag is the user's tag
(the first 4 hex digits of a BLAKE2b digest of the user name), so every session of one
user shares one hash slot with that user's index: creating, destroying and logging out
everywhere are each one script in one slot, and a session is never created or destroyed
without its index entry. The id carries the tag, so :meth:`~SessionStore.get` finds the
slot without a lookup. The tag reveals 16 bits of a hash of the user name to whoever
sees the id, who could use the session anyway: the id is the bearer secret.

**Rotation.** :meth:`~SessionStore.rotate` moves a session to a new id (do it on login,
against session fixation) with its data. When the new id keeps the old tag (the same
user, or no user given), or the server is standalone, it is one script: the old id dies
as the new one is born. Logging in an anonymous session on a cluster moves it to the
user's slot, so it takes two scripts: the first reads the old session and deletes it in
one step (no write to the old id can land after the read), the second creates the new
one. Between the two no id is valid, never both; if the second fails (or the caller is
cancelled between them), the session is gone and the user logs in again: it fails
closed.

**Expiry.** Every :meth:`~SessionStore.get` and :meth:`~SessionStore.update` sets the
whole hash's TTL back to ``ttl`` (no per-field expiry, so Redis 6.2 serves it). With
``absolute_ttl`` a session also ends that long after it was created or logged in,
however active: its deadline is kept in the hash on the server's clock, and no TTL is
ever set past it. A user index lives at least as long as its longest session; entries
of sessions that expired on their own are dropped at the user's next login.

**Data.** Values are serialized field by field (JSON by default; never pickle unless you
pass a signed :class:`~aioredispatterns.serializers.PickleSerializer` yourself), so two
requests of one session that write different fields both land; two that write the same
field: the last one wins.

Cancellation: every call is one script (two for a cross-slot rotation, above), atomic on
the server; a caller cancelled after it ran loses the reply, not the write. ``on_change``
runs in the caller's task after the write: cancelling the caller may skip it. Nothing
runs in the background.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

from ._commands import Arg
from ._connection import AnyRedis, check_client, is_cluster
from ._keys import DEFAULT_PREFIX, check_prefix, keyspace
from ._scripts import Script
from ._validate import check_callable, check_count, check_items, check_name, check_seconds, shown
from .errors import ConfigurationError, RedisPatternsError
from .serializers import Serializer, check_serializer, default_serializer

__all__ = (
    "Session",
    "SessionChange",
    "SessionStore",
)

_CREATE = Script.load("session_create")
_GET = Script.load("session_get")
_UPDATE = Script.load("session_update")
_REMOVE = Script.load("session_remove")
_ROTATE = Script.load("session_rotate")
_DESTROY_USER = Script.load("session_destroy_user")

#: Random bytes in an id's secret: 192 bits, 32 base64url characters.
_SECRET_BYTES: Final = 24
_ID: Final = re.compile(r"\A([0-9a-f]{4})\.([A-Za-z0-9_-]{32})\Z")
#: The longest field name and user name accepted, in bytes.
_MAX_FIELD_BYTES: Final = 256
_MAX_USER_BYTES: Final = 1024
_MAX_NAME_BYTES: Final = 128
#: The most fields one call writes or deletes.
_MAX_FIELDS: Final = 1000
#: Versions count writes; they stay exact in Lua's doubles.
_MAX_VERSION: Final = 2**53 - 1
#: A fresh id that already exists is a 2**-192 event; give up after a few anyway.
_CREATE_ATTEMPTS: Final = 4

ChangeKind: TypeAlias = Literal["create", "update", "rotate", "destroy", "restore"]


@dataclass(frozen=True, slots=True)
class Session:
    """A snapshot of one session, as read or written.

    Attributes:
        id: the session id (``<tag>.<secret>``): the bearer secret a cookie carries.
        user: who is logged in (set by ``create(user=...)`` or :meth:`SessionStore.rotate`),
            or None for an anonymous session.
        data: the session's fields and their values (a read-only mapping; change them with
            :meth:`SessionStore.update`).
    """

    id: str
    user: str | None
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class SessionChange:
    """What ``on_change`` is told after a write: enough for a durable copy to follow.

    Attributes:
        kind: ``"create"``, ``"update"``, ``"rotate"`` (``previous_id`` died and
            ``session`` took its place), ``"restore"`` or ``"destroy"`` (also once per
            session :meth:`SessionStore.destroy_user` deleted).
        session_id: the id written (for ``"rotate"``: the new id).
        session: the session after the change; None for ``"destroy"``.
        version: the session's version after the change (it grows by one on every write;
            keep the highest per id); 0 for ``"destroy"``.
        previous_id: for ``"rotate"``, the id that died; else None.
    """

    kind: ChangeKind
    session_id: str
    session: Session | None
    version: int
    previous_id: str | None = None


OnChange: TypeAlias = Callable[[SessionChange], Awaitable[None]]


def _ms(name: str, seconds: float) -> int:
    return max(1, round(check_seconds(name, seconds) * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _user_digest(user: str) -> str:
    return hashlib.blake2b(user.encode(), digest_size=16).hexdigest()


def _check_text(what: str, value: object, max_bytes: int) -> str:
    """A str name (not bytes) that ``check_name`` accepts."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a str, got {shown(value)}")
    checked = check_name(what, value, max_bytes=max_bytes)
    assert isinstance(checked, str)
    return checked


def _check_user(user: object) -> str:
    return _check_text("user", user, _MAX_USER_BYTES)


def _check_field(name: object) -> str:
    return _check_text("session field name", name, _MAX_FIELD_BYTES)


class SessionStore:
    """Sessions in Redis: create, read (sliding the TTL), update field by field, rotate,
    destroy, and destroy every session of a user.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the store's name (a str of at most 128 bytes); stores with different names
            (or prefixes) never see each other's sessions.
        prefix: the key prefix.
        ttl: the sliding TTL in seconds: a session nobody reads or writes for this long
            expires (default 30 minutes).
        absolute_ttl: if given, a session also ends this many seconds after it was
            created or logged in (:meth:`rotate` with ``user``), however active.
        on_change: an async callable awaited with a :class:`SessionChange` after every
            write (see the module's docstring: the answer to "Redis is the only session
            store"); an exception it raises propagates to the caller, after the write.
        serializer: how values become bytes (default: JSON).

    Keys: ``<prefix>:session:{<name>:<tag>}:s:<secret>`` per session and
    ``<prefix>:session:{<name>:<tag>}:u:<user hash>`` per user (see the module docstring).

    Raises:
        ConfigurationError: a bad ``name``, ``prefix``, ``ttl``, ``absolute_ttl``,
            ``on_change`` or ``serializer`` (before any command).
    """

    __slots__ = (
        "_absolute_ms",
        "_client",
        "_on_change",
        "_ttl_ms",
        "absolute_ttl",
        "name",
        "prefix",
        "serializer",
        "ttl",
    )

    def __init__(
        self,
        client: AnyRedis,
        *,
        name: str = "sessions",
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 1800.0,
        absolute_ttl: float | None = None,
        on_change: OnChange | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        self._client = check_client(client)
        if not isinstance(name, str):
            raise ConfigurationError(f"name must be a str, got {shown(name)}")
        check_name("name", name, max_bytes=_MAX_NAME_BYTES)
        check_prefix(prefix)
        keyspace(prefix, "session", f"{name}:0000")  # refuses what a key cannot hold
        self._ttl_ms = _ms("ttl", ttl)
        self._absolute_ms = 0 if absolute_ttl is None else _ms("absolute_ttl", absolute_ttl)
        self._on_change = None if on_change is None else check_callable("on_change", on_change)
        self.serializer: Serializer = (
            default_serializer() if serializer is None else check_serializer(serializer)
        )
        self.name: str = name
        self.prefix: str = prefix
        self.ttl: float = float(ttl)
        self.absolute_ttl: float | None = None if absolute_ttl is None else float(absolute_ttl)

    def __repr__(self) -> str:
        return f"<SessionStore {self.name!r} ttl={self.ttl} absolute_ttl={self.absolute_ttl}>"

    # ------------------------------------------------------------------ keys and codec

    def _base(self, tag: str) -> str:
        base = keyspace(self.prefix, "session", f"{self.name}:{tag}").base
        assert isinstance(base, str)
        return base

    def _where(self, tag: str, secret: str) -> tuple[str, str]:
        """The session's key and the prefix of its tag's user index keys."""
        base = self._base(tag)
        return f"{base}:s:{secret}", f"{base}:u:"

    def _fields(self, values: Mapping[str, Any] | None, what: str) -> list[Arg]:
        if values is None:
            return []
        if not isinstance(values, Mapping):
            raise ConfigurationError(f"{what} must be a mapping, got {type(values).__name__}")
        if len(values) > _MAX_FIELDS:
            raise ConfigurationError(f"{what} has {len(values)} fields, above {_MAX_FIELDS}")
        flat: list[Arg] = []
        for name, value in values.items():
            flat.append("d:" + _check_field(name))
            flat.append(self.serializer.dumps(value))
        return flat

    def _session(self, session_id: str, flat: list[Any]) -> tuple[Session, int]:
        user: str | None = None
        version = 0
        data: dict[str, Any] = {}
        for i in range(0, len(flat) - 1, 2):
            name = _text(flat[i])
            if name.startswith("d:"):
                data[name[2:]] = self.serializer.loads(_raw(flat[i + 1]))
            elif name == "m:u":
                user = _text(flat[i + 1])
            elif name == "m:v":
                version = int(flat[i + 1])
        return Session(session_id, user, MappingProxyType(data)), version

    @staticmethod
    def _parse_id(session_id: object) -> tuple[str, str] | None:
        """``(tag, secret)`` of a well-formed id; None for a str of another shape."""
        if not isinstance(session_id, str):
            raise ConfigurationError(f"a session id must be a str, got {shown(session_id)}")
        match = _ID.match(session_id)
        return None if match is None else (match.group(1), match.group(2))

    @classmethod
    def _split(cls, session_id: object) -> tuple[str, str]:
        where = cls._parse_id(session_id)
        if where is None:
            raise ConfigurationError(f"not a session id: {shown(session_id)}")
        return where

    @staticmethod
    def _new_secret() -> str:
        return secrets.token_urlsafe(_SECRET_BYTES)

    async def _notify(self, change: SessionChange) -> None:
        if self._on_change is not None:
            await self._on_change(change)

    # ------------------------------------------------------------------ the API

    async def create(
        self, data: Mapping[str, Any] | None = None, *, user: str | None = None
    ) -> Session:
        """Create a session under a fresh id and return it.

        Args:
            data: its first fields (JSON-serializable values by default).
            user: who it belongs to (entered in the user's index, for
                :meth:`destroy_user`); None: anonymous (log in later with :meth:`rotate`).

        Raises:
            ConfigurationError: a bad field name or ``user`` (before any command).
            SerializationError: a value the serializer cannot encode (before any command).

        Cancellation: the script either ran or did not; if it ran, the session exists and
        expires after ``ttl`` unused.
        """
        fields = self._fields(data, "data")
        digest = "" if user is None else _user_digest(_check_user(user))
        for _ in range(_CREATE_ATTEMPTS):
            tag = digest[:4] if digest else secrets.token_hex(2)
            secret = self._new_secret()
            key, index_prefix = self._where(tag, secret)
            args: list[Arg] = [
                self._ttl_ms, index_prefix, secret, user or "", digest, self._absolute_ms, 0, 0,
                *fields,
            ]  # fmt: skip
            if await _CREATE.run(self._client, [key], args) == 1:
                session_id = f"{tag}.{secret}"
                session = Session(session_id, user, MappingProxyType(dict(data or {})))
                await self._notify(SessionChange("create", session_id, session, 1))
                return session
        raise RedisPatternsError("could not find a free session id")  # pragma: no cover

    async def get(self, session_id: str) -> Session | None:
        """The session ``session_id``, its TTL slid back to ``ttl``; None if there is none.

        A string that is not shaped like an id (a forged or truncated cookie) answers
        None without a command.

        Raises:
            ConfigurationError: ``session_id`` is not a str (before any command).
            SerializationError: a stored value the serializer cannot decode.

        Cancellation: the read and the slide either ran or did not.
        """
        where = self._parse_id(session_id)
        if where is None:
            return None
        tag, secret = where
        key, index_prefix = self._where(tag, secret)
        flat = await _GET.run(self._client, [key], [self._ttl_ms, index_prefix, secret])
        if not flat:
            return None
        return self._session(session_id, flat)[0]

    async def update(
        self,
        session_id: str,
        set: Mapping[str, Any] | None = None,
        delete: Iterable[str] = (),
    ) -> bool:
        """Set and delete fields of a session, and slide its TTL, in one atomic step.

        Only the fields named are touched: concurrent updates of different fields all
        land. A session that does not exist is not created.

        Returns:
            True if the session existed and was updated; False if it is gone (expired,
            destroyed, rotated away): nothing was written.

        Raises:
            ConfigurationError: a malformed ``session_id``, a bad field name, more than
                1000 fields, or a field both set and deleted (before any command).
            SerializationError: a value the serializer cannot encode (before any command).

        Cancellation: the script either ran or did not; if it ran, every field changed.
        """
        tag, secret = self._split(session_id)
        fields = self._fields(set, "set")
        deleted = [_check_field(name) for name in check_items("delete", delete)]
        if len(deleted) > _MAX_FIELDS:
            raise ConfigurationError(f"delete has {len(deleted)} fields, above {_MAX_FIELDS}")
        if set is not None and any(name in set for name in deleted):
            raise ConfigurationError("a field cannot be both set and deleted")
        key, index_prefix = self._where(tag, secret)
        snapshot = self._on_change is not None
        args: list[Arg] = [
            self._ttl_ms, index_prefix, secret, int(snapshot), len(fields) // 2, *fields,
            *("d:" + name for name in deleted),
        ]  # fmt: skip
        reply = await _UPDATE.run(self._client, [key], args)
        if not reply:
            return False
        if snapshot:
            session, version = self._session(session_id, reply[1])
            await self._notify(SessionChange("update", session_id, session, version))
        return True

    async def rotate(self, session_id: str, *, user: str | None = None) -> Session | None:
        """Move a session to a new id with its data; the old id stops working (login).

        Call it whenever the privilege of a session changes, above all on login, so an
        id planted before the login (session fixation) is worthless after it.

        Args:
            session_id: the current id.
            user: who the session now belongs to (a login: its absolute deadline
                restarts); None: it keeps its user (or stays anonymous).

        Returns:
            The session under its new id; None if ``session_id`` does not exist (expired,
            destroyed, rotated already): nothing was created.

        Raises:
            ConfigurationError: a malformed ``session_id`` or bad ``user`` (before any
                command).

        Cancellation: in one slot (or on a standalone server) the move is one script.
        Across slots (logging in an anonymous session on a cluster) it is two, the old id
        deleted first: a caller cancelled between them leaves no session (the user logs
        in again), never two.
        """
        old_tag, old_secret = self._split(session_id)
        digest = "" if user is None else _user_digest(_check_user(user))
        new_tag = digest[:4] if digest else old_tag
        old_key, old_index = self._where(old_tag, old_secret)
        if new_tag != old_tag and is_cluster(self._client):
            return await self._rotate_across(session_id, user, digest, new_tag)
        for _ in range(_CREATE_ATTEMPTS):
            secret = self._new_secret()
            new_key, new_index = self._where(new_tag, secret)
            args: list[Arg] = [
                self._ttl_ms, old_index, old_secret, new_index, secret,
                "0" if user is None else "1", user or "", digest, self._absolute_ms,
            ]  # fmt: skip
            reply = await _ROTATE.run(self._client, [old_key, new_key], args)
            if reply == 0:
                continue  # pragma: no cover - the fresh id existed
            if not reply:
                return None
            new_id = f"{new_tag}.{secret}"
            session, version = self._session(new_id, reply)
            await self._notify(SessionChange("rotate", new_id, session, version, session_id))
            return session
        raise RedisPatternsError("could not find a free session id")  # pragma: no cover

    async def _rotate_across(
        self, session_id: str, user: str | None, digest: str, new_tag: str
    ) -> Session | None:
        old_tag, old_secret = self._split(session_id)
        old_key, old_index = self._where(old_tag, old_secret)
        flat = await _REMOVE.run(self._client, [old_key], [old_index, old_secret])
        if not flat:
            return None
        version = 0
        fields: list[Arg] = []
        for i in range(0, len(flat) - 1, 2):
            name = _text(flat[i])
            if name.startswith("d:"):
                fields += [name, _raw(flat[i + 1])]
            elif name == "m:v":
                version = int(flat[i + 1])
        # The new tag is the user's, so ``user`` is set: a login, the deadline restarts.
        for _ in range(_CREATE_ATTEMPTS):
            secret = self._new_secret()
            key, index_prefix = self._where(new_tag, secret)
            args: list[Arg] = [
                self._ttl_ms, index_prefix, secret, user or "", digest, self._absolute_ms, 0,
                version, *fields,
            ]  # fmt: skip
            created = await _CREATE.run(self._client, [key], args)
            if created == 1:
                new_id = f"{new_tag}.{secret}"
                session, _ = self._session(new_id, [*fields, b"m:u", user])
                change = SessionChange("rotate", new_id, session, version + 1, session_id)
                await self._notify(change)
                return session
        raise RedisPatternsError("could not find a free session id")  # pragma: no cover

    async def destroy(self, session_id: str) -> bool:
        """Delete a session (logout) and its entry in its user's index.

        Returns:
            True if it existed.

        Raises:
            ConfigurationError: a malformed ``session_id`` (before any command).

        Cancellation: the script either ran or did not.
        """
        tag, secret = self._split(session_id)
        key, index_prefix = self._where(tag, secret)
        flat = await _REMOVE.run(self._client, [key], [index_prefix, secret])
        if not flat:
            return False
        await self._notify(SessionChange("destroy", session_id, None, 0))
        return True

    async def destroy_user(self, user: str) -> int:
        """Delete every session of ``user`` (log out everywhere), in one atomic step.

        Sessions created for the user afterwards are not affected. Anonymous sessions
        never belong to a user: log them in with :meth:`rotate` (``user=``) or create
        them with ``user=``.

        Returns:
            How many sessions were deleted.

        Raises:
            ConfigurationError: a bad ``user`` (before any command).

        Cancellation: the script either ran or did not.
        """
        digest = _user_digest(_check_user(user))
        tag = digest[:4]
        base = self._base(tag)
        deleted = await _DESTROY_USER.run(self._client, [f"{base}:u:{digest}"], [f"{base}:s:"])
        for member in deleted:
            await self._notify(SessionChange("destroy", f"{tag}.{_text(member)}", None, 0))
        return len(deleted)

    async def restore(self, session: Session, *, version: int = 0) -> bool:
        """Put a saved session back under its own id (after Redis lost it).

        The way back from a durable copy kept with ``on_change``: when :meth:`get` misses
        for an id the copy still has, restore it and read again. Its TTL starts afresh (as
        does its absolute deadline, if any).

        Args:
            session: the saved session (``SessionChange.session``).
            version: the saved version (``SessionChange.version``): the restored session
                continues from ``version + 1``, so a copy that keeps the highest version
                per id keeps following it.

        Returns:
            True if it was written; False if a session with that id exists already
            (nothing written).

        Raises:
            ConfigurationError: a malformed id, user or field (before any command).
            SerializationError: a value the serializer cannot encode (before any command).

        Cancellation: the script either ran or did not.
        """
        if not isinstance(session, Session):
            raise ConfigurationError(f"expected a Session, got {type(session).__name__}")
        tag, secret = self._split(session.id)
        digest = ""
        if session.user is not None:
            digest = _user_digest(_check_user(session.user))
            if digest[:4] != tag:
                raise ConfigurationError("the session's id does not carry its user's tag")
        version = check_count("version", version, maximum=_MAX_VERSION)
        fields = self._fields(session.data, "data")
        key, index_prefix = self._where(tag, secret)
        args: list[Arg] = [
            self._ttl_ms, index_prefix, secret, session.user or "", digest, self._absolute_ms,
            0, version, *fields,
        ]  # fmt: skip
        if await _CREATE.run(self._client, [key], args) != 1:
            return False
        await self._notify(SessionChange("restore", session.id, session, version + 1))
        return True
