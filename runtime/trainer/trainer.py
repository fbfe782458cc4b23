"""The online trainer: one training loop over live traces.

    resume()                      the latest checkpoint, or the initial draft, or scratch
    loop:
      receive traces              delivery.py: read, claim, dead-letter (the delivery contract)
      featurise them              objective.build_example: the target replica's features
      (day 0) choose a vocabulary from the first traces and the built-in workloads
      hold out one prompt in N    by a hash of its token ids: the gate's unseen prompts
      one optimizer step          step.py, on fresh traces mixed with replayed ones
      checkpoint, then ack        every ``checkpoint_every`` steps
      evaluate and publish        publish.py: beat stable on the held-out prompts, offer it

Several trainer processes form one data-parallel job with torch.distributed (gloo on CPU,
NCCL on GPU): every rank reads its share of the stream, gradients are all-reduced
(step.py), rank 0 writes checkpoints and publishes candidates.
"""

from __future__ import annotations

import hashlib
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aurora.runtime import protocol
from aurora.runtime.checkpoint import (
    CheckpointError,
    CheckpointStore,
    load_draft,
    new_revision_id,
)
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.models import load_target
from aurora.runtime.protocol import Builtin, TraceRecord
from aurora.runtime.trainer.config import TrainerConfig
from aurora.runtime.trainer.delivery import GROUP, TraceDelivery
from aurora.runtime.trainer.objective import (
    Objective,
    TraceExample,
    build_example,
    build_vocabulary,
)
from aurora.runtime.trainer.publish import Publisher
from aurora.runtime.trainer.step import distributed, global_sum, make_optimizer, optimizer_step

log = logging.getLogger(__name__)

__all__ = ["GROUP", "ReplayBuffer", "Trainer", "TrainerConfig", "held_out"]


def held_out(prompt_ids: Sequence[int], every: int) -> bool:
    """Whether a prompt belongs to the held-out set: one prompt in ``every``, by a stable
    hash of its token ids, so every trace of a prompt lands on the same side and the gate
    measures the draft on prompts it never trained on."""
    if every <= 0:
        return False
    digest = hashlib.sha256(struct.pack(f"<{len(prompt_ids)}I", *prompt_ids)).digest()
    return int.from_bytes(digest[:8], "little") % every == 0


def objective_of(config: TrainerConfig) -> Objective:
    return Objective(
        ttt_steps=config.ttt_steps,
        step_decay=config.step_decay,
        lambda_discard=config.lambda_discard,
        lambda_reject=config.lambda_reject,
        reject_term=config.reject_term,
    )


class ReplayBuffer:
    """Featurised traces within a memory bound; the oldest are evicted first."""

    def __init__(self, max_bytes: int, seed: int = 0) -> None:
        self.max_bytes, self.items, self.bytes = max_bytes, deque[TraceExample](), 0
        self.rng = random.Random(seed)

    def add(self, ex: TraceExample) -> None:
        self.items.append(ex)
        self.bytes += ex.nbytes()
        while self.bytes > self.max_bytes and len(self.items) > 1:
            self.bytes -= self.items.popleft().nbytes()

    def sample(self, n: int) -> list[TraceExample]:
        return self.rng.sample(list(self.items), min(n, len(self.items)))

    def __len__(self) -> int:
        return len(self.items)


class Trainer:
    def __init__(self, config: TrainerConfig, target: Any = None, tokenizer: Any = None) -> None:
        self.config = config
        self.keys = config.keys
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.redis: Any = protocol.connect(config.redis_url, timeout=None)
        if target is None:
            target, tokenizer = load_target(config.model, device=config.device, serves=False)
        self.target, self.tokenizer = target, tokenizer
        self.draft_config = DraftConfig.for_target(
            target.config,
            config.model,
            fuse_layers=config.fuse_layers,
            draft_vocab_size=config.draft_vocab,
        )
        self.head = EagleDraftHead(self.draft_config, target.get_input_embeddings()).to(
            config.device
        )
        self.optimizer = make_optimizer(self.head, config.lr, config.weight_decay)
        self.delivery = TraceDelivery(
            self.redis,
            self.keys,
            config.consumer,
            vocab_size=int(target.get_input_embeddings().num_embeddings),
            batch_size=config.batch_size,
            reclaim_idle_ms=config.reclaim_idle_ms,
            trace_maxlen=config.trace_maxlen,
        )
        self.publisher = Publisher(
            self.redis,
            self.keys,
            target,
            spec_tokens=config.spec_tokens,
            publish_margin=config.publish_margin,
            min_accept_length=config.min_accept_length,
            advertise_url=config.advertise_url,
        )
        self.store = CheckpointStore(config.checkpoint_dir, keep=config.keep)
        self.replay = ReplayBuffer(config.replay_bytes, config.seed + self.rank)
        self.fresh: list[tuple[str, TraceExample]] = []  # (entry id, example) not yet trained on
        self.heldout: deque[tuple[str, TraceExample]] = deque(maxlen=config.holdout_size)
        self.vocab_ready = False
        self.step = 0
        self.traces_seen = 0
        self.traces_since_publish = 0
        self.revision: str | None = None  # latest checkpoint
        self.published: str | None = None
        self.last_loss = float("nan")
        self.step_budget = 0.0
        self._t2d: torch.Tensor | None = None
        self._waiting: list[tuple[str, TraceRecord]] = []  # for the day-0 vocabulary
        self._attempted, self._attempt_step = False, 0
        self._checkpoint_failed = False  # the status reports an error until one succeeds

    # ------------------------------------------------------------------ the loop

    def run(self, *, max_steps: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Run until ``stop()`` is true (or max_steps optimizer steps). With several
        ranks every iteration makes the same collective calls on every rank."""
        self.resume()
        last_status = 0.0
        while not (stop and stop()) and (max_steps is None or self.step < max_steps):
            self.tick()
            if time.monotonic() - last_status > 2.0:
                self._status()
                last_status = time.monotonic()
        self._drain()
        if self.delivery.unacked or distributed():
            self.checkpoint()
        self._status(**{f"weights_rank{self.rank}": self.weights_digest()})

    def tick(self) -> bool:
        """One iteration of the loop, after ``resume()``: read and featurise what arrived
        (blocking up to ``block_ms`` only when idle; 0 never blocks), one optimizer step
        when there is something to train on (a checkpoint every ``checkpoint_every``
        steps), and a candidate when one is due. Returns whether it stepped. ``run`` calls
        it in a loop; a driver that time-slices the trainer (`aurora bench adapt`) calls
        it directly."""
        busy = self.step_budget >= 1 or bool(self.fresh)
        self.ingest(self.delivery.receive(0 if busy else self.config.block_ms))
        self._ensure_vocabulary()
        stepped = self.vocab_ready and self.train_step()
        if stepped and self.step % self.config.checkpoint_every == 0:
            self.checkpoint()
        if self.vocab_ready:
            self.maybe_publish()
        return stepped

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Load the latest checkpoint (weights, optimizer, counters, held-out set),
        or the configured initial draft, or start from scratch."""
        latest = self.store.latest()
        source = None
        if latest is not None:
            source = self.store.path(latest.revision)
        elif self.config.init not in (Builtin.SCRATCH, ""):
            source = Path(self.config.init)
        if source is not None:
            self.head, meta = load_draft(
                source, self.target, device=self.config.device, trainable=True
            )
            self.draft_config = self.head.config
            self.optimizer = make_optimizer(self.head, self.config.lr, self.config.weight_decay)
            self.vocab_ready = True
            self.revision = meta.revision
            if latest is not None:
                self._restore_trainer_state(meta.revision)
            log.info(
                "resumed from %s (step %d, %d traces)", meta.revision, self.step, self.traces_seen
            )
        if distributed():
            for p in self.head.state_dict().values():
                dist.broadcast(p, 0)
        self._t2d = self.head.target_to_draft()
        self.delivery.open()

    def _restore_trainer_state(self, revision: str) -> None:
        state = self.store.load_trainer_state(revision)
        if state is None:
            return
        tensors, info = state
        self.step, self.traces_seen = int(info["step"]), int(info["traces_seen"])
        self.published = info.get("published")
        self.delivery.already_incorporated = set(info.get("incorporated_ids", []))
        opt_state: dict[str, Any] = {"state": {}, "param_groups": info["optimizer_param_groups"]}
        for name, tensor in tensors.items():
            index, key = name.split(".", 1)
            opt_state["state"].setdefault(int(index), {})[key] = tensor
        self.optimizer.load_state_dict(opt_state)
        for entry_id in info.get("heldout_entries", []):
            record = self.delivery.read_entry(entry_id)
            if record is not None:  # None: trimmed away by retention
                self.heldout.append((entry_id, build_example(self.target, self.head, record)))

    # ------------------------------------------------------------------ data

    def ingest(self, traces: list[tuple[str, TraceRecord]]) -> int:
        """Featurise what delivery handed over. Returns how many new traces arrived."""
        arrived = 0
        for entry_id, record in traces:
            if len(record.output_ids) < 2:  # nothing to learn; acked at the next checkpoint
                self.delivery.incorporated(entry_id, record.trace_id)
                continue
            if not self.vocab_ready:
                self._waiting.append((entry_id, record))
                continue
            self._featurise(entry_id, record)
            arrived += 1
        return arrived

    def _featurise(self, entry_id: str, record: TraceRecord) -> None:
        example = build_example(self.target, self.head, record)
        if held_out(record.prompt_ids, self.config.holdout_every):
            self.heldout.append((entry_id, example))
            self.delivery.incorporated(entry_id, record.trace_id)
        else:
            self.fresh.append((entry_id, example))
            self.step_budget += self.config.steps_per_trace

    def _ensure_vocabulary(self) -> None:
        """Day 0: choose the draft vocabulary from the first traces plus the built-in
        workloads' prompts, so tokens of other domains are not missing."""
        if self.vocab_ready:
            return
        (waiting,) = global_sum(len(self._waiting))
        if waiting < min(8, self.config.first_candidate_after):
            return
        from aurora.runtime import workloads

        streams = [[*r.prompt_ids, *r.output_ids] for _, r in self._waiting] * 4
        for domain in workloads.domains():
            for prompt in workloads.load_domain(domain)[:200]:
                streams.append(self.tokenizer(prompt.text).input_ids)
        vocab = build_vocabulary(
            streams, self.draft_config.draft_vocab_size, self.draft_config.target_vocab_size
        )
        if distributed():
            dist.broadcast(vocab, 0)
        self.head.set_vocabulary(vocab)
        self._t2d = self.head.target_to_draft()
        self.vocab_ready = True
        waiting_records, self._waiting = self._waiting, []
        for entry_id, record in waiting_records:
            self._featurise(entry_id, record)
        log.info("draft vocabulary of %d tokens chosen from %d traces", vocab.numel(), waiting)

    # ------------------------------------------------------------------ train

    def train_step(self) -> bool:
        """One optimizer step on fresh traces mixed with replayed ones."""
        c = self.config
        n_fresh = min(len(self.fresh), max(1, round(c.batch_size * (1 - c.replay_fraction))))
        batch_fresh, self.fresh = self.fresh[:n_fresh], self.fresh[n_fresh:]
        may_replay = bool(batch_fresh) or self.step_budget >= 1
        replay = self.replay.sample(c.batch_size - len(batch_fresh)) if may_replay else []
        loss = optimizer_step(
            self.head,
            self.optimizer,
            [ex for _, ex in batch_fresh] + replay,
            objective_of(c),
            lr=c.lr * min(1.0, (self.step + 1) / max(1, c.warmup_steps)),
            clip=c.clip,
            t2d=self._t2d,
        )
        if loss is None:
            return False
        self.step += 1
        self.step_budget = max(0.0, self.step_budget - 1)
        self.last_loss = loss
        for entry_id, ex in batch_fresh:
            self.replay.add(ex)
            self.delivery.incorporated(entry_id, ex.trace_id)
            self.traces_seen += 1
            self.traces_since_publish += 1
        return True

    def _drain(self) -> None:
        """On a clean stop, train on what was read but not yet trained on, so the
        final checkpoint incorporates it (collective with several ranks)."""
        while self.vocab_ready and global_sum(len(self.fresh))[0] > 0:
            self.train_step()

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self, evaluation: dict[str, Any] | None = None) -> str | None:
        """Write weights and trainer state atomically, then ack what they incorporate.
        Collective with several ranks: rank 0 writes, every rank acks its own entries."""
        revision, ok = None, 1.0
        if self.rank == 0:
            revision = new_revision_id(self.step)
            try:
                self.store.save(
                    revision,
                    {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                    parent=self.revision,
                    step=self.step,
                    traces_seen=self.traces_seen,
                    evaluation=evaluation or {},
                    draft_config=self.draft_config.to_dict(),
                    **self._trainer_state(),
                    protect=self.publisher.protected(self.published),
                )
                self.revision = revision
                if self._checkpoint_failed:
                    self._checkpoint_failed = False
                    log.info("checkpoint %s written: the checkpoint volume works again", revision)
                    self.publisher.clear_error()
            except CheckpointError as err:
                # Nothing is acked: the traces stay pending and are retried.
                log.error("checkpoint failed, nothing acknowledged: %s", err)
                self._checkpoint_failed = True
                self._status(error=str(err))
                revision, ok = None, 0.0
        if distributed():
            flag = torch.tensor([ok])
            dist.broadcast(flag, 0)
            ok = float(flag)
        if ok == 0:
            return None
        self.delivery.ack_incorporated()
        return revision

    def _trainer_state(self) -> dict[str, Any]:
        """What a restart needs besides the weights: optimizer tensors and counters."""
        opt = self.optimizer.state_dict()
        tensors = {
            f"{index}.{key}": value
            for index, state in opt["state"].items()
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        }
        info = {
            "step": self.step,
            "traces_seen": self.traces_seen,
            "published": self.published,
            "optimizer_param_groups": opt["param_groups"],
            "incorporated_ids": list(self.delivery.unacked.values()),
            "heldout_entries": [e for e, _ in self.heldout],
        }
        return {"trainer_state": tensors, "trainer_json": info}

    # ------------------------------------------------------------------ publish

    def maybe_publish(self) -> str | None:
        """Evaluate and checkpoint when a candidate is due (enough new traces, or more
        training since the last attempt); offer it when it passes the gate."""
        c = self.config
        due = c.first_candidate_after if self.published is None else c.publish_every
        since_publish, heldout = global_sum(self.traces_since_publish, len(self.heldout))
        enough_traces = since_publish >= due
        more_training = (
            self._attempted and self.step - self._attempt_step >= c.reevaluate_every_steps
        )
        if not (enough_traces or more_training) or heldout == 0:
            return None
        if not enough_traces and self.traces_seen < c.first_candidate_after:
            return None
        self.traces_since_publish = 0
        self._attempted, self._attempt_step = True, self.step
        if self.rank != 0 or not self.heldout:
            self.checkpoint()
            return None
        evaluation = self.publisher.evaluate(self.head, [ex for _, ex in self.heldout])
        revision = self.checkpoint(evaluation)
        if revision is None:
            return None
        self._status(last_evaluation=evaluation)
        needed = self.publisher.needed(evaluation)
        if evaluation["candidate"] < needed:
            log.info(
                "not publishing %s: offline accept length %.2f, needs %.2f (stable %s: %.2f)",
                revision,
                evaluation["candidate"],
                needed,
                evaluation["stable_revision"],
                evaluation["stable"],
            )
            return None
        self.publisher.offer(self.store.path(revision))
        self.published = revision
        log.info(
            "published candidate %s: offline accept length %.2f vs stable %s %.2f",
            revision,
            evaluation["candidate"],
            evaluation["stable_revision"],
            evaluation["stable"],
        )
        return revision

    # ------------------------------------------------------------------ report

    @property
    def checkpoint_failing(self) -> bool:
        """The last checkpoint write failed and none has succeeded since."""
        return self._checkpoint_failed

    def lag(self) -> int:
        return self.delivery.lag()

    def _status(self, **extra: Any) -> None:
        self.publisher.status(
            {
                "step": self.step,
                "traces_seen": self.traces_seen,
                "loss": self.last_loss,
                "checkpoint": self.revision or "",
                "published": self.published or "",
                "heldout": len(self.heldout),
                "replay": len(self.replay),
                "lag": self.lag(),
                **extra,
            }
        )

    def weights_digest(self) -> str:
        """A digest of the draft weights: equal on every rank of a data-parallel job."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.head.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
