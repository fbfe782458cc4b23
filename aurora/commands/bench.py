"""`aurora bench`: side-by-side benchmarks that report ratios."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _line(console: Any, text: str) -> None:
    """One timestamped progress line (a log file, CI)."""
    console.print(f"[{time.strftime('%H:%M:%S')}] {text}", highlight=False)


@contextlib.contextmanager
def _progress(console: Any, every_s: float = 10.0) -> Iterator[Callable[[str], None]]:
    """``update(text)`` for a long benchmark: a live status line on a terminal; else
    (a log file, CI) the text as a line, at most one every ``every_s`` seconds."""
    if console.is_terminal:
        with console.status("benchmarking") as status:
            yield status.update
        return
    last = [-every_s]

    def update(text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            _line(console, text)

    yield update


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
    from aurora.commands import bench_gate

    bench_gate.register(sub)


def _register_adapt(sub: argparse._SubParsersAction) -> None:
    from aurora.commands.workload import SCHEDULE_HELP

    a = sub.add_parser(
        "adapt",
        help="domain shift on unseen prompts: plain, static and online Aurora per objective",
        description="Serves one seeded stream whose traffic shifts domain (default prose, then "
        "code) with every arm on the same requests: plain decoding; a static draft fitted on "
        "the first domain only; and online Aurora, starting from it, with each objective "
        "variant (forward KL only, + off-path KL, + negative term, all), whose traces go "
        "through an embedded Redis to real trainers and which hot-swap to each published "
        "candidate. By default no prompt is served twice (unseen traffic). Arms are "
        "interleaved per request and the trainers run between blocks of requests, while "
        "serving is paused. Over --seeds runs it reports the time-weighted throughput ratios "
        "against plain and static, and the post-shift traces each objective needs to reach "
        "an offline accept length on never-served prompts, as mean and 90 %% interval.",
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
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the results as JSON (rewritten after each seed, so a run stopped "
        "part-way keeps the seeds it finished; `complete` says whether every seed ran)",
    )
    a.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: pool the seeds of several --json documents of one configuration "
        "(e.g. `--seed 1 --seeds 1` on another machine) into one report, every interval "
        "recomputed over all their seeds; with --json, write it there",
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
    with _progress(console) as update:
        result = decode_benchmark(config, prompts, progress=lambda i, n: update(f"prompt {i}/{n}"))
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
    with _progress(console) as update:
        result = run_unseen(config, lambda *info: update(" ".join(map(str, info))))
    for domain, data in result["domains"].items():
        table = Table(
            title=f"{domain}: {len(data['prompts'])} unseen prompts, warm-up "
            f"{data['warmup']['requests']} requests, {config.max_new_tokens} new tokens, "
            f"k={config.spec_tokens}, greedy"
        )
        for col in ("method", "tok/s", "vs plain", "90% interval", "accept len", "identical"):
            table.add_column(col)
        for name, row in data["methods"].items():
            low_high = row["speedup_interval_90"]
            table.add_row(
                name,
                f"{row['tokens_per_s']:.1f}",
                f"{row['speedup_vs_plain']:.2f}x",
                "-" if low_high is None else f"{low_high[0]:.2f}x-{low_high[1]:.2f}x",
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


def _adapt_detail(info: dict, rolling: int) -> str:
    """Where a `bench adapt` run is: the phase and each arm's rolling accept length."""
    from aurora.runtime.bench_adapt import accept_length

    phase = "before shift" if info["index"] < info["shift"] else "after shift"
    accept = "  ".join(
        f"{name} {accept_length(state.served[-rolling:]):.2f}"
        for name, state in info["arms"].items()
    )
    return f"{phase}: {accept}"


@contextlib.contextmanager
def _adapt_progress(console: Any, rolling: int) -> Iterator[Callable[[str, dict], None]]:
    """The ``progress(event, info)`` callback of `run_adapt`: bars on a terminal; else (a log
    file, CI) one line at most every 10 s, and every fitting stage and seed as it starts."""
    if not console.is_terminal:
        with _progress(console) as update:

            def line(event: str, info: dict) -> None:
                if event == "fit":
                    update(f"fit static draft: {info['stage']} {info['done']}/{info['total']}")
                elif event == "seed":
                    _line(console, f"seed {info['seed']}")
                elif event == "request":
                    update(
                        f"request {info['index'] + 1}/{info['total']} {_adapt_detail(info, rolling)}"
                    )

            yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
            elif event == "seed":
                bar.update(fit, visible=False)
                bar.update(serve, visible=True, description=f"seed {info['seed']}", completed=0)
            elif event == "request":
                detail = _adapt_detail(info, rolling)
                bar.update(serve, completed=info["index"] + 1, total=info["total"], detail=detail)

        yield progress


def _adapt(args: argparse.Namespace) -> int:
    from rich.console import Console

    from aurora.runtime.bench import write_json
    from aurora.runtime.bench_adapt import AdaptConfig, plot, run_adapt
    from aurora.runtime.options import from_args

    if args.merge:
        return _merge_adapt(args)
    config = from_args(AdaptConfig, args, schedule=adapt_schedule(args))
    console = Console()
    with _adapt_progress(console, config.rolling) as progress:

        def partial(document: dict) -> None:
            if args.json:
                write_json(args.json, document)
                console.print(f"json (seeds {document['seeds']} so far): {args.json}")

        result = run_adapt(config, progress, partial)
    _print_adapt(console, result)
    png = plot(result, args.plot or config.workdir / "adapt.png")
    console.print(f"plot: {png}")
    if args.json:
        write_json(args.json, result)
        console.print(f"json: {args.json}")
    return 0


def _merge_adapt(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from aurora.errors import UsageError
    from aurora.runtime.bench import write_json
    from aurora.runtime.bench_adapt import merge_documents, plot

    docs = []
    for path in args.merge:
        try:
            docs.append((str(path), json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--merge {path}: cannot read it as JSON ({exc})") from exc
    result = merge_documents(docs)
    console = Console()
    _print_adapt(console, result)
    if args.plot:
        console.print(f"plot: {plot(result, args.plot)}")
    if args.json:
        write_json(args.json, result)
        console.print(f"json: {args.json}")
    return 0


def _fmt(figure: dict | None, unit: str = "", digits: int = 2) -> str:
    """``mean (low-high)`` of an interval figure; '-' when absent, 'never' when no seed got
    there, 'N/M seeds' when only some did."""
    if not figure:
        return "-"
    if figure["mean"] is None:
        reached = figure.get("reached")
        return "never" if not reached else f"{reached}/{figure['n']} seeds"
    text = f"{figure['mean']:.{digits}f}{unit}"
    if figure["low"] is not None:
        text += f" ({figure['low']:.{digits}f}-{figure['high']:.{digits}f})"
    return text


def _print_adapt(console: Any, result: dict) -> None:
    from rich.table import Table

    config = result["config"]
    levels = [f"{level:.1f}" for level in config["levels"]]
    table = Table(
        title=f"adapt: {result['schedule']}, {result['traffic']} traffic, shift at request "
        f"{result['shift_index']}, {config['max_new_tokens']} new tokens, k={config['k']}, "
        f"greedy; mean (90 % interval) over {len(result['seeds'])} seeds"
    )
    table.add_column("arm", no_wrap=True)
    for col in ("accept len after shift", "vs plain", "vs static"):
        table.add_column(col)
    for level in levels:
        table.add_column(f"traces to {level}")
    table.add_column("swaps")
    for name, row in result["arms"].items():
        reach = row.get("traces_to_accept_length", {})
        table.add_row(
            name,
            _fmt(row.get("accept_length_after_shift")),
            _fmt(row.get("throughput_ratio_vs_plain"), "x"),
            _fmt(row.get("throughput_ratio_vs_static"), "x"),
            *(_fmt(reach.get(level), digits=1) for level in levels),
            f"{row['swaps']['mean']:.1f}",
        )
    console.print(table, width=None if console.is_terminal else 150)
    console.print(f"traffic: {result['traffic_note']}")
    console.print(
        f"vs plain / vs static: decode tokens over decode seconds, last {config['window']} "
        "requests, same requests for every arm. traces to L: post-shift traces until the "
        f"trainer's draft reaches an offline accept length of L on {len(result['eval_prompts'])} "
        "never-served prompts (the static draft: "
        f"{result['static_offline_accept_length_on_eval']:.2f} there)"
    )
    for goal, value in result["goals"].items():
        console.print(f"goal {goal}: {value}")


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
    with _progress(console) as update:
        result = batch_benchmark(
            config,
            [p.text for p in prompts],
            progress=lambda i, n: update(f"configuration {i}/{n}"),
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
