"""`aurora bench gate`: the rollout gate's decisions by scenario (registered under
`aurora bench`); the simulation is `aurora.runtime.bench_gate`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from aurora.runtime.bench_gate import SCENARIOS
    from aurora.runtime.options import add_options
    from aurora.runtime.rollout.policy import RolloutPolicy

    g = sub.add_parser(
        "gate",
        help="the rollout gate's promotion and rollback rates by scenario (CPU-only simulation)",
        description="Replays simulated per-request stats through the rollout decision code "
        "(the operator's and aurora local's), many seeded canaries per scenario: A/A, known "
        "0.9x/1.04x/1.1x/1.2x/1.5x, a bimodal 1.6x/0.7x candidate whose time-weighted speedup "
        "is below 1, the machine slowing mid-canary, a traffic shift, recurring prompts and "
        "batched cohorts. Prints each scenario's true (time-weighted) speedup and its "
        "promotion, rollback and inconclusive rates, the false promotion rate (highest "
        "promotion rate where the truth is below minSpeedup) and the power at 1.2x. Rates "
        "of decisions, not timings: the figures do not depend on the machine.",
    )
    g.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    g.add_argument("--trials", type=int, default=1000, help="canaries per scenario (default: 1000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--workers", type=int, default=1, help="processes to run trials in (same results)"
    )
    g.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in SCENARIOS],
        default=None,
        help="run only this scenario (repeatable; default: all)",
    )
    add_options(
        g.add_argument_group("rollout policy (the Speculator's spec.rollout)"), RolloutPolicy
    )
    g.set_defaults(handler=_gate)


def _gate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from aurora.errors import UsageError
    from aurora.runtime.bench_gate import SCENARIOS, run_gate_bench, write_json
    from aurora.runtime.options import OptionError, from_args
    from aurora.runtime.rollout.policy import RolloutPolicy

    try:
        policy = from_args(RolloutPolicy, args)
    except OptionError as error:
        raise UsageError(f"rollout policy: {error}") from None
    if args.trials < 1:
        raise UsageError(f"--trials={args.trials}: run at least 1 trial per scenario")
    scenarios = [s for s in SCENARIOS if args.scenario is None or s.name in args.scenario]
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("canaries", total=args.trials * len(scenarios))

        def advance(scenario: str, done: int) -> None:
            progress.update(task, advance=done, description=scenario)

        result = run_gate_bench(
            policy, args.trials, args.seed, scenarios, advance, workers=max(1, args.workers)
        )
    table = Table(title=f"rollout gate, {args.trials} canaries per scenario")
    for column in (
        "scenario",
        "true speedup",
        "promoted",
        "rolled back",
        "inconclusive",
        "median n",
    ):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for name, row in result["scenarios"].items():
        table.add_row(
            name,
            f"{row['true_speedup']:.3f}x",
            f"{row['promotion_rate']:.3f}",
            f"{row['rollback_rate']:.3f}",
            f"{row['inconclusive_rate']:.3f}",
            f"{row['median_requests_to_decision']:.0f}",
        )
    console.print(table)
    console.print(
        f"false promotion rate {result['false_promotion_rate']} (goal <= "
        f"{policy.false_promotion_rate}); power at 1.2x {result['power_at_1_2x']} (goal >= 0.9)"
    )
    if args.json is not None:
        write_json(args.json, result)
        console.print(f"wrote {args.json}")
    return 0
