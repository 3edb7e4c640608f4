"""redis-py's own asyncio tests, run against the drop-in client and against redis-py.

    .venv/bin/python tests/redis_py_suite/run.py [--servers redis-7,valkey-9.1]
        [--protocol 2|3] [--files test_commands.py,...] [--workdir DIR] [--json FILE]

What it does, for the installed redis-py version:

1. downloads redis-py's sdist (``pip download --no-binary :all: --no-deps redis==X``) and
   extracts its ``tests/`` (cached in ``--workdir``, by default
   ``~/.cache/aioredispatterns/redis-py-X``);
2. patches one line of ``tests/test_asyncio/conftest.py``: the client factory behind
   the ``r`` / ``r2`` / ``decoded_r`` fixtures takes its class from ``shim.py`` instead of
   ``redis.asyncio.Redis`` (the patch must apply exactly once, or the run stops);
3. per server kind, starts a throwaway server with the test harness
   (``aioredispatterns.testing``; never a server already running here) and runs
   ``test_commands.py``, ``test_pipeline.py``, ``test_scripting.py`` and ``test_pubsub.py``
   twice on it: with ``redis.asyncio.Redis`` (the reference) and with
   ``AutoPipelinedRedis`` (the drop-in);
4. prints pass / fail / skip / error counts per run and every test whose outcome differs
   between the two, and exits 1 if any does (or if the drop-in run sent nothing through
   the auto-pipeline).

Each test runs twice in redis-py's suite (``single``: a ``client()`` with one connection,
which keeps redis-py's path; ``pool``: the pooled client, where the drop-in's commands
ride the auto-pipeline). Not part of the default pytest run: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("test_commands.py", "test_pipeline.py", "test_scripting.py", "test_pubsub.py")
CLIENTS = ("plain", "dropin")
# The one line of redis-py's asyncio conftest the shim replaces (the factory's default).
FACTORY_LINE = "        cls=redis.Redis,\n"
PATCHED_LINE = "        cls=__import__('shim').client_class(),  # aioredispatterns shim\n"


def fetch_tests(workdir: Path) -> Path:
    """redis-py's test tree for the installed version, downloaded and patched once."""
    redis_version = version("redis")
    root = workdir / f"redis-{redis_version}"
    if (root / "tests" / "test_asyncio" / "conftest.py").is_file():
        return root
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += [f"redis=={redis_version}", "-d", str(workdir), "-q"]
    subprocess.run(command, check=True)
    archive = workdir / f"redis-{redis_version}.tar.gz"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"redis-{redis_version}/")]
        wanted = [
            m
            for m in members
            if "/tests/" in m.name or m.name.endswith(("/pyproject.toml", "/tests"))
        ]
        tar.extractall(workdir, members=wanted, filter="data")
    conftest = root / "tests" / "test_asyncio" / "conftest.py"
    text = conftest.read_text()
    if text.count(FACTORY_LINE) != 1:
        raise SystemExit(f"{conftest}: the client factory line to patch is not there once")
    conftest.write_text(text.replace(FACTORY_LINE, PATCHED_LINE))
    return root


def run_pytest(
    root: Path, url: str, client: str, files: list[str], protocol: str, report: Path
) -> tuple[dict[str, str], int]:
    """Run redis-py's tests with ``client``; outcome per test id, and pipelined commands."""
    env = dict(os.environ)
    env["ARP_REDIS_PY_CLIENT"] = client
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(root), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-p", "shim", "-p", "no:cacheprovider"]
    command += ["-p", "no:randomly", "-q", "-o", "addopts=", "-o", "log_cli=false"]
    command += [f"--redis-url={url}", f"--redis-mod-url={url}", f"--junitxml={report}"]
    if protocol:
        command.append(f"--protocol={protocol}")
    command += [f"tests/test_asyncio/{name}" for name in files]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    pipelined = 0
    for line in done.stdout.splitlines():
        if line.startswith("ARP-PIPELINED-COMMANDS:"):
            pipelined = int(line.split(":", 1)[1])
    if not report.is_file():
        sys.stdout.write(done.stdout[-5000:] + done.stderr[-5000:])
        raise SystemExit(f"pytest wrote no report ({client})")
    return outcomes(report), pipelined


def outcomes(report: Path) -> dict[str, str]:
    """``{test id: failed | error | skipped | passed}`` from a JUnit XML report (a test
    with several entries, a failure and a teardown error say, keeps the worst)."""
    rank = {"failed": 3, "error": 2, "skipped": 1, "passed": 0}
    found: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = (
            "failed"
            if "failure" in tags
            else "error"
            if "error" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        if rank[outcome] >= rank[found.get(test_id, "passed")]:
            found[test_id] = outcome
    return found


def compare(kind: str, results: dict[str, dict[str, str]], pipelined: int) -> dict[str, object]:
    """Print the counts of both runs on ``kind`` and every test whose outcome differs."""
    counts = {client: Counter(results[client].values()) for client in CLIENTS}
    ids = sorted(set(results["plain"]) | set(results["dropin"]))
    differ = [
        [test_id, results["plain"].get(test_id), results["dropin"].get(test_id)]
        for test_id in ids
        if results["plain"].get(test_id) != results["dropin"].get(test_id)
    ]
    print(f"\n== {kind}")
    for client in CLIENTS:
        c = counts[client]
        print(
            f"  {client:7s} passed {c['passed']:5d}  failed {c['failed']:3d}  "
            f"error {c['error']:3d}  skipped {c['skipped']:4d}"
        )
    print(f"  commands the drop-in's auto-pipelines carried: {pipelined}")
    not_passing = sorted(t for t, o in results["plain"].items() if o in ("failed", "error"))
    print(f"  failing with plain redis-py too ({len(not_passing)}):")
    for test_id in not_passing:
        print(f"    {test_id}")
    print(f"  different outcomes ({len(differ)}):")
    for test_id, plain, dropin in differ:
        print(f"    {test_id}: plain {plain}, drop-in {dropin}")
    return {
        "counts": {client: dict(counts[client]) for client in CLIENTS},
        "pipelined_commands": pipelined,
        "failing_with_plain": not_passing,
        "different": differ,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="redis-7,valkey-9.1")
    parser.add_argument("--protocol", default="", help="2 or 3 (default: redis-py's)")
    parser.add_argument("--files", default=",".join(FILES))
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".cache" / "aioredispatterns",
        help="where redis-py's sdist is downloaded and extracted",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from aioredispatterns.testing import RedisServer, find_server_binary

    root = fetch_tests(args.workdir)
    files = [name.strip() for name in args.files.split(",") if name.strip()]
    print(f"redis-py {version('redis')} tests, protocol {args.protocol or 'default'}: {files}")
    summary: dict[str, object] = {"redis-py": version("redis"), "protocol": args.protocol}
    ok = True
    with tempfile.TemporaryDirectory() as scratch:
        for kind in [k.strip() for k in args.servers.split(",") if k.strip()]:
            results: dict[str, dict[str, str]] = {}
            pipelined = 0
            with RedisServer(find_server_binary(kind)) as server:
                for client in CLIENTS:
                    report = Path(scratch) / f"{kind}-{client}.xml"
                    results[client], carried = run_pytest(
                        root, server.url, client, files, args.protocol, report
                    )
                    pipelined += carried
            summary[kind] = found = compare(kind, results, pipelined)
            ok = ok and not found["different"] and pipelined > 0
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
