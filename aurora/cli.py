"""The `aurora` command. Each subcommand lives in its own module under
`aurora.commands` and exposes `register(subparsers)`; heavy imports (torch,
kopf) happen inside the command's handler, so `aurora --help` stays fast and
the operator image works without torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from aurora import __version__
from aurora.errors import UsageError

# Order here is the order in `aurora --help`.
COMMANDS = (
    "aurora.commands.models",
    "aurora.commands.crd",
    "aurora.commands.operator",
    "aurora.commands.workload",
    "aurora.commands.train",
    "aurora.commands.local",
    "aurora.commands.bench",
    "aurora.commands.draft",
    "aurora.commands.serve",
    "aurora.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aurora",
        description="Speculative decoding whose draft model keeps learning from live traffic.",
    )
    parser.add_argument("--version", action="version", version=f"aurora {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UsageError as err:
        print(f"aurora: error: {err}", file=sys.stderr)
        return 2
