"""The benchmark runner: runs scenarios interleaved and reports medians and ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aioredispatterns.__main__ import main
from aioredispatterns._bench import default_scenario_dir


def test_bench_prints_and_writes_a_table(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--url", redis_url, "--duration", "0.6", "--rounds", "2"]
    code = main([*argv, "--only", "c1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "GET c1" in printed
    assert "redis-py pool" in printed
    payload = json.loads(out.read_text())
    rows = {(r["group"], r["name"]): r for r in payload["results"]}
    row = rows[("GET c1", "redis-py pool")]
    assert row["median_ops_per_second"] > 0
    assert row["ratio_to_baseline"] == pytest.approx(1.0)
    assert len(row["ops_per_second"]) == 2  # one figure per round


def test_bench_without_url_never_uses_a_local_6379(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend the embedded server is not installed: the runner must refuse, not fall back.
    from aioredispatterns import testing
    from aioredispatterns.testing import ServerNotAvailable

    def missing(kind: str) -> Path:
        raise ServerNotAvailable(kind)

    monkeypatch.setattr(testing, "find_server_binary", missing)
    assert main(["bench", "--duration", "0.1", "--rounds", "1"]) == 2
    assert "aioredispatterns[server]" in capsys.readouterr().err


def test_scenarios_are_found_in_the_checkout() -> None:
    assert (default_scenario_dir() / "redis_baseline.py").is_file()
