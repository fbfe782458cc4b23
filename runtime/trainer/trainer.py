"""The online trainer: consume traces, improve the draft, publish candidates.

Delivery contract (what "incorporated" means). A trace entry is acknowledged
(XACK) only once it is *incorporated*, which is one of:
  - its gradient went into an optimizer step whose weights and optimizer state
    are in a checkpoint on disk (the ack happens right after that checkpoint);
  - it was held out for evaluation and the checkpoint lists its entry id (the
    held-out set is re-read from the stream on resume);
  - it was malformed and now sits in the dead-letter stream with the reason;
  - its trace id is listed in the latest checkpoint as already incorporated
    (a re-delivery after a crash between checkpoint and XACK).
Everything else stays pending in the consumer group. A trainer killed at any
moment loses nothing: on restart it resumes from its latest checkpoint and
reclaims pending entries (its own, and with XAUTOCLAIM those of dead consumers).

Several trainer processes form one data-parallel job with torch.distributed
(gloo on CPU, NCCL on GPU): each reads its share of the stream through the same
consumer group, gradients are all-reduced, so every rank holds the same model;
rank 0 writes checkpoints and publishes candidates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
import torch.distributed as dist

from aurora.runtime import protocol
from aurora.runtime.checkpoint import (
    CheckpointError,
    CheckpointStore,
    load_checkpoint,
    new_revision_id,
)
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.models import load_target
from aurora.runtime.trainer.objective import (
    TraceExample,
    aurora_loss,
    build_example,
    build_vocabulary,
    evaluate,
)
from aurora.runtime.trainer.serve_checkpoints import revision_url

log = logging.getLogger(__name__)

GROUP = "trainer"


@dataclass
class TrainerConfig:
    model: str = "smollm2-135m"
    namespace: str = "default"
    name: str = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint_dir: Path = Path("checkpoints")
    # Base URL where servers fetch this trainer's checkpoints (serve_checkpoints.py);
    # None: servers read them from a shared volume at the record's path.
    advertise_url: str | None = None
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    init: str = "scratch"  # or a checkpoint directory
    device: str = "cpu"
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = 4  # traces per optimizer step (per rank)
    lambda_discard: float = 0.5
    ttt_steps: int = 3
    step_decay: float = 0.8
    draft_vocab: int = 4096
    fuse_layers: tuple[int, int, int] | None = None
    spec_tokens: int = 4  # k, for offline evaluation
    first_candidate_after: int = 24  # traces trained on before the first candidate
    publish_every: int = 24  # new traces between candidates
    publish_margin: float = 0.05  # candidate must beat stable's offline accept length by 5 %
    min_accept_length: float = 1.5  # and reach at least this offline accept length
    holdout_every: int = 6  # one trace in N is held out for evaluation
    holdout_size: int = 24
    replay_bytes: int = 512 << 20
    replay_fraction: float = 0.5  # share of each batch drawn from older traces
    steps_per_trace: float = 4.0  # optimizer steps allowed per incorporated trace
    checkpoint_every: int = 10  # optimizer steps
    reevaluate_every_steps: int = 40  # evaluate again after this many steps without new traces
    keep: int = 5
    reclaim_idle_ms: int = 60_000
    block_ms: int = 500
    trace_maxlen: int = 10_000
    seed: int = 0

    @property
    def keys(self) -> protocol.Keys:
        return protocol.Keys(self.namespace, self.name)


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
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.redis: Any = protocol.connect(config.redis_url, timeout=None)
        if target is None:
            target, tokenizer = load_target(config.model, device=config.device)
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
        self.optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.store = CheckpointStore(config.checkpoint_dir, keep=config.keep)
        self.replay = ReplayBuffer(config.replay_bytes, config.seed + self.rank)
        self.fresh: list[tuple[str, TraceExample]] = []  # (entry id, example) not yet trained on
        self.heldout: deque[tuple[str, TraceExample]] = deque(maxlen=config.holdout_size)
        self.unacked: list[str] = []  # entry ids incorporated since the last checkpoint
        self.incorporated_ids: set[str] = set()  # trace ids in the latest checkpoint
        self.vocab_ready = False
        self.step = 0
        self.traces_seen = 0
        self.traces_since_publish = 0
        self.revision: str | None = None  # latest checkpoint
        self.published: str | None = None
        self.last_loss = float("nan")
        self.step_budget = 0.0
        self._stable_eval: tuple[str, tuple[str, ...], float] | None = None
        self._t2d: torch.Tensor | None = None
        self._pending_records: list[tuple[str, Any]] = []  # waiting for the day-0 vocabulary
        self._own_pending_read = False
        self._attempted, self._attempt_step = False, 0
        self._last_reclaim = 0.0
        self._checkpoint_failed = False  # the status reports an error until one succeeds

    # ------------------------------------------------------------------ setup

    def resume(self) -> None:
        """Load the latest checkpoint (weights, optimizer, counters, held-out set),
        or the configured initial draft, or start from scratch."""
        latest = self.store.latest()
        source = None
        if latest is not None:
            source = self.store.path(latest.revision)
        elif self.config.init not in ("scratch", ""):
            source = Path(self.config.init)
        if source is not None:
            tensors, meta = load_checkpoint(source)
            config = DraftConfig.from_dict(meta.draft_config)
            if config != self.draft_config:
                self.draft_config = config
                self.head = EagleDraftHead(config, self.target.get_input_embeddings()).to(
                    self.config.device
                )
                self.optimizer = torch.optim.AdamW(
                    self.head.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
                )
            self.head.load_state_dict(tensors)
            self.vocab_ready = True
            self.revision = meta.revision
            if latest is not None:
                self._restore_trainer_state(meta.revision)
            log.info(
                "resumed from %s (step %d, %d traces)", meta.revision, self.step, self.traces_seen
            )
        if self.world > 1:
            for p in self.head.state_dict().values():
                dist.broadcast(p, 0)
        self._t2d = self.head.target_to_draft()
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
            self.redis.xgroup_create(self.keys.traces, GROUP, id="0", mkstream=True)

    def _restore_trainer_state(self, revision: str) -> None:
        state = self.store.load_trainer_state(revision)
        if state is None:
            return
        tensors, info = state
        self.step, self.traces_seen = int(info["step"]), int(info["traces_seen"])
        self.published = info.get("published")
        self.incorporated_ids = set(info.get("incorporated_ids", []))
        opt_state = {"state": {}, "param_groups": info["optimizer_param_groups"]}
        for name, tensor in tensors.items():
            index, key = name.split(".", 1)
            opt_state["state"].setdefault(int(index), {})[key] = tensor
        self.optimizer.load_state_dict(opt_state)
        for entry_id in info.get("heldout_entries", []):
            self._read_heldout(entry_id)

    def _read_heldout(self, entry_id: str) -> None:
        found = self.redis.xrange(self.keys.traces, entry_id, entry_id)
        if not found:
            return  # trimmed away by retention
        try:
            record = protocol.decode_trace(found[0][1])
        except protocol.TraceDecodeError:
            return
        self.heldout.append((entry_id, build_example(self.target, self.head, record)))

    # ------------------------------------------------------------------ input

    def _read(self, block_ms: int) -> list[tuple[str, dict]]:
        """After a restart our own pending entries first, then (now and then) those
        that dead consumers left pending, then new ones."""
        entries: list[tuple[str, dict]] = []
        if not self._own_pending_read:
            own = self.redis.xreadgroup(
                GROUP, self.config.consumer, {self.keys.traces: "0"}, count=10_000
            )
            for _, items in own or []:
                entries += [(_s(i), f) for i, f in items if f]
            self._own_pending_read = True
        if time.monotonic() - self._last_reclaim > self.config.reclaim_idle_ms / 4000:
            self._last_reclaim = time.monotonic()
            result = self.redis.xautoclaim(
                self.keys.traces,
                GROUP,
                self.config.consumer,
                self.config.reclaim_idle_ms,
                start_id="0-0",
                count=self.config.batch_size * 8,
            )
            claimed = result[1] if result else []
            entries += [(_s(i), f) for i, f in claimed if f]
            for i, f in claimed:  # trimmed while pending: nothing left to learn from
                if not f:
                    self.redis.xack(self.keys.traces, GROUP, i)
        if not entries:
            new = self.redis.xreadgroup(
                GROUP,
                self.config.consumer,
                {self.keys.traces: ">"},
                count=self.config.batch_size * 2,
                block=block_ms or None,
            )
            for _, items in new or []:
                entries += [(_s(i), f) for i, f in items]
        return entries

    def ingest(self, entries: list[tuple[str, dict]]) -> int:
        """Decode, dead-letter, deduplicate and featurise entries. Returns how many
        new training traces arrived."""
        arrived = 0
        for entry_id, fields in entries:
            try:
                record = protocol.decode_trace(fields)
            except protocol.TraceDecodeError as err:
                self._dead_letter(entry_id, fields, err.reason)
                continue
            if reason := self._unfit(record):  # well-formed, but would crash featurising
                self._dead_letter(entry_id, fields, reason)
                continue
            if record.trace_id in self.incorporated_ids:
                self.redis.xack(
                    self.keys.traces, GROUP, entry_id
                )  # re-delivery: already in a checkpoint
                continue
            if len(record.output_ids) < 2:
                self.unacked.append(entry_id)  # nothing to learn; acked at the next checkpoint
                continue
            if not self.vocab_ready:
                self._pending_records.append((entry_id, record))
                continue
            self._featurise(entry_id, record)
            arrived += 1
        return arrived

    def _dead_letter(self, entry_id: str, fields: dict, reason: str) -> None:
        protocol.dead_letter(
            self.redis, self.keys, entry_id, fields, reason, self.config.trace_maxlen
        )
        self.redis.xack(self.keys.traces, GROUP, entry_id)
        log.warning("trace entry %s dead-lettered: %s", entry_id, reason)

    def _unfit(self, record: Any) -> str | None:
        """Why a decodable trace cannot be learnt from with this target, or None: a
        token id beyond the target's vocabulary (a trace of another model, or a bit
        flip) would fail the embedding lookup and stop the trainer."""
        vocab = int(self.target.get_input_embeddings().num_embeddings)
        ids = [*record.prompt_ids, *record.output_ids]
        for step in record.steps:
            ids += step.proposed
            ids += [i for row in step.topk_ids or [] for i in row]
        top = max(ids, default=0)
        if top >= vocab:
            return (
                f"token id {top} is outside the target's vocabulary (0..{vocab - 1}): "
                "a trace of another model, or corrupted"
            )
        return None

    def _featurise(self, entry_id: str, record: Any) -> None:
        example = build_example(self.target, self.head, record)
        if _held_out(record.trace_id, self.config.holdout_every):
            self.heldout.append((entry_id, example))
            self.unacked.append(entry_id)
        else:
            self.fresh.append((entry_id, example))
            self.step_budget += self.config.steps_per_trace

    def _ensure_vocabulary(self) -> None:
        """Day 0: choose the draft vocabulary from the first traces plus the built-in
        workloads' prompts, so tokens of other domains are not missing."""
        if self.vocab_ready:
            return
        waiting = torch.tensor([len(self._pending_records)], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(waiting)
        if float(waiting) < min(8, self.config.first_candidate_after):
            return
        from aurora.runtime import workloads

        streams = [[*r.prompt_ids, *r.output_ids] for _, r in self._pending_records] * 4
        for domain in workloads.domains():
            for prompt in workloads.load_domain(domain)[:200]:
                streams.append(self.tokenizer(prompt.text).input_ids)
        vocab = build_vocabulary(
            streams, self.draft_config.draft_vocab_size, self.draft_config.target_vocab_size
        )
        if self.world > 1:
            dist.broadcast(vocab, 0)
        self.head.set_vocabulary(vocab)
        self._t2d = self.head.target_to_draft()
        self.vocab_ready = True
        pending, self._pending_records = self._pending_records, []
        for entry_id, record in pending:
            self._featurise(entry_id, record)
        log.info("draft vocabulary of %d tokens chosen from %d traces", vocab.numel(), len(pending))

    # ------------------------------------------------------------------ training

    def train_step(self) -> bool:
        """One optimizer step on fresh traces mixed with replayed ones."""
        c = self.config
        n_fresh = min(len(self.fresh), max(1, round(c.batch_size * (1 - c.replay_fraction))))
        batch_fresh, self.fresh = self.fresh[:n_fresh], self.fresh[n_fresh:]
        may_replay = bool(batch_fresh) or self.step_budget >= 1
        replay = self.replay.sample(c.batch_size - len(batch_fresh)) if may_replay else []
        batch = [ex for _, ex in batch_fresh] + replay
        have = torch.tensor([len(batch)], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(have)
        if float(have) == 0:
            return False
        self.head.train()
        self.optimizer.zero_grad(set_to_none=False)
        total = 0.0
        for ex in batch:
            parts = aurora_loss(
                self.head,
                ex,
                ttt_steps=c.ttt_steps,
                decay=c.step_decay,
                lambda_discard=c.lambda_discard,
                t2d=self._t2d,
            )
            (parts.total / float(have)).backward()
            total += float(parts.total.detach())
        if self.world > 1:
            for p in self.head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), c.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup_steps))
        self.optimizer.step()
        self.head.eval()
        self.step += 1
        self.step_budget = max(0.0, self.step_budget - 1)
        self.last_loss = total / max(1, len(batch))
        for entry_id, ex in batch_fresh:
            self.replay.add(ex)
            self.unacked.append(entry_id)
            self.traces_seen += 1
            self.traces_since_publish += 1
        return True

    # ------------------------------------------------------------------ output

    def checkpoint(self, evaluation: dict[str, Any] | None = None) -> str | None:
        """Write weights and trainer state atomically, then ack what they incorporate.
        Collective with several ranks: rank 0 writes, every rank acks its own entries."""
        revision, ok = None, torch.ones(1)
        if self.rank == 0:
            revision = new_revision_id(self.step)
            opt = self.optimizer.state_dict()
            trainer_state = {
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
                "incorporated_ids": self._unacked_trace_ids(),
                "heldout_entries": [e for e, _ in self.heldout],
            }
            try:
                self.store.save(
                    revision,
                    {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                    parent=self.revision,
                    step=self.step,
                    traces_seen=self.traces_seen,
                    evaluation=evaluation or {},
                    draft_config=self.draft_config.to_dict(),
                    trainer_state=trainer_state,
                    trainer_json=info,
                    protect=self._protected(),
                )
                self.revision = revision
                if self._checkpoint_failed:
                    self._checkpoint_failed = False
                    log.info("checkpoint %s written: the checkpoint volume works again", revision)
                    with contextlib.suppress(redis.RedisError):
                        self.redis.hdel(self.keys.trainer, "error")
            except CheckpointError as err:
                # Nothing is acked: the traces stay pending and are retried.
                log.error("checkpoint failed, nothing acknowledged: %s", err)
                self._checkpoint_failed = True
                self._status(error=str(err))
                revision, ok = None, torch.zeros(1)
        if self.world > 1:
            dist.broadcast(ok, 0)
        if float(ok) == 0:
            return None
        if self.unacked:
            self.redis.xack(self.keys.traces, GROUP, *self.unacked)
            self.unacked = []
        self.incorporated_ids = set()
        return revision

    def _unacked_trace_ids(self) -> list[str]:
        known = {e: ex.trace_id for e, ex in self.heldout}
        known.update({e: ex.trace_id for e, ex in self.fresh})
        ids = []
        for entry_id in self.unacked:
            found = known.get(entry_id)
            if found is None:
                rows = self.redis.xrange(self.keys.traces, entry_id, entry_id)
                if rows:
                    with contextlib.suppress(protocol.TraceDecodeError):
                        found = protocol.decode_trace(rows[0][1]).trace_id
            if found:
                ids.append(found)
        return ids

    def _protected(self) -> set[str]:
        desired = protocol.get_desired(self.redis, self.keys)
        refs = [desired.stable, desired.candidate] if desired else []
        return {r.revision for r in refs if r is not None} | (
            {self.published} if self.published else set()
        )

    def stable_accept_length(self, examples: list[TraceExample]) -> tuple[str, float]:
        """Offline accept length of what is stable now (n-gram, a head, or none)."""
        desired = protocol.get_desired(self.redis, self.keys)
        stable = desired.stable if desired else None
        name = stable.revision if stable else "none"
        # By trace ids, not count: once full, the held-out set rolls at a fixed size.
        key = (name, tuple(ex.trace_id for ex in examples))
        if self._stable_eval and self._stable_eval[:2] == key:
            return name, self._stable_eval[2]
        k = self.config.spec_tokens
        if name == "ngram":
            value = evaluate(examples, k)["accept_length"]
        elif stable is not None and name not in ("none", "scratch") and stable.path:
            try:
                tensors, meta = load_checkpoint(stable.path)
                head = EagleDraftHead(
                    DraftConfig.from_dict(meta.draft_config), self.target.get_input_embeddings()
                )
                head.load_state_dict(tensors)
                value = evaluate(examples, k, head.eval())["accept_length"]
            except CheckpointError as err:
                log.warning("cannot evaluate stable %s: %s", name, err)
                value = 1.0
        else:
            value = 1.0
        self._stable_eval = (name, key[1], value)
        return name, value

    def maybe_publish(self) -> str | None:
        c = self.config
        due = c.first_candidate_after if self.published is None else c.publish_every
        # Also re-evaluate when traffic pauses but training went on (replay steps).
        steps_since = self.step - self._attempt_step
        counts = torch.tensor([self.traces_since_publish, len(self.heldout)], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(counts)
        enough_traces = float(counts[0]) >= due
        more_training = self._attempted and steps_since >= c.reevaluate_every_steps
        if not (enough_traces or more_training) or float(counts[1]) == 0:
            return None
        if not enough_traces and self.traces_seen < c.first_candidate_after:
            return None
        self.traces_since_publish = 0
        self._attempted, self._attempt_step = True, self.step
        if self.rank != 0 or not self.heldout:
            self.checkpoint()
            return None
        examples = [ex for _, ex in self.heldout]
        mine = evaluate(examples, c.spec_tokens, self.head)
        stable_name, stable_tau = self.stable_accept_length(examples)
        evaluation = {
            "candidate": mine["accept_length"],
            "stable": stable_tau,
            "stable_revision": stable_name,
            "per_domain": mine["per_domain"],
            "heldout_traces": len(examples),
            "k": c.spec_tokens,
        }
        revision = self.checkpoint(evaluation)
        if revision is None:
            return None
        needed = max(stable_tau * (1 + c.publish_margin), c.min_accept_length)
        if mine["accept_length"] < needed:
            log.info(
                "not publishing %s: offline accept length %.2f, needs %.2f (stable %s: %.2f)",
                revision,
                mine["accept_length"],
                needed,
                stable_name,
                stable_tau,
            )
            self._status(last_evaluation=evaluation)
            return None
        _, meta = load_checkpoint(self.store.path(revision))
        record = meta.to_candidate(self.store.path(revision))
        if c.advertise_url:
            record = record.model_copy(update={"url": revision_url(c.advertise_url, revision)})
        protocol.offer_candidate(self.redis, self.keys, record)
        self.published = revision
        log.info(
            "published candidate %s: offline accept length %.2f vs stable %s %.2f",
            revision,
            mine["accept_length"],
            stable_name,
            stable_tau,
        )
        self._status(last_evaluation=evaluation)
        return revision

    @property
    def checkpoint_failing(self) -> bool:
        """The last checkpoint write failed and none has succeeded since."""
        return self._checkpoint_failed

    def lag(self) -> int:
        """Traces not yet incorporated: never delivered plus pending (`protocol.trace_lag`,
        the figure the operator reports too)."""
        with contextlib.suppress(redis.ResponseError):
            return protocol.trace_lag(self.redis, self.keys)
        return 0

    def _status(self, **extra: Any) -> None:
        import json

        fields = {
            "step": self.step,
            "traces_seen": self.traces_seen,
            "loss": self.last_loss,
            "checkpoint": self.revision or "",
            "published": self.published or "",
            "heldout": len(self.heldout),
            "replay": len(self.replay),
            "updated": time.time(),
            "lag": self.lag(),
            **{k: json.dumps(v) if isinstance(v, dict) else v for k, v in extra.items()},
        }
        with contextlib.suppress(redis.RedisError):
            self.redis.hset(self.keys.trainer, mapping={k: str(v) for k, v in fields.items()})

    # ------------------------------------------------------------------ loop

    def run(self, *, max_steps: int | None = None, stop: Any = None) -> None:
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
        if self.unacked or self.world > 1:
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
        self.ingest(self._read(0 if busy else self.config.block_ms))
        self._ensure_vocabulary()
        stepped = self.vocab_ready and self.train_step()
        if stepped and self.step % self.config.checkpoint_every == 0:
            self.checkpoint()
        if self.vocab_ready:
            self.maybe_publish()
        return stepped

    def _drain(self) -> None:
        """On a clean stop, train on what was read but not yet trained on, so the
        final checkpoint incorporates it (collective with several ranks)."""
        while self.vocab_ready:
            remaining = torch.tensor([len(self.fresh)], dtype=torch.float32)
            if self.world > 1:
                dist.all_reduce(remaining)
            if float(remaining) == 0:
                return
            self.train_step()

    def weights_digest(self) -> str:
        """A digest of the draft weights: equal on every rank of a data-parallel job."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.head.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def _held_out(trace_id: str, every: int) -> bool:
    import zlib

    return every > 0 and zlib.crc32(trace_id.encode()) % every == 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
