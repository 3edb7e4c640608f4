"""``python -m aioredispatterns bench | doctor | info | --version``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from . import __version__
from .errors import RedisPatternsError


def _levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,64, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aioredispatterns")
    parser.add_argument("--version", action="version", version=f"aioredispatterns {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="benchmark the library against raw redis-py and its competitors",
        description="Runs the built-in scenarios (or those of --scenarios DIR) in interleaved "
        "rounds and prints medians, ratios to each group's baseline and latencies. Without "
        "--url an embedded Valkey (the 'server' extra) is started; a server already "
        "listening on 6379 is never used silently.",
    )
    bench.add_argument("--url", help="measure this server instead of an embedded one")
    bench.add_argument(
        "--cluster",
        action="store_true",
        help="run the cluster scenarios: on an embedded 3-primary Valkey cluster (and a "
        "standalone server of the same binary, for comparison), or on --url "
        "redis+cluster://...",
    )
    bench.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds for the whole run, setups included (60)",
    )
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    bench.add_argument(
        "--concurrency", type=_levels, help="only these concurrency levels, e.g. 1,64"
    )
    bench.add_argument(
        "--only",
        help="only rows whose group or name contains one of these comma-separated words "
        "(case-insensitive); a group's baseline always comes along",
    )
    bench.add_argument(
        "--scenarios",
        type=Path,
        help="run the scenario files of this directory instead of the built-in ones",
    )
    bench.add_argument("--list", action="store_true", help="list the rows and exit")
    bench.add_argument("--json", type=Path, help="also write the results to this file")
    bench.add_argument("--markdown", type=Path, help="also write a markdown report")
    bench.add_argument(
        "--plot", type=Path, help="also draw the ratios to this PNG (needs matplotlib)"
    )
    bench.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    bench.add_argument(
        "--reference",
        action="store_true",
        help="also run redis-benchmark (GET/SET, unpipelined, -c 64) on the same server",
    )

    doctor = commands.add_parser(
        "doctor",
        help="find common mistakes on a live server, read-only, and say what to change",
        description="Examines the server (every primary of a cluster) read-only: keys "
        "without TTLs and big keys (a paced SCAN sample), KEYS / FLUSHALL / slow O(N) "
        "commands, persistence, maxmemory and replication against the server's role, "
        "clients. Exit code 0 clean, 1 warnings, 2 errors.",
    )
    doctor.add_argument("--url", default="redis://127.0.0.1:6379/0")
    doctor.add_argument(
        "--role",
        choices=("cache", "queue", "lock", "streams", "mixed"),
        default="mixed",
        help="what the server is for (mixed: the strictest of them)",
    )
    doctor.add_argument("--prefix", help="sample only keys starting with this")
    doctor.add_argument(
        "--sample", type=int, default=10_000, help="examine at most this many keys (10000)"
    )
    doctor.add_argument(
        "--time-limit",
        type=float,
        default=20.0,
        help="stop sampling keys after this many seconds (20)",
    )
    output = doctor.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument(
        "--plain", action="store_true", help="print plain text (the default uses rich)"
    )

    info = commands.add_parser("info", help="print the server's name, version and commands")
    info.add_argument("--url", default="redis://127.0.0.1:6379/0")
    return parser


async def _info(url: str) -> None:
    from ._capabilities import server_info
    from ._connection import connect

    client = connect(url)
    try:
        print(repr(await server_info(client)))
    finally:
        await client.aclose()


async def _doctor(args: argparse.Namespace) -> int:
    import json

    from ._connection import connect
    from ._doctor_report import plain, print_report
    from .doctor import doctor

    client = connect(args.url)
    try:
        report = await doctor(
            client,
            role=args.role,
            prefix=args.prefix,
            sample=args.sample,
            time_limit=args.time_limit,
        )
    finally:
        await client.aclose()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.plain:
        print(plain(report, _redacted(args.url)))
    else:
        print_report(report, _redacted(args.url))
    return report.exit_code


def _redacted(url: str) -> str:
    """``url`` without its password (a report is pasted into tickets)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _bench(args: argparse.Namespace) -> None:
    if args.list:
        from ._bench.listing import print_rows

        print_rows(args.scenarios, args.only, args.concurrency)
        return
    from ._bench.runner import run_bench

    anyio.run(
        lambda: run_bench(
            url=args.url,
            duration=args.duration,
            rounds=args.rounds,
            concurrency=args.concurrency,
            only=args.only,
            scenario_dir=args.scenarios,
            json_path=args.json,
            markdown_path=args.markdown,
            plot_path=args.plot,
            reference=args.reference,
            cluster=args.cluster,
            loop_name="uvloop" if args.uvloop else "asyncio",
        ),
        backend_options={"use_uvloop": args.uvloop},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a library error; for
    ``doctor``, 0 clean, 1 warnings, 2 errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            _bench(args)
        elif args.command == "doctor":
            return anyio.run(_doctor, args)
        else:
            anyio.run(_info, args.url)
    except RedisPatternsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
