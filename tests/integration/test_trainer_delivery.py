"""The trainer's delivery against a real redis-server: what it hands to the training
loop, and what it dead-letters with the reason (no model needed)."""

from __future__ import annotations

import struct

import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.protocol import TraceRecord, VerifyStep, encode_trace
from aurora.runtime.trainer.delivery import GROUP, TraceDelivery

pytestmark = pytest.mark.integration

KEYS = protocol.Keys("default", "delivery")


def _record(trace_id: str) -> TraceRecord:
    # prefill 7; a step that accepted 8 of [8, 9] and emitted the correction 11
    return TraceRecord(
        trace_id=trace_id,
        server="test",
        prompt_ids=[5, 6],
        output_ids=[7, 8, 11],
        steps=[VerifyStep(proposed=[8, 9], accepted=1)],
        temperature=0.0,
    )


def _delivery(client: redis.Redis) -> TraceDelivery:
    delivery = TraceDelivery(
        client, KEYS, "c0", vocab_size=100, batch_size=4, reclaim_idle_ms=60_000, trace_maxlen=100
    )
    delivery.open()
    return delivery


def _u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def _u16(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # the target "rejected" 9 and then emitted 9 itself at that position
        ({"output_ids": _u32(7, 8, 9)}, "rejected proposed token 9"),
        # two accepted out of a proposal of two, but the output says otherwise
        ({"accepted": _u16(3)}, "accepted=3 exceeds the 2 proposed"),
        # a token the target's vocabulary does not have
        ({"output_ids": _u32(7, 8, 111)}, "outside the target's vocabulary"),
    ],
)
def test_inconsistent_traces_are_dead_lettered_with_the_reason_and_never_handed_over(
    redis_client: redis.Redis, change: dict[str, bytes], reason: str
) -> None:
    # Given a good trace and an inconsistent one in the stream
    delivery = _delivery(redis_client)
    good = protocol.publish_trace(redis_client, KEYS, _record("good"), maxlen=100)
    bad = redis_client.xadd(KEYS.traces, {**encode_trace(_record("bad")), **change}).decode()
    # When the trainer's delivery reads them
    handed = delivery.receive(0)
    # Then only the good one reaches the training loop
    assert [(entry_id, record.trace_id) for entry_id, record in handed] == [(good, "good")]
    # and the bad one is in the dead-letter stream with its reason, acked (nothing pending)
    dead = redis_client.xrange(KEYS.dead_letter)
    assert [f[b"source_id"].decode() for _, f in dead] == [bad]
    assert reason in dead[0][1][b"reason"].decode()
    pending = redis_client.xpending(KEYS.traces, GROUP)
    assert pending["pending"] == 1  # the good one, until a checkpoint incorporates it


def test_incorporated_entries_are_acked_only_when_the_checkpoint_says_so(
    redis_client: redis.Redis,
) -> None:
    delivery = _delivery(redis_client)
    entry = protocol.publish_trace(redis_client, KEYS, _record("t1"), maxlen=100)
    [(entry_id, record)] = delivery.receive(0)
    delivery.incorporated(entry_id, record.trace_id)
    assert redis_client.xpending(KEYS.traces, GROUP)["pending"] == 1
    delivery.ack_incorporated()
    assert entry_id == entry and redis_client.xpending(KEYS.traces, GROUP)["pending"] == 0
