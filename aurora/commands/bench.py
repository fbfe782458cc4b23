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
        help="our engine (plain, n-gram, suffix, trained drafts) against transformers, same prompts",
        description="Runs transformers' generate, transformers' prompt lookup, our engine plain, with "
        "the n-gram proposer and with each --draft checkpoint on the same prompts (interleaved), at "
        "temperature 0. Prints tokens/s, mean accepted length, speedups, output identity and achieved "
        "weight-read bandwidth against the measured memory copy bandwidth. With --unseen: every "
        "proposer (n-gram, suffix, the head with a fixed k and adaptive, the hybrid) per domain, on "
        "prompts neither the head nor the suffix tree has seen, optionally after --warmup requests "
        "of the domain's other prompts; JSON domains.<domain>.methods.<method> and "
        "min_speedup_vs_plain for the adaptive head and the hybrid.",
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
        "--domain",
        action="append",
        default=None,
        help="built-in workload domain or file:PATH (default: code; with --unseen repeatable, "
        "default: code, prose, math and chat)",
    )
    d.add_argument(
        "--unseen",
        action="store_true",
        help="every proposer per domain on prompts disjoint from the head's fitting prompts and "
        "from what the suffix tree saw (at most one --draft; without one, a head is fitted on "
        "the code domain's training half and cached in --workdir)",
    )
    d.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="N",
        help="with --unseen: the suffix tree first learns N requests of the domain's other "
        "prompts (default: 0)",
    )
    d.add_argument(
        "--workdir",
        type=Path,
        default=Path("aurora-bench-unseen"),
        help="with --unseen: the fitted head and cached warm-up outputs "
        "(default: ./aurora-bench-unseen)",
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
    a.add_argument("--model", default="smollm2-135m")
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
    a.add_argument("--requests-before", type=int, default=8, metavar="N")
    a.add_argument("--requests-after", type=int, default=40, metavar="N")
    a.add_argument(
        "--distinct-prompts",
        type=int,
        default=16,
        metavar="N",
        help="recurring traffic: each domain draws from this many distinct prompts, as in "
        "`aurora local` (default: 16; 0 = all prompts)",
    )
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--spec-tokens", type=int, default=3, help="k for every arm (default: 3)")
    a.add_argument(
        "--block", type=int, default=8, help="requests served between training slices (default: 8)"
    )
    a.add_argument(
        "--steps-per-block",
        type=int,
        default=16,
        help="optimizer steps each online trainer runs per slice, at most (default: 16, "
        "2 per trace at the default block)",
    )
    a.add_argument(
        "--fit-prompts", type=int, default=16, help="prompts the static draft is fitted on"
    )
    a.add_argument("--fit-epochs", type=int, default=6)
    a.add_argument("--lambda-discard", type=float, default=0.5, help="for the online arm")
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument(
        "--publish-margin",
        type=float,
        default=0.05,
        help="a candidate is published when its offline accept length beats the served "
        "revision's by this fraction (the trainer's default: 0.05)",
    )
    a.add_argument(
        "--window",
        type=int,
        default=16,
        help="last requests after the shift over which throughput is compared (default: 16)",
    )
    a.add_argument(
        "--rolling", type=int, default=8, help="rolling window for accept length (default: 8)"
    )
    a.add_argument(
        "--recover-fraction",
        type=float,
        default=0.9,
        help="recovered: rolling accept length stays at or above this fraction of the static "
        "draft's pre-shift level (default: 0.9)",
    )
    a.add_argument(
        "--target-accept-length",
        type=float,
        default=1.5,
        help="accept length for the traces-needed figure (default: 1.5)",
    )
    a.add_argument("--seed", type=int, default=0)
    a.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1, robust on a shared machine; 0 = all cores)",
    )
    a.add_argument(
        "--workdir",
        type=Path,
        default=Path("aurora-bench-adapt"),
        help="cached static draft, trainer checkpoints and the plot (default: ./aurora-bench-adapt)",
    )
    a.add_argument("--plot", type=Path, default=None, help="PNG path (default: WORKDIR/adapt.png)")
    a.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    a.set_defaults(handler=_adapt)


def _decode(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.errors import UsageError
    from aurora.runtime.bench import decode_benchmark, default_prompts, write_json

    if args.unseen:
        return _unseen(args)
    if args.domain and len(args.domain) > 1:
        raise UsageError(f"--domain given {len(args.domain)} times: give one (or use --unseen)")
    args.domain = args.domain[0] if args.domain else "code"
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


def _unseen(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from aurora.errors import UsageError
    from aurora.runtime.bench import write_json
    from aurora.runtime.bench_unseen import DOMAINS, UnseenConfig, run_unseen

    if len(args.draft) > 1 or args.prompts < 1 or args.warmup < 0:
        raise UsageError(
            f"--unseen takes at most one --draft (got {len(args.draft)}), --prompts >= 1 "
            f"(got {args.prompts}) and --warmup >= 0 (got {args.warmup})"
        )
    config = UnseenConfig(
        model=args.model,
        draft=args.draft[0] if args.draft else None,
        domains=tuple(args.domain or DOMAINS),
        prompts=args.prompts,
        warmup=args.warmup,
        k=args.spec_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        threads=args.threads or None,
        workdir=args.workdir,
    )
    console = Console()
    with console.status("benchmarking") as status:
        result = run_unseen(config, lambda *info: status.update(" ".join(map(str, info))))
    for domain, data in result["domains"].items():
        table = Table(
            title=f"{domain}: {len(data['prompts'])} unseen prompts, warm-up "
            f"{data['warmup']['requests']} requests, {config.max_new_tokens} new tokens, "
            f"k={config.k}, greedy"
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
    if args.json:
        write_json(args.json, result)
        console.print(f"json: {args.json}")
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

    config = AdaptConfig(
        model=args.model,
        schedule=adapt_schedule(args),
        seed=args.seed,
        distinct_prompts=args.distinct_prompts,
        max_new_tokens=args.max_new_tokens,
        k=args.spec_tokens,
        block=args.block,
        steps_per_block=args.steps_per_block,
        fit_prompts=args.fit_prompts,
        fit_epochs=args.fit_epochs,
        lambda_discard=args.lambda_discard,
        lr=args.lr,
        publish_margin=args.publish_margin,
        window=args.window,
        rolling=args.rolling,
        recover_fraction=args.recover_fraction,
        target_accept_length=args.target_accept_length,
        threads=args.threads,
        workdir=args.workdir,
    )
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
