"""A full or read-only checkpoint volume: the trainer reports it, acknowledges nothing
it could not checkpoint, never damages the last good checkpoint, and carries on once
the volume is usable again. Real kernel errors (ENOSPC, EROFS) from a private tmpfs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from reliability_support import FaultyVolume, fresh_copies

from aurora.runtime import protocol
from aurora.runtime.checkpoint import TMP_PREFIX, CheckpointStore, load_checkpoint
from aurora.runtime.protocol import TraceRecord
from aurora.runtime.trainer.config import TrainerConfig
from aurora.runtime.trainer.delivery import GROUP
from aurora.runtime.trainer.trainer import Trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS = protocol.Keys("default", "volume")


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.traces, GROUP)["pending"])


def trained_trainer(
    model: tuple[Any, Any], client: redis.Redis, url: str, root: Path, records: list[TraceRecord]
) -> Trainer:
    """A trainer on ``root`` that has read ``records`` and taken optimizer steps."""
    for record in records:
        protocol.publish_trace(client, KEYS, record, maxlen=10_000)
    config = TrainerConfig(
        speculator=f"{KEYS.namespace}/{KEYS.name}", redis_url=url, checkpoint_dir=root,
        draft_vocab=512, batch_size=4, first_candidate_after=10**6, checkpoint_every=10**6,
        holdout_every=0, block_ms=10,
    )  # fmt: skip
    trainer = Trainer(config, *model)
    trainer.resume()
    while trainer.step < 2 or trainer.fresh:
        trainer.tick()
    return trainer


def more_steps(trainer: Trainer, client: redis.Redis, records: list[TraceRecord]) -> None:
    for record in records:
        protocol.publish_trace(client, KEYS, record, maxlen=10_000)
    target = trainer.step + 2
    while trainer.step < target or trainer.fresh:
        trainer.tick()


FAULTS = [  # (name, make the volume refuse writes, make it usable again, what the report says)
    ("full", FaultyVolume.fill, FaultyVolume.free, "the disk is full"),
    (
        "read-only",
        lambda v: v.read_only(True),
        lambda v: v.read_only(False),
        "not writable",
    ),
]


def test_a_volume_that_refuses_writes_is_reported_and_the_last_good_checkpoint_survives(
    model: tuple[Any, Any],
    served_traces: list[TraceRecord],
    volume: FaultyVolume,
    redis_client: redis.Redis,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a trainer whose last good checkpoint is on the volume, everything acked
    root = volume.path / "checkpoints"
    trainer = trained_trainer(model, redis_client, redis_url, root, served_traces)
    good = trainer.checkpoint()
    assert good is not None and pending(redis_client) == 0
    store = CheckpointStore(root)
    for name, fault, heal, why in FAULTS:
        good_files = {p.name: p.read_bytes() for p in (root / good).iterdir()}
        kept = [m.revision for m in store.list()]
        # When the volume refuses writes and the trainer trains on new traces and checkpoints
        fault(volume)
        more_steps(trainer, redis_client, fresh_copies(served_traces[:4], 1))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="aurora.runtime.trainer.trainer"):
            assert trainer.checkpoint() is None, name
        # Then it says why in its log and in its status in Redis
        assert why in caplog.text, name
        status = {k.decode(): v.decode() for k, v in redis_client.hgetall(KEYS.trainer).items()}
        assert why in status["error"] and status["checkpoint"] == good, name
        # and the new traces stay pending (retried later, not lost)
        assert pending(redis_client) == 4, name
        # and the last good checkpoint is intact, still the latest, with no half-written one
        assert [m.revision for m in store.list()] == kept and kept[-1] == good, name
        assert {p.name: p.read_bytes() for p in (root / good).iterdir()} == good_files, name
        load_checkpoint(root / good)
        assert not [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)], name
        # When the volume is usable again, the next checkpoint incorporates and acks them
        heal(volume)
        newer = trainer.checkpoint()
        assert newer is not None and pending(redis_client) == 0, name
        assert [m.revision for m in store.list()] == [*kept, newer], name
        # and the status no longer reports the error
        assert not redis_client.hget(KEYS.trainer, "error"), name
        good = newer
