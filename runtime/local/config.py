"""`aurora local`'s configuration as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurora.runtime import protocol
from aurora.runtime.rollout import RolloutPolicy

# `aurora local`'s rollout policy where it differs from the policy's defaults (which suit
# a cluster): fewer samples and a larger baseline, so a short CPU demo reaches decisions.
LOCAL_ROLLOUT: dict[str, Any] = {
    "min_samples": 12,
    "canary_share": "0.4",
    "baseline_share": "0.2",
    "max_canary_samples": 60,
    "on_inconclusive": "Rollback",
}


@dataclass
class LocalConfig:
    model: str = "smollm2-135m"
    schedule: str = "code:60,prose:400"
    # The first phase lasts at least its count and until `shift_delay` requests after the
    # `shift_after_promotions`-th promotion (at most `hold_limit` x its count), so the domain
    # shift lands on a draft that has proven itself; 0 promotions: follow the counts.
    shift_after_promotions: int = 2
    shift_delay: int = 16
    hold_limit: float = 3.0
    # Servers decode one request at a time: batches never mix arms, so with batching an
    # arm's per-request throughput would depend on its traffic share (the busier arm batches
    # more and each of its requests decodes slower), which biases the live A/B.
    server_max_batch: int = 1
    distinct_prompts: int | None = 40  # None: every prompt of a domain before any repeats
    seed: int = 0
    minutes: float = 14.0
    redis_url: str | None = None
    servers: int = 1
    clients: int = 2
    max_new_tokens: int = 32
    spec_tokens: int = 3
    initial_draft: str = protocol.Builtin.NONE
    workdir: Path = Path("aurora-local")
    report_dir: Path | None = None
    namespace: str = "default"
    name: str = "local"
    rollout: RolloutPolicy = field(default_factory=lambda: RolloutPolicy(**LOCAL_ROLLOUT))
    first_candidate_after: int = 16
    publish_every: int = 24
    lr: float = 1e-3
    lambda_discard: float = 0.5
    min_accept_length: float = 1.6
    steps_per_trace: float = 6.0
    server_threads: int = 1
    trainer_threads: int = 1
    interval_s: float = 1.0
    live: bool = True
    stop_after_decision: bool = False  # end at the first promotion or rollback (tests)

    @property
    def keys(self) -> protocol.Keys:
        return protocol.Keys(self.namespace, self.name)
