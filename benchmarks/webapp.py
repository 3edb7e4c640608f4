"""The FastAPI example app under HTTP load, against the same app on hand-written redis-py.

    python benchmarks/webapp.py [--duration 60] [--rounds 3] [--connections 64]
                                [--outage 10] [--kind valkey-9.1] [--generator wrk|python]

A throwaway server (started here, stopped by pid) and two uvicorn processes (one worker
each): ``examples/fastapi_app/app.py`` (the library, wired via lifespan) and
``baseline.py`` (the same routes on redis-py). The load is the issue's mix over
Zipf-distributed product ids (s = 1.1 over 10,000): 90% cached ``GET /products/{id}``,
5% ``PUT /products/{id}`` (write, invalidation, publish), 4% ``POST /orders`` (a stream
append, fulfilled by a consumer group), 1% ``POST /reports/{name}`` (a lock and a fenced
write), each request with one of 64 API keys (every request is rate-limited).

Throughput: ``--duration`` seconds of load per app, split in ``--rounds`` alternating
runs (app, baseline, app, ...), so drift on a shared machine hits both alike; printed:
req/s, p50, p99, max and status codes per app, and the req/s ratio.

Outage: for each of ``kill`` (the server process SIGKILLed, restarted on the same port
with an empty dataset) and ``pause`` (SIGSTOP, then SIGCONT), three runs on the example
app: 5 s before, ``--outage`` seconds with the server down, 10 s after. Printed per phase:
req/s, p99, max latency and status codes (the promise: no 500, every request a 2xx or a
429/503 with ``Retry-After`` during the outage, the max below 1 s, and the "after" phase
back to the "before" figures).

The load generator is ``wrk`` when it is on PATH (``apt-get install wrk``), else a small
asyncio HTTP/1.1 keep-alive client in this file (``--generator python``: slower, and it
shares the 2 cores with the apps, so its figures are lower for both).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aioredispatterns.testing import RedisServer, find_server_binary, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app"
PRODUCTS = 10_000
ZIPF_S = 1.1
KEYS = 64

WRK_SCRIPT = """
local N, S, KEYS = %(products)d, %(zipf_s)f, %(keys)d
local cdf = {}
counts = {}
local threads = {}

function setup(thread) table.insert(threads, thread) end

function init(args)
  local total = 0
  for i = 1, N do total = total + 1 / (i ^ S); cdf[i] = total end
  for i = 1, N do cdf[i] = cdf[i] / total end
  math.randomseed(os.time())
end

local function zipf()
  local u, lo, hi = math.random(), 1, N
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

function request()
  local r = math.random(100)
  local h = {["X-Api-Key"] = "key" .. math.random(KEYS)}
  if r <= 90 then
    return wrk.format("GET", "/products/" .. zipf(), h)
  end
  h["Content-Type"] = "application/json"
  if r <= 95 then
    return wrk.format("PUT", "/products/" .. zipf(), h, '{"price": ' .. math.random(1000) .. '}')
  elseif r <= 99 then
    return wrk.format("POST", "/orders", h, '{"product_id": ' .. zipf() .. ', "quantity": 1}')
  end
  return wrk.format("POST", "/reports/r" .. math.random(10), h, "")
end

function response(status, headers, body)
  local key = status
  if status == 503 and not (headers["retry-after"] or headers["Retry-After"]) then
    key = "503-without-Retry-After"
  end
  counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout))
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("counts")) do
      io.write("STATUS " .. tostring(status) .. " " .. tostring(n) .. "\\n")
    end
  end
end
"""


@dataclass
class Run:
    """One load run's figures."""

    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    socket_errors: int = 0
    statuses: collections.Counter[int | str] = field(default_factory=collections.Counter)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        codes = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items(), key=str))
        errors = f" socket errors: {self.socket_errors}" if self.socket_errors else ""
        return (
            f"{self.rps:8.0f} req/s  p50 {self.p50_ms:6.1f} ms  p99 {self.p99_ms:6.1f} ms  "
            f"max {self.max_ms:7.1f} ms  [{codes}]{errors}"
        )


# ------------------------------------------------------------------- load generators


def wrk_run(url: str, seconds: float, connections: int, script: Path) -> Run:
    done = subprocess.run(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
            "-s", str(script), url,
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    run = Run()
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            requests, duration_us, p50, p99, most, errors = map(int, line.split()[1:])
            run.requests, run.seconds = requests, duration_us / 1e6
            run.p50_ms, run.p99_ms, run.max_ms = p50 / 1e3, p99 / 1e3, most / 1e3
            run.socket_errors = errors
        elif line.startswith("STATUS "):
            _, status, count = line.split()
            run.statuses[int(status) if status.isdigit() else status] += int(count)
    return run


def _zipf_table() -> list[float]:
    weights = [1 / (i**ZIPF_S) for i in range(1, PRODUCTS + 1)]
    total = sum(weights)
    table, running = [], 0.0
    for weight in weights:
        running += weight
        table.append(running / total)
    return table


def _python_request(rng: random.Random, cdf: list[float]) -> bytes:
    def zipf() -> int:
        return min(PRODUCTS, bisect.bisect_left(cdf, rng.random()) + 1)

    key = f"key{rng.randint(1, KEYS)}"
    r = rng.randint(1, 100)
    if r <= 90:
        method, path, body = "GET", f"/products/{zipf()}", b""
    elif r <= 95:
        method, path = "PUT", f"/products/{zipf()}"
        body = json.dumps({"price": rng.randint(1, 1000)}).encode()
    elif r <= 99:
        method, path = "POST", "/orders"
        body = json.dumps({"product_id": zipf(), "quantity": 1}).encode()
    else:
        method, path, body = "POST", f"/reports/r{rng.randint(1, 10)}", b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: bench\r\nX-Api-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _python_load(url: str, seconds: float, connections: int) -> Run:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    cdf = _zipf_table()
    latencies: list[float] = []
    run = Run()
    deadline = time.monotonic() + seconds

    async def connection(index: int) -> None:
        rng = random.Random(index)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.monotonic() < deadline:
                started = time.monotonic()
                writer.write(_python_request(rng, cdf))
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.monotonic() - started)
                run.statuses[int(status_line.split()[1])] += 1
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            run.socket_errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(connection(i) for i in range(connections)))
    run.seconds = time.monotonic() - started
    run.requests = len(latencies)
    if latencies:
        ordered = sorted(latencies)
        run.p50_ms = ordered[len(ordered) // 2] * 1e3
        run.p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3
        run.max_ms = ordered[-1] * 1e3
    return run


# ------------------------------------------------------------------- the apps


class App:
    """One uvicorn process serving ``module:app`` from the example's directory."""

    def __init__(self, module: str, redis_url: str, log: Path) -> None:
        self.module = module
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "EXAMPLE_PREFIX": f"bench{uuid.uuid4().hex[:6]}",
            "EXAMPLE_RATE_LIMIT": "1000000",
            "EXAMPLE_REPORT_LIMIT": "1000000",
        }
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", f"{module}:app",
                "--app-dir", str(EXAMPLE), "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", "--no-access-log",
                "--timeout-graceful-shutdown", "5",
            ],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.log_path = log

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.module} did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load per app")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--outage", type=float, default=10, help="seconds (0: skip)")
    parser.add_argument("--kind", default="valkey-9.1")
    parser.add_argument("--generator", choices=("wrk", "python"), default=None)
    args = parser.parse_args()
    generator = args.generator or ("wrk" if shutil.which("wrk") else "python")

    work = Path(tempfile.mkdtemp(prefix="arp-webapp-"))
    script = work / "mix.lua"
    script.write_text(WRK_SCRIPT % {"products": PRODUCTS, "zipf_s": ZIPF_S, "keys": KEYS})

    def load(url: str, seconds: float) -> Run:
        if generator == "wrk":
            return wrk_run(url, seconds, args.connections, script)
        return asyncio.run(_python_load(url, seconds, args.connections))

    server = RedisServer(find_server_binary(args.kind), name="webapp").start()
    apps = [App("app", server.url, work / "app.log"), App("baseline", server.url, work / "b.log")]
    print(f"server {args.kind} on :{server.port}; load by {generator}, {args.connections} "
          f"connections; logs in {work}")  # fmt: skip
    try:
        for app in apps:
            app.wait_healthy()
        for app in apps:  # warm up: caches filled, scripts loaded, pools grown
            load(app.url, 5)
        per_round = args.duration / args.rounds
        runs: dict[str, list[Run]] = {app.module: [] for app in apps}
        for round_ in range(args.rounds):
            for app in apps if round_ % 2 == 0 else apps[::-1]:
                run = load(app.url, per_round)
                runs[app.module].append(run)
                print(f"  round {round_ + 1} {app.module:8} {run.line()}", flush=True)
        totals = {}
        for module, parts in runs.items():
            total = Run(
                requests=sum(r.requests for r in parts),
                seconds=sum(r.seconds for r in parts),
                p50_ms=statistics.median(r.p50_ms for r in parts),
                p99_ms=statistics.median(r.p99_ms for r in parts),
                max_ms=max(r.max_ms for r in parts),
                socket_errors=sum(r.socket_errors for r in parts),
            )
            for r in parts:
                total.statuses.update(r.statuses)
            totals[module] = total
            print(f"{module:10} {total.line()}")
        ratio = totals["app"].rps / totals["baseline"].rps
        p99 = "equal or better" if totals["app"].p99_ms <= totals["baseline"].p99_ms else "worse"
        print(f"ratio app/baseline: {ratio:.2f}x req/s, p99 {p99} "
              f"({totals['app'].p99_ms:.1f} vs {totals['baseline'].p99_ms:.1f} ms)")  # fmt: skip

        if args.outage > 0:
            app = apps[0]
            for outage, done in (("kill", "killed"), ("pause", "paused")):
                print(f"outage: server {done} for {args.outage:g} s, example app")
                print(f"  before  {load(app.url, 5).line()}", flush=True)
                if outage == "kill":
                    server.kill()
                else:
                    server.pause()
                try:
                    during = load(app.url, args.outage)
                finally:
                    if outage == "kill":
                        server.restart()
                    else:
                        server.resume()
                print(f"  during  {during.line()}", flush=True)
                print(f"  after   {load(app.url, 10).line()}", flush=True)
            log = app.log()
            print(
                f"app log: {log.count('Traceback')} tracebacks, "
                f"{log.count('rate limiting is failing')} 'rate limiting is failing' lines, "
                f"{len(log.splitlines())} lines in all"
            )
    finally:
        for app in apps:
            app.stop()
        server.stop()


if __name__ == "__main__":
    main()
