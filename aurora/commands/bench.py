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
    _register_batch(sub)


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


def _register_batch(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "batch",
        help="continuous batching: the same requests at max batch 1, 2, 4, with and without a draft",
        description="Sends the same requests, all arriving at once, through the engine's batched "
        "decoder with each --batch size, with no draft and with the n-gram draft (greedy). Each "
        "request joins as soon as a row is free, as in `aurora serve --max-batch`. Prints total "
        "tokens/s (all generated tokens over the wall time, prefills included), the ratio to the "
        "smallest batch with the same draft, mean per-request latency, accepted length, rows per "
        "verify step, and whether every output equals the smallest batch's.",
    )
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument(
        "--domain", default="code", help="built-in workload domain or file:PATH (default: code)"
    )
    b.add_argument("--prompts", type=int, default=8, help="number of requests (default: 8)")
    b.add_argument(
        "--batch",
        type=int,
        action="append",
        default=None,
        metavar="N",
        help="a max batch size to measure (repeatable; default: 1, 2 and 4)",
    )
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--spec-tokens", type=int, default=4, help="k for the n-gram draft")
    b.add_argument("--repeats", type=int, default=1, help="runs of every configuration")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    b.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    b.set_defaults(handler=_batch)


def _batch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.errors import UsageError
    from aurora.runtime.bench import default_prompts, write_json
    from aurora.runtime.bench_batch import batch_benchmark

    batches = sorted(set(args.batch or [1, 2, 4]))
    if batches[0] < 1 or args.prompts < 1 or args.repeats < 1:
        raise UsageError(
            f"--batch {batches}, --prompts {args.prompts}, --repeats {args.repeats}: "
            "each must be at least 1"
        )
    prompts, _ = default_prompts(args.domain, args.prompts, args.seed)
    console = Console()
    with console.status("benchmarking") as status:
        result = batch_benchmark(
            args.model,
            [p.text for p in prompts],
            batches=batches,
            k=args.spec_tokens,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            threads=args.threads or None,
            progress=lambda i, n: status.update(f"configuration {i}/{n}"),
        )
    table = Table(
        title=f"batch: {args.model}, {len(prompts)} {args.domain} requests at once, "
        f"{args.max_new_tokens} new tokens, k={args.spec_tokens}, greedy"
    )
    for col in ("draft", "batch", "tok/s", "vs batch 1", "latency s", "accept", "rows", "same"):
        table.add_column(col)
    for row in result["configs"]:
        table.add_row(
            row["draft"],
            str(row["max_batch"]),
            f"{row['tokens_per_s']:.1f}",
            f"{row['speedup_vs_batch1']:.2f}x",
            f"{row['mean_latency_s']:.2f}",
            "-" if row["accept_length"] is None else f"{row['accept_length']:.2f}",
            f"{row['mean_rows_per_step']:.2f}",
            "yes" if row["identical_to_batch1"] else "NO",
        )
    console.print(table)
    console.print(f"threads {result['threads']}; ratios are against max batch {result['batch1']}")
    if args.json:
        write_json(args.json, result)
    return 0
