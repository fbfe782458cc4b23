"""`aurora local`: the whole loop on one machine (the README's main job)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aurora.runtime.local.config import LocalConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "local",
        help="run server, trainer, rollout and traffic on this machine",
        description="Starts an embedded Redis (unless --redis-url), the inference server(s), the "
        "online trainer, the rollout policy and a traffic generator that follows a workload "
        "schedule; shows live progress and writes a report folder (JSON, Markdown, PNG) at the end "
        "or after --minutes. Ctrl-C stops every process cleanly and still writes the report.",
    )
    from aurora.runtime.local.config import LOCAL_ROLLOUT, LocalConfig
    from aurora.runtime.options import add_options
    from aurora.runtime.rollout.policy import RolloutPolicy

    add_options(p, LocalConfig)
    rollout = p.add_argument_group("rollout policy (the Speculator's spec.rollout)")
    add_options(rollout, RolloutPolicy, defaults=LOCAL_ROLLOUT)
    p.set_defaults(handler=_run)


def local_config(args: argparse.Namespace) -> LocalConfig:
    """The run's configuration from the parsed flags; a refused rollout policy is a usage
    error naming the flags."""
    from aurora.errors import UsageError
    from aurora.runtime.local.config import LocalConfig
    from aurora.runtime.options import OptionError, from_args
    from aurora.runtime.rollout.policy import RolloutPolicy

    try:
        rollout = from_args(RolloutPolicy, args)
    except OptionError as error:
        raise UsageError(f"rollout policy: {error}") from None
    config: LocalConfig = from_args(LocalConfig, args, rollout=rollout)
    return config


def _run(args: argparse.Namespace) -> int:
    from aurora.runtime.local.run import LocalMode

    config = local_config(args)
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
