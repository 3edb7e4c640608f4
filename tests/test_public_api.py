"""The public surface: tuple __all__, sorted, documented, nothing private leaking."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import aioredispatterns

PUBLIC_MODULES = sorted(
    f"aioredispatterns.{m.name}"
    for m in pkgutil.iter_modules(aioredispatterns.__path__)
    if not m.name.startswith("_")
)


@pytest.mark.parametrize("module_name", ["aioredispatterns", *PUBLIC_MODULES])
def test_public_modules_declare_a_sorted_tuple_all(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, tuple), f"{module_name} lacks a tuple __all__"
    assert list(exported) == sorted(exported), f"{module_name}.__all__ is not sorted"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name}"


@pytest.mark.parametrize("name", [n for n in aioredispatterns.__all__ if n != "__version__"])
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(aioredispatterns, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
    assert not obj.__module__.split(".")[-1].startswith("_") or callable(obj)


def test_every_error_derives_from_the_root() -> None:
    from aioredispatterns import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), aioredispatterns.RedisPatternsError)
    for name in aioredispatterns.__all__:
        obj = getattr(aioredispatterns, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, aioredispatterns.RedisPatternsError), name


def test_error_tree_is_drawn_in_the_errors_docstring() -> None:
    from aioredispatterns import errors

    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} missing from the tree in errors.__doc__"


def test_package_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("aioredispatterns").joinpath("py.typed").is_file()
