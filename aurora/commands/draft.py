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
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--domain", default="code", help="built-in workload domain or file:PATH")
    f.add_argument("--prompts", type=int, default=40, help="training prompts (default: 40)")
    f.add_argument("--heldout", type=int, default=8, help="held-out prompts to evaluate on")
    f.add_argument("--epochs", type=int, default=8)
    f.add_argument("--max-new-tokens", type=int, default=96)
    f.add_argument("--spec-tokens", type=int, default=4)
    f.add_argument("--lambda-discard", type=float, default=0.5)
    f.add_argument("--draft-vocab", type=int, default=4096)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--out", type=Path, default=Path("drafts"), help="checkpoint root (default: ./drafts)"
    )
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

    console = Console()
    train, held = default_prompts(args.domain, args.prompts, args.seed)
    held = held[: args.heldout]

    def progress(stage: str, i: int, n: int, scores: dict | None = None) -> None:
        console.log(f"{stage} {i}/{n}" + (f": {scores}" if scores else ""))

    path = fit_draft(
        args.model,
        train,
        args.out,
        epochs=args.epochs,
        max_new_tokens=args.max_new_tokens,
        k=args.spec_tokens,
        lambda_discard=args.lambda_discard,
        draft_vocab=args.draft_vocab,
        lr=args.lr,
        heldout=held,
        progress=progress,
    )
    console.print(f"draft checkpoint: {path}")
    return 0
