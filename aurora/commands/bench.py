"""`aurora bench`: side-by-side benchmarks that report ratios."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="side-by-side benchmarks (ratios, one run)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    d = sub.add_parser(
        "decode",
        help="our engine (plain, n-gram, trained drafts) against transformers, same prompts",
        description="Runs transformers' generate, transformers' prompt lookup, our engine plain, with "
        "the n-gram proposer and with each --draft checkpoint on the same prompts (interleaved), at "
        "temperature 0. Prints tokens/s, mean accepted length, speedups, output identity and achieved "
        "weight-read bandwidth against the measured memory copy bandwidth.",
    )
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument(
        "--draft",
        action="append",
        default=[],
        metavar="PATH",
        help="a draft checkpoint directory (repeatable); n-gram is always included",
    )
    d.add_argument(
        "--domain", default="code", help="built-in workload domain or file:PATH (default: code)"
    )
    d.add_argument("--prompts", type=int, default=8, help="number of prompts (default: 8)")
    d.add_argument(
        "--heldout",
        action="store_true",
        help="use the held-out half of the domain (the half `aurora draft fit` does not train on)",
    )
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--spec-tokens", type=int, default=4, help="k for every speculative method")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    d.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    d.set_defaults(handler=_decode)


def _decode(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.runtime.bench import decode_benchmark, default_prompts, write_json

    train, held = default_prompts(args.domain, args.prompts, args.seed)
    prompts = held if args.heldout else train
    console = Console()
    with console.status("benchmarking") as status:
        result = decode_benchmark(
            args.model,
            ["ngram", *args.draft],
            prompts,
            k=args.spec_tokens,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads or None,
            progress=lambda i, n: status.update(f"prompt {i}/{n}"),
        )
    table = Table(
        title=f"decode: {args.model}, {len(prompts)} {args.domain} prompts, "
        f"{args.max_new_tokens} new tokens, k={args.spec_tokens}, greedy"
    )
    for col in (
        "method",
        "tok/s",
        "vs plain",
        "vs HF generate",
        "accept len",
        "identical",
        "weights GB/s",
    ):
        table.add_column(col)
    for name, row in result["methods"].items():
        table.add_row(
            name,
            f"{row['tokens_per_s']:.1f}",
            f"{row['speedup_vs_plain']:.2f}x",
            f"{row['speedup_vs_hf_generate']:.2f}x",
            "-" if row["accept_length"] is None else f"{row['accept_length']:.2f}",
            "yes" if row["identical"] else "NO",
            "-" if row["weight_read_gbs"] is None else f"{row['weight_read_gbs']:.1f}",
        )
    console.print(table)
    console.print(
        f"memory copy bandwidth {result['memory_copy_bandwidth_gbs']:.1f} GB/s; "
        f"weights {result['weight_bytes'] / 1e6:.0f} MB; threads {result['threads']}"
    )
    if args.json:
        write_json(args.json, result)
    return 0
