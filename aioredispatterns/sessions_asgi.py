"""Sessions for ASGI apps (Starlette, FastAPI): a middleware with signed cookies.

Install with ``pip install 'aioredispatterns[asgi]'``; the middleware itself is plain
ASGI and imports nothing from Starlette. ::

    store = SessionStore(client, ttl=1800)
    app = Starlette(routes=..., middleware=[
        Middleware(SessionMiddleware, store=store, secret=os.environ["SESSION_SECRET"]),
    ])

    async def login(request: Request) -> Response:
        session = session_of(request)              # or request.scope["session"]
        user = await check_password(...)           # yours
        await session.login(user)                  # new id (rotation), cookie re-set
        return RedirectResponse("/")

    async def cart(request: Request) -> Response:
        session = session_of(request)
        session["cart"] = [*session.get("cart", []), item]   # written back at response start
        ...

With FastAPI, a dependency: ``def current_session(request: Request) -> RequestSession:
return session_of(request)`` and ``Annotated[RequestSession, Depends(current_session)]``.
Starlette's own ``request.session`` returns the same object (typed there as a dict).

**The store** is a provider resolved per request, as for the rate-limit glue: the
:class:`~aioredispatterns.sessions.SessionStore` itself, :func:`app_state` ``("sessions")``
(the store the app's lifespan put in its state: ``yield {"sessions": store}`` or
``app.state.sessions = store``), or a callable with no argument or with the ASGI scope.
So the client and the store are made and closed in the lifespan, not at import.

**Cookies.** The cookie holds the session id and an HMAC-SHA256 of it under ``secret``
(``<id>.<signature>``, 81 characters). A cookie whose signature does not check out
(forged, tampered with, truncated, signed with another secret) is ignored before any
Redis command: guessing ids costs the attacker a request each and Redis nothing. The
signature is compared in constant time. To rotate the secret, pass a list: the first
signs, every one verifies. The cookie is ``Secure``, ``HttpOnly`` and ``SameSite=Lax``
by default, and a browser-session cookie (no ``Max-Age``) unless ``max_age`` is given,
then it is re-sent on every response so it slides with the session.

**When things are written.** A request's session is read once, before the app runs (one
script, which also slides its TTL), only if the request carries a validly signed cookie.
Changes (``session[k] = v``, ``del session[k]``) are written at ``http.response.start``,
field by field (:meth:`SessionStore.update <aioredispatterns.sessions.SessionStore.update>`):
two concurrent requests of one session writing different fields both land. A value
mutated in place (``session["cart"].append(x)``) is not seen: assign it again. The first
write to a request without a session creates one and sets the cookie.
:meth:`RequestSession.login` and :meth:`RequestSession.logout` act at once. A websocket
gets the session as read at the handshake; write with ``await session.save()`` (an
existing session only: no cookie can be set there).

A request whose session is gone (expired, logged out elsewhere) behaves as one without a
session; the stale cookie is left alone (deleting it could race with a concurrent
login's new cookie) and replaced as soon as the session is written.

**When Redis fails** (unreachable, paused, the pool exhausted, an error reply, or slower
than ``timeout``) while the middleware loads or writes back a session, ``on_error``
decides, as for the rate-limit middleware: ``"closed"`` (default) answers ``503 Service
Unavailable`` with ``Retry-After: error_retry_after`` without calling the app;
``"open"`` lets the request through with an empty session marked unavailable
(``session.available`` is False: no id, no user; see :class:`RequestSession` for what
writes to it do); a callable ``(scope, error) -> "open" | "closed"`` decides per
request. For ``error_cooldown`` seconds after a failure, requests that need Redis go to
``on_error`` without waiting on it again; then one probes. One warning is logged when an
outage starts and one when the store answers again (``aioredispatterns.sessions_asgi``
logger), not one per request. Requests without a session cookie that write nothing
need no Redis command and are served normally throughout.

The write-back runs at ``http.response.start``, before that message is passed on: no
byte of the response has left yet, so under ``"closed"`` a failed write-back still
turns the response into the 503 (the app's own response is dropped; whatever else the
handler did stands, a login or logout in it included, whose cookie the 503 carries; a
write that timed out may still land later). Under ``"open"`` the app's response goes
out without the write (and without a new session's cookie). What the handler itself
awaits (:meth:`~RequestSession.login`, :meth:`~RequestSession.logout`,
:meth:`~RequestSession.save`) raises the store's typed error in the handler, where the
app's exception handlers can map it. Bad configuration (a provider that finds no store)
and undecodable session data (:class:`~aioredispatterns.errors.SerializationError`) are
not an outage: they raise.

Cancellation: a client disconnect that cancels the request before a write leaves the
session as it was; after, the write stands (see :mod:`aioredispatterns.sessions`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Final, Literal, TypeAlias

from ._asgi_outage import (
    DEFAULT_ERROR_COOLDOWN,
    DEFAULT_ERROR_RETRY_AFTER,
    DEFAULT_TIMEOUT,
    UNAVAILABLE_BODY,
    Failure,
    FailurePolicy,
    OnError,
    Outage,
    encode_headers,
    refuse,
)
from ._provider import AppState, Provider, app_state, resolver
from ._validate import check_flag, check_seconds, shown
from .errors import ConfigurationError, ConnectionFailed, RedisPatternsError
from .sessions import Session, SessionStore

__all__ = (
    "AppState",
    "OnError",
    "RequestSession",
    "SessionMiddleware",
    "app_state",
    "session_of",
)

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

logger: logging.Logger = logging.getLogger("aioredispatterns.sessions_asgi")

#: What the MAC covers besides the id, so a signature made for something else under the
#: same secret is never a valid session cookie.
_PURPOSE: Final = b"aioredispatterns.session\x00"
_SIGNATURE_CHARS: Final = 43  # 32 bytes of HMAC-SHA256, base64url without padding
#: Longer cookie values are refused before the MAC is computed.
_MAX_COOKIE: Final = 256
_MIN_SECRET_BYTES: Final = 16
_TOKEN: Final = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
_SAMESITE: Final = {"lax": "Lax", "strict": "Strict", "none": "None"}
#: Logged once per outage, when on_error let a request through and its writes are lost.
_DROPPED: Final = (
    "session writes are dropped until the session store answers again (requests that "
    "on_error let through during the outage keep their changes to themselves)"
)


class RequestSession(MutableMapping[str, Any]):
    """The session of one request: a mutable mapping of its data, plus login / logout.

    The middleware puts it at ``scope["session"]``; reach it with :func:`session_of`.
    Reads come from the snapshot taken when the request arrived; writes are recorded and
    written back field by field when the response starts (or at :meth:`save`).

    **Unavailable.** When the store failed to load the session and the middleware's
    ``on_error`` let the request through (``"open"``), the session is empty, without id
    or user, and :attr:`available` is False. Writes to it (``session[k] = v``,
    ``del session[k]``, :meth:`save`) are seen by the rest of the request but never
    written: they are dropped, with one warning per outage (writing them would start a
    new session and overwrite the cookie of the real one, which is only out of reach).
    :meth:`login` and :meth:`logout` raise
    :class:`~aioredispatterns.errors.ConnectionFailed` instead (neither can be done
    without the store, and pretending would be worse: a logout that leaves the session
    valid). Check :attr:`available` to answer differently, such as a 503 of your own.

    Attributes:
        id: the session id, or None while the request has no session.
        user: who is logged in, or None.
        store: the store it lives in.
        available: False when the store could not be read for this request (above).
    """

    __slots__ = (
        "_cookie",
        "_data",
        "_deleted",
        "_failure",
        "_outage",
        "_set",
        "available",
        "id",
        "store",
        "user",
    )

    def __init__(self, store: SessionStore, session: Session | None) -> None:
        self.store: SessionStore = store
        self.available: bool = True
        self._failure: RedisPatternsError | None = None
        self._outage: Outage | None = None
        self.id: str | None = None if session is None else session.id
        self.user: str | None = None if session is None else session.user
        self._data: dict[str, Any] = {} if session is None else dict(session.data)
        self._set: dict[str, Any] = {}
        self._deleted: set[str] = set()
        self._cookie: Literal["keep", "set", "delete"] = "keep"

    def __repr__(self) -> str:
        return f"<RequestSession user={self.user!r} fields={sorted(self._data)}>"

    def __getitem__(self, name: str) -> Any:
        return self._data[name]

    def __setitem__(self, name: str, value: Any) -> None:
        """Set a field (written back at response start).

        Raises:
            ConfigurationError: ``name`` is not a str.
            SerializationError: the store's serializer cannot encode ``value``.
        """
        if not isinstance(name, str):
            raise ConfigurationError(f"a session field name must be a str, got {shown(name)}")
        # Refuse a value the store cannot encode here, in the handler that set it, rather
        # than when the response starts.
        self.store.serializer.dumps(value)
        self._data[name] = value
        self._set[name] = value
        self._deleted.discard(name)

    def __delitem__(self, name: str) -> None:
        del self._data[name]
        self._set.pop(name, None)
        self._deleted.add(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def modified(self) -> bool:
        """Whether there are changes not written yet."""
        return bool(self._set or self._deleted)

    async def save(self) -> None:
        """Write the pending changes now (the middleware calls it at response start).

        Without a session yet, the first change creates one (and the cookie is set).
        If the session vanished meanwhile (expired, logged out elsewhere), a new
        anonymous one is started with only the fields this request set: a write never
        brings back what a logout removed.

        On an unavailable session (see the class), the changes are dropped instead: no
        command is sent.

        Cancellation: a write either ran or did not; the changes stay pending until it
        completes.
        """
        if not self.modified:
            return
        if not self.available:
            self._drop()
            return
        if self.id is not None and await self.store.update(
            self.id, self._set, delete=self._deleted
        ):
            self._set.clear()
            self._deleted.clear()
            return
        # No session yet, or it is gone: what this request set is all the new one holds.
        fresh = dict(self._set)
        if fresh:
            created = await self.store.create(fresh)
            self.id = created.id
            self._cookie = "set"
        else:
            self.id = None
        self.user = None
        self._data = fresh
        self._set = {}
        self._deleted = set()

    async def login(self, user: str) -> None:
        """Log ``user`` in: the session moves to a new id (rotation) with its data.

        The id the request came with stops working at once (against session fixation);
        the response sets the cookie to the new one. Pending changes are written first.

        Raises:
            ConfigurationError: a bad ``user``.
            ConnectionFailed: the session is unavailable (see the class); nothing was
                sent. Errors of the store itself as they come.
        """
        self._check_available("log in")
        await self.save()
        session = None
        if self.id is not None:
            session = await self.store.rotate(self.id, user=user)
        if session is None:  # none, or it vanished meanwhile: start afresh
            session = await self.store.create(user=user)
        self.id = session.id
        self.user = session.user
        self._data = dict(session.data)
        self._cookie = "set"

    async def logout(self, *, everywhere: bool = False) -> None:
        """End the session (and with ``everywhere``, every session of its user).

        The data is cleared and the response deletes the cookie; a write after this
        starts a new anonymous session.

        Raises:
            ConnectionFailed: the session is unavailable (see the class); nothing was
                sent and the session stays valid. Errors of the store itself as they come.
        """
        check_flag("everywhere", everywhere)
        self._check_available("log out")
        if everywhere and self.user is not None:
            await self.store.destroy_user(self.user)
        if self.id is not None:
            await self.store.destroy(self.id)
        self.id = None
        self.user = None
        self._data = {}
        self._set = {}
        self._deleted = set()
        self._cookie = "delete"

    def _mark_unavailable(self, error: RedisPatternsError, outage: Outage) -> None:
        self.available = False
        self._failure = error
        self._outage = outage

    def _check_available(self, what: str) -> None:
        if not self.available:
            raise ConnectionFailed(
                f"cannot {what}: this request's session could not be read, the session "
                f"store is failing ({type(self._failure).__name__}: {self._failure})"
            ) from self._failure

    def _drop(self) -> None:
        if self._outage is not None:
            self._outage.note("dropped", _DROPPED)
        self._set = {}
        self._deleted = set()


def session_of(request_or_scope: Any) -> RequestSession:
    """The :class:`RequestSession` of a Starlette/FastAPI request (or an ASGI scope).

    Raises:
        ConfigurationError: the :class:`SessionMiddleware` did not run for this request.
    """
    scope = getattr(request_or_scope, "scope", request_or_scope)
    session = scope.get("session") if isinstance(scope, Mapping) else None
    if not isinstance(session, RequestSession):
        raise ConfigurationError("no session: is SessionMiddleware installed on this app?")
    return session


def _keys(secret: object) -> tuple[bytes, ...]:
    candidates = [secret] if isinstance(secret, str | bytes) else secret
    if not isinstance(candidates, Sequence) or not candidates:
        raise ConfigurationError("secret must be a str or bytes, or a non-empty list of them")
    keys = []
    for candidate in candidates:
        if not isinstance(candidate, str | bytes):
            raise ConfigurationError(f"a secret must be str or bytes, got {shown(candidate)}")
        key = candidate.encode() if isinstance(candidate, str) else candidate
        if len(key) < _MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"a secret must be at least {_MIN_SECRET_BYTES} bytes (secrets.token_hex(32))"
            )
        keys.append(key)
    return tuple(keys)


def _mac(key: bytes, session_id: str) -> bytes:
    digest = hmac.new(key, _PURPOSE + session_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


class SessionMiddleware:
    """ASGI middleware: a signed session cookie, the session at ``scope["session"]``.

    Args:
        app: the wrapped ASGI app.
        store: a :class:`~aioredispatterns.sessions.SessionStore`, :func:`app_state`
            ``(name)``, or a callable returning one (with no argument or with the ASGI
            scope), resolved on every request (so the store can be built in the app's
            lifespan).
        secret: the key the cookie is signed with (str or bytes, at least 16 bytes); a
            list of them to rotate keys: the first signs, all verify.
        cookie_name: the cookie's name.
        secure: send the cookie over HTTPS only.
        httponly: hide the cookie from JavaScript.
        samesite: ``"lax"``, ``"strict"`` or ``"none"`` (which needs ``secure``).
        path: the cookie's path.
        domain: the cookie's domain (None: the host that set it).
        max_age: seconds the browser keeps the cookie (at least 1; re-sent on every
            response of a request with a session); None (default): until the browser
            closes.
        on_error: ``"closed"`` (default: 503 with ``Retry-After``, the app is not
            called), ``"open"`` (the request proceeds with an unavailable session: see
            :class:`RequestSession`) or a callable ``(scope, error) -> "open" |
            "closed"``; when Redis fails or takes longer than ``timeout`` loading or
            writing back a session (see the module docstring).
        timeout: the most seconds a session load, or its write-back, may take
            (``None``: the client's own socket timeout); past it, ``on_error`` decides.
        error_retry_after: the ``Retry-After`` seconds of a 503.
        error_cooldown: after a failure, for this many seconds, requests that need Redis
            go to ``on_error`` at once without asking it (so a paused server does not cost
            every request ``timeout``); then one request probes again. 0: always ask.

    A WebSocket handshake failed closed gets the 503 as an HTTP response where the server
    supports the ``websocket.http.response`` extension (uvicorn does), else a close with
    code 1013 (try again later).

    Raises:
        ConfigurationError: a bad option (at construction), or a provider that found no
            store (per request: a bug in the app's wiring, not an outage).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: Provider[SessionStore],
        *,
        secret: str | bytes | Sequence[str | bytes],
        cookie_name: str = "session",
        secure: bool = True,
        httponly: bool = True,
        samesite: Literal["lax", "strict", "none"] = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float | None = None,
        on_error: OnError = "closed",
        timeout: float | None = DEFAULT_TIMEOUT,
        error_retry_after: int = DEFAULT_ERROR_RETRY_AFTER,
        error_cooldown: float = DEFAULT_ERROR_COOLDOWN,
    ) -> None:
        self.app: ASGIApp = app
        self._store = resolver(store, SessionStore, "store")
        self._keys = _keys(secret)
        if not isinstance(cookie_name, str) or not _TOKEN.match(cookie_name):
            raise ConfigurationError(f"cookie_name must be a cookie name, got {shown(cookie_name)}")
        check_flag("secure", secure)
        check_flag("httponly", httponly)
        if samesite not in _SAMESITE:
            raise ConfigurationError(f"samesite must be lax, strict or none, got {shown(samesite)}")
        if samesite == "none" and not secure:
            raise ConfigurationError("samesite='none' needs secure=True (browsers refuse it)")
        for what, value in (("path", path), ("domain", domain)):
            if value is not None and (not isinstance(value, str) or re.search(r"[;\s]", value)):
                raise ConfigurationError(f"{what} must be a str without ';' or spaces")
        self.cookie_name: str = cookie_name
        attributes = [f"Path={path}", f"SameSite={_SAMESITE[samesite]}"]
        if domain is not None:
            attributes.append(f"Domain={domain}")
        if secure:
            attributes.append("Secure")
        if httponly:
            attributes.append("HttpOnly")
        expired = [*attributes, "Max-Age=0", "Expires=Thu, 01 Jan 1970 00:00:00 GMT"]
        if max_age is not None:
            attributes.append(f"Max-Age={int(check_seconds('max_age', max_age, minimum=1))}")
        self._attributes = "; ".join(attributes)
        self._delete = "; ".join(expired)
        self._refresh = max_age is not None
        self._outage = Outage(
            error_cooldown,
            logger=logger,
            subject="the session store",
            degraded="did not get their session",
        )
        self._policy = FailurePolicy(
            on_error=on_error,
            timeout=timeout,
            error_retry_after=error_retry_after,
            outage=self._outage,
        )

    def sign(self, session_id: str) -> str:
        """The cookie value for ``session_id``: ``<id>.<HMAC-SHA256 under the first secret>``."""
        return f"{session_id}.{_mac(self._keys[0], session_id).decode()}"

    def unsign(self, value: str) -> str | None:
        """The session id of a cookie value whose signature checks out (under any of the
        secrets), else None. Constant time in the signature; no Redis command."""
        if not isinstance(value, str) or len(value) > _MAX_COOKIE or not value.isascii():
            return None
        session_id, dot, signature = value.rpartition(".")
        if not dot or len(signature) != _SIGNATURE_CHARS:
            return None
        given = signature.encode()
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(_mac(key, session_id), given)
        return session_id if valid else None

    def _cookie_id(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name != b"cookie":
                continue
            for part in value.decode("latin-1").split(";"):
                key, eq, cookie = part.strip().partition("=")
                if eq and key == self.cookie_name:
                    found = self.unsign(cookie.strip().strip('"'))
                    if found is not None:
                        return found
        return None

    def _set_cookie(self, session: RequestSession) -> bytes | None:
        if session._cookie == "delete" and session.id is None:
            return f"{self.cookie_name}=; {self._delete}".encode()
        if session.id is not None and (session._cookie == "set" or self._refresh):
            return f"{self.cookie_name}={self.sign(session.id)}; {self._attributes}".encode()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        store = self._store(scope)
        session = await self._load(scope, store)
        if isinstance(session, Failure):
            await refuse(
                scope, receive, send, 503, UNAVAILABLE_BODY, encode_headers(session.headers())
            )
            return
        scope["session"] = session
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_with_cookie(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's response became a 503: the rest of it goes nowhere
            if message["type"] == "http.response.start":
                failed = await self._write_back(scope, session)
                if failed is not None:
                    replaced = True
                    headers = encode_headers(failed.headers())
                    if session._cookie != "keep":
                        # A login or logout in the handler acted at once (the old id is
                        # dead): the 503 still carries the cookie that follows it.
                        cookie = self._set_cookie(session)
                        if cookie is not None:
                            headers.append((b"set-cookie", cookie))
                    await refuse(scope, receive, send, 503, UNAVAILABLE_BODY, headers)
                    return
                header = self._set_cookie(session)
                if header is not None:
                    message = dict(message)
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", header)]
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _load(self, scope: Scope, store: SessionStore) -> RequestSession | Failure:
        """The request's session; a Failure when the store failed and on_error said closed."""
        session_id = self._cookie_id(scope)
        if session_id is None:
            return RequestSession(store, None)  # nothing to read: no command, no outage
        loaded = await self._policy.call(scope, "session load", lambda: store.get(session_id))
        if not isinstance(loaded, Failure):
            return RequestSession(store, loaded)
        if loaded.policy == "closed":
            return loaded
        session = RequestSession(store, None)
        session._mark_unavailable(loaded.error, self._outage)
        return session

    async def _write_back(self, scope: Scope, session: RequestSession) -> Failure | None:
        """Write the session's changes; a Failure when that failed and on_error said closed."""
        if not session.modified:
            return None
        if not session.available:
            await session.save()  # drops the changes, sends nothing
            return None
        saved = await self._policy.call(scope, "session write", session.save)
        if not isinstance(saved, Failure):
            return None
        if saved.policy == "closed":
            return saved
        # Failed open: the response goes out without the write (pending changes are
        # left as they are, and a new session gets no cookie: it has no id).
        self._outage.note("dropped", _DROPPED)
        return None
