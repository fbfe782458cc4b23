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
        default="code:150,prose:90",
        help="traffic schedule, e.g. 'code:150,prose:90' (see `aurora workload show`)",
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
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
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
    p.add_argument(
        "--min-speedup", default="1.05", help="rollout.minSpeedup: candidate over stable"
    )
    p.add_argument("--min-samples", type=int, default=12, help="requests per arm before deciding")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("aurora-local"),
        help="checkpoints, logs and the report go here (default: ./aurora-local)",
    )
    p.add_argument(
        "--report-dir", type=Path, default=None, help="report folder (default: WORKDIR/report)"
    )
    p.add_argument("--no-live", action="store_true", help="no live terminal view (log lines only)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from aurora.runtime.local import LocalConfig, LocalMode

    config = LocalConfig(
        model=args.model,
        schedule=args.schedule,
        distinct_prompts=args.distinct_prompts or None,
        seed=args.seed,
        minutes=args.minutes,
        redis_url=args.redis_url,
        servers=args.servers,
        clients=args.clients,
        max_new_tokens=args.max_new_tokens,
        spec_tokens=args.spec_tokens,
        initial_draft=args.initial_draft,
        min_speedup=args.min_speedup,
        min_samples=args.min_samples,
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
