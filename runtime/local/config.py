"""`aurora local`'s configuration as plain data; each knob is a flag of `aurora local`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurora.runtime import protocol
from aurora.runtime.models import model_knob
from aurora.runtime.options import knob
from aurora.runtime.rollout import RolloutPolicy, server_day_zero

# `aurora local`'s rollout policy where it differs from the policy's defaults (which suit
# a cluster): fewer samples and a larger baseline, so a short CPU demo reaches decisions.
# minSamples 12 is just above what the gate's confidence sequence needs (10); 60 candidate
# requests (about 150 requests, some 6 minutes of a CPU demo) bound an unclear canary.
LOCAL_ROLLOUT: dict[str, Any] = {
    "min_samples": 12,
    "canary_share": "0.4",
    "baseline_share": "0.2",
    "max_canary_samples": 60,
    "on_inconclusive": "Rollback",
}


@dataclass
class LocalConfig:
    model: str = model_knob()
    schedule: str = knob(
        "code:60,prose:400",
        "traffic schedule: day-0 code traffic, then a shift to prose by default (see "
        "`aurora workload show`)",
    )
    # The first phase lasts at least its count and until `shift_delay` requests after the
    # `shift_after_promotions`-th promotion (at most `hold_limit` x its count), so the domain
    # shift lands on a draft that has proven itself; 0 promotions: follow the counts.
    shift_delay: int = 16
    hold_limit: float = 3.0
    shift_after_promotions: int = knob(
        2,
        f"hold the schedule's first phase (at least its count, at most {hold_limit:g}x) until "
        f"{shift_delay} requests after the K-th promotion, so the domain shift lands on a "
        "draft that has proven itself; 0 follows the phase counts as written",
        metavar="K",
    )
    # Servers decode one request at a time by default (two clients on two cores gain little
    # from batching); with more, a server routes each batch's cohort to one arm with one
    # draw, so the live A/B stays unbiased (runtime/server/worker.py).
    server_max_batch: int = knob(
        1,
        "rows per batch on each server (> 1: each batch cohort is routed to one arm, so "
        "every arm sees the same batch sizes)",
        flag="--max-batch",
    )
    distinct_prompts: int = knob(
        40,
        "recurring traffic: each domain cycles through this many distinct prompts, as a "
        "service with recurring requests does (0 = all prompts of the domain)",
    )
    seed: int = knob(0, "traffic and routing seed")
    minutes: float = knob(14.0, "stop after this long")
    redis_url: str | None = knob(None, "use this Redis instead of an embedded one")
    servers: int = knob(1, "inference server processes")
    clients: int = knob(2, "concurrent traffic clients")
    max_new_tokens: int = knob(32, "tokens generated per request")
    spec_tokens: int = knob(3, "draft tokens per verify step (k)")
    initial_draft: protocol.Builtin = knob(
        protocol.Builtin.SUFFIX,
        "day-0 stable draft: suffix (model-free suffix decoding over the prompt and every "
        "output served; learned candidates must beat it), none (serve without speculation "
        "until a trained draft proves faster), ngram (model-free prompt lookup) or scratch "
        "(untrained head)",
    )
    workdir: Path = knob(
        Path("aurora-local"),
        "checkpoints, logs and the report go here; an earlier run's checkpoints there are "
        "removed at start, since every run begins at day 0",
    )
    report_dir: Path | None = knob(None, "report folder, WORKDIR/report when off")
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
    live: bool = knob(True, "the live terminal view (--no-live: log lines only)")
    stop_after_decision: bool = False  # end at the first promotion or rollback (tests)

    @property
    def server_draft(self) -> str:
        """What servers start with: plain decoding while a gated day-0 draft is canaried."""
        return server_day_zero(self.initial_draft, self.rollout)

    @property
    def keys(self) -> protocol.Keys:
        return protocol.Keys(self.namespace, self.name)
