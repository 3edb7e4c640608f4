"""``python -m aioredispatterns bench | info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from .errors import RedisPatternsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aioredispatterns")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="benchmark the library against raw redis-py and its competitors",
        description="Without --url an embedded Valkey (the 'server' extra) is started; "
        "a server already listening on 6379 is never used silently.",
    )
    bench.add_argument("--url", help="measure this server instead of an embedded one")
    bench.add_argument("--duration", type=float, default=20.0, help="seconds in all (20)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    bench.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        help="only these concurrency levels, e.g. 1,64",
    )
    bench.add_argument("--only", help="only scenarios whose group or name contains this")
    bench.add_argument("--scenarios", type=Path, help="directory of scenario files")
    bench.add_argument("--json", type=Path, help="also write the results to this file")
    bench.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    bench.add_argument(
        "--reference",
        action="store_true",
        help="also run redis-benchmark (GET/SET, unpipelined, -c 64) on the same server",
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from ._bench import default_scenario_dir, run_bench

            anyio.run(
                lambda: run_bench(
                    url=args.url,
                    duration=args.duration,
                    rounds=args.rounds,
                    concurrency=args.concurrency,
                    only=args.only,
                    scenario_dir=args.scenarios or default_scenario_dir(),
                    json_path=args.json,
                    reference=args.reference,
                    loop_name="uvloop" if args.uvloop else "asyncio",
                ),
                backend_options={"use_uvloop": args.uvloop},
            )
        else:
            anyio.run(_info, args.url)
    except RedisPatternsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
