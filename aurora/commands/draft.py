"""`aurora draft`: offline tools for draft heads."""

from __future__ import annotations

import argparse


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
