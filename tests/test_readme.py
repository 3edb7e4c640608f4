"""The README's example runs as written (with the test server's URL)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python example under '## Example'"
    return match.group(1)


def test_readme_example_runs(redis_url: str) -> None:
    code = _example().replace("redis://127.0.0.1:6379/0", redis_url)
    assert redis_url in code  # the example really was pointed at the test server
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "talking to" in done.stdout


def test_readme_commands_match_ci() -> None:
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"Run the tests.*?```console\n(.*?)\n```", text, re.S)
    assert test_command, "README lacks the test command"
    assert test_command.group(1).strip() in ci  # .ci/run calls exactly the README's command
