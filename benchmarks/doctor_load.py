"""What ``doctor`` costs a busy server: its run time on 1,000,000 keys, and how much it adds
to other clients' command latency while it runs.

    python benchmarks/doctor_load.py [--url URL --fill] [--keys 1000000] [--rounds 10]

Without ``--url`` a throwaway Valkey 9.1 is started here (stopped by pid) and filled with
``--keys`` keys (``DEBUG POPULATE``, plus a few hundred keys of other shapes: TTLs, hashes,
a few big keys). ``--url`` examines your server; it is filled only with ``--fill``.

A latency probe runs in a process of its own: it sends ``GET`` at a fixed rate
(``--rate`` per second, open loop, so it never loads the server itself) over one plain
socket and times every reply. Under it, phases of ``--seconds`` alternate ``--rounds``
times: quiet, then ``doctor`` running back to back for the whole phase (``--control``:
quiet again, to see the machine's noise floor). Alternating short
phases spreads the noise of a shared machine over both conditions alike. The figures are
the p50 / p90 / p99 of each condition over all its phases, and the difference; and the
server time the doctor's own commands took (``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio

import aioredispatterns as arp
from aioredispatterns._commands import execute, execute_many
from aioredispatterns.doctor import DoctorReport, doctor
from aioredispatterns.testing import RedisServer, find_server_binary


def _probe(host: str, port: int, seconds: float, rate: float) -> None:
    """Run in the probe process: GET at ``rate`` per second for ``seconds``; print
    ``[monotonic send time, latency in µs]`` pairs as JSON."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    command = b"*2\r\n$3\r\nGET\r\n$5\r\nkey:1\r\n"
    samples: list[tuple[float, float]] = []
    interval = 1.0 / rate
    start = time.monotonic()
    due = start
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        due += interval
        sent = time.monotonic()
        sock.sendall(command)
        reply = sock.recv(65536)
        while not _complete(reply):
            reply += sock.recv(65536)
        samples.append((sent, (time.monotonic() - sent) * 1e6))
    print(json.dumps(samples))


def _complete(reply: bytes) -> bool:
    if reply.startswith(b"$"):
        head, found, rest = reply.partition(b"\r\n")
        return bool(found) and (int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2)
    return reply.endswith(b"\r\n")


def _start_probe(host: str, port: int, seconds: float, rate: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--probe", host, str(port), str(seconds), str(rate)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish_probe(process: subprocess.Popen[str]) -> list[tuple[float, float]]:
    out, _ = process.communicate(timeout=600)
    return [(sent, latency) for sent, latency in json.loads(out)]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _fill(client: Any, keys: int) -> None:
    have = int(await execute(client, "DBSIZE"))
    if have < keys:
        try:
            await execute(client, "DEBUG", "POPULATE", keys - have, "key", 64)
        except arp.CommandError:  # no DEBUG (Redis 7+ without enable-debug-command)
            for start in range(have, keys, 10_000):
                end = min(keys, start + 10_000)
                await execute_many(
                    client, [["SET", f"key:{i}", "v" * 64] for i in range(start, end)],
                    idempotent=True,
                )  # fmt: skip
    # Other shapes, so every check has something to look at.
    commands: list[list[Any]] = []
    for i in range(200):
        commands.append(["SET", f"session:{i}", "x" * 100, "EX", 3600])
        commands.append(["HSET", f"user:{i}", "name", "n", "email", "e"])
    commands.append(["SETRANGE", "blob:1", 2 << 20, "x"])
    await execute_many(client, commands, idempotent=True)


async def _server_usec(client: Any) -> int:
    """Microseconds the server has spent running commands (INFO commandstats)."""
    info = await execute(client, "INFO", "commandstats")
    return sum(int(stats["usec"]) for stats in info.values())


async def _one_run(client: Any, sample: int | None) -> DoctorReport:
    if sample is None:
        return await doctor(client, role="cache")
    return await doctor(client, role="cache", sample=sample)


async def _main(args: argparse.Namespace) -> None:
    server: RedisServer | None = None
    url = args.url
    if url is None:
        server = RedisServer(find_server_binary("valkey-9.1"), name="doctor-load").start()
        url = server.url
    client = arp.connect(url)
    try:
        if server is not None or args.fill:
            started = time.monotonic()
            await _fill(client, args.keys)
            print(f"filled in {time.monotonic() - started:.1f} s")
        total = int(await execute(client, "DBSIZE"))
        host, port = (url.split("//", 1)[1].split("/", 1)[0]).rsplit(":", 1)
        host = host.rpartition("@")[2]

        busy = await _server_usec(client)
        report = await _one_run(client, args.sample)
        busy = await _server_usec(client) - busy
        print(f"keys on the server: {total:,}")
        print(f"one doctor run: {report.duration:.2f} s; {report.coverage}")
        print(
            f"server time its commands took: {busy / 1000:.1f} ms "
            f"({busy / 1e6 / report.duration:.2%} of the run)"
        )
        print(f"findings: {[f'{f.severity.label}:{f.check}' for f in report.findings]}")

        if args.nice:
            os.nice(19)  # after the server started: only the doctor's runs yield the CPU
        # One probe for the whole measurement; phases alternate under it: quiet, then
        # doctor running back to back (the run in progress is cancelled at the phase's end).
        phase = args.seconds
        probe = _start_probe(host, int(port), 2 * phase * args.rounds + 1.0, args.rate)
        await anyio.sleep(0.5)  # the probe process starts
        quiet: list[tuple[float, float]] = []
        loaded: list[tuple[float, float]] = []
        runs = 0
        for _ in range(args.rounds):
            start = time.monotonic()
            await anyio.sleep(phase)
            quiet.append((start, time.monotonic()))
            start = time.monotonic()
            with anyio.move_on_after(phase):
                while not args.control:
                    runs += 1
                    await _one_run(client, args.sample)
                await anyio.sleep(phase)
            loaded.append((start, time.monotonic()))
        samples = await anyio.to_thread.run_sync(_finish_probe, probe)
    finally:
        await client.aclose()
        if server is not None:
            server.stop()

    def within(spans: list[tuple[float, float]]) -> list[float]:
        return [lat for sent, lat in samples if any(a <= sent < b for a, b in spans)]

    alone, during = within(quiet), within(loaded)
    print()
    print(
        f"GET latency at {args.rate:g}/s, {args.rounds} x {phase:g} s quiet and "
        f"{phase:g} s {'quiet again (control)' if args.control else 'with doctor running'} "
        f"({runs} runs started, the last of each phase cancelled at its end)"
    )
    print(f"{'':>16} {'samples':>8} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'mean µs':>8}")
    for name, values in (("quiet", alone), ("doctor running", during)):
        print(
            f"{name:>16} {len(values):8,} {_quantile(values, 0.5):8.1f} "
            f"{_quantile(values, 0.9):8.1f} {_quantile(values, 0.99):8.1f} "
            f"{statistics.fmean(values):8.1f}"
        )
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        before, after = _quantile(alone, q), _quantile(during, q)
        print(f"added to {label}: {(after - before) / before:+.1%}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        host, port, seconds, rate = sys.argv[2:6]
        _probe(host, int(port), float(seconds), float(rate))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="examine this server instead of a throwaway one")
    parser.add_argument("--fill", action="store_true", help="fill --url's server with keys")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, help="doctor's sample (its default if unset)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A run: the same phases without running doctor (the machine's noise floor)",
    )
    parser.add_argument(
        "--nice",
        action="store_true",
        help="run doctor at nice 19, as if from another machine: on a shared 2-core box "
        "its CPU time otherwise delays the server and the probe, not its commands",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="probe GETs per second")
    anyio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
