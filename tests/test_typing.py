"""Type tests: every public symbol has a known type, and ``Cache[T]`` hands ``T`` back.

Both run a type checker in a subprocess (a few seconds each) and are skipped when it is
not installed (``pip install -e '.[dev]'`` brings pyright and mypy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from aioredispatterns import Cache

ROOT = Path(__file__).resolve().parents[1]

needs_pyright = pytest.mark.skipif(
    importlib.util.find_spec("pyright") is None,
    reason="pyright is not installed (pip install -e '.[dev]')",
)
needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install -e '.[dev]')",
)

# What a user writes. A wrong inferred type fails assert_type; each "type: ignore" line
# must really be an error (mypy --warn-unused-ignores, pyright's
# reportUnnecessaryTypeIgnoreComment), so a Cache[T] that accepted anything fails too.
SNIPPET = """\
# pyright: strict, reportUnnecessaryTypeIgnoreComment=true
from typing import Any, assert_type

import redis.asyncio as redis

from aioredispatterns import Cache


class User:
    pass


async def fetch_user() -> User:
    return User()


async def main(client: redis.Redis) -> None:
    async with Cache(client, ttl=60) as plain:
        assert_type(plain, Cache[Any])
        assert_type(await plain.get_or_load("user:1", fetch_user), User)
        assert_type(await plain.get_or_load("user:1", lambda: fetch_user()), User)

    async with Cache[User](client, ttl=60) as users:
        assert_type(users, Cache[User])
        assert_type(await users.get_or_load("user:1", fetch_user), User)
        assert_type(await users.get("user:1"), User | None)
        assert_type(await users.get("user:1", 0), User | int)
        assert_type(await users.get_many(["user:1", "user:2"]), dict[str, User])
        await users.set("user:1", User())
        await users.set_many({"user:1": User(), "user:2": None})
        await users.set("user:1", "not a user")  # type: ignore[arg-type]

        @users.cached(key="user:{uid}")
        async def load(uid: int) -> User:
            return User()

        assert_type(await load(1), User)
        await load("1")  # type: ignore[arg-type]
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # pyright resolves imports through the first python on PATH: make it this one.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # No "a newer pyright exists" check against PyPI.
    env["PYRIGHT_PYTHON_IGNORE_WARNINGS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@needs_pyright
def test_every_public_symbol_has_a_known_type() -> None:
    result = _run(
        ["pyright", "--verifytypes", "aioredispatterns", "--ignoreexternal", "--outputjson"],
        ROOT,
    )
    report = json.loads(result.stdout)["typeCompleteness"]
    assert report["packageRootDirectory"], "pyright did not find the package"
    ambiguous = [
        f"{symbol['name']}: {diagnostic['message']}"
        for symbol in report["symbols"]
        for diagnostic in symbol["diagnostics"]
        if diagnostic["severity"] == "error"
    ]
    assert report["completenessScore"] == 1, "\n".join(ambiguous)
    counts = report["exportedSymbolCounts"]
    assert counts["withAmbiguousType"] == counts["withUnknownType"] == 0
    assert counts["withKnownType"] > 500  # the whole public API was looked at


@pytest.fixture
def snippet(tmp_path: Path) -> Path:
    path = tmp_path / "snippet.py"
    path.write_text(SNIPPET)
    return path


@needs_pyright
def test_cache_value_type_flows_to_the_caller_pyright(snippet: Path) -> None:
    result = _run(["pyright", "--pythonversion", "3.11", snippet.name], snippet.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


@needs_mypy
def test_cache_value_type_flows_to_the_caller_mypy(snippet: Path) -> None:
    result = _run(
        [
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--python-version",
            "3.11",
            "--cache-dir",
            str(snippet.parent / ".mypy_cache"),
            snippet.name,
        ],
        snippet.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


async def test_a_subscripted_cache_behaves_as_a_plain_one(
    redis_client: Redis, key_prefix: str
) -> None:
    # Cache[T] is for the type checker only: the subscripted class builds the same cache.
    async def load() -> dict[str, int]:
        return {"hits": 1}

    async with Cache[dict[str, int]](redis_client, ttl=60, prefix=key_prefix) as cache:
        assert isinstance(cache, Cache)
        assert await cache.get_or_load("k", load) == {"hits": 1}
        assert await cache.get("k") == {"hits": 1}
        assert await cache.get_many(["k", "missing"]) == {"k": {"hits": 1}}
