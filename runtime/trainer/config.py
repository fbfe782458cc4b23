"""The trainer's configuration as plain data (no torch: `aurora train --help` and the
operator read it without loading anything)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aurora.errors import UsageError
from aurora.runtime import protocol
from aurora.runtime.options import knob
from aurora.runtime.protocol import Builtin


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class TrainerConfig:
    """Everything `aurora train` takes; each knob's flag is generated from its field."""

    model: str = knob("smollm2-135m", "target model: alias, path or Hugging Face id")
    speculator: str = knob(
        "default/local",
        "whose traces to read (Redis keys aurora:NAMESPACE:NAME:*)",
        metavar="NAMESPACE/NAME",
    )
    redis_url: str = knob(
        "redis://127.0.0.1:6379/0",
        "Redis URL (password from AURORA_REDIS_PASSWORD when the URL has none)",
        env="AURORA_REDIS_URL",
    )
    checkpoint_dir: Path = knob(
        Path("checkpoints"), "where revisions are written (shared with the servers)"
    )
    consumer: str = field(default_factory=_default_consumer)  # the consumer group member
    init: str = knob(Builtin.SCRATCH.value, "initial draft: scratch or a checkpoint directory")
    device: str = knob("cpu", "cpu or cuda")
    lr: float = knob(1e-3, "AdamW learning rate")
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = knob(4, "traces per optimizer step per rank")
    lambda_discard: float = knob(
        0.5,
        "weight of the off-path KL at the positions after a rejected proposal; 0 trains on "
        "the served continuation only",
    )
    ttt_steps: int = knob(3, "training-time-test unrolled steps")
    step_decay: float = 0.8
    draft_vocab: int = knob(4096, "reduced draft vocabulary size")
    fuse_layers: tuple[int, int, int] | None = None
    spec_tokens: int = knob(4, "k used for offline evaluation")
    first_candidate_after: int = knob(24, "training traces before the first candidate (day 0)")
    publish_every: int = knob(24, "new training traces between candidates")
    publish_margin: float = knob(
        0.05, "a candidate must beat stable's offline accept length by this fraction"
    )
    min_accept_length: float = knob(
        1.5, "never publish a candidate whose offline accept length is below this"
    )
    holdout_every: int = 6  # one prompt in N is held out for evaluation (0: none)
    holdout_size: int = 24
    replay_bytes: int = 512 << 20
    replay_fraction: float = 0.5  # share of each batch drawn from older traces
    steps_per_trace: float = knob(
        4.0, "optimizer steps allowed per new trace (replaying older ones in between)"
    )
    checkpoint_every: int = knob(10, "optimizer steps between checkpoints")
    reevaluate_every_steps: int = 40  # evaluate again after this many steps without new traces
    keep: int = knob(5, "checkpoints retained")
    reclaim_idle_ms: int = 60_000
    block_ms: int = 500
    trace_maxlen: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        _ = self.keys  # validates --speculator
        for name in ("batch_size", "ttt_steps", "draft_vocab", "spec_tokens", "keep"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}={getattr(self, name)}: use 1 or more")

    @property
    def keys(self) -> protocol.Keys:
        namespace, slash, name = self.speculator.partition("/")
        if not slash:
            raise UsageError(
                f"--speculator={self.speculator!r} must be NAMESPACE/NAME, e.g. default/local"
            )
        try:
            return protocol.Keys(namespace, name)
        except ValueError as error:
            raise UsageError(f"--speculator={self.speculator!r}: {error}") from None


@dataclass
class FitConfig:
    """Everything `aurora draft fit` takes (and `fit_draft`, the offline training loop)."""

    model: str = knob("smollm2-135m", "target model: alias, path or Hugging Face id")
    domain: str = knob("code", "built-in workload domain or file:PATH")
    prompts: int = knob(40, "training prompts")
    heldout: int = knob(8, "held-out prompts to evaluate on")
    epochs: int = knob(8, "passes over the training traces")
    max_new_tokens: int = knob(96, "tokens the target generates per prompt")
    spec_tokens: int = knob(4, "k: draft tokens per verify step, generating and evaluating")
    lambda_discard: float = knob(
        0.5, "weight of the off-path KL; 0 trains on the served continuation only"
    )
    draft_vocab: int = knob(4096, "reduced draft vocabulary size")
    lr: float = knob(1e-3, "AdamW learning rate")
    seed: int = knob(0, "seed of the split into training and held-out prompts")
    out: Path = knob(Path("drafts"), "checkpoint root")
