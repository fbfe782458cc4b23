"""Trace delivery: the trainer's side of the trace stream (read, claim, ack, dead-letter).

Delivery contract (what "incorporated" means). A trace entry is acknowledged
(XACK) only once it is *incorporated*, which is one of:
  - its gradient went into an optimizer step whose weights and optimizer state
    are in a checkpoint on disk (the ack happens right after that checkpoint);
  - it was held out for evaluation and the checkpoint lists its entry id (the
    held-out set is re-read from the stream on resume);
  - it was malformed, or inconsistent, and now sits in the dead-letter stream with
    the reason;
  - its trace id is listed in the latest checkpoint as already incorporated
    (a re-delivery after a crash between checkpoint and XACK).
Everything else stays pending in the consumer group. A trainer killed at any
moment loses nothing: on restart it resumes from its latest checkpoint and
reclaims pending entries (its own first, and with XAUTOCLAIM those that dead
consumers left pending for ``reclaim_idle_ms``).

With several data-parallel ranks each reads its share of the stream through the
same consumer group and acks its own entries after the shared checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from aurora.runtime import protocol
from aurora.runtime.protocol import TraceRecord

log = logging.getLogger(__name__)

GROUP = "trainer"


class TraceDelivery:
    """The consumer ``consumer`` of the trainer's group on one Speculator's trace stream.

    ``receive`` hands over decoded, learnable traces; the trainer calls ``incorporated``
    for each one its next checkpoint will cover and ``ack_incorporated`` once that
    checkpoint is on disk."""

    def __init__(
        self,
        client: Any,
        keys: protocol.Keys,
        consumer: str,
        *,
        vocab_size: int,
        batch_size: int,
        reclaim_idle_ms: int,
        trace_maxlen: int,
    ) -> None:
        self.redis, self.keys, self.consumer = client, keys, consumer
        self.vocab_size, self.batch_size = vocab_size, batch_size
        self.reclaim_idle_ms, self.trace_maxlen = reclaim_idle_ms, trace_maxlen
        self.unacked: dict[str, str] = {}  # entry id -> trace id, incorporated since the last ack
        self.already_incorporated: set[str] = set()  # trace ids listed in the latest checkpoint
        self._own_pending_read = False
        self._last_reclaim = 0.0

    def open(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
            self.redis.xgroup_create(self.keys.traces, GROUP, id="0", mkstream=True)

    # ------------------------------------------------------------------ read

    def receive(self, block_ms: int) -> list[tuple[str, TraceRecord]]:
        """(entry id, record) of the traces read now, blocking up to ``block_ms`` when
        nothing is waiting (0: never). Malformed, inconsistent or foreign entries are
        dead-lettered and re-deliveries of incorporated traces acked on the way."""
        traces = []
        for entry_id, fields in self._read(block_ms):
            try:
                record = protocol.decode_trace(fields)
            except protocol.TraceDecodeError as err:
                self.dead_letter(entry_id, fields, err.reason)
                continue
            if reason := self.unfit(record):
                self.dead_letter(entry_id, fields, reason)
                continue
            if record.trace_id in self.already_incorporated:  # re-delivery: in a checkpoint
                self.redis.xack(self.keys.traces, GROUP, entry_id)
                continue
            traces.append((entry_id, record))
        return traces

    def _read(self, block_ms: int) -> list[tuple[str, dict]]:
        """After a restart our own pending entries first, then (now and then) those
        that dead consumers left pending, then new ones."""
        entries: list[tuple[str, dict]] = []
        if not self._own_pending_read:
            own = self.redis.xreadgroup(GROUP, self.consumer, {self.keys.traces: "0"}, count=10_000)
            for _, items in own or []:
                entries += [(_s(i), f) for i, f in items if f]
            self._own_pending_read = True
        if time.monotonic() - self._last_reclaim > self.reclaim_idle_ms / 4000:
            self._last_reclaim = time.monotonic()
            result = self.redis.xautoclaim(
                self.keys.traces,
                GROUP,
                self.consumer,
                self.reclaim_idle_ms,
                start_id="0-0",
                count=self.batch_size * 8,
            )
            claimed = result[1] if result else []
            entries += [(_s(i), f) for i, f in claimed if f]
            for i, f in claimed:  # trimmed while pending: nothing left to learn from
                if not f:
                    self.redis.xack(self.keys.traces, GROUP, i)
        if not entries:
            new = self.redis.xreadgroup(
                GROUP,
                self.consumer,
                {self.keys.traces: ">"},
                count=self.batch_size * 2,
                block=block_ms or None,
            )
            for _, items in new or []:
                entries += [(_s(i), f) for i, f in items]
        return entries

    def read_entry(self, entry_id: str) -> TraceRecord | None:
        """The trace at ``entry_id`` (a held-out trace on resume), or None when retention
        trimmed it away or it does not decode."""
        found = self.redis.xrange(self.keys.traces, entry_id, entry_id)
        if not found:
            return None
        try:
            return protocol.decode_trace(found[0][1])
        except protocol.TraceDecodeError:
            return None

    def unfit(self, record: TraceRecord) -> str | None:
        """Why a decodable trace cannot be learnt from with this target, or None: a
        token id beyond the target's vocabulary (a trace of another model, or a bit
        flip) would fail the embedding lookup and stop the trainer."""
        ids = [*record.prompt_ids, *record.output_ids]
        for step in record.steps:
            ids += step.proposed
            ids += [i for row in step.topk_ids or [] for i in row]
        top = max(ids, default=0)
        if top >= self.vocab_size:
            return (
                f"token id {top} is outside the target's vocabulary (0..{self.vocab_size - 1}): "
                "a trace of another model, or corrupted"
            )
        return None

    # ------------------------------------------------------------------ settle

    def incorporated(self, entry_id: str, trace_id: str) -> None:
        """The next checkpoint covers this entry (trained on, held out, or nothing to learn)."""
        self.unacked[entry_id] = trace_id

    def ack_incorporated(self) -> None:
        """A checkpoint covering every ``incorporated`` entry is on disk: ack them."""
        if self.unacked:
            self.redis.xack(self.keys.traces, GROUP, *self.unacked)
            self.unacked = {}
        self.already_incorporated = set()

    def dead_letter(self, entry_id: str, fields: Mapping[Any, Any], reason: str) -> None:
        protocol.dead_letter(self.redis, self.keys, entry_id, fields, reason, self.trace_maxlen)
        self.redis.xack(self.keys.traces, GROUP, entry_id)
        log.warning("trace entry %s dead-lettered: %s", entry_id, reason)

    def lag(self) -> int:
        """Traces not yet incorporated: never delivered plus pending (`protocol.trace_lag`,
        the figure the operator reports too)."""
        with contextlib.suppress(redis.ResponseError):
            return protocol.trace_lag(self.redis, self.keys)
        return 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
