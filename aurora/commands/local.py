"""`aurora local`: the whole loop on one machine (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "local",
        help="run server, trainer, rollout and traffic on this machine",
        description="Starts an embedded Redis (unless --redis-url), the inference server(s), the "
        "online trainer, the rollout policy and a traffic generator that follows a workload "
        "schedule; shows live progress and writes a report folder (JSON, Markdown, PNG) at the end "
        "or after --minutes. Ctrl-C stops every process cleanly and still writes the report.",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="target model: alias, path or Hugging Face id"
    )
    p.add_argument(
        "--schedule",
        default="code:60,prose:400",
        help="traffic schedule (default 'code:60,prose:400': day-0 code traffic, then a shift "
        "to prose; see `aurora workload show`)",
    )
    p.add_argument(
        "--shift-after-promotions",
        type=int,
        default=2,
        metavar="K",
        help="hold the schedule's first phase (at least its count, at most 3x) until 16 "
        "requests after the K-th promotion, so the domain shift lands on a draft that has "
        "proven itself (default: 2); 0 follows the phase counts as written",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="rows per batch on each server (default 1: the live A/B stays unbiased, since "
        "batches never mix arms and a busier arm would batch more)",
    )
    p.add_argument(
        "--distinct-prompts",
        type=int,
        default=40,
        help="recurring traffic: each domain cycles through this many distinct prompts, as a "
        "service with recurring requests does (default: 40; 0 = all prompts of the domain)",
    )
    p.add_argument("--seed", type=int, default=0, help="traffic and routing seed")
    p.add_argument("--minutes", type=float, default=14.0, help="stop after this long (default: 14)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--servers", type=int, default=1, help="inference server processes (default: 1)")
    p.add_argument("--clients", type=int, default=2, help="concurrent traffic clients (default: 2)")
    p.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens generated per request (default: 32)"
    )
    p.add_argument(
        "--spec-tokens", type=int, default=3, help="draft tokens per verify step (k; default 3)"
    )
    p.add_argument(
        "--initial-draft",
        default="none",
        choices=["none", "ngram", "scratch"],
        help="day-0 stable draft: none (serve without speculation until a trained draft "
        "proves faster; default), ngram (model-free prompt lookup) or scratch (untrained head)",
    )
    from aurora.runtime.local import LOCAL_ROLLOUT
    from aurora.runtime.options import add_options
    from aurora.runtime.rollout.policy import RolloutPolicy

    rollout = p.add_argument_group("rollout policy (the Speculator's spec.rollout)")
    add_options(rollout, RolloutPolicy, defaults=LOCAL_ROLLOUT)
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("aurora-local"),
        help="checkpoints, logs and the report go here (default: ./aurora-local); an earlier "
        "run's checkpoints there are removed at start, since every run begins at day 0",
    )
    p.add_argument(
        "--report-dir", type=Path, default=None, help="report folder (default: WORKDIR/report)"
    )
    p.add_argument("--no-live", action="store_true", help="no live terminal view (log lines only)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from aurora.errors import UsageError
    from aurora.runtime.local import LocalConfig, LocalMode
    from aurora.runtime.options import OptionError, from_args
    from aurora.runtime.rollout.policy import RolloutPolicy

    try:
        rollout = from_args(RolloutPolicy, args)
    except OptionError as error:
        raise UsageError(f"rollout policy: {error}") from None

    config = LocalConfig(
        model=args.model,
        schedule=args.schedule,
        shift_after_promotions=max(0, args.shift_after_promotions),
        server_max_batch=args.max_batch,
        distinct_prompts=args.distinct_prompts or None,
        seed=args.seed,
        minutes=args.minutes,
        redis_url=args.redis_url,
        servers=args.servers,
        clients=args.clients,
        max_new_tokens=args.max_new_tokens,
        spec_tokens=args.spec_tokens,
        initial_draft=args.initial_draft,
        rollout=rollout,
        workdir=args.workdir,
        report_dir=args.report_dir,
        live=not args.no_live,
    )
    import logging
    import signal

    logging.getLogger("httpx").setLevel(logging.WARNING)

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    mode = LocalMode(config)
    try:
        report = mode.execute()
    except KeyboardInterrupt:
        mode.shutdown()
        print(f"stopped; report in {config.report_dir or config.workdir / 'report'}")
        return 130
    summary = (report / "report.md").read_text()
    print(summary)
    print(f"report: {report}")
    return 0
