"""`aurora train`: the online trainer (one process, or one rank of a torchrun job)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
from dataclasses import dataclass

from aurora.errors import UsageError
from aurora.runtime.options import knob


@dataclass
class TrainProcess:
    """What `aurora train` takes besides the trainer's own configuration."""

    metrics_port: int = knob(
        0,
        "serve Prometheus /metrics on this port from the start, before the model loads "
        "(Kubernetes probes use it; the operator passes 9100); 0: off. With several ranks, "
        "rank r serves on port + r",
    )
    threads: int = knob(0, "torch threads (0: all cores)")
    max_steps: int | None = knob(None, "stop after this many optimizer steps")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="consume traces from Redis, train the draft, publish candidates",
        description="The online trainer. Reads traces through a Redis consumer group, recomputes "
        "target features with a replica of the target, trains the draft head on the Aurora "
        "objective, writes checkpoints atomically and offers candidates that beat the stable draft "
        "offline. Run several ranks with torchrun for data-parallel training "
        "(gloo on CPU, NCCL on GPU).",
    )
    from aurora.runtime.options import add_options
    from aurora.runtime.trainer.config import TrainerConfig

    add_options(p, TrainerConfig)
    add_options(p, TrainProcess)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from aurora.runtime.options import from_args
    from aurora.runtime.trainer.config import TrainerConfig
    from aurora.runtime.trainer.metrics import serve_metrics
    from aurora.runtime.trainer.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
    collector = None
    if args.metrics_port:
        try:
            collector = serve_metrics(args.metrics_port + rank)
        except OSError as error:
            raise UsageError(
                f"--metrics-port={args.metrics_port + rank}: cannot listen ({error.strerror}); "
                "pick a free port or 0 to turn the endpoint off"
            ) from None
    config = from_args(
        TrainerConfig, args, consumer=f"{socket.gethostname()}-{os.getpid()}-rank{rank}"
    )
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    trainer = Trainer(config)
    if collector is not None:
        collector.trainer = trainer
    trainer.run(max_steps=args.max_steps, stop=lambda: stopping)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
