"""Fuzz every public constructor and method with hostile inputs, against real servers.

Each call gets a mix of valid values and hostile ones: NaN, infinities, huge and negative
numbers, bools and strings where numbers go, lone surrogates, empty and 10 MB strings,
None, containers. The property, call by call:

* it returns, or raises a :class:`~aioredispatterns.RedisPatternsError`: never a foreign
  exception (TypeError, OverflowError, UnicodeEncodeError, a redis-py error, an
  ExceptionGroup), nor a foreign one translated into ``ConnectionFailed`` on its way out;
* an argument outside its documented bounds is refused with ``ConfigurationError``
  (``InvalidKeyError`` for a bad key or name, ``SerializationError`` for a value the
  serializer cannot encode); valid arguments are accepted, and the call then fails only
  the way the server may legitimately answer (``LockNotAcquired``, ``ValueTooLarge``...);
* it finishes within a deadline (``anyio.fail_after``);
* no key exists outside the test's prefix, after each example (each uses a fresh
  sub-prefix, dropped afterwards) and at the end of the test.

"Valid" is modelled here (:class:`Expect`) from the documented bounds (``_validate``'s
docstring, the primitives' docstrings), not read back from the library. Drawn values are
wrapped in :class:`Atom` so that a falsifying example prints short (one 10 MB string is
drawn rarely and always the same object). Each distinct violation raises its own
``Violation`` subclass, so Hypothesis reports every one it found, not only the first;
shrinking is off to keep a failing run inside the per-test timeout (the messages name the
call, its arguments and the library line).

The explicit cases of the issue are ``test_issue_case``. The fuzz runs on Valkey 9.1 and
Redis 7 only, to keep CI time small.
"""

from __future__ import annotations

import inspect
import itertools
import math
import pickle
import re
import string
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import aioredispatterns
from aioredispatterns import (
    GCRA,
    Broadcast,
    BufferPolicy,
    Cache,
    ConfigurationError,
    ConnectionFailed,
    ConsumerGroup,
    ConsumerPolicy,
    FixedWindow,
    InvalidKeyError,
    JsonSerializer,
    Lock,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    Message,
    MsgpackSerializer,
    PickleSerializer,
    PubSubOverflow,
    RateLimitDecision,
    RateLimiter,
    RateLimitExceeded,
    RawSerializer,
    ReconnectPolicy,
    RedisPatternsError,
    Redlock,
    Semaphore,
    SerializationError,
    SlidingWindowCounter,
    SlidingWindowLog,
    StreamError,
    StreamMessage,
    StreamProducer,
    StreamRetention,
    TokenBucket,
    ValueTooLarge,
    connect,
    fenced_get,
    fenced_set,
    publish,
    server_info,
    subscribe,
)
from aioredispatterns._connection import is_cluster

# The servers the fuzz runs on (the plugin names a server by its kind).
FUZZ_KINDS = ("valkey-9.1", "redis-7", "cluster")

# The documented bounds (see the docstring of aioredispatterns._validate), restated here
# so that the model does not read them back from the code under test.
MAX_SECONDS = 10 * 365 * 24 * 3600.0  # the longest duration anywhere: ten years
MAX_COUNT = 2**53  # the largest default count: exact in Lua
MAX_NAME_BYTES = 1024  # the default limit of a key, name or channel
MAX_TOKEN = 2**64 - 1  # fenced_set's tokens
MAX_SIZE = 10**12  # a rate limit's limit, capacity or burst
STREAM_COUNT = 1_000_000  # ConsumerPolicy's concurrency, batch and in-flight bounds

CALL_DEADLINE = 5.0  # every call
SESSION_DEADLINE = 20.0  # an ``async with`` and the calls inside it
WAIT_BUDGET = 1.0  # a call that may legitimately wait (acquire, wait) is cut after this

_LIBRARY = str(Path(aioredispatterns.__file__).parent) + "/"
_ROOT = str(Path(aioredispatterns.__file__).parent.parent) + "/"

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    # No shrinking: a failing run must stay inside the per-test timeout, and each
    # violation's message already names the call, its arguments and the library line.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)


# --------------------------------------------------------------------------- values


class _Omit:
    """An argument left out (the default applies)."""

    def __repr__(self) -> str:
        return "OMIT"


_OMIT = _Omit()


def _nested(depth: int) -> list[Any]:
    outer: list[Any] = []
    current = outer
    for _ in range(depth):
        inner: list[Any] = []
        current.append(inner)
        current = inner
    return outer


BIG = "x" * (10 * 1024 * 1024)  # one 10 MB string, reused by every draw
# More digits than CPython turns into a str (4300): hiredis.pack_command segfaults on it,
# so it is kept away from the arguments that reach the packer unchecked (see
# test_huge_int_never_reaches_the_packer, which runs those in a subprocess).
HUGE_INT = 10**5000
LONG_SURROGATES = "\ud800" * 600
DEEP = _nested(300)


def _show(value: object, limit: int = 40) -> str:
    """A short description of ``value`` (never the 10 MB string itself)."""
    if isinstance(value, Atom):
        return value.label
    if value is BIG:
        return "<10 MB str>"
    if value is DEEP:
        return "<list nested 300 deep>"
    if value is LONG_SURROGATES:
        return "'\\ud800' * 600"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, str | bytes | bytearray):
        if len(value) > limit:
            unit = "chars" if isinstance(value, str) else "bytes"
            return f"<{type(value).__name__} of {len(value)} {unit}: {value[:10]!r}...>"
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        inner = ", ".join(_show(item) for item in items[:4]) + (", ..." if len(items) > 4 else "")
        if isinstance(value, list):
            return f"[{inner}]"
        if isinstance(value, tuple):
            return f"({inner}{',' if len(items) == 1 else ''})"
        return f"{type(value).__name__}({{{inner}}})"
    if isinstance(value, dict):
        pairs = list(value.items())
        inner = ", ".join(f"{_show(k)}: {_show(v)}" for k, v in pairs[:4])
        return "{" + inner + (", ..." if len(pairs) > 4 else "") + "}"
    text = repr(value)
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "...>"


class Atom:
    """One drawn value with a short label (what a falsifying example prints)."""

    __slots__ = ("label", "value")

    def __init__(self, value: object, label: str | None = None) -> None:
        self.value = value
        self.label = label if label is not None else _show(value)

    def __repr__(self) -> str:
        return self.label


class _Marker:
    """A value resolved inside the test (the lease's token, the message read ...)."""

    def __init__(self, label: str, delta: int = 0) -> None:
        self.label = label
        self.delta = delta

    def __repr__(self) -> str:
        return self.label


LEASE_TOKEN = _Marker("<lease.token>")
THE_MESSAGE = _Marker("<the message read>")
MAX_COST = _Marker("<smallest size>")
ABOVE_MAX_COST = _Marker("<smallest size + 1>", delta=1)


class _Boom(Exception):
    """What the fuzz's failing loader raises (it must come out as itself)."""


async def _handler(message: StreamMessage) -> None:
    return None


def _key_function(user_id: object) -> str:
    return "fixed-key"


HOSTILE_VALUES: list[object] = [
    None,
    True,
    False,
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    -0.0,
    1e-7,
    2**53 + 1,
    2**63,
    2**64,
    2**70,
    1e15,
    1e16,
    1e300,
    1e306,
    1e308,
    -1e308,
    10**400,
    HUGE_INT,
    MAX_SECONDS * 2,
    "1",
    "x",
    "",
    "\ud800",
    "a\udfffb",
    LONG_SURROGATES,
    "{",
    "{missing}",
    "k" * 1025,
    BIG,
    b"",
    b"\xff\xfe",
    bytearray(b"k"),
    memoryview(b"k"),
    [],
    ["k"],
    [1, 2],
    {},
    {"k": 1},
    {1: "k"},
    set(),
    frozenset({"k"}),
    ("k",),
    object(),
    DEEP,
]


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


HOSTILE_ATOMS = [Atom(v) for v in HOSTILE_VALUES]
HOSTILE = st.sampled_from(HOSTILE_ATOMS)
HOSTILE_HASHABLE = st.sampled_from([Atom(v) for v in HOSTILE_VALUES if _hashable(v)])


def pick(*valid: object, hostile: bool = True, crashes: bool = True) -> st.SearchStrategy[Atom]:
    """One of ``valid`` or, a quarter of the time, a hostile value (so that calls with
    several arguments still often get only valid ones, and succeed). ``crashes=False``
    leaves out HUGE_INT (an argument the library hands to hiredis unchecked)."""
    good = [v if isinstance(v, Atom) else Atom(v) for v in valid]
    if not hostile:
        return st.sampled_from(good)
    bad = HOSTILE_ATOMS if crashes else [a for a in HOSTILE_ATOMS if a.value is not HUGE_INT]
    # One list, the valid values repeated: Hypothesis merges repeated one_of branches.
    return st.sampled_from(good * -(-3 * len(bad) // len(good)) + bad)


def options(
    spec: Mapping[str, st.SearchStrategy[Atom]], *, at_most: int = 3, always: Iterable[str] = ()
) -> st.SearchStrategy[dict[str, Atom]]:
    """Keyword arguments: ``always`` plus up to ``at_most`` others, each drawn from ``spec``."""
    names = sorted(spec)
    fixed = set(always)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Atom]:
        chosen = fixed | set(draw(st.lists(st.sampled_from(names), max_size=at_most, unique=True)))
        return {name: draw(spec[name]) for name in names if name in chosen}

    return build()


def kwargs(drawn: Mapping[str, Atom]) -> dict[str, Any]:
    """The keyword arguments a drawn dict stands for (OMIT: left out)."""
    return {name: atom.value for name, atom in drawn.items() if atom.value is not _OMIT}


def _sig(function: str, /, *args: object, **kw: object) -> str:
    parts = [_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kw.items()]
    return f"{function}({', '.join(parts)})"


JSON = JsonSerializer()
JSON_STDLIB = JsonSerializer(use_orjson=False)
MSGPACK = MsgpackSerializer()
RAW = RawSerializer()
PICKLE = PickleSerializer(key=b"0" * 32)
SERIALIZER = pick(None, JSON, JSON_STDLIB, MSGPACK, RAW, PICKLE)

# Keys, names, channels: valid ones include bytes, non-ASCII, braces and the exact limit.
NAME = pick("k", "user:1", b"k", b"\xff\xfe", "\u00fc", "{x}", "a b", "k" * 1024)
VALUE = st.one_of(
    pick(1, "v", b"v", 2.5, None, True, [1, "a"], {"a": [1, 2.5, None]}, ("t",), hostile=False),
    pick(-(2**63), 2**63 - 1, {"k": math.nan}, [1, "\ud800"], {"\ud800": 1}, {1: 2}, hostile=False),
    HOSTILE,
)


# --------------------------------------------------------------------------- the model


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _json_ok(value: object, depth: int = 0) -> bool:
    """Whether JsonSerializer must accept ``value`` (its documented model, exact types)."""
    kind = type(value)
    if value is None or kind is bool:
        return True
    if kind is str:
        return _encodable(value)  # type: ignore[arg-type]
    if kind is int:
        return -(2**63) <= value <= 2**63 - 1  # type: ignore[operator]
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is list or kind is tuple:
        return depth < 254 and all(_json_ok(item, depth + 1) for item in value)  # type: ignore[attr-defined]
    if kind is dict:
        return depth < 254 and all(
            type(k) is str and _encodable(k) and _json_ok(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


def _raw_ok(value: object) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    return isinstance(value, str) and _encodable(value)


def _codec(serializer: object) -> str:
    if serializer is None or isinstance(serializer, JsonSerializer):
        return "json"
    if isinstance(serializer, RawSerializer):
        return "raw"
    return "other"  # msgpack, pickle: what they accept is theirs to say


_STREAM_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")


def _stream_id_ok(text: str) -> bool:
    match = _STREAM_ID.fullmatch(text)
    return match is not None and all(int(p) < 2**64 for p in match.groups() if p is not None)


def _template_ok(template: str, argument: str) -> bool:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return all(f.split(".")[0].split("[")[0] == argument for f in fields)


class Expect:
    """What one call may do, from checks of its arguments against the documented bounds.

    A refused argument means the call must raise one of the refusals' errors (or of
    ``maybe``); with none, it may return or raise what ``legit`` and ``maybe`` list.
    """

    def __init__(self, *legit: type[BaseException]) -> None:
        self.refusals: list[tuple[type[Exception], str]] = []
        self.maybe: list[type[BaseException]] = []
        self.legit = list(legit)

    @property
    def valid(self) -> bool:
        return not self.refusals

    def refuse(self, reason: str, error: type[Exception] = ConfigurationError) -> bool:
        self.refusals.append((error, reason))
        return False

    def also(self, *errors: type[BaseException]) -> None:
        """Outcomes that depend on what the model does not predict."""
        self.maybe.extend(errors)

    def allowed(self) -> tuple[type[BaseException], ...]:
        base = [error for error, _ in self.refusals] if self.refusals else self.legit
        return tuple(base + self.maybe)

    def reasons(self) -> str:
        return "; ".join(reason for _, reason in self.refusals)

    # The checks return whether the value is valid.

    def number(
        self,
        name: str,
        value: object,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        below: float | None = None,
    ) -> bool:
        if not _is_number(value):
            return self.refuse(f"{name}={_show(value)} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            return self.refuse(f"{name}={value!r} is not finite")
        if minimum is not None and value < minimum:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} < {minimum}")
        if above is not None and value <= above:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} <= {above}")
        if maximum is not None and value > maximum:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} > {maximum}")
        if below is not None and value >= below:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} >= {below}")
        return True

    def seconds(
        self,
        name: str,
        value: object,
        *,
        zero: bool = False,
        none: bool = False,
        minimum: float | None = None,
        maximum: float = MAX_SECONDS,
    ) -> bool:
        if value is None and none:
            return True
        if not self.number(name, value):
            return False
        if value < 0 or (value == 0 and not zero):  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} s is not {'>= 0' if zero else '> 0'}")
        if minimum is not None and value < minimum:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} s < {minimum} s")
        if value > maximum:  # type: ignore[operator]
            return self.refuse(f"{name}={_show(value)} s is above ten years")
        return True

    def count(self, name: str, value: object, minimum: int = 0, maximum: int = MAX_COUNT) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return self.refuse(f"{name}={_show(value)} is not an int")
        if not minimum <= value <= maximum:
            return self.refuse(f"{name}={_show(value)} is outside [{minimum}, {maximum}]")
        return True

    def flag(self, name: str, value: object) -> bool:
        if not isinstance(value, bool):
            return self.refuse(f"{name}={_show(value)} is not True or False")
        return True

    def choice(self, name: str, value: object, choices: tuple[object, ...]) -> bool:
        if any(type(value) is type(c) and value == c for c in choices):
            return True
        try:
            loose = value in choices
        except TypeError:
            loose = False
        if loose:  # 2.0 for 2: either answer is fine
            self.also(ConfigurationError)
            return True
        return self.refuse(f"{name}={_show(value)} is not one of {choices}")

    def name(
        self,
        what: str,
        value: object,
        *,
        max_bytes: int = MAX_NAME_BYTES,
        str_only: bool = False,
        empty: type[Exception] = InvalidKeyError,
    ) -> bool:
        if isinstance(value, str):
            if not value:
                return self.refuse(f"{what} is empty", empty)
            if not _encodable(value):
                return self.refuse(f"{what}={_show(value)} has a lone surrogate", InvalidKeyError)
            size = len(value.encode())
        elif isinstance(value, bytes) and not str_only:
            if not value:
                return self.refuse(f"{what} is empty", empty)
            size = len(value)
        else:
            return self.refuse(f"{what}={_show(value)} is a {type(value).__name__}")
        if size > max_bytes:
            return self.refuse(f"{what} is {size} bytes, above {max_bytes}", InvalidKeyError)
        return True

    def serializer(self, value: object) -> bool:
        if value is None or (hasattr(value, "dumps") and hasattr(value, "loads")):
            return True
        return self.refuse(f"serializer={_show(value)} has no dumps/loads")

    def instance(self, name: str, value: object, kind: type, *, none: bool = False) -> bool:
        if (value is None and none) or isinstance(value, kind):
            return True
        return self.refuse(f"{name}={_show(value)} is not a {kind.__name__}")

    def value(self, value: object, serializer: object, what: str = "value") -> bool:
        codec = _codec(serializer)
        if codec == "other":
            self.also(SerializationError)
            return True
        ok = _json_ok(value) if codec == "json" else _raw_ok(value)
        if not ok:
            return self.refuse(
                f"{what}={_show(value)} cannot be encoded ({codec})", SerializationError
            )
        return True

    def names(self, what: str, values: object, **check: Any) -> int | None:
        """An iterable of names (not one str/bytes); how many valid ones, None if refused."""
        if isinstance(values, str | bytes):
            self.refuse(f"{what}={_show(values)} is one str/bytes, not a list of them")
            return None
        try:
            items = iter(values)  # type: ignore[call-overload]
        except TypeError:
            self.refuse(f"{what}={_show(values)} is not iterable")
            return None
        good = 0
        for item in items:
            if not self.name(f"{what}[]", item, **check):
                return None
            good += 1
        return good


# --------------------------------------------------------------------------- checking


class Violation(AssertionError):
    """A call broke the property (one subclass per call and kind: see the module doc)."""


_VIOLATIONS: dict[str, type[Violation]] = {}


def _violation(kind: str, message: str) -> Violation:
    cls = _VIOLATIONS.get(kind)
    if cls is None:
        name = re.sub(r"\W+", "_", kind).strip("_")[:80]
        cls = _VIOLATIONS[kind] = type(f"Violation_{name}", (Violation,), {})
    return cls(message)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _frames(exc: BaseException) -> str:
    """Where ``exc`` came from: the innermost library frames, and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_LIBRARY)]
    parts = [f"{f.filename.removeprefix(_ROOT)}:{f.lineno} ({f.name})" for f in ours[-3:]]
    if frames and (not ours or frames[-1] is not ours[-1]):
        last = frames[-1]
        parts.append(f"raised in {last.filename.removeprefix(_ROOT)}:{last.lineno} ({last.name})")
    return " <- ".join(reversed(parts)) or "no traceback"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__module__}.{type(exc).__qualname__}: {_clip(str(exc))} at {_frames(exc)}"
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, RedisPatternsError):
        text += f"; caused by {type(cause).__qualname__}: {_clip(str(cause))} at {_frames(cause)}"
    return text


def _foreign(exc: BaseException) -> str | None:
    if isinstance(exc, BaseExceptionGroup):
        return "an exception group"
    if not isinstance(exc, RedisPatternsError):
        return "a foreign exception"
    if isinstance(exc, ConnectionFailed) and "inside redis-py" in str(exc):
        return "a foreign exception translated into ConnectionFailed"
    return None


async def _invoke(fn: Callable[[], Any]) -> Any:
    result = fn()
    # Only coroutines: a redis-py client is awaitable itself (it would connect).
    if inspect.iscoroutine(result):
        result = await result
    return result


async def attempt(
    call: str,
    fn: Callable[[], Any],
    expect: Expect,
    *,
    budget: float | None = None,
    deadline: float = CALL_DEADLINE,
) -> tuple[bool, Any]:
    """Run ``fn()`` (sync or async) and check its outcome; ``(returned, value)``.

    With ``budget``, a valid call that is still waiting after ``budget`` seconds is cut
    (a legitimate wait, ended by us); an invalid one must have been refused at once.
    """
    name = call.split("(", 1)[0]
    raised: Exception | None = None
    value: Any = None
    cut = False
    started = anyio.current_time()
    try:
        with anyio.fail_after(deadline):
            try:
                if budget is None:
                    value = await _invoke(fn)
                else:
                    with anyio.move_on_after(budget) as scope:
                        value = await _invoke(fn)
                    cut = scope.cancelled_caught
            except Violation:
                raise
            except Exception as exc:
                raised = exc
    except TimeoutError:
        raise _violation(
            f"{name}:deadline", f"{call}: did not finish within {deadline:g} s"
        ) from None
    elapsed = anyio.current_time() - started
    if elapsed >= deadline:
        raise _violation(
            f"{name}:deadline", f"{call}: took {elapsed:.1f} s (deadline {deadline:g} s)"
        )
    if raised is None:
        if not expect.valid:
            what = "started waiting" if cut else f"returned {_show(value)}"
            raise _violation(
                f"{name}:accepted", f"{call}: {what}; expected a refusal: {expect.reasons()}"
            )
        return not cut, value
    foreign = _foreign(raised)
    allowed = expect.allowed()
    if allowed and isinstance(raised, allowed):
        # The caller's own exception (a loader's) may be allowed too, as itself.
        own = tuple(a for a in allowed if not issubclass(a, RedisPatternsError))
        if foreign is None or (own and isinstance(raised, own)):
            return False, None
    wanted = ", ".join(e.__name__ for e in allowed) or "no error"
    if foreign is not None:
        problem = f"raised {foreign}"
    elif expect.valid:
        problem = f"valid input, but it raised (allowed: {wanted})"
    else:
        problem = f"raised the wrong error (expected {wanted}: {expect.reasons()})"
    raise _violation(
        f"{name}:{type(raised).__name__}", f"{call}: {problem}: {_describe(raised)}"
    ) from None


def _broken(call: str, what: str) -> Violation:
    return _violation(f"{call.split('(', 1)[0]}:{what}", f"{call}: {what}")


# --------------------------------------------------------------------------- fixtures


class Fuzz:
    """Per test: the client, a fresh sub-prefix per example, the keyspace check."""

    def __init__(self, client: Redis, root: str, url: str) -> None:
        self.client = client
        self.root = root
        self.url = url
        self.cluster = is_cluster(client)
        self._examples = itertools.count()

    def on_several_nodes(self, channels: list[Any]) -> bool:
        """Whether a cluster serves ``channels`` (valid names) from more than one node."""
        if not self.cluster:
            return False
        cluster: Any = self.client
        return len({cluster.get_node_from_key(channel).name for channel in channels}) > 1

    async def example(self, body: Callable[[str], Awaitable[None]]) -> None:
        """Run one example under a fresh prefix; drop its keys; check the keyspace."""
        prefix = f"{self.root}e{next(self._examples)}"
        try:
            await body(prefix)
        finally:
            with anyio.move_on_after(10, shield=True):
                keys = [k async for k in self.client.scan_iter(match=f"{prefix}:*", count=1000)]
                if keys:
                    await self.client.unlink(*keys)
        stray = await self.stray_keys()
        if stray:
            raise _violation("keyspace", f"keys outside the prefix {self.root!r}: {stray[:5]}")

    async def stray_keys(self) -> list[bytes]:
        """Every key of the server not under this test's prefix."""
        root = self.root.encode()
        return [k async for k in self.client.scan_iter(count=1000) if not k.startswith(root)]


@pytest_asyncio.fixture
async def fuzz(redis_server: Any, redis_client: Redis, key_prefix: str) -> AsyncIterator[Fuzz]:
    if redis_server.name not in FUZZ_KINDS:
        pytest.skip(f"the input fuzz runs on {' and '.join(FUZZ_KINDS)} only")
    state = Fuzz(redis_client, key_prefix, redis_server.url)
    yield state
    # The plugin flushed the server before this test: whatever lies outside the test's
    # prefix now was written by the library outside it.
    assert await state.stray_keys() == []


# --------------------------------------------------------------------------- cache


class _Loader:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind} loader>"


LOADER = st.one_of(
    st.sampled_from([Atom(_Loader("value")), Atom(_Loader("none")), Atom(_Loader("boom"))]),
    st.sampled_from([Atom(None), Atom("x"), Atom(1)]),
)
TTL_ARG = pick(_OMIT, None, 1, 60)
ITEMS = st.one_of(
    st.tuples(st.sampled_from(["dict", "pairs"]), st.lists(st.tuples(NAME, VALUE), max_size=3)),
    st.sampled_from(
        [Atom(v) for v in (None, 5, "ab", [("k",)], [("k", 1, 2)], {"k"}, {"k": 1}, {1: "k"})]
    ),
)
KEYS = st.one_of(
    st.lists(NAME, max_size=3),
    st.sampled_from([Atom(v) for v in (None, 5, 1.5, "ab", b"ab", object())]),
)
TEMPLATE = st.one_of(
    pick("user:{user_id}", "{user_id}", None, Atom(_key_function, "<key function>"), hostile=False),
    pick("{", "{missing}", "{}", "{0}", "user:{user_id", "}", 5, b"user:{user_id}", hostile=False),
)
CACHE_OPTIONS = {
    "ttl": pick(10, 1, 60, None, MAX_SECONDS, _OMIT),
    "stale_ttl": pick(0, 1, 5),
    "negative_ttl": pick(None, 1),
    "jitter": pick(0, 0.1, 0.99),
    "early_refresh": pick(None, 1.0, 1000),
    "distributed": pick(False, True),
    "lease_ttl": pick(0.5, 10),
    "lease_wait": pick(None, 0, 0.1),
    "max_load_time": pick(1, 60),
    "refresh_backoff": pick(0, 1),
    "max_value_size": pick(None, 22, 1024, 2**20, 512 * 2**20),
    "oversize": pick("raise", "skip"),
    "max_key_bytes": pick(1, 1024, 65536),
    "serializer": SERIALIZER,
}
CACHE_OP = st.one_of(
    st.tuples(st.just("get"), NAME, VALUE),
    st.tuples(st.just("get_or_load"), NAME, LOADER, VALUE, TTL_ARG),
    st.tuples(st.just("set"), NAME, VALUE, TTL_ARG),
    st.tuples(st.just("set_many"), ITEMS, TTL_ARG, pick(_OMIT, False, True)),
    st.tuples(st.just("warm"), ITEMS, TTL_ARG),
    st.tuples(st.just("get_many"), KEYS),
    st.tuples(st.just("invalidate"), st.lists(NAME, max_size=3)),
    st.tuples(st.just("cached"), TEMPLATE, TTL_ARG, VALUE),
)


def expect_cache(o: Mapping[str, Any]) -> Expect:
    e = Expect()
    ttl = o.get("ttl", _OMIT)
    if ttl is _OMIT:
        e.refuse("ttl is missing (ttl=None must be explicit)")
    else:
        e.seconds("ttl", ttl, none=True)
    stale_ok = e.seconds("stale_ttl", o.get("stale_ttl", 0.0), zero=True)
    e.seconds("negative_ttl", o.get("negative_ttl"), none=True)
    e.number("jitter", o.get("jitter", 0.1), minimum=0, below=1)
    if o.get("early_refresh") is not None:
        e.number("early_refresh", o["early_refresh"], above=0, maximum=1000)
    e.flag("distributed", o.get("distributed", False))
    lease_ok = e.seconds("lease_ttl", o.get("lease_ttl", 10.0))
    e.seconds("lease_wait", o.get("lease_wait"), none=True, zero=True)
    e.seconds("max_load_time", o.get("max_load_time", 60.0))
    e.seconds("refresh_backoff", o.get("refresh_backoff", 1.0), zero=True)
    if o.get("max_value_size", 1) is not None:
        e.count("max_value_size", o.get("max_value_size", 2**20), 22, 512 * 2**20)
    e.choice("oversize", o.get("oversize", "raise"), ("raise", "skip"))
    e.count("max_key_bytes", o.get("max_key_bytes", MAX_NAME_BYTES), 1, 64 * 1024)
    e.serializer(o.get("serializer"))
    if (
        e.valid
        and stale_ok
        and lease_ok
        and o.get("distributed") is True
        and ttl is not None
        and o.get("lease_ttl", 10.0) >= ttl + o.get("stale_ttl", 0.0)
    ):
        e.refuse("distributed: lease_ttl is not shorter than ttl + stale_ttl")
    return e


def _items(drawn: object) -> tuple[object, list[tuple[object, object]] | None]:
    """The items argument of set_many/warm, and its pairs (None: a hostile whole)."""
    if isinstance(drawn, Atom):
        return drawn.value, None
    form, pairs = drawn  # type: ignore[misc]
    real = [(k.value, v.value) for k, v in pairs]
    if form == "dict" and all(_hashable(k) for k, _ in real):
        return dict(real), list(dict(real).items())
    return real, real


def _expect_items(
    e: Expect, items: object, pairs: list[tuple[object, object]] | None, mkb: int, ser: object
) -> None:
    if pairs is None:
        # A hostile whole: a mapping is fine; else an iterable of (key, value) pairs.
        if isinstance(items, Mapping):
            pairs = list(items.items())
        else:
            try:
                entries = list(items)  # type: ignore[call-overload]
            except TypeError:
                e.refuse(f"items={_show(items)} is not iterable")
                return
            if not all(isinstance(p, tuple | list) and len(p) == 2 for p in entries):
                e.refuse(f"items={_show(items)} is not made of (key, value) pairs")
                return
            pairs = [tuple(p) for p in entries]  # type: ignore[misc]
    for key, value in pairs:
        e.name("key", key, max_bytes=mkb)
        if value is not None:  # None is cached as "not found": nothing to serialize
            e.value(value, ser)


async def cache_op(cache: Cache, op: tuple[Any, ...], mkb: int, ser: object) -> None:
    name = op[0]
    if name == "get":
        key, default = op[1].value, op[2].value
        e = Expect()
        e.name("key", key, max_bytes=mkb)
        await attempt(_sig("Cache.get", key, default), lambda: cache.get(key, default), e)
    elif name == "get_or_load":
        key, loader_atom, value, ttl = op[1].value, op[2], op[3].value, op[4].value
        e = Expect(_Boom, ValueTooLarge)
        e.also(SerializationError)  # a hit decodes, a miss encodes: depends on the state
        e.name("key", key, max_bytes=mkb)
        if ttl is not _OMIT:
            e.seconds("ttl", ttl, none=True)
        loader: Any = loader_atom.value
        if isinstance(loader, _Loader):
            kind = loader.kind

            async def load() -> Any:
                if kind == "boom":
                    raise _Boom("loader failed")
                return None if kind == "none" else value

            loader = load
        elif not callable(loader):
            e.refuse(f"loader={_show(loader)} is not callable")
        kw = {} if ttl is _OMIT else {"ttl": ttl}
        await attempt(
            _sig("Cache.get_or_load", key, loader_atom, **kw),
            lambda: cache.get_or_load(key, loader, **kw),
            e,
        )
    elif name == "set":
        key, value, ttl = op[1].value, op[2].value, op[3].value
        e = Expect(ValueTooLarge)
        e.name("key", key, max_bytes=mkb)
        if value is not None:
            e.value(value, ser)
        if ttl is not _OMIT:
            e.seconds("ttl", ttl, none=True)
        kw = {} if ttl is _OMIT else {"ttl": ttl}
        ok, written = await attempt(
            _sig("Cache.set", key, value, **kw), lambda: cache.set(key, value, **kw), e
        )
        if ok and not isinstance(written, bool):
            raise _broken("Cache.set", f"returned {_show(written)}, not a bool")
    elif name in ("set_many", "warm"):
        items, pairs = _items(op[1])
        ttl = op[2].value
        e = Expect(ValueTooLarge)
        kw: dict[str, Any] = {} if ttl is _OMIT else {"ttl": ttl}
        if ttl is not _OMIT:
            e.seconds("ttl", ttl, none=True)
        if name == "set_many" and op[3].value is not _OMIT:
            kw["only_missing"] = op[3].value
            e.flag("only_missing", op[3].value)
        _expect_items(e, items, pairs, mkb, ser)
        method = cache.set_many if name == "set_many" else cache.warm
        ok, written = await attempt(
            _sig(f"Cache.{name}", items, **kw), lambda: method(items, **kw), e
        )
        if ok and not isinstance(written, int):
            raise _broken(f"Cache.{name}", f"returned {_show(written)}, not an int")
    elif name == "get_many":
        drawn = op[1]
        keys = drawn.value if isinstance(drawn, Atom) else [a.value for a in drawn]
        e = Expect()
        if isinstance(keys, str):
            e.also(ConfigurationError)  # one str: its characters as keys, or refused
            for char in keys:
                e.name("key", char, max_bytes=mkb)
        else:
            try:
                listed = list(keys)
            except TypeError:
                e.refuse(f"keys={_show(keys)} is not iterable")
            else:
                for key in listed:
                    e.name("key", key, max_bytes=mkb)
        ok, found = await attempt(_sig("Cache.get_many", keys), lambda: cache.get_many(keys), e)
        if ok and not isinstance(found, dict):
            raise _broken("Cache.get_many", f"returned {_show(found)}, not a dict")
    elif name == "invalidate":
        keys = [a.value for a in op[1]]
        e = Expect()
        for key in keys:
            e.name("key", key, max_bytes=mkb)
        await attempt(_sig("Cache.invalidate", *keys), lambda: cache.invalidate(*keys), e)
    else:  # cached
        template, ttl, argument = op[1].value, op[2].value, op[3].value
        e = Expect()
        if ttl is not _OMIT:
            e.seconds("ttl", ttl, none=True)
        if isinstance(template, str):
            if not _template_ok(template, "user_id"):
                e.refuse(f"key template {template!r} cannot be filled from (user_id)")
        elif template is not None and not callable(template):
            e.refuse(f"key={_show(template)} is neither a template nor a callable")

        async def profile(user_id: object) -> object:
            return user_id

        kw = {"key": template} if ttl is _OMIT else {"key": template, "ttl": ttl}
        call = _sig("Cache.cached", **kw) + "(profile)"
        ok, function = await attempt(call, lambda: cache.cached(**kw)(profile), e)
        if ok:
            # The key comes from the argument (too long, a surrogate, an unsupported type:
            # refused) and the value is the argument (maybe not serializable).
            e = Expect(ValueTooLarge)
            e.also(ConfigurationError, SerializationError)
            await attempt(f"{call}({_show(argument)})", lambda: function(argument), e)
            e = Expect()
            e.also(ConfigurationError)
            await attempt(
                f"{call}.invalidate({_show(argument)})", lambda: function.invalidate(argument), e
            )


@settings(FUZZ_SETTINGS, max_examples=30)
@given(
    case=st.fixed_dictionaries(
        {
            "options": options(CACHE_OPTIONS, always=("ttl",)),
            "ops": st.lists(CACHE_OP, min_size=1, max_size=5),
        }
    )
)
async def test_fuzz_cache(fuzz: Fuzz, case: dict[str, Any]) -> None:
    async def body(prefix: str) -> None:
        o = kwargs(case["options"])
        ok, cache = await attempt(
            _sig("Cache", **o), lambda: Cache(fuzz.client, prefix=prefix, **o), expect_cache(o)
        )
        if not ok:
            return
        mkb = o.get("max_key_bytes", MAX_NAME_BYTES)

        async def session() -> None:
            async with cache:
                for op in case["ops"]:
                    await cache_op(cache, op, mkb, o.get("serializer"))

        await attempt("async with Cache", session, Expect(), deadline=SESSION_DEADLINE)

    await fuzz.example(body)


# --------------------------------------------------------------------------- locks

LOCK_OPTIONS = {
    "ttl": pick(0.01, 0.5, 10, MAX_SECONDS),
    "timeout": pick(None, 0, 0.05),
    "cancel_on_loss": pick(False, True),
    "fence_ttl": pick(None, 1, 3600, MAX_SECONDS),
}
REDLOCK_OPTIONS = {
    "drift_factor": pick(0, 0.01, 0.49),
    "node_timeout": pick(None, 0.001, 0.05),
    "retry_delay": pick(0.001, 0.2),
    "release_timeout": pick(0.001, 2),
}
CLIENTS_FORMS = ["[client]"] * 6 + ["[]", "[client, client]", "None", "client", "'x'"]


def expect_lock(
    kind: str, name: object, limit: object, clients: str, o: dict[str, Any], r: dict[str, Any]
) -> Expect:
    e = Expect()
    if kind == "Redlock" and clients != "[client]":
        e.refuse(f"clients={clients}: not a non-empty list of distinct servers")
    e.name("name", name)
    if kind == "Semaphore":
        e.count("limit", limit, 1, MAX_COUNT)
    ttl = o.get("ttl", 10.0)
    ttl_ok = e.seconds("ttl", ttl, minimum=0.01)
    e.seconds("timeout", o.get("timeout"), none=True, zero=True)
    e.flag("cancel_on_loss", o.get("cancel_on_loss", False))
    e.seconds("fence_ttl", o.get("fence_ttl", 7 * 24 * 3600.0), none=True, minimum=1)
    if kind == "Redlock":
        e.number("drift_factor", r.get("drift_factor", 0.01), minimum=0, below=0.5)
        e.seconds("retry_delay", r.get("retry_delay", 0.2), minimum=0.001)
        node_timeout = r.get("node_timeout")
        node_ok = e.seconds("node_timeout", node_timeout, none=True, minimum=0.001)
        e.seconds("release_timeout", r.get("release_timeout", 2.0), minimum=0.001)
        if ttl_ok and node_ok:
            used = min(0.5, max(0.005, ttl / 50)) if node_timeout is None else node_timeout
            if used >= ttl:
                e.refuse(f"node_timeout {used} is not shorter than ttl {ttl}")
    return e


def _fence_bytes(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and value.bit_length() < 10_000:
        return repr(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    return None


@settings(FUZZ_SETTINGS, max_examples=30)
@given(
    case=st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["Lock", "Semaphore", "Redlock"]),
            "name": NAME,
            "limit": pick(1, 2, 2**53),
            "clients": st.sampled_from(CLIENTS_FORMS),
            "options": options(LOCK_OPTIONS),
            "redlock": options(REDLOCK_OPTIONS, at_most=2),
            "acquire": options(
                {"blocking": pick(True, False), "timeout": pick(None, 0, 0.05)}, at_most=2
            ),
            "contend_timeout": pick(None, 0, 0.05),
            "hold": st.booleans(),
            "resource": NAME,
            "fence_value": pick(b"v", "v", 7, 2.5, bytearray(b"v"), crashes=False),
            "token": pick(LEASE_TOKEN, 0, 1, 2**53, MAX_TOKEN),
        }
    )
)
async def test_fuzz_locks(fuzz: Fuzz, case: dict[str, Any]) -> None:
    client = fuzz.client

    async def body(prefix: str) -> None:
        kind, name, limit = case["kind"], case["name"].value, case["limit"].value
        o, r = kwargs(case["options"]), kwargs(case["redlock"])
        clients = {
            "[client]": [client],
            "[]": [],
            "[client, client]": [client, client],
            "None": None,
            "client": client,
            "'x'": "x",
        }[case["clients"]]
        if kind == "Lock":
            call, make = _sig("Lock", name, **o), lambda: Lock(client, name, prefix=prefix, **o)
        elif kind == "Semaphore":
            call = _sig("Semaphore", name, limit, **o)
            make = lambda: Semaphore(client, name, limit, prefix=prefix, **o)  # noqa: E731
        else:
            call = f"Redlock({case['clients']}, " + _sig("", name, **o, **r)[1:]
            make = lambda: Redlock(clients, name, prefix=prefix, **o, **r)  # type: ignore[arg-type]  # noqa: E731
        ok, lock = await attempt(call, make, expect_lock(kind, name, limit, case["clients"], o, r))
        lease = None
        if ok:
            a = kwargs(case["acquire"])
            e = Expect(LockNotAcquired)
            if "blocking" in a:
                e.flag("blocking", a["blocking"])
            if "timeout" in a:
                e.seconds("timeout", a["timeout"], none=True, zero=True)
            ok, lease = await attempt(
                _sig(f"{kind}.acquire", **a), lambda: lock.acquire(**a), e, budget=WAIT_BUDGET
            )
            if ok:
                ok, other = await attempt(
                    f"{kind}.acquire(blocking=False) while held",
                    lambda: lock.acquire(blocking=False),
                    Expect(LockNotAcquired),
                )
                if ok:
                    await attempt(
                        "Lease.release (second holder)", other.release, Expect(LockNotOwned)
                    )
                timeout = case["contend_timeout"].value
                e = Expect(LockNotAcquired)
                e.seconds("timeout", timeout, none=True, zero=True)
                ok, other = await attempt(
                    f"{kind}.acquire(timeout={_show(timeout)}) while held",
                    lambda: lock.acquire(timeout=timeout),
                    e,
                    budget=0.3,
                )
                if ok:
                    await attempt("Lease.release (contender)", other.release, Expect(LockNotOwned))
                await attempt("Lease.extend", lease.extend, Expect(LockNotOwned))
                await attempt("Lease.release", lease.release, Expect(LockNotOwned))
            if kind == "Lock":
                await attempt("Lock.locked", lock.locked, Expect())
            elif kind == "Semaphore":
                await attempt("Semaphore.holders", lock.holders, Expect())
            if case["hold"]:

                async def hold() -> None:
                    async with lock:
                        pass

                await attempt(
                    f"async with {kind}",
                    hold,
                    Expect(LockNotAcquired, LockLost),
                    budget=WAIT_BUDGET,
                )

        # Fencing on a fresh resource: a valid write is accepted and read back exactly.
        resource, value = case["resource"].value, case["fence_value"].value
        token = case["token"].value
        if token is LEASE_TOKEN:
            token = lease.token if lease is not None else 1
        e = Expect()
        e.name("resource", resource)
        e.count("token", token, 0, MAX_TOKEN)
        if isinstance(value, bool) or not isinstance(value, bytes | str | int | float):
            e.refuse(f"value={_show(value)} is not bytes, str, int or float")
        elif isinstance(value, str) and not _encodable(value):
            e.refuse(f"value={_show(value)} has a lone surrogate")
        elif _fence_bytes(value) is None:
            e.also(ConfigurationError)  # an int too long for str()
        call = _sig("fenced_set", resource, value, token)
        ok, written = await attempt(
            call, lambda: fenced_set(client, resource, value, token, prefix=prefix), e
        )
        if ok and written is not True:
            raise _broken(call, f"returned {written!r} on a fresh resource")
        e = Expect()
        e.name("resource", resource)
        ok2, got = await attempt(
            _sig("fenced_get", resource), lambda: fenced_get(client, resource, prefix=prefix), e
        )
        if ok and ok2 and (got is None or got.token != token or got.value != _fence_bytes(value)):
            raise _broken(call, f"fenced_get read back {_show(got)}")

    await fuzz.example(body)


# --------------------------------------------------------------------------- rate limits

POLICY = st.one_of(
    st.tuples(
        st.just("TokenBucket"),
        pick(1, 10, MAX_SIZE),
        pick(0.001, 1, 100, 1e6),
        st.just(Atom(_OMIT)),
    ),
    st.tuples(
        st.just("GCRA"), pick(1, 10), pick(0.001, 1, 60, MAX_SECONDS), pick(_OMIT, None, 1, 20)
    ),
    st.tuples(
        st.sampled_from(["SlidingWindowLog", "SlidingWindowCounter", "FixedWindow"]),
        pick(1, 3, 10000, MAX_SIZE),
        pick(1e-6, 0.001, 1, 60, MAX_SECONDS),
        st.just(Atom(_OMIT)),
    ),
)
POLICY_TYPES = {
    "TokenBucket": TokenBucket,
    "GCRA": GCRA,
    "SlidingWindowLog": SlidingWindowLog,
    "SlidingWindowCounter": SlidingWindowCounter,
    "FixedWindow": FixedWindow,
}


def expect_policy(kind: str, a: object, b: object, burst: object) -> tuple[Expect, int]:
    """The model of a policy, and its size (what one moment admits) if valid."""
    e = Expect()
    span = MAX_SECONDS * 1e6
    if kind == "TokenBucket":
        valid = e.count("capacity", a, 1, MAX_SIZE) & e.number("rate", b, above=0, maximum=1e6)
        if valid and a * (1e6 / b) > span:  # type: ignore[operator]
            e.refuse("the bucket takes more than ten years to refill")
        return e, a if e.valid else 0  # type: ignore[return-value]
    if kind == "GCRA":
        ok = e.count("limit", a, 1, MAX_SIZE) & e.seconds("period", b)
        if burst is not _OMIT and burst is not None:
            ok &= e.count("burst", burst, 1, MAX_SIZE)
        size = a if burst is _OMIT or burst is None else burst
        if ok:
            interval = b * 1e6 / a  # type: ignore[operator]
            if interval < 1:
                e.refuse("less than a microsecond per unit")
            elif size * interval > span:  # type: ignore[operator]
                e.refuse("a full burst books more than ten years ahead")
        return e, size if e.valid else 0  # type: ignore[return-value]
    e.count("limit", a, 1, MAX_SIZE)
    e.seconds("window", b, minimum=1e-6)
    return e, a if e.valid else 0  # type: ignore[return-value]


IDENTITY = pick("user:1", b"user:1", "\u00fc", "{x}", "k" * 1024)
COST = pick(_OMIT, 1, 2, 4000, MAX_COST, ABOVE_MAX_COST)
RATE_OP = st.tuples(
    st.sampled_from(["hit", "peek", "wait", "reset"]),
    IDENTITY,
    COST,
    pick(_OMIT, None, 0, 0.05, 0.5),
)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(
    case=st.fixed_dictionaries(
        {
            "policies": st.lists(POLICY, min_size=1, max_size=3),
            "form": st.sampled_from(
                ["list", "single", "tuple"] * 4 + [Atom(v) for v in (None, [], "x", [1], 5)]
            ),
            "options": options(
                {
                    "name": pick("default", "api", "\u00fc", "k" * 1024),
                    "max_identity_bytes": pick(1, 1024, 65536),
                },
                at_most=2,
            ),
            "ops": st.lists(RATE_OP, min_size=1, max_size=4),
        }
    )
)
async def test_fuzz_ratelimit(fuzz: Fuzz, case: dict[str, Any]) -> None:
    async def body(prefix: str) -> None:
        built: list[Any] = []
        sizes: list[int] = []
        for kind, a, b, burst in case["policies"]:
            args = (a.value, b.value) if burst.value is _OMIT else (a.value, b.value, burst.value)
            e, size = expect_policy(kind, a.value, b.value, burst.value)
            ok, policy = await attempt(
                _sig(kind, *args), lambda k=kind, x=args: POLICY_TYPES[k](*x), e
            )
            if ok:
                built.append(policy)
                sizes.append(size)
        if len(built) != len(case["policies"]):
            return
        form = case["form"]
        e = Expect()
        if isinstance(form, Atom):
            policies: Any = form.value
            e.refuse(f"policies={form} is not a policy or a sequence of them")
        elif form == "single" and len(built) == 1:
            policies = built[0]
        else:
            policies = tuple(built) if form == "tuple" else built
        o = kwargs(case["options"])
        e.name("name", o.get("name", "default"), str_only=True)
        e.count("max_identity_bytes", o.get("max_identity_bytes", MAX_NAME_BYTES), 1, 64 * 1024)
        ok, limiter = await attempt(
            _sig("RateLimiter", policies, **o),
            lambda: RateLimiter(fuzz.client, policies, prefix=prefix, **o),
            e,
        )
        if not ok:
            return
        mib = o.get("max_identity_bytes", MAX_NAME_BYTES)
        smallest = min(sizes)
        used: set[bytes] = set()
        for op, identity_atom, cost_atom, timeout_atom in case["ops"]:
            identity, cost, timeout = identity_atom.value, cost_atom.value, timeout_atom.value
            if isinstance(cost, _Marker):
                cost = smallest + cost.delta
            e = Expect(RateLimitExceeded) if op == "wait" else Expect()
            e.name("identity", identity, max_bytes=mib)
            kw: dict[str, Any] = {}
            if op != "reset" and cost is not _OMIT:
                kw["cost"] = cost
                if e.count("cost", cost, 1, MAX_COUNT) and cost > smallest:
                    e.refuse(f"cost {cost} is above the smallest size {smallest}")
            if op == "wait" and timeout is not _OMIT:
                kw["timeout"] = timeout
                e.seconds("timeout", timeout, none=True, zero=True)
            method = getattr(limiter, op)
            call = _sig(f"RateLimiter.{op}", identity, **kw)
            ok, decision = await attempt(
                call,
                lambda m=method, i=identity, k=kw: m(i, **k),
                e,
                budget=WAIT_BUDGET if op == "wait" else None,
            )
            state = identity.encode() if isinstance(identity, str) and e.valid else identity
            fresh = e.valid and state not in used
            if op in ("hit", "wait") and e.valid:
                used.add(state)  # type: ignore[arg-type]
            elif op == "reset" and ok:
                used.discard(state)  # type: ignore[arg-type]
            if not ok or op == "reset":
                continue
            if not isinstance(decision, RateLimitDecision):
                raise _broken(call, f"returned {_show(decision)}")
            if decision.remaining < 0 or (decision.retry_after == 0) != decision.allowed:
                raise _broken(call, f"inconsistent decision {decision}")
            if fresh and not decision.allowed:
                raise _broken(call, f"refused a fresh identity with a valid cost: {decision}")

    await fuzz.example(body)


# --------------------------------------------------------------------------- streams

FIELD_NAME = st.one_of(pick("n", "a:b", "\u00fc", "k" * 1024, hostile=False), HOSTILE_HASHABLE)
FIELDS = st.one_of(
    st.lists(st.tuples(FIELD_NAME, VALUE), min_size=1, max_size=3),
    st.lists(st.tuples(FIELD_NAME, VALUE), max_size=0),
    st.sampled_from([Atom(v) for v in (None, [("n", 1)], "ab", 5)]),
)
RETENTION_OPTIONS = {
    "maxlen": pick(None, 1, 1000, 2**53),
    "max_age": pick(None, 1, 60, MAX_SECONDS),
    "exact": pick(False, True),
}
CONSUMER_OPTIONS = {
    "concurrency": pick(1, 16, STREAM_COUNT),
    "max_in_flight": pick(1, 256, STREAM_COUNT),
    "batch_size": pick(1, 100),
    "max_deliveries": pick(1, 5),
    "block": pick(0.05, 1, MAX_SECONDS),
    "claim_idle": pick(0.05, 60),
    "claim_interval": pick(None, 1),
    "drain_timeout": pick(0.05, 10),
    "ack_timeout": pick(0.05, 5),
    "consumer_idle": pick(None, 1, 3600),
    "start_id": pick(
        "0", "$", "0-0", "1700000000000-5", str(2**64 - 1), str(2**64), "1-2-3", "garbage"
    ),
    "dead_letter_maxlen": pick(None, 1, 2**53),
}


def _fields(drawn: object) -> object:
    if isinstance(drawn, Atom):
        return drawn.value
    return {name.value: value.value for name, value in drawn}  # type: ignore[attr-defined]


def expect_fields(e: Expect, fields: object, ser: object) -> None:
    if not isinstance(fields, Mapping) or not fields:
        e.refuse(f"message {_show(fields)} is not a non-empty mapping")
        return
    for name, value in fields.items():
        if isinstance(name, str):
            e.name("field name", name, empty=ConfigurationError)
        else:
            e.refuse(f"field name {_show(name)} is not a str")
        e.value(value, ser, what=f"field {_show(name)}")


def expect_messages(e: Expect, messages: object, ser: object) -> None:
    try:
        items = iter(messages)  # type: ignore[call-overload]
    except TypeError:
        e.refuse(f"messages={_show(messages)} is not iterable")
        return
    for fields in items:
        if not isinstance(fields, Mapping):
            e.refuse(f"message {_show(fields)} is not a mapping")
            return
        expect_fields(e, fields, ser)


def expect_consumer_policy(o: Mapping[str, Any]) -> Expect:
    e = Expect()
    for name in ("concurrency", "max_in_flight", "batch_size", "max_deliveries"):
        if name in o:
            e.count(name, o[name], 1, STREAM_COUNT)
    for name in ("block", "claim_idle", "drain_timeout", "ack_timeout"):
        if name in o:
            e.seconds(name, o[name])
    for name in ("claim_interval", "consumer_idle"):
        if name in o:
            e.seconds(name, o[name], none=True)
    start = o.get("start_id", "0")
    if not isinstance(start, str) or not (start == "$" or _stream_id_ok(start)):
        e.refuse(f"start_id={_show(start)} is not '0', '$' or a stream id")
    if o.get("dead_letter_maxlen") is not None:
        e.count("dead_letter_maxlen", o["dead_letter_maxlen"], 1, MAX_COUNT)
    return e


@settings(FUZZ_SETTINGS, max_examples=25)
@given(
    case=st.fixed_dictionaries(
        {
            "stream": NAME,
            "serializer": SERIALIZER,
            "retention": st.one_of(
                pick(_OMIT, None, hostile=False),
                st.sampled_from([Atom(v) for v in ("x", {"maxlen": 5}, 5)]),
                options({"maxlen": RETENTION_OPTIONS["maxlen"]}, always=("maxlen",)),
                options({"max_age": RETENTION_OPTIONS["max_age"]}, always=("max_age",)),
                options(RETENTION_OPTIONS),
            ),
            "adds": st.lists(FIELDS, max_size=2),
            "add_many": st.one_of(
                st.lists(FIELDS, max_size=3),
                st.sampled_from([Atom(v) for v in (None, 5, "ab", {"n": 1}, set(), DEEP)]),
            ),
            "policy": st.one_of(
                pick(_OMIT, None, hostile=False),
                st.sampled_from([Atom("x"), Atom({})]),
                options(CONSUMER_OPTIONS),
            ),
            "group": pick("g", "\u00fc", "k" * 1024),
            "consumer": pick(_OMIT, None, "c1", "k" * 1024),
            "handler": pick(_OMIT, None, Atom(_handler, "<async handler>")),
            "acks": st.lists(pick(THE_MESSAGE, "1-0", "0-1", "1700000000000-5"), max_size=3),
            "reject": st.tuples(
                pick(THE_MESSAGE), pick(RuntimeError("boom"), ValueError("\ud800"), hostile=False)
            ),
            "run": st.booleans(),
            "dead_count": pick(1, 100, crashes=False),
        }
    )
)
async def test_fuzz_streams(fuzz: Fuzz, case: dict[str, Any]) -> None:
    client = fuzz.client

    async def body(prefix: str) -> None:
        stream, ser = case["stream"].value, case["serializer"].value
        # Retention
        drawn = case["retention"]
        e = Expect()
        retention: Any = _OMIT
        if isinstance(drawn, dict):
            o = kwargs(drawn)
            maxlen, max_age = o.get("maxlen"), o.get("max_age")
            if (maxlen is None) == (max_age is None):
                e.refuse("not exactly one of maxlen and max_age")
            if maxlen is not None:
                e.count("maxlen", maxlen, 1, MAX_COUNT)
            if max_age is not None:
                e.seconds("max_age", max_age)
            e.flag("exact", o.get("exact", False))
            ok, retention = await attempt(
                _sig("StreamRetention", **o), lambda: StreamRetention(**o), e
            )
            if not ok:
                retention = _OMIT
        else:
            retention = drawn.value
        # Producer
        e = Expect()
        e.name("stream", stream)
        e.serializer(ser)
        kw: dict[str, Any] = {"serializer": ser}
        if retention is not _OMIT:
            kw["retention"] = retention
            e.instance("retention", retention, StreamRetention, none=True)
        ok, producer = await attempt(
            _sig("StreamProducer", stream, **kw),
            lambda: StreamProducer(client, stream, prefix=prefix, **kw),
            e,
        )
        if ok:
            for drawn_fields in case["adds"]:
                fields = _fields(drawn_fields)
                e = Expect()
                expect_fields(e, fields, ser)
                call = _sig("StreamProducer.add", fields)
                ok, entry = await attempt(call, lambda f=fields: producer.add(f), e)
                if ok and not (isinstance(entry, str) and _stream_id_ok(entry)):
                    raise _broken(call, f"returned {_show(entry)}, not an entry id")
            drawn = case["add_many"]
            messages = drawn.value if isinstance(drawn, Atom) else [_fields(f) for f in drawn]
            e = Expect()
            expect_messages(e, messages, ser)
            call = _sig("StreamProducer.add_many", messages)
            ok, ids = await attempt(call, lambda: producer.add_many(messages), e)
            if ok and (not isinstance(ids, list) or len(ids) != len(list(messages))):
                raise _broken(call, f"returned {_show(ids)}")
        # Consumer policy and group
        drawn = case["policy"]
        policy: Any = _OMIT
        if isinstance(drawn, dict):
            o = kwargs(drawn)
            ok, policy = await attempt(
                _sig("ConsumerPolicy", **o), lambda: ConsumerPolicy(**o), expect_consumer_policy(o)
            )
            if not ok:
                policy = _OMIT
        else:
            policy = drawn.value
        group_name, consumer, handler = (
            case["group"].value,
            case["consumer"].value,
            case["handler"].value,
        )
        e = Expect()
        e.name("stream", stream)
        e.name("group", group_name, str_only=True)
        e.serializer(ser)
        kw = {"serializer": ser}
        if consumer is not _OMIT:
            kw["consumer"] = consumer
            if consumer is not None:
                e.name("consumer", consumer, str_only=True)
        if handler is not _OMIT:
            kw["handler"] = handler
            if handler is not None and not callable(handler):
                e.refuse(f"handler={_show(handler)} is not callable")
        if policy is not _OMIT:
            kw["policy"] = policy
            e.instance("policy", policy, ConsumerPolicy, none=True)
        ok, group = await attempt(
            _sig("ConsumerGroup", stream, group_name, **kw),
            lambda: ConsumerGroup(client, stream, group_name, prefix=prefix, **kw),
            e,
        )
        if not ok:
            return
        acks = [a.value for a in case["acks"]]

        def expect_ack(values: list[Any], *legit: type[BaseException]) -> Expect:
            e = Expect(*legit)
            for value in values:
                if isinstance(value, StreamMessage):
                    continue
                if isinstance(value, bytes):
                    e.also(ConfigurationError)
                elif not isinstance(value, str) or not _stream_id_ok(value):
                    e.refuse(f"{_show(value)} is neither a message nor an entry id")
            return e

        early = [a for a in acks if a is not THE_MESSAGE]
        e = expect_ack(early, StreamError)
        e.also(StreamError)  # "not running" may come before the arguments are looked at
        await attempt(_sig("ConsumerGroup.ack (not running)", *early), lambda: group.ack(*early), e)
        count = case["dead_count"].value
        e = Expect()
        if isinstance(count, bool) or not isinstance(count, int):
            e.refuse(f"count={_show(count)} is not an int")
        elif count < 1:
            e.also(ConfigurationError)
        elif count > MAX_COUNT:
            e.refuse(f"count={_show(count)} is above 2**53")
        await attempt(
            _sig("ConsumerGroup.dead_letters", count), lambda: group.dead_letters(count), e
        )
        await attempt("ConsumerGroup.info (no group yet)", group.info, Expect(StreamError))
        if not case["run"]:
            return
        plain = StreamProducer(client, stream, prefix=prefix)

        async def session() -> None:
            async with group:
                await attempt(
                    "StreamProducer.add (while running)", lambda: plain.add({"n": "1"}), Expect()
                )
                message = None
                if handler in (None, _OMIT):
                    it = group.messages()
                    _, message = await attempt(
                        "ConsumerGroup.messages().__anext__", it.__anext__, Expect(), budget=2.0
                    )
                values = [message if a is THE_MESSAGE else a for a in acks]
                values = [v for v in values if v is not None]
                await attempt(
                    _sig("ConsumerGroup.ack", *values),
                    lambda: group.ack(*values),
                    expect_ack(values),
                )
                await attempt("ConsumerGroup.info", group.info, Expect())
                target, error = case["reject"][0].value, case["reject"][1].value
                if target is THE_MESSAGE:
                    target = message
                if target is not None:
                    e = Expect()
                    e.instance("message", target, StreamMessage)
                    await attempt(
                        _sig("ConsumerGroup.reject", target, error),
                        lambda: group.reject(target, error),
                        e,
                    )

        await attempt("async with ConsumerGroup", session, Expect(), deadline=SESSION_DEADLINE)

    await fuzz.example(body)


# --------------------------------------------------------------------------- pub/sub

CHANNEL = pick("c", "news:1", b"c", "\u00fc", "k" * 1024)
PATTERNS = pick(_OMIT, (), ["user:*"], [b"p*"])
BUFFER_OPTIONS = {
    "size": pick(1, 10, 10**8),
    "overflow": pick("drop_oldest", "drop_newest", "error"),
}
RECONNECT_OPTIONS = {
    "initial_delay": pick(0.01, 0.05, 1),
    "max_delay": pick(0.05, 5, MAX_SECONDS),
    "multiplier": pick(1, 2, 1000),
    "max_attempts": pick(None, 1, 3),
    "confirm_timeout": pick(1, 5),
}
POLICY_ARG = pick(_OMIT)


def expect_reconnect(o: Mapping[str, Any]) -> Expect:
    e = Expect()
    first = e.seconds("initial_delay", o.get("initial_delay", 0.05))
    most = e.seconds("max_delay", o.get("max_delay", 5.0))
    e.seconds("confirm_timeout", o.get("confirm_timeout", 5.0))
    if first and most and o.get("max_delay", 5.0) < o.get("initial_delay", 0.05):
        e.refuse("max_delay < initial_delay")
    e.number("multiplier", o.get("multiplier", 2.0), minimum=1, maximum=1000)
    if o.get("max_attempts") is not None:
        e.count("max_attempts", o["max_attempts"], 1, MAX_COUNT)
    return e


def expect_subscription(e: Expect, channels: list[Any], patterns: object) -> None:
    found = 0
    for channel in channels:
        if e.name("channel", channel):
            found += 1
    if patterns is not _OMIT:
        good = e.names("patterns", patterns)
        found += good or 0
    if e.valid and not found:
        e.refuse("no channel and no pattern")


async def _policy(drawn: object, spec: type, model: Callable[[Mapping[str, Any]], Expect]) -> Any:
    """A BufferPolicy/ReconnectPolicy argument: built from drawn options, or drawn as is."""
    if isinstance(drawn, dict):
        o = kwargs(drawn)
        ok, built = await attempt(_sig(spec.__name__, **o), lambda: spec(**o), model(o))
        return built if ok else _OMIT
    return drawn.value  # type: ignore[attr-defined]


def expect_buffer(o: Mapping[str, Any]) -> Expect:
    e = Expect()
    e.count("size", o.get("size", 10_000), 1, 10**8)
    e.choice("overflow", o.get("overflow", "drop_oldest"), ("drop_oldest", "drop_newest", "error"))
    return e


async def _receive(messages: Any, call: str, *, cluster: bool = False) -> None:
    # On a cluster, a message an earlier example (or step) published through another node
    # may be relayed after this subscription began (nodes forward PUBLISH asynchronously):
    # one more message may arrive, in another serializer's format, and overflow a
    # one-message buffer.
    late: tuple[type[Exception], ...] = (PubSubOverflow, SerializationError) if cluster else ()

    async def next_message() -> Any:
        try:
            return await messages.__anext__()
        except late as exc:
            return exc

    ok, item = await attempt(f"{call}.__anext__", next_message, Expect(), budget=2.0)
    if ok and isinstance(item, (Message, *late)):
        return
    raise _broken(call, f"a message published to it was not delivered (got {_show(item)})")


@settings(FUZZ_SETTINGS, max_examples=25)
@given(
    case=st.fixed_dictionaries(
        {
            "buffer": st.one_of(POLICY_ARG, options(BUFFER_OPTIONS, at_most=2)),
            "reconnect": st.one_of(
                POLICY_ARG, pick(None, hostile=False), options(RECONNECT_OPTIONS)
            ),
            "channels": st.lists(CHANNEL, min_size=1, max_size=2) | st.just([]),
            "patterns": PATTERNS,
            "sharded": pick(_OMIT, False, True),
            "serializer": SERIALIZER,
            "hci": pick(_OMIT, None, 0.5, 30),
            "publish": st.tuples(CHANNEL, VALUE, SERIALIZER, pick(_OMIT, False, True)),
            "broadcast": options(
                {
                    "sharded": pick(False, True),
                    "serializer": SERIALIZER,
                    "reconnect": pick(None, ReconnectPolicy()),
                    "health_check_interval": pick(None, 0.5, 30),
                },
                at_most=2,
            ),
            "hub_subscribe": st.tuples(
                st.lists(CHANNEL, max_size=2),
                PATTERNS,
                pick(_OMIT, BufferPolicy(), BufferPolicy(1, "error")),
            ),
            "hub_publish": st.tuples(CHANNEL, VALUE),
        }
    )
)
async def test_fuzz_pubsub(fuzz: Fuzz, case: dict[str, Any]) -> None:
    client = fuzz.client

    async def body(prefix: str) -> None:
        buffer = await _policy(case["buffer"], BufferPolicy, expect_buffer)
        reconnect = await _policy(case["reconnect"], ReconnectPolicy, expect_reconnect)
        channels = [a.value for a in case["channels"]]
        patterns, sharded = case["patterns"].value, case["sharded"].value
        ser, hci = case["serializer"].value, case["hci"].value
        kw: dict[str, Any] = {"serializer": ser}
        e = Expect()
        e.serializer(ser)
        for name, value in (("patterns", patterns), ("sharded", sharded), ("buffer", buffer)):
            if value is not _OMIT:
                kw[name] = value
        if sharded is not _OMIT:
            e.flag("sharded", sharded)
        if buffer is not _OMIT:
            e.instance("buffer", buffer, BufferPolicy)
        if reconnect is not _OMIT:
            kw["reconnect"] = reconnect
            e.instance("reconnect", reconnect, ReconnectPolicy, none=True)
        if hci is not _OMIT:
            kw["health_check_interval"] = hci
            e.seconds("health_check_interval", hci, none=True)
        expect_subscription(e, channels, patterns)
        call = _sig("subscribe", *channels, **kw)
        ok, subscription = await attempt(call, lambda: subscribe(client, *channels, **kw), e)
        if ok:

            async def session() -> None:
                async with subscription as messages:
                    if channels:
                        await attempt(
                            f"publish to {_show(channels[0])} (subscribed)",
                            lambda: publish(
                                client,
                                channels[0],
                                "hello",
                                serializer=ser,
                                sharded=sharded is True,
                            ),
                            Expect(),
                        )
                        await _receive(messages, call, cluster=fuzz.cluster)

            e = Expect()
            if sharded is True and fuzz.on_several_nodes(channels):
                e.refuse("sharded channels served by more than one cluster node")
            await attempt(f"async with {call}", session, e, deadline=SESSION_DEADLINE)

        # publish
        channel, message, codec, flag = (a.value for a in case["publish"])
        e = Expect()
        e.name("channel", channel)
        e.serializer(codec)
        pkw: dict[str, Any] = {"serializer": codec}
        if flag is not _OMIT:
            pkw["sharded"] = flag
            e.flag("sharded", flag)
        if e.valid:
            e.value(message, codec, what="message")
        ok, count = await attempt(
            _sig("publish", channel, message, **pkw),
            lambda: publish(client, channel, message, **pkw),
            e,
        )
        if ok and (not isinstance(count, int) or count < 0):
            raise _broken("publish", f"returned {_show(count)}")

        # Broadcast
        b = kwargs(case["broadcast"])
        e = Expect()
        if "sharded" in b:
            e.flag("sharded", b["sharded"])
        e.serializer(b.get("serializer"))
        if "reconnect" in b:
            e.instance("reconnect", b["reconnect"], ReconnectPolicy, none=True)
        if "health_check_interval" in b:
            e.seconds("health_check_interval", b["health_check_interval"], none=True)
        ok, broadcast = await attempt(_sig("Broadcast", **b), lambda: Broadcast(client, **b), e)
        if not ok:
            return
        hub_channels = [a.value for a in case["hub_subscribe"][0]]
        hub_patterns, hub_buffer = case["hub_subscribe"][1].value, case["hub_subscribe"][2].value
        target, payload = (a.value for a in case["hub_publish"])

        async def hub_session() -> None:
            async with broadcast as hub:
                skw: dict[str, Any] = {}
                e = Expect()
                if hub_patterns is not _OMIT:
                    skw["patterns"] = hub_patterns
                if hub_buffer is not _OMIT:
                    skw["buffer"] = hub_buffer
                    e.instance("buffer", hub_buffer, BufferPolicy)
                expect_subscription(e, hub_channels, hub_patterns)
                call = _sig("Broadcast.subscribe", *hub_channels, **skw)
                ok, local = await attempt(call, lambda: hub.subscribe(*hub_channels, **skw), e)
                if ok:
                    async with local as messages:
                        if hub_channels:
                            await attempt(
                                "Broadcast.publish (subscribed)",
                                lambda: hub.publish(hub_channels[0], "hello"),
                                Expect(),
                            )
                            await _receive(messages, call, cluster=fuzz.cluster)
                e = Expect()
                e.name("channel", target)
                e.value(payload, b.get("serializer"), what="message")
                await attempt(
                    _sig("Broadcast.publish", target, payload),
                    lambda: hub.publish(target, payload),
                    e,
                )

        e = Expect()
        if b.get("sharded") is True and fuzz.cluster:
            e.refuse("a sharded Broadcast on a cluster client")
        await attempt(_sig("async with Broadcast", **b), hub_session, e, deadline=SESSION_DEADLINE)

    await fuzz.example(body)


# --------------------------------------------------------------------------- connect

# Each URL form: (what connect() must do, whether the client then reaches the server).
URL_FORMS: dict[str, tuple[str, str]] = {
    "{url}": ("ok", "live"),
    "{url}?cluster=false": ("ok", "live"),
    "{url}?cluster=0": ("ok", "live"),
    "redis://127.0.0.1:{port}": ("ok", "live"),
    "redis://127.0.0.1:1/0": ("ok", "dead"),
    "unix:///nonexistent/arp-fuzz.sock": ("ok", "dead"),
    "redis://127.0.0.1:{port}/x": ("maybe", "maybe"),
    "redis://\ud800/0": ("maybe", "maybe"),
    "": ("refuse", ""),
    "127.0.0.1:6379": ("refuse", ""),
    "http://127.0.0.1:6379/0": ("refuse", ""),
    "{url}?cluster=maybe": ("refuse", ""),
    "redis://127.0.0.1:99999/0": ("refuse", ""),
    "redis://[::1/0": ("refuse", ""),
}
CONNECT_OPTIONS = {
    "cluster": pick(None, False, True),
    "max_connections": pick(1, 32, 100_000),
    "pool_timeout": pick(0.5, 5),
    "socket_timeout": pick(None, 0.5, 5),
    "connect_timeout": pick(0.5, 2),
    "retries": pick(0, 3, 100),
    "backoff_base": pick(0.01, 0.05),
    "backoff_cap": pick(0.05, 1),
    "health_check_interval": pick(0.5, 15),
    "protocol": pick(2, 3),
    "username": pick(None, "default"),
    "password": pick(None, "secret"),
    "auto_pipeline": pick(False, True),
}


@settings(FUZZ_SETTINGS, max_examples=25)
@given(
    case=st.fixed_dictionaries(
        {
            "url": st.one_of(
                st.sampled_from(["{url}"] * 4 + sorted(URL_FORMS)),
                st.sampled_from([Atom(v) for v in (None, 5, b"redis://127.0.0.1/0", BIG)]),
            ),
            "options": options(CONNECT_OPTIONS),
        }
    )
)
async def test_fuzz_connect(fuzz: Fuzz, case: dict[str, Any]) -> None:
    async def body(prefix: str) -> None:
        port = fuzz.url.rsplit(":", 1)[1].split("/")[0]
        drawn = case["url"]
        e = Expect()
        if isinstance(drawn, Atom):
            url: Any = drawn.value
            verdict, reach = "refuse", ""
        else:
            base = fuzz.url
            if drawn.startswith("{url}?cluster="):
                # The forms are about a plain URL: on the cluster kind, that of one node
                # (redis+cluster:// and ?cluster=false would contradict each other).
                base = base.replace("redis+cluster://", "redis://")
            url = drawn.replace("{url}", base).replace("{port}", port)
            verdict, reach = URL_FORMS[drawn]
        if verdict == "refuse":
            e.refuse(f"url {_show(url)} is malformed")
        elif verdict == "maybe":
            e.also(ConfigurationError)
        o = kwargs(case["options"])
        if o.get("cluster") is not None:
            e.flag("cluster", o["cluster"])
        e.count("max_connections", o.get("max_connections", 32), 1, 100_000)
        for name in (
            "pool_timeout",
            "connect_timeout",
            "backoff_base",
            "backoff_cap",
            "health_check_interval",
        ):
            if name in o:
                e.seconds(name, o[name])
        e.seconds("socket_timeout", o.get("socket_timeout"), none=True)
        e.count("retries", o.get("retries", 3), 0, 100)
        e.choice("protocol", o.get("protocol", 2), (2, 3))
        for name in ("username", "password"):
            if o.get(name) is not None and not isinstance(o[name], str):
                e.refuse(f"{name}={_show(o[name])} is not a str")
            elif isinstance(o.get(name), str) and not _encodable(o[name]):
                e.refuse(f"{name}={_show(o[name])} has a lone surrogate")
        e.flag("auto_pipeline", o.get("auto_pipeline", True))
        ok, client = await attempt(_sig("connect", url, **o), lambda: connect(url, **o), e)
        if not ok:
            return
        try:
            # The client must work when everything is sane; otherwise it may fail, but
            # only with a library error.
            quick = any(
                isinstance(o.get(n), int | float) and o[n] < 0.1
                for n in ("socket_timeout", "connect_timeout", "pool_timeout")
            )
            sane = (
                reach == "live"
                and not quick
                and o.get("cluster") is not True
                and o.get("username") is None
                and o.get("password") is None
            )
            e = Expect()
            if not sane:
                e.also(RedisPatternsError)
            await attempt(
                f"server_info(connect({_show(url)}, {_show(o)}))",
                lambda: server_info(client),
                e,
                budget=None if sane else 3.0,
            )
        finally:
            with anyio.move_on_after(5, shield=True):
                await client.aclose()

    await fuzz.example(body)


# --------------------------------------------------------------------------- serializers

LOADS_INPUT = st.one_of(
    pick(
        b"",
        b"garbage",
        b"1",
        b'{"a": 1}',
        b"\xff",
        b'"\\ud800"',
        b"[" * 2000,
        b"\x80\x04K\x01.",
        hostile=False,
    ),
    HOSTILE,
)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(
    case=st.fixed_dictionaries(
        {
            "kind": st.sampled_from(
                ["JsonSerializer", "MsgpackSerializer", "RawSerializer", "PickleSerializer"]
            ),
            "use_orjson": pick(_OMIT, None, True, False),
            "pickle": options(
                {
                    "key": pick(b"0" * 16, "k" * 16, b"0" * 32),
                    "previous_keys": pick((), [b"1" * 16], ["p" * 16]),
                    "protocol": pick(0, 2, 5, pickle.HIGHEST_PROTOCOL),
                },
                always=("key",),
            ),
            "values": st.lists(VALUE, min_size=1, max_size=3),
            "data": st.lists(LOADS_INPUT, max_size=3),
        }
    )
)
async def test_fuzz_serializers(fuzz: Fuzz, case: dict[str, Any]) -> None:
    async def body(prefix: str) -> None:
        kind = case["kind"]
        e = Expect()
        kw: dict[str, Any] = {}
        if kind == "JsonSerializer":
            if case["use_orjson"].value is not _OMIT:
                kw["use_orjson"] = case["use_orjson"].value
                if kw["use_orjson"] is not None:
                    e.flag("use_orjson", kw["use_orjson"])
        elif kind == "PickleSerializer":
            kw = kwargs(case["pickle"])

            def key_ok(name: str, key: object) -> None:
                if isinstance(key, str) and not _encodable(key):
                    e.refuse(f"{name}={_show(key)} has a lone surrogate")
                elif isinstance(key, str | bytes):
                    if len(key.encode() if isinstance(key, str) else key) < 16:
                        e.refuse(f"{name}={_show(key)} is shorter than 16 bytes")
                else:
                    e.refuse(f"{name}={_show(key)} is not bytes or str")

            key_ok("key", kw["key"])
            if "previous_keys" in kw:
                old = kw["previous_keys"]
                if isinstance(old, str | bytes):
                    e.refuse("previous_keys is one key, not a list")
                else:
                    try:
                        listed = list(old)
                    except TypeError:
                        e.refuse(f"previous_keys={_show(old)} is not iterable")
                    else:
                        for key in listed:
                            key_ok("previous_keys[]", key)
            if kw.get("protocol") is not None:  # None: pickle's default protocol
                protocol = kw["protocol"]
                if type(protocol) is int and protocol < 0:
                    e.also(ConfigurationError)  # pickle reads a negative one as the highest
                elif type(protocol) is not int or protocol > pickle.HIGHEST_PROTOCOL:
                    e.refuse(f"protocol={_show(protocol)} is not a pickle protocol")
        codec_type = {
            "JsonSerializer": JsonSerializer,
            "MsgpackSerializer": MsgpackSerializer,
            "RawSerializer": RawSerializer,
            "PickleSerializer": PickleSerializer,
        }[kind]
        ok, codec = await attempt(_sig(kind, **kw), lambda: codec_type(**kw), e)
        if not ok:
            return
        for atom in case["values"]:
            value = atom.value
            e = Expect()
            e.value(value, codec)
            call = _sig(f"{kind}.dumps", value)
            ok, data = await attempt(call, lambda v=value: codec.dumps(v), e)
            if ok:
                if not isinstance(data, bytes):
                    raise _broken(call, f"returned {_show(data)}, not bytes")
                await attempt(f"{kind}.loads({call})", lambda d=data: codec.loads(d), Expect())
        for atom in case["data"]:
            data = atom.value
            e = Expect()
            e.also(SerializationError)
            if not isinstance(data, bytes):
                e.also(ConfigurationError)
            await attempt(_sig(f"{kind}.loads", data), lambda d=data: codec.loads(d), e)

    await fuzz.example(body)


# --------------------------------------------------------------------------- the issue's cases


class Context:
    """What an explicit case gets: a live client, a client to nowhere, the URL, a prefix.

    A call made through ``dead`` that reaches the command layer fails with
    ``ConnectionFailed``: a case expecting ``ConfigurationError`` through it proves that
    the input was refused before any command was sent.
    """

    def __init__(self, live: Redis, dead: Redis, url: str, prefix: str) -> None:
        self.live = live
        self.dead = dead
        self.url = url
        self.prefix = prefix


async def _refused(error: type[Exception], fn: Callable[[], Any]) -> None:
    with pytest.raises(error):
        await _invoke(fn)


def refuses(
    fn: Callable[[Context], Any], error: type[Exception] = ConfigurationError
) -> Callable[[Context], Awaitable[None]]:
    async def case(ctx: Context) -> None:
        await _refused(error, lambda: fn(ctx))

    return case


def in_cache(
    fn: Callable[[Cache], Any], error: type[Exception] = InvalidKeyError
) -> Callable[[Context], Awaitable[None]]:
    async def case(ctx: Context) -> None:
        async with Cache(ctx.dead, ttl=10, prefix=ctx.prefix) as cache:
            await _refused(error, lambda: fn(cache))

    return case


async def _sliding_log_cost(ctx: Context) -> None:
    limiter = RateLimiter(ctx.live, SlidingWindowLog(10000, 60), prefix=ctx.prefix)
    decision = await limiter.hit("user", cost=4000)
    assert decision.allowed
    assert decision.remaining == 6000
    decision = await limiter.hit("user", cost=4000)
    assert decision.allowed
    assert decision.remaining == 2000
    assert not (await limiter.hit("user", cost=4000)).allowed


async def _connect_cluster_false(ctx: Context) -> None:
    # A plain URL: on the cluster kind, that of one node (redis+cluster:// and
    # ?cluster=false contradict each other).
    url = ctx.url.replace("redis+cluster://", "redis://")
    client = connect(url + "?cluster=false")
    try:
        assert (await server_info(client)).version
    finally:
        await client.aclose()


async def _cached_template(ctx: Context, template: str) -> None:
    cache = Cache(ctx.dead, ttl=10, prefix=ctx.prefix)

    async def load(user_id: int) -> int:
        return user_id

    with pytest.raises(ConfigurationError):
        cache.cached(key=template)(load)


def _dead_limiter(ctx: Context) -> RateLimiter:
    return RateLimiter(ctx.dead, GCRA(10, 1.0), prefix=ctx.prefix)


CONNECT_NOT_FINITE = {
    f"connect({name}={value})": refuses(
        lambda ctx, n=name, v=value: connect(ctx.url, **{n: v})  # type: ignore[arg-type]
    )
    for name in (
        "socket_timeout",
        "connect_timeout",
        "pool_timeout",
        "health_check_interval",
        "backoff_base",
        "backoff_cap",
    )
    for value in (math.nan, math.inf)
}

ISSUE_CASES: dict[str, Callable[[Context], Awaitable[None]]] = {
    "SlidingWindowLog(10000, 60).hit(cost=4000) works": _sliding_log_cost,
    "GCRA(1, 1e15)": refuses(lambda ctx: GCRA(1, 1e15)),
    "FixedWindow(1, 1e15)": refuses(lambda ctx: FixedWindow(1, 1e15)),
    **CONNECT_NOT_FINITE,
    "ReconnectPolicy(initial_delay=nan)": refuses(
        lambda ctx: ReconnectPolicy(initial_delay=math.nan)
    ),
    "subscribe(health_check_interval=nan)": refuses(
        lambda ctx: subscribe(ctx.dead, "c", health_check_interval=math.nan)
    ),
    "Lock(ttl=1e306)": refuses(lambda ctx: Lock(ctx.dead, "l", ttl=1e306)),
    "Cache(ttl=1e300)": refuses(lambda ctx: Cache(ctx.dead, ttl=1e300)),
    "Cache(stale_ttl=1e308)": refuses(lambda ctx: Cache(ctx.dead, ttl=10, stale_ttl=1e308)),
    "Cache.get(list key)": in_cache(lambda cache: cache.get(["k"])),  # type: ignore[arg-type]
    "Cache.set(bytearray key)": in_cache(lambda cache: cache.set(bytearray(b"k"), 1)),  # type: ignore[arg-type]
    "Lock(list name)": refuses(lambda ctx: Lock(ctx.dead, ["k"]), InvalidKeyError),  # type: ignore[arg-type]
    "Lock(bytearray name)": refuses(lambda ctx: Lock(ctx.dead, bytearray(b"k")), InvalidKeyError),  # type: ignore[arg-type]
    "RateLimiter.hit(list identity)": refuses(
        lambda ctx: _dead_limiter(ctx).hit(["k"]),
        InvalidKeyError,  # type: ignore[arg-type]
    ),
    "RateLimiter.hit(bytearray identity)": refuses(
        lambda ctx: _dead_limiter(ctx).hit(bytearray(b"k")),
        InvalidKeyError,  # type: ignore[arg-type]
    ),
    "Cache.get(lone surrogate key)": in_cache(lambda cache: cache.get("\ud800")),
    "subscribe(lone surrogate channel)": refuses(
        lambda ctx: subscribe(ctx.dead, "\ud800"), InvalidKeyError
    ),
    "publish(lone surrogate channel)": refuses(
        lambda ctx: publish(ctx.dead, "a\udfffb", 1), InvalidKeyError
    ),
    "ConsumerGroup(lone surrogate group)": refuses(
        lambda ctx: ConsumerGroup(ctx.dead, "s", "\ud800"), InvalidKeyError
    ),
    "Lock.acquire(timeout='1')": refuses(lambda ctx: Lock(ctx.dead, "l").acquire(timeout="1")),  # type: ignore[arg-type]
    "RateLimiter.wait(timeout='1')": refuses(
        lambda ctx: _dead_limiter(ctx).wait("u", timeout="1")  # type: ignore[arg-type]
    ),
    "Redlock(drift_factor='x')": refuses(
        lambda ctx: Redlock([ctx.dead], "r", drift_factor="x")  # type: ignore[arg-type]
    ),
    "Lock(cancel_on_loss='no')": refuses(
        lambda ctx: Lock(ctx.dead, "l", cancel_on_loss="no")  # type: ignore[arg-type]
    ),
    "Lock(ttl=1e16)": refuses(lambda ctx: Lock(ctx.dead, "l", ttl=1e16)),
    "Lock(fence_ttl=1e16)": refuses(lambda ctx: Lock(ctx.dead, "l", fence_ttl=1e16)),
    "Semaphore(limit=2**63)": refuses(lambda ctx: Semaphore(ctx.dead, "s", limit=2**63)),
    "Cache(ttl=1e16)": refuses(lambda ctx: Cache(ctx.dead, ttl=1e16)),
    "StreamRetention(maxlen=2**70)": refuses(lambda ctx: StreamRetention(maxlen=2**70)),
    "ConsumerPolicy(start_id='garbage')": refuses(lambda ctx: ConsumerPolicy(start_id="garbage")),
    "fenced_set(value=None)": refuses(
        lambda ctx: fenced_set(ctx.dead, "r", None, 1, prefix=ctx.prefix)  # type: ignore[arg-type]
    ),
    "fenced_set(token=10**400)": refuses(
        lambda ctx: fenced_set(ctx.dead, "r", b"v", 10**400, prefix=ctx.prefix)
    ),
    "TokenBucket(2**63, 1.0)": refuses(lambda ctx: TokenBucket(2**63, 1.0)),
    "ConsumerPolicy(dead_letter_maxlen=2**70)": refuses(
        lambda ctx: ConsumerPolicy(dead_letter_maxlen=2**70)
    ),
    "cached(key='{')": lambda ctx: _cached_template(ctx, "{"),
    "cached(key='{missing}')": lambda ctx: _cached_template(ctx, "{missing}"),
    "connect(url + '?cluster=false') works": _connect_cluster_false,
    "10 MB cache key": in_cache(lambda cache: cache.get(BIG)),
    "10 MB lock name": refuses(lambda ctx: Lock(ctx.dead, BIG), InvalidKeyError),
    "10 MB limiter identity": refuses(lambda ctx: _dead_limiter(ctx).hit(BIG), InvalidKeyError),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
async def test_issue_case(fuzz: Fuzz, name: str) -> None:
    dead = connect("redis://127.0.0.1:1/0", retries=0, connect_timeout=0.5)
    try:
        with anyio.fail_after(CALL_DEADLINE):
            await ISSUE_CASES[name](Context(fuzz.client, dead, fuzz.url, fuzz.root))
    finally:
        await dead.aclose()
    assert await fuzz.stray_keys() == []


HUGE_INT_SCRIPT = """
import sys

import anyio

from aioredispatterns import ConfigurationError, ConsumerGroup, connect, fenced_set


async def main(url: str, prefix: str, call: str) -> None:
    client = connect(url)
    try:
        if call == "fenced_set":
            await fenced_set(client, "r", 10**5000, 1, prefix=prefix)
        else:
            await ConsumerGroup(client, "s", "g", prefix=prefix).dead_letters(10**5000)
    except ConfigurationError:
        print("refused")
    except Exception as exc:
        print(f"raised {type(exc).__qualname__}: {exc}"[:300])
    else:
        print("accepted")
    finally:
        await client.aclose()


anyio.run(main, *sys.argv[1:])
"""


@pytest.mark.parametrize("call", ["fenced_set", "dead_letters"])
def test_huge_int_never_reaches_the_packer(redis_server: Any, key_prefix: str, call: str) -> None:
    # An int of more than 4300 digits (CPython refuses to make a str of it) makes
    # hiredis.pack_command segfault; in a subprocess, so that a crash fails this test
    # instead of ending the whole run. Expected: refused before any command.
    if redis_server.name not in FUZZ_KINDS:
        pytest.skip(f"the input fuzz runs on {' and '.join(FUZZ_KINDS)} only")
    done = subprocess.run(
        [sys.executable, "-c", HUGE_INT_SCRIPT, redis_server.url, key_prefix, call],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode < 0:
        pytest.fail(
            f"{call} with an int of 5000 digits killed the process with signal "
            f"{-done.returncode}; stderr:\n{done.stderr[-1500:]}"
        )
    assert (done.returncode, done.stdout.strip()) == (0, "refused"), done.stderr[-1500:]
