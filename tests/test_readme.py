"""Every python block of the README runs as pasted (against a throwaway server).

Each block is a complete program for a Redis on ``localhost:6379``: this test swaps that
one URL for the harness server's, refuses a block that could reach any other server (the
machine's own Redis included), runs it in a subprocess and checks what it prints. The
FastAPI example is an app, not a program: it is imported and driven through its lifespan.
Pytest tests in the README are listed in ``NOT_PROGRAMS`` with where they are run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aioredispatterns import connect

README = Path(__file__).resolve().parent.parent / "README.md"
#: The one server URL every README block uses; the test replaces it.
README_URL = "redis://localhost:6379/0"
#: The server kind the blocks run on (one kind keeps this module fast).
KIND = "valkey-9.1"
TIMEOUT = 60

FASTAPI_EXAMPLE = "example-cache-aside-in-a-fastapi-app"

#: What each program must print (a fragment of its stdout). A new block needs an entry.
EXPECTED_OUTPUT = {
    "cache-aside": "1 load for 100 misses",
    "near-cache": "after the write: {'theme': 'light'}",
    "doctor": "sampled key in readme-doctor:* has no TTL",
    "sessions-1": "phone after log-out-everywhere: None",
    "sessions-2": "stranger: user=None cart=None",
    "web-apps-fastapi-starlette": "/hello: [200, 200, 429]",
    "locks-with-fencing-tokens": "written with fencing token",
    "rate-limiting": "request 6: allowed=False",
    "streams-a-worker-pool-on-a-consumer-group": "processed=100",
    "job-queues": "first: ceo@example.com",
    "pub-sub": "user:7 signed in",
    "counters-and-unique-counts": "views in the last hour: 5",
    "leaderboards": "#2 dave 8420",
    "geo": "louvre to versailles: 17.1 km",
    "serializers": "refused before anything was written",
    "connections": "talking to valkey 9.1",
    "least-privilege-acls": "commands denied to readme-app: 0",
    "auto-pipelining": "PipelineStats(batches=",
    "errors": "body: 'no card on file for order 42'",
    "metrics-and-logs": 'aioredispatterns_cache_hits_total{name="users"} 2.0',
}

#: Blocks that are not programs, and what runs them instead.
NOT_PROGRAMS = {
    FASTAPI_EXAMPLE: "an ASGI app: test_fastapi_example imports it and serves two requests",
    "testing-your-own-code-against-real-servers-1": (
        "a conftest.py / test_mine.py pair: tests/test_plugin.py runs it as a pytest project"
    ),
    "testing-your-own-code-against-real-servers-2": (
        "a pytest test: test_fault_proxy_example runs it as a pytest project"
    ),
}


@dataclass(frozen=True)
class Block:
    """One ```python block of the README and the section it belongs to."""

    id: str
    code: str


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def readme_blocks() -> list[Block]:
    """The README's python blocks, each named after its section (``-N`` when several)."""
    found: list[tuple[str, str]] = []
    section = "top"
    pattern = re.compile(r"^## ([^\n]+)$|^```python\n(.*?)^```$", re.M | re.S)
    for match in pattern.finditer(README.read_text()):
        if match.group(1) is not None:
            section = _slug(match.group(1))
        else:
            found.append((section, match.group(2)))
    per_section = Counter(section for section, _ in found)
    seen: Counter[str] = Counter()
    blocks = []
    for section, code in found:
        seen[section] += 1
        name = section if per_section[section] == 1 else f"{section}-{seen[section]}"
        blocks.append(Block(name, code))
    return blocks


def block(block_id: str) -> Block:
    (found,) = [b for b in readme_blocks() if b.id == block_id]
    return found


PROGRAMS = [b.id for b in readme_blocks() if b.id not in NOT_PROGRAMS]


def pointed_at(code: str, url: str) -> str:
    """``code`` with the README's URL replaced by ``url``.

    Fails if the block could reach another server: a URL or port 6379 of its own, or
    ``connect()`` without a URL (the library's default is 127.0.0.1:6379, the machine's
    own Redis).
    """
    assert README_URL in code, f"the block does not use {README_URL}"
    assert not re.search(r"connect\(\s*(\)|\w+\s*=)", code), "connect() without a URL"
    code = code.replace(README_URL, url)
    urls = set(re.findall(r"(?:redis|rediss|unix)(?:\+cluster)?://[^\s\"'`]+", code))
    assert urls == {url}, f"the block names another server: {urls - {url}}"
    assert "6379" not in code, "the block names port 6379 outside the README's one URL"
    return code


@pytest.fixture
def one_kind(redis_server: Any) -> None:
    """Run once per session, on a ``KIND`` server this suite started (the blocks write
    keys, the test flushes, and the machine's own servers are never touched)."""
    if redis_server.name != KIND or not getattr(redis_server, "owned", False):
        pytest.skip(f"the README's examples run on a {KIND} server started by the suite")


@pytest.fixture
def server_url(one_kind: None, redis_url: str) -> str:
    """The URL of the ``KIND`` server, flushed (so what the blocks print is known)."""
    import redis

    with redis.Redis.from_url(redis_url) as admin:
        admin.flushall()
    return redis_url


def test_every_block_is_run_or_accounted_for() -> None:
    ids = [b.id for b in readme_blocks()]
    assert len(ids) == len(set(ids))
    assert set(NOT_PROGRAMS) <= set(ids), "NOT_PROGRAMS names a block the README lacks"
    missing = set(PROGRAMS) - set(EXPECTED_OUTPUT)
    assert not missing, f"add the expected output of {missing} to EXPECTED_OUTPUT"
    assert set(EXPECTED_OUTPUT) <= set(PROGRAMS), "EXPECTED_OUTPUT names a missing block"


@pytest.mark.parametrize("block_id", PROGRAMS)
def test_program_runs_as_pasted(block_id: str, server_url: str, tmp_path: Path) -> None:
    program = tmp_path / f"{block_id.replace('-', '_')}.py"
    program.write_text(pointed_at(block(block_id).code, server_url))
    done = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert EXPECTED_OUTPUT[block_id] in done.stdout, done.stdout


async def test_fastapi_example(server_url: str, tmp_path: Path) -> None:
    source = tmp_path / "readme_fastapi_app.py"
    source.write_text(pointed_at(block(FASTAPI_EXAMPLE).code, server_url))
    spec = importlib.util.spec_from_file_location("readme_fastapi_app", source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.app

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            first = await client.get("/users/1")
            second = await client.get("/users/1")
        stats = app.state.cache.stats

    assert first.status_code == 200, first.text
    assert first.json() == {"id": 1, "name": "Ada"}
    assert second.json() == first.json()
    assert (stats.loads, stats.hits) == (1, 1)  # the second request was a cache hit
    async with connect(server_url) as check:
        assert await check.exists("arp:cache:{user:1}") == 1  # cached on the test server


def test_fault_proxy_example(one_kind: None, tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["aioredispatterns.testing"]\n')
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_faults.py").write_text(
        block("testing-your-own-code-against-real-servers-2").code
    )
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"ARP_TEST_REDIS_URL", "REDIS_URL", "ARP_REDIS_SERVERS", "PYTEST_ADDOPTS"}
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--redis-servers", KIND],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout, done.stdout


def test_readme_commands_match_ci() -> None:
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"Run the tests.*?```console\n(.*?)\n```", text, re.S)
    assert test_command, "README lacks the test command"
    assert test_command.group(1).strip() in ci  # .ci/run calls exactly the README's command
