"""Evaluation and publishing: is a checkpoint worth a canary, and offering it.

The gate is offline: the trainer's draft and the revision stable now are both run
over the held-out traces (`objective.evaluate`, the accept length chain drafting
would reach on them), and a checkpoint is offered as a candidate only when it beats
stable by ``publish_margin`` and reaches ``min_accept_length``. What the live canary
then measures is the rollout's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from aurora.runtime import protocol
from aurora.runtime.checkpoint import CheckpointError, load_checkpoint, load_draft
from aurora.runtime.draft import EagleDraftHead
from aurora.runtime.protocol import Builtin
from aurora.runtime.trainer.objective import TraceExample, evaluate
from aurora.runtime.trainer.serve_checkpoints import revision_url

log = logging.getLogger(__name__)


class Publisher:
    """Evaluates against what is stable and offers candidates for one Speculator."""

    def __init__(
        self,
        client: Any,
        keys: protocol.Keys,
        target: Any,
        *,
        spec_tokens: int,
        publish_margin: float,
        min_accept_length: float,
        advertise_url: str | None = None,
    ) -> None:
        self.redis, self.keys, self.target = client, keys, target
        self.k, self.margin, self.floor = spec_tokens, publish_margin, min_accept_length
        self.advertise_url = advertise_url  # where servers download (serve_checkpoints.py)
        self._stable_cache: tuple[str, tuple[str, ...], float] | None = None

    def stable_revision(self) -> protocol.RevisionRef | None:
        desired = protocol.get_desired(self.redis, self.keys)
        return desired.stable if desired else None

    def stable_accept_length(self, examples: Sequence[TraceExample]) -> tuple[str, float]:
        """(name, offline accept length) of what is stable now: the n-gram proposer, a
        checkpoint, or no draft (1.0). Cached while stable and the examples stay the same."""
        stable = self.stable_revision()
        name = stable.revision if stable else Builtin.NONE
        # By trace ids, not count: once full, the held-out set rolls at a fixed size.
        key = (str(name), tuple(ex.trace_id for ex in examples))
        if self._stable_cache and self._stable_cache[:2] == key:
            return key[0], self._stable_cache[2]
        if name == Builtin.NGRAM:
            value = evaluate(examples, self.k)["accept_length"]
        elif stable is not None and name not in (Builtin.NONE, Builtin.SCRATCH) and stable.path:
            try:
                head, _ = load_draft(stable.path, self.target)
                value = evaluate(examples, self.k, head)["accept_length"]
            except CheckpointError as err:
                log.warning("cannot evaluate stable %s: %s", name, err)
                value = 1.0
        else:
            value = 1.0
        self._stable_cache = (*key, value)
        return key[0], value

    def evaluate(self, head: EagleDraftHead, examples: Sequence[TraceExample]) -> dict[str, Any]:
        """The evaluation a checkpoint carries: its offline accept length and stable's."""
        mine = evaluate(examples, self.k, head)
        stable_name, stable_tau = self.stable_accept_length(examples)
        return {
            "candidate": mine["accept_length"],
            "stable": stable_tau,
            "stable_revision": stable_name,
            "per_domain": mine["per_domain"],
            "heldout_traces": len(examples),
            "k": self.k,
        }

    def needed(self, evaluation: dict[str, Any]) -> float:
        """The offline accept length a candidate must reach."""
        return max(float(evaluation["stable"]) * (1 + self.margin), self.floor)

    def offer(self, path: Path) -> None:
        """Offer the checkpoint at ``path`` as a candidate, with the URL servers that
        share no volume with the trainer download it from (when it serves them)."""
        _, meta = load_checkpoint(path)
        record = meta.to_candidate(path)
        if self.advertise_url:
            record = record.model_copy(
                update={"url": revision_url(self.advertise_url, meta.revision)}
            )
        protocol.offer_candidate(self.redis, self.keys, record)

    def protected(self, published: str | None) -> set[str]:
        """Revisions pruning must keep: stable, on canary, and the last one offered."""
        desired = protocol.get_desired(self.redis, self.keys)
        refs = [desired.stable, desired.candidate] if desired else []
        revisions = {r.revision for r in refs if r is not None}
        # hybrid:<revision> is served from its head's checkpoint (the rollout's hybrid canaries)
        heads = {protocol.head_of(r) for r in revisions}
        return revisions | heads | ({published} if published else set())

    def status(self, fields: dict[str, Any]) -> None:
        """Write the trainer's status hash (what `aurora local` and operators read)."""
        values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
        values["updated"] = time.time()
        with contextlib.suppress(redis.RedisError):
            self.redis.hset(self.keys.trainer, mapping={k: str(v) for k, v in values.items()})

    def clear_error(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.hdel(self.keys.trainer, "error")
