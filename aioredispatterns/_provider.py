"""Providers: the objects an ASGI glue needs, found when a request comes in, not at import.

An app builds its client, caches and limiters in its lifespan and closes them there; the
middleware, decorators and dependencies are built earlier, at import. So they take a
*provider* of the object instead of the object itself, and resolve it per request:

* the object itself (built before the app, the old way);
* a callable with no argument (``lambda: services.limiter``);
* a callable taking the ASGI scope (``lambda scope: scope["app"].state.limiter``);
* :func:`app_state` ``("limiter")``: ``limiter`` from the lifespan state (what a lifespan
  yields, which the server copies into ``scope["state"]``), else from ``app.state``.

:func:`resolver` turns a provider into one function of the scope, once, when the glue is
built: a request then pays an ``isinstance`` check, nothing else. Resolution is plain
Python (no await, nothing sent), so there is nothing to cancel.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeAlias, TypeVar

from .errors import ConfigurationError

__all__ = ("AppState", "Provider", "app_state", "resolver")

T = TypeVar("T")

Scope: TypeAlias = MutableMapping[str, Any]

#: What the glue accepts where it needs a ``T``: see the module docstring.
Provider: TypeAlias = "T | AppState | Callable[[], T] | Callable[[Scope], T]"


class AppState:
    """A provider that reads ``name`` from the app's state when a request comes in.

    Looks first in the lifespan state (``scope["state"]``, filled from the mapping a
    lifespan yields; also what ``request.state`` reads), then on the Starlette / FastAPI
    application's ``app.state`` (``scope["app"]``, set once routing starts). Build it
    with :func:`app_state`.

    Raises (when called):
        ConfigurationError: neither holds ``name`` (the lifespan did not set it, or the
            request arrived before the lifespan ran).
    """

    __slots__ = ("name",)

    name: str

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(f"app_state needs an attribute name, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"app_state({self.name!r})"

    def __call__(self, scope: Scope) -> Any:
        state = scope.get("state")
        if isinstance(state, Mapping) and self.name in state:
            return state[self.name]
        app = scope.get("app")
        found = getattr(getattr(app, "state", None), self.name, _MISSING)
        if found is _MISSING:
            raise ConfigurationError(
                f"no {self.name!r} in the lifespan state or app.state: set it in the "
                "app's lifespan before serving requests"
            )
        return found


_MISSING = object()


def app_state(name: str) -> AppState:
    """A provider of ``name`` from the lifespan state or ``app.state`` (see :class:`AppState`).

    ``RateLimitMiddleware(app, limiter=app_state("limiter"))`` lets the lifespan create the
    limiter (``app.state.limiter = RateLimiter(...)``, or ``yield {"limiter": ...}``).

    Raises:
        ConfigurationError: ``name`` is not an identifier.
    """
    return AppState(name)


def resolver(
    provider: object, kind: type[T] | tuple[type[T], ...], what: str
) -> Callable[[Scope], T]:
    """Turn ``provider`` into a function of the ASGI scope that returns a ``kind``.

    Called once, when the glue is built. An instance of ``kind`` is returned as is; an
    :class:`AppState` or a callable is called per request (a callable with one positional
    parameter gets the scope, one with none gets nothing), and what it returns must be a
    ``kind``.

    Raises:
        ConfigurationError: ``provider`` is neither a ``kind`` nor callable (here); a
            provider returned something else than a ``kind`` (per request, naming
            ``what``).
    """
    if isinstance(provider, kind):
        value = provider
        return lambda scope: value
    if not callable(provider):
        raise ConfigurationError(
            f"{what} must be a {_names(kind)}, a callable returning one, or app_state(name); "
            f"got {type(provider).__name__}"
        )
    call: Callable[[Scope], object]
    if isinstance(provider, AppState) or _takes_scope(provider):
        call = provider
    else:
        no_args: Callable[[], object] = provider

        def call(scope: Scope) -> object:
            return no_args()

    def resolve(scope: Scope) -> T:
        found = call(scope)
        if not isinstance(found, kind):
            raise ConfigurationError(
                f"the {what} provider {provider!r} returned {type(found).__name__}, "
                f"not a {_names(kind)}"
            )
        return found

    return resolve


def _takes_scope(function: Callable[..., object]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the scope
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return bool(required) or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
