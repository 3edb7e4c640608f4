"""The benchmark runner: scenarios from the package (never the cwd), reports, honest rows.

Runs without ``--url`` start the runner's own embedded Valkey (the ``server`` extra), as
``python -m aioredispatterns bench`` does for a user; each run is a second or two.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import aioredispatterns
from aioredispatterns.__main__ import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str) -> int:
    return main(["bench", *args])


def _rows(payload: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["group"], row["name"]): row for row in payload["results"]}


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aioredispatterns {aioredispatterns.__version__}"


def test_list_groups_rows_with_the_baseline_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("--list") == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    groups = [line.split(" | ")[0] for line in lines]
    # Rows of one group are adjacent, and each group opens with its one baseline.
    seen: list[str] = []
    for group, line in zip(groups, lines, strict=True):
        if not seen or seen[-1] != group:
            assert group not in seen, f"group {group!r} is split"
            assert "(baseline)" in line, f"group {group!r} does not open with its baseline"
            seen.append(group)
        else:
            assert "(baseline)" not in line, f"group {group!r} has two baselines"
    for goal_group in ("auto-pipeline GET c64", "cache hit c64", "pubsub fan-out x100"):
        assert goal_group in seen


def test_a_benchmarks_directory_in_the_cwd_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "evil-ran"
    hostile = tmp_path / "benchmarks"
    hostile.mkdir()
    (hostile / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "raise SystemExit('a file of the working directory was executed')\n"
    )
    monkeypatch.chdir(tmp_path)
    assert _bench("--only", "GET pipelined", "--duration", "1", "--rounds", "1") == 0
    assert not marker.exists()
    assert "redis-py explicit pipeline" in capsys.readouterr().out


def _write_scenario(directory: Path, name: str, body: str) -> None:
    header = """
        from contextlib import asynccontextmanager

        from aioredispatterns._bench import BenchEnv, Scenario
    """
    (directory / f"{name}.py").write_text(textwrap.dedent(header) + textwrap.dedent(body))


def test_scenarios_dir_is_loaded_when_asked(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    marker = tmp_path / "mine-ran"
    _write_scenario(
        mine,
        "ping",
        f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        @asynccontextmanager
        async def setup(env):
            client = env.client()
            try:
                yield client.ping
            finally:
                await client.aclose()

        def scenarios(env: BenchEnv) -> list[Scenario]:
            return [Scenario("my group", "my ping", 1, setup, baseline=True)]
        """,
    )
    out = tmp_path / "out.json"
    code = _bench("--scenarios", str(mine), "--duration", "1", "--rounds", "2", "--json", str(out))
    assert code == 0
    assert marker.read_text() == "imported"
    payload = json.loads(out.read_text())
    (row,) = payload["results"]
    assert (row["group"], row["name"]) == ("my group", "my ping")
    assert len(row["ops_per_second"]) == 2  # one figure per round
    assert row["median_ops_per_second"] > 0


def test_a_short_run_writes_json_markdown_and_a_png(tmp_path: Path) -> None:
    paths = {kind: tmp_path / f"out.{kind}" for kind in ("json", "md", "png")}
    code = _bench(
        "--only", "auto-pipeline GET c1",
        "--duration", "3",
        "--rounds", "2",
        "--json", str(paths["json"]),
        "--markdown", str(paths["md"]),
        "--plot", str(paths["png"]),
    )  # fmt: skip
    assert code == 0
    payload = json.loads(paths["json"].read_text())
    meta = payload["metadata"]
    assert meta["server_name"] == "valkey"
    assert meta["server_version"].startswith("9.")
    assert meta["loop"] == "asyncio"
    assert isinstance(meta["hiredis"], bool)
    assert meta["cpus"] >= 1
    assert meta["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["libraries"]["aioredispatterns"] == aioredispatterns.__version__
    assert meta["libraries"]["redis"]
    assert set(meta["competitors"]) >= {"broadcaster", "cashews", "aiocache", "limits"}
    rows = _rows(payload)
    base = rows[("auto-pipeline GET c1", "redis-py pool")]
    ours = rows[("auto-pipeline GET c1", "aioredispatterns")]
    assert base["ratio_to_baseline"] == pytest.approx(1.0)
    assert ours["median_ops_per_second"] > 0
    assert len(ours["round_ratios"]) == 2
    markdown = paths["md"].read_text()
    assert "| auto-pipeline GET c1 | aioredispatterns |" in markdown
    assert "server: valkey 9." in markdown
    assert "hiredis" in markdown
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE


def test_a_url_run_records_that_server(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    # A redis+cluster:// URL runs the cluster scenarios only.
    only = "cluster cache" if "+cluster://" in redis_url else "GET pipelined"
    code = _bench(
        "--url", redis_url, "--only", only, "--duration", "1", "--rounds", "1",
        "--json", str(out),
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["metadata"]["server_where"] == "--url"
    assert payload["metadata"]["url"] == redis_url
    assert payload["results"][0]["median_ops_per_second"] > 0


def test_a_cluster_run_compares_redis_py_cluster_and_standalone(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    code = _bench("--cluster", "--duration", "4", "--rounds", "1", "--json", str(out))
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    groups = {row["group"] for row in rows}
    assert groups == {"cluster cache hit c64 64 keys", "cluster ratelimit c64"}
    names = {row["name"] for row in rows}
    assert "redis-py RedisCluster GET + json" in names
    assert "Cache.get_or_load, standalone" in names
    assert all(row["median_ops_per_second"] > 0 for row in rows)


def test_fan_out_reports_deliveries_for_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    code = _bench("--only", "fan-out", "--duration", "2", "--rounds", "1", "--json", str(out))
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) >= 2  # redis-py's 100 subscriptions and Broadcast, at least
    for row in rows:
        assert row["group"] == "pubsub fan-out x100"
        assert row["unit"] == "deliveries"
        assert row["ops_per_call"] == 100
        assert row["median_ops_per_second"] > 0, row["name"]
        for quantile in ("p50_ms", "p99_ms"):  # null in the JSON when nothing was timed
            assert row[quantile] is not None, row["name"]
            assert math.isfinite(row[quantile]), row["name"]
        assert row["ratio_to_baseline"] is not None


def test_competitors_noise_is_counted_not_dumped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    _write_scenario(
        noisy,
        "noisy",
        """
        import asyncio
        import logging
        import sys
        import warnings

        async def fail() -> None:
            raise RuntimeError("a competitor's background task failed")

        @asynccontextmanager
        async def setup(env):
            # What noisy libraries do: log, warn, print, and drop a failed task.
            logging.getLogger("noisy.library").warning("noisy log record")
            warnings.warn("noisy warning", UserWarning, stacklevel=1)
            print("noisy stderr line", file=sys.stderr)
            asyncio.get_running_loop().create_task(fail())
            await asyncio.sleep(0.01)  # the task fails; nobody awaits it
            yield lambda: asyncio.sleep(0)

        def scenarios(env: BenchEnv) -> list[Scenario]:
            return [Scenario("noise", "noisy competitor", 1, setup, baseline=True)]
        """,
    )
    assert _bench("--scenarios", str(noisy), "--duration", "1", "--rounds", "2") == 0
    out, err = capfd.readouterr()
    for dumped in ("noisy log record", "noisy warning", "noisy stderr line", "Traceback"):
        assert dumped not in err
    summary = [line for line in out.splitlines() if line.startswith("noise: ")]
    assert len(summary) == 4, summary  # one line per kind
    text = "\n".join(summary)
    assert "2 x log WARNING from noisy.library: noisy log record" in text
    assert "2 x UserWarning: noisy warning" in text
    assert "2 x line printed on stderr" in text
    assert "2 x Task exception was never retrieved: builtins.RuntimeError in fail" in text


def test_plot_without_matplotlib_fails_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert _bench("--duration", "1", "--plot", "out.png") == 2
    captured = capsys.readouterr()
    assert "matplotlib" in captured.err
    assert "aioredispatterns[bench]" in captured.err
    assert "bench:" not in captured.out  # nothing was started


def test_bench_without_url_never_uses_a_local_6379(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend the embedded server is not installed: the runner must refuse, not fall back.
    from aioredispatterns import testing
    from aioredispatterns.testing import ServerNotAvailable

    def missing(kind: str) -> Path:
        raise ServerNotAvailable(kind)

    monkeypatch.setattr(testing, "find_server_binary", missing)
    assert _bench("--duration", "1", "--rounds", "1") == 2
    assert "aioredispatterns[server]" in capsys.readouterr().err
