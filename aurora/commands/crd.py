"""`aurora crd`: write the Speculator CustomResourceDefinition generated from the
operator's pydantic models, or check that a written one has not drifted."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "crd",
        help="write (or check) the Speculator CRD generated from the operator's models",
        description="Generate the aurora.dev Speculator CustomResourceDefinition from the same "
        "pydantic models the operator validates with, and write it to DIR/aurora.dev_speculators.yaml. "
        "With --check, write nothing and exit 1 if the file differs.",
    )
    parser.add_argument(
        "--output",
        "-o",
        default="crds",
        metavar="DIR",
        help="directory to write into (default: crds)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if DIR holds a different CRD than the models generate",
    )
    parser.add_argument("--stdout", action="store_true", help="print the CRD instead of writing it")
    parser.set_defaults(handler=_crd)


def _crd(args: argparse.Namespace) -> int:
    from aurora.operator import crd

    directory = Path(args.output)
    if args.stdout:
        print(crd.render_crd(), end="")
        return 0
    if args.check:
        problem = crd.crd_drift(directory)
        if problem:
            print(f"aurora crd: {problem}")
            return 1
        print(f"{directory / crd.CRD_FILENAME} is up to date")
        return 0
    print(crd.write_crd(directory))
    return 0
