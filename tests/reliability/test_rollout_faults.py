"""A broken draft never ships, and a restarted rollout loop carries on where it was.

A corrupt or NaN checkpoint offered as a candidate: the real server (the default model
behind uvicorn) refuses it before any swap and reports why; the rollout round
(runtime/rollout/loop.py and decision.py, through a real Redis) marks it Rejected and
stable keeps serving. The loop restarted mid-rollout (its memory lost, its state
re-read from Redis as `aurora local` keeps it) resumes without a second canary or
promotion. The operator's own restart against a real API server is in tests/e2e."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from live_server import LiveServer, wait_for
from reliability_support import server_config
from safetensors.torch import load_file, save_file

from aurora.runtime import protocol
from aurora.runtime.chaos import write_revision
from aurora.runtime.checkpoint import DRAFT_FILE, META_FILE
from aurora.runtime.protocol import CandidateRecord, Keys, LoadedReport, RequestStats
from aurora.runtime.rollout import RolloutPolicy, RolloutState, loop

pytestmark = pytest.mark.integration

KEYS = Keys("default", "local")  # the server's default --speculator
POLICY = RolloutPolicy.model_validate(
    {"minSamples": 20, "maxCanarySamples": 100, "bootstrapResamples": 200, "seed": 1}
)


def offer(client: redis.Redis, path: Path, created: float) -> None:
    meta = json.loads((path / META_FILE).read_text())
    record = CandidateRecord(
        revision=path.name, path=str(path), sha256=meta["sha256"], created=created, step=1,
        traces_seen=10, evaluation={"candidate": 2.5, "stable": 2.0},
    )  # fmt: skip
    protocol.offer_candidate(client, KEYS, record)


def flip_a_byte(path: Path) -> str:
    data = bytearray((path / DRAFT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / DRAFT_FILE).write_bytes(bytes(data))
    return "sha256"


def poison_with_nan(path: Path) -> str:
    """NaN weights with a matching sha256 and meta: what a diverged trainer that skipped
    the save-time check would write."""
    tensors = load_file(path / DRAFT_FILE)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name][0] = float("nan")
    save_file(tensors, path / DRAFT_FILE)
    meta = json.loads((path / META_FILE).read_text())
    meta["sha256"] = hashlib.sha256((path / DRAFT_FILE).read_bytes()).hexdigest()
    (path / META_FILE).write_text(json.dumps(meta))
    return "NaN"


@pytest.mark.parametrize("damage", [flip_a_byte, poison_with_nan], ids=["corrupt", "nan"])
def test_a_broken_candidate_is_refused_before_any_swap_rejected_and_stable_keeps_serving(
    damage: Any,
    model: tuple[Any, Any],
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Given a server whose stable revision r-good was promoted earlier
    good = write_revision(model[0], tmp_path, "r-good", 1)
    bad = write_revision(model[0], tmp_path, "r-bad", 2)
    offer(redis_client, good, created=100.0)
    state = RolloutState(stable_revision="r-good", tried_through=100.0)
    window = loop.SampleWindow(size=POLICY.max_canary_samples)
    with LiveServer(server_config(redis_url=redis_url), model) as server:
        first = loop.run_round(redis_client, KEYS, POLICY, state, window, now=1000.0)
        assert first.published is not None and first.published.stable is not None
        wait_for(lambda: (r := loaded(redis_client)) and r.stable == "r-good", "r-good loaded")
        # When the trainer offers a candidate whose checkpoint is corrupt (or holds NaN)
        why = damage(bad)
        offer(redis_client, bad, created=200.0)
        canary = loop.run_round(
            redis_client, KEYS, POLICY, first.decision.new_state, window, now=1010.0
        )
        assert canary.decision.action == "StartCanary" and canary.published is not None
        assert canary.published.candidate is not None
        # Then the server refuses it and says why, still serving r-good alone
        report = wait_for(lambda: (r := loaded(redis_client)) and r.error and r, "the refusal")
        assert why in report.error and "r-bad" in report.error
        assert (report.stable, report.candidate) == ("r-good", None)
        # and the next rollout round rejects it for good, with the server's reason
        rejected = loop.run_round(
            redis_client, KEYS, POLICY, canary.decision.new_state, window, now=1020.0
        )
        assert rejected.decision.action == "Reject" and why in rejected.decision.reason
        assert rejected.decision.new_state.rejected == ["r-bad"]
        assert rejected.decision.new_state.phase == "Idle"
        desired = protocol.get_desired(redis_client, KEYS)
        assert desired is not None and desired.candidate is None
        assert desired.stable is not None and desired.stable.revision == "r-good"
        # and it is never tried again
        later = loop.run_round(
            redis_client, KEYS, POLICY, rejected.decision.new_state, window, now=1030.0
        )
        assert later.decision.action == "None" and not later.changed
        # and every request is served by r-good: the broken draft never served one
        for _ in range(4):
            body = {"text": "def fibonacci(n):", "sampling_params": {"max_new_tokens": 3}}
            reply = server.post("/generate", body)
            assert reply.status_code == 200 and reply.headers["X-Aurora-Revision"] == "r-good"
        assert "r-bad" not in server.client.get("/metrics").text


def loaded(client: redis.Redis) -> LoadedReport | None:
    return protocol.get_loaded(client, KEYS).get("reliability")


def publish_stats(client: redis.Redis, revision: str, arm: str, n: int, rate: float) -> None:
    rng = random.Random(f"{revision}/{arm}/{client.xlen(KEYS.stats)}")
    for _ in range(n):
        stats = RequestStats(
            revision=revision, arm=arm, server="s1",  # type: ignore[arg-type]
            decode_tokens_per_s=rng.gauss(rate, 0.5), accept_length=2.0, new_tokens=32,
            verify_steps=12, latency_s=1.0,
        )  # fmt: skip
        protocol.publish_stats(client, KEYS, stats, maxlen=10_000)


class Driver:
    """The rollout loop as `aurora local` runs it: a round, then the state saved in
    Redis. A restart is a new Driver: empty memory, state read back from Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.window = loop.SampleWindow(size=POLICY.max_canary_samples)
        stored = client.get(KEYS.rollout)
        self.state = RolloutState.model_validate_json(stored) if stored else RolloutState()

    def round(self, now: float, *, persist: bool = True) -> loop.Round:
        result = loop.run_round(self.client, KEYS, POLICY, self.state, self.window, now)
        if persist:
            self.state = result.decision.new_state
            self.client.set(KEYS.rollout, self.state.model_dump_json(by_alias=True))
        return result


def test_a_restarted_loop_resumes_mid_rollout_without_a_second_canary_or_promotion(
    redis_client: redis.Redis,
) -> None:
    # Given a canary of r1 against stable r0, half-way through its samples
    for revision, created in (("r0", 10.0), ("r1", 20.0)):
        record = CandidateRecord(
            revision=revision, path=f"/checkpoints/{revision}", sha256="0" * 64,
            created=created, step=1, traces_seen=1,
        )  # fmt: skip
        protocol.offer_candidate(redis_client, KEYS, record)
    redis_client.set(
        KEYS.rollout, RolloutState(stable_revision="r0", tried_through=10.0).model_dump_json()
    )
    first = Driver(redis_client)
    assert first.round(now=100.0).decision.action == "StartCanary"
    generation = protocol.get_desired(redis_client, KEYS).generation  # type: ignore[union-attr]
    publish_stats(redis_client, "r0", "stable", 15, 20.0)
    publish_stats(redis_client, "r1", "candidate", 15, 30.0)
    assert first.round(now=110.0).decision.action == "Wait"
    # When the loop dies between publishing a round's outcome and saving its state,
    # and a new one starts with no memory
    crashed = Driver(redis_client)
    crashed.round(now=115.0, persist=False)
    second = Driver(redis_client)
    # Then it resumes the canary: no second StartCanary, nothing new for servers
    resumed = second.round(now=120.0)
    assert resumed.decision.action == "Wait" and not resumed.changed
    assert protocol.get_desired(redis_client, KEYS).generation == generation  # type: ignore[union-attr]
    # and its sample window refilled from the stats stream, so the canary completes
    publish_stats(redis_client, "r0", "stable", 10, 20.0)
    publish_stats(redis_client, "r1", "candidate", 10, 30.0)
    assert second.round(now=130.0).decision.action == "Promote"
    # When it restarts again mid-promotion, servers then report r1 loaded
    third = Driver(redis_client)
    report = LoadedReport(server="s1", stable="r1", updated=time.time())
    protocol.report_loaded(redis_client, KEYS, report)
    done = third.round(now=time.time())
    # Then the promotion completes once: one event of each kind in the saved history
    assert [e.action for e in done.decision.events] == ["Promoted"]
    saved = RolloutState.model_validate_json(redis_client.get(KEYS.rollout))  # type: ignore[arg-type]
    assert [(e.action, e.revision) for e in saved.history] == [
        ("StartCanary", "r1"),
        ("Promote", "r1"),
        ("Promoted", "r1"),
    ]
    assert saved.stable_revision == "r1" and saved.phase == "Idle"
