"""`aurora train`: the online trainer (one process, or one rank of a torchrun job)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

from aurora.errors import UsageError


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
    p.add_argument(
        "--model", default="smollm2-135m", help="target model: alias, path or Hugging Face id"
    )
    p.add_argument(
        "--speculator",
        default="default/local",
        metavar="NAMESPACE/NAME",
        help="whose traces to read (Redis keys aurora:NAMESPACE:NAME:*)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("AURORA_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (env AURORA_REDIS_URL; password from AURORA_REDIS_PASSWORD)",
    )
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("checkpoints"),
        help="where revisions are written (shared with the servers)",
    )
    p.add_argument(
        "--init", default="scratch", help="initial draft: scratch or a checkpoint directory"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=4, help="traces per optimizer step per rank")
    p.add_argument(
        "--lambda-discard",
        type=float,
        default=0.5,
        help="weight of the rejected-proposal term; 0 trains on accepted tokens only",
    )
    p.add_argument("--ttt-steps", type=int, default=3, help="training-time-test unrolled steps")
    p.add_argument("--draft-vocab", type=int, default=4096, help="reduced draft vocabulary size")
    p.add_argument("--spec-tokens", type=int, default=4, help="k used for offline evaluation")
    p.add_argument(
        "--first-candidate-after",
        type=int,
        default=24,
        help="training traces before the first candidate (day 0)",
    )
    p.add_argument(
        "--publish-every", type=int, default=24, help="new training traces between candidates"
    )
    p.add_argument(
        "--publish-margin",
        type=float,
        default=0.05,
        help="a candidate must beat stable's offline accept length by this fraction",
    )
    p.add_argument(
        "--min-accept-length",
        type=float,
        default=1.5,
        help="never publish a candidate whose offline accept length is below this",
    )
    p.add_argument(
        "--steps-per-trace",
        type=float,
        default=4.0,
        help="optimizer steps allowed per new trace (replaying older ones in between)",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints"
    )
    p.add_argument("--keep", type=int, default=5, help="checkpoints retained")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus /metrics on this port from the start, before the model loads "
        "(Kubernetes probes use it; the operator passes 9100). Default 0: off. With several "
        "ranks, rank r serves on port + r",
    )
    p.add_argument(
        "--serve-checkpoints-port",
        type=int,
        default=0,
        help="serve the checkpoints over HTTP on this port (GET /revisions/REV/FILE), for "
        "servers that share no volume with the trainer; rank 0 only. Default 0: off",
    )
    p.add_argument(
        "--advertise-url",
        default=None,
        metavar="URL",
        help="base URL of that endpoint as servers reach it (e.g. the trainer's Service, "
        "http://NAME-trainer.NS.svc:9200); each candidate record carries its revision's URL",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    p.set_defaults(handler=_run)


def parse_speculator(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    if not namespace or not name:
        raise UsageError(f"--speculator {value!r} must be NAMESPACE/NAME, e.g. default/local")
    return namespace, name


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from aurora.runtime.trainer.metrics import serve_metrics
    from aurora.runtime.trainer.trainer import Trainer, TrainerConfig

    namespace, name = parse_speculator(args.speculator)
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
    if args.serve_checkpoints_port and rank == 0:
        from aurora.runtime.trainer.serve_checkpoints import serve_checkpoints

        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        try:
            serve_checkpoints(args.checkpoint_dir, args.serve_checkpoints_port)
        except OSError as error:
            raise UsageError(
                f"--serve-checkpoints-port={args.serve_checkpoints_port}: cannot listen "
                f"({error.strerror}); pick a free port or 0 to turn it off"
            ) from None
    config = TrainerConfig(
        model=args.model,
        namespace=namespace,
        name=name,
        redis_url=args.redis_url,
        checkpoint_dir=args.checkpoint_dir,
        advertise_url=args.advertise_url if args.serve_checkpoints_port else None,
        consumer=f"{socket.gethostname()}-{os.getpid()}-rank{rank}",
        init=args.init,
        device=args.device,
        lr=args.lr,
        batch_size=args.batch_size,
        lambda_discard=args.lambda_discard,
        ttt_steps=args.ttt_steps,
        draft_vocab=args.draft_vocab,
        spec_tokens=args.spec_tokens,
        first_candidate_after=args.first_candidate_after,
        publish_every=args.publish_every,
        publish_margin=args.publish_margin,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        min_accept_length=args.min_accept_length,
        steps_per_trace=args.steps_per_trace,
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
