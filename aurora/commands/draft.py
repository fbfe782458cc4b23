"""`aurora draft`: offline tools for draft heads."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("draft", help="offline draft tools (fit a head from a prompt set)")
    sub = p.add_subparsers(dest="draft_command", metavar="ACTION", required=True)
    f = sub.add_parser(
        "fit",
        help="train a draft head on the target's own continuations of a prompt set",
        description="Generates the target's greedy continuations of the training half of a "
        "workload domain, trains an EAGLE-3 style head on them with the Aurora objective (the "
        "online trainer's loss) and writes a checkpoint that servers load as a revision. Reports "
        "the offline accept length on the held-out half after every epoch.",
    )
    from aurora.runtime.options import add_options
    from aurora.runtime.trainer.config import FitConfig

    add_options(f, FitConfig)
    f.set_defaults(handler=_fit)
    g = sub.add_parser(
        "fetch",
        help="download a draft, check its sha256, unpack it (the day-0 draft's init step)",
        description="Downloads the file at --url, refuses it unless its sha256 is --sha256, "
        "and puts it into --into: a .tar, .tar.gz or .tgz archive is unpacked there (no "
        "absolute paths, no '..'), any other file is stored under its name. Nothing "
        "half-written is left behind; a second run with the same digest does nothing. The "
        "operator runs it as an init container for spec.draft.fetch.",
    )
    g.add_argument("--url", required=True, help="http(s) URL of the draft or its archive")
    g.add_argument("--sha256", required=True, help="expected sha256 of that file (hex)")
    g.add_argument("--into", type=Path, required=True, help="folder to put it in")
    g.set_defaults(handler=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    import re

    from aurora.errors import UsageError
    from aurora.runtime.fetch import FetchError, fetch_draft

    if not re.fullmatch(r"[0-9a-f]{64}", args.sha256):
        raise UsageError(f"--sha256 {args.sha256!r} is not a sha256 (64 lower-case hex digits)")
    try:
        fetch_draft(args.url, args.sha256, args.into)
    except FetchError as error:
        raise UsageError(str(error)) from None
    print(f"fetched {args.url} into {args.into}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from aurora.runtime.bench import default_prompts, fit_draft
    from aurora.runtime.options import from_args
    from aurora.runtime.trainer.config import FitConfig

    config = from_args(FitConfig, args)
    console = Console()
    train, held = default_prompts(config.domain, config.prompts, config.seed)

    def progress(stage: str, i: int, n: int, scores: dict | None = None) -> None:
        console.log(f"{stage} {i}/{n}" + (f": {scores}" if scores else ""))

    path = fit_draft(config, train, heldout=held[: config.heldout], progress=progress)
    console.print(f"draft checkpoint: {path}")
    return 0
