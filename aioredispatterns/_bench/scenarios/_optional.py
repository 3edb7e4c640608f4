"""Competitors are optional (the ``bench`` extra installs them): rows appear when present.

Their modules are handled as ``Any``: the scenarios use a few calls of each, and their
types are theirs to keep straight, not this package's type check's.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from typing import Any


def has(module: str) -> bool:
    """Whether ``module`` can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def load(module: str) -> Any:
    """Import ``module`` (a competitor) untyped."""
    return importlib.import_module(module)


def json_loads() -> Callable[[bytes | str], Any]:
    """``orjson.loads`` when installed (what a speed-minded user picks), else ``json.loads``."""
    if has("orjson"):
        loads: Callable[[bytes | str], Any] = load("orjson").loads
        return loads
    return json.loads
