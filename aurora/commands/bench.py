"""`aurora bench`: side-by-side benchmarks that report ratios."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="side-by-side benchmarks (ratios, one run)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    d = sub.add_parser(
        "decode",
        help="our engine (plain, n-gram, trained drafts) against transformers, same prompts",
        description="Runs transformers' generate, transformers' prompt lookup, our engine plain, with "
        "the n-gram proposer and with each --draft checkpoint on the same prompts (interleaved), at "
        "temperature 0. Prints tokens/s, mean accepted length, speedups, output identity and achieved "
        "weight-read bandwidth against the measured memory copy bandwidth. With --unseen: every "
        "proposer (n-gram, suffix, the head with a fixed k and adaptive, the hybrid) in each of "
        "--domains, on prompts neither the head nor the suffix tree has seen, optionally after "
        "--warmup requests of the domain's other prompts; JSON domains.<domain>.methods.<method> "
        "and min_speedup_vs_plain for the adaptive head and the hybrid.",
    )
    from aurora.runtime.bench_config import BatchBenchConfig, DecodeBenchConfig
    from aurora.runtime.options import add_options

    add_options(d, DecodeBenchConfig)
    d.set_defaults(handler=_decode)
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
    add_options(b, BatchBenchConfig)
    b.set_defaults(handler=_batch)
    _register_adapt(sub)


def _register_adapt(sub: argparse._SubParsersAction) -> None:
    from aurora.commands.workload import SCHEDULE_HELP

    a = sub.add_parser(
        "adapt",
        help="domain shift: a static draft against online Aurora (and lambda_discard = 0)",
        description="Serves one seeded stream whose traffic shifts domain (default prose, then "
        "code) with three arms on the same requests: a static draft fitted on the first domain "
        "only; online Aurora, starting from it, whose traces go through an embedded Redis to a "
        "real trainer and which hot-swaps to each published candidate; and the same with "
        "lambda_discard = 0. Arms are interleaved per request and the trainers run between "
        "blocks of requests, while serving is paused, so neither distorts the other's timings. "
        "Prints a table, draws accept length and decode tokens/s over requests (PNG) and "
        "reports the throughput ratio online/static after the shift and the requests needed "
        "to recover.",
    )
    from aurora.runtime.bench_adapt import AdaptConfig
    from aurora.runtime.options import add_options

    source = a.add_mutually_exclusive_group()
    source.add_argument(
        "--schedule",
        metavar="SPEC",
        help=SCHEDULE_HELP + "; the shift is where the second phase starts "
        "(default: prose:N,code:M from --requests-before/--requests-after)",
    )
    source.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help='a JSONL prompt file, as in `aurora workload` (one {"prompt": ...} or '
        '{"messages": [...]} per line): once, it is the traffic after the shift (prose before); '
        "twice, the first is before the shift and the second after",
    )
    add_options(a, AdaptConfig)
    a.add_argument("--plot", type=Path, default=None, help="PNG path (default: WORKDIR/adapt.png)")
    a.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    a.set_defaults(handler=_adapt)


def _decode(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.runtime.bench import decode_benchmark, default_prompts, write_json
    from aurora.runtime.bench_config import DecodeBenchConfig
    from aurora.runtime.options import from_args

    config = from_args(DecodeBenchConfig, args)
    if config.unseen:
        return _unseen(config)
    train, held = default_prompts(config.domain, config.prompts, config.seed)
    prompts = held if config.heldout else train
    console = Console()
    with console.status("benchmarking") as status:
        result = decode_benchmark(
            config, prompts, progress=lambda i, n: status.update(f"prompt {i}/{n}")
        )
    table = Table(
        title=f"decode: {config.model}, {len(prompts)} {config.domain} prompts, "
        f"{config.max_new_tokens} new tokens, k={config.spec_tokens}, greedy"
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
    if config.json:
        write_json(config.json, result)
    return 0


def _unseen(config: Any) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.runtime.bench import write_json
    from aurora.runtime.bench_unseen import run_unseen

    console = Console()
    with console.status("benchmarking") as status:
        result = run_unseen(config, lambda *info: status.update(" ".join(map(str, info))))
    for domain, data in result["domains"].items():
        table = Table(
            title=f"{domain}: {len(data['prompts'])} unseen prompts, warm-up "
            f"{data['warmup']['requests']} requests, {config.max_new_tokens} new tokens, "
            f"k={config.spec_tokens}, greedy"
        )
        for col in ("method", "tok/s", "vs plain", "accept len", "identical"):
            table.add_column(col)
        for name, row in data["methods"].items():
            table.add_row(
                name,
                f"{row['tokens_per_s']:.1f}",
                f"{row['speedup_vs_plain']:.2f}x",
                "-" if row["accept_length"] is None else f"{row['accept_length']:.2f}",
                "yes" if row["identical"] else "NO",
            )
        console.print(table)
    console.print(
        "min speedup vs plain over the domains: "
        + ", ".join(f"{m} {v:.2f}x" for m, v in result["min_speedup_vs_plain"].items())
    )
    if config.json:
        write_json(config.json, result)
        console.print(f"json: {config.json}")
    return 0


def adapt_schedule(args: argparse.Namespace) -> str:
    """The schedule string from --schedule, --prompts or the default prose-then-code."""
    from aurora.errors import UsageError

    if args.schedule:
        return str(args.schedule)
    for flag in ("requests_before", "requests_after"):
        if getattr(args, flag) < 1:
            raise UsageError(
                f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1 request"
            )
    files = [f"file:{Path(p).expanduser().resolve()}" for p in args.prompts or []]
    if len(files) > 2:
        raise UsageError(
            f"--prompts given {len(files)} times: give one file (traffic after the shift) or "
            "two (before and after); use --schedule for more phases"
        )
    before, after = "prose", "code"
    if len(files) == 1:
        after = files[0]
    elif len(files) == 2:
        before, after = files
    return f"{before}:{args.requests_before},{after}:{args.requests_after}"


def _adapt(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aurora.runtime.bench import write_json
    from aurora.runtime.bench_adapt import AdaptConfig, plot, rolling_mean, run_adapt
    from aurora.runtime.options import from_args

    config = from_args(AdaptConfig, args, schedule=adapt_schedule(args))
    console = Console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console) as bar:
        fit = bar.add_task("fit static draft", total=None, detail="(cached drafts skip this)")
        serve = bar.add_task("serve", total=None, detail="", visible=False)

        def progress(event: str, info: dict) -> None:
            if event == "fit":
                bar.update(
                    fit,
                    description=f"fit static draft: {info['stage']}",
                    completed=info["done"],
                    total=info["total"],
                )
            elif event == "request":
                arms, i = info["arms"], info["index"]
                phase = "before shift" if i < info["shift"] else "after shift"
                accept = "  ".join(
                    f"{name} {rolling_mean(arm.accept_lengths, config.rolling)[-1]:.2f}"
                    for name, arm in arms.items()
                )
                bar.update(fit, visible=False)
                bar.update(
                    serve,
                    visible=True,
                    description=f"serve ({phase})",
                    completed=i + 1,
                    total=info["total"],
                    detail=f"accept length {accept}",
                )
            elif event == "train":
                arm = info["arm"]
                bar.update(
                    serve,
                    detail=f"{arm.name} trainer: step {arm.trainer.step}, "
                    f"{len(arm.swaps)} swaps, serving {arm.revision}",
                )

        result = run_adapt(config, progress)
    _print_adapt(console, result)
    png = plot(result, args.plot or args.workdir / "adapt.png")
    console.print(f"plot: {png}")
    if args.json:
        write_json(args.json, result)
        console.print(f"json: {args.json}")
    return 0


def _print_adapt(console: Any, result: dict) -> None:
    from rich.table import Table

    window = result["last_window"]["requests"]
    table = Table(
        title=f"adapt: {result['schedule']}, shift at request {result['shift_index']}, "
        f"{result['config']['max_new_tokens']} new tokens, k={result['config']['k']}, greedy"
    )
    for col in (
        "arm",
        "accept len before",
        "accept len after",
        f"accept len last {window}",
        f"tok/s last {window}",
        "vs static",
        "recovered after",
        "swaps",
    ):
        table.add_column(col)
    for name, row in result["arms"].items():
        ratio = row["throughput_ratio_vs_static"]
        recovered = row["recovery_requests"]
        table.add_row(
            name,
            f"{row['accept_length_before_shift']:.2f}",
            f"{row['accept_length_after_shift']:.2f}",
            f"{row['accept_length_last_window']:.2f}",
            f"{row['tokens_per_s_last_window']:.1f}",
            "-" if ratio is None else f"{ratio:.2f}x",
            "never" if recovered is None else f"{recovered} requests",
            str(len(result["swaps"][name])),
        )
    console.print(table)
    console.print(
        f"recovered: {result['recovery_definition']} (level {result['recovery_level']:.2f})"
    )
    for name, reached in result["traces_to_target"].items():
        console.print(
            f"{name}: accept length {result['target_accept_length']:.2f} "
            + (
                "not reached"
                if reached is None
                else f"reached after {reached['post_shift_traces']} post-shift traces "
                f"(served revision trained on {reached['trained_traces']} traces)"
            )
        )


def _batch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.runtime.bench import default_prompts, write_json
    from aurora.runtime.bench_batch import batch_benchmark
    from aurora.runtime.bench_config import BatchBenchConfig
    from aurora.runtime.options import from_args

    config = from_args(BatchBenchConfig, args)
    prompts, _ = default_prompts(config.domain, config.prompts, config.seed)
    console = Console()
    with console.status("benchmarking") as status:
        result = batch_benchmark(
            config,
            [p.text for p in prompts],
            progress=lambda i, n: status.update(f"configuration {i}/{n}"),
        )
    table = Table(
        title=f"batch: {config.model}, {len(prompts)} {config.domain} requests at once, "
        f"{config.max_new_tokens} new tokens, k={config.spec_tokens}, greedy"
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
    if config.json:
        write_json(config.json, result)
    return 0
