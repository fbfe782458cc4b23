"""The rollout gate on live servers: a real `aurora serve` process (at --max-batch 1 and at
4, where it batches and routes cohorts), a real redis-server and the real rollout loop.

An A/A canary (the stable draft republished under a new revision id) is not promoted and
its interval holds 1.0; then a candidate whose server adds a fixed delay to each of its
verify steps (`--test-slow-revision`) is rolled back. Assertions are on the decisions,
never on timings; the policy's error rate is 1% so that a false decision is rare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.chaos import Load, write_revision
from aurora.runtime.checkpoint import META_FILE
from aurora.runtime.embedded_redis import free_port
from aurora.runtime.models import load_target
from aurora.runtime.protocol import CandidateRecord, Keys
from aurora.runtime.rollout import Decision, RolloutPolicy, RolloutState, loop
from aurora.runtime.workloads import load_domain

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS = Keys("default", "gate")
SLOW_MS = (
    1000  # per verify step of revision "slow": many times a step's own cost, even on a busy CPU
)
CLIENTS = 4


def policy(max_batch: int) -> RolloutPolicy:
    # A batched cohort (up to 8 requests) is one cluster: the gate needs 10 per arm.
    return RolloutPolicy(
        min_samples=10,
        max_canary_samples=20 if max_batch == 1 else 100,
        canary_share="0.45",
        baseline_share="0.1",
        false_promotion_rate="0.01",
        on_inconclusive="Hold",
    )


@pytest.fixture(scope="module")
def drafts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of one draft head under three revision ids: a0 (stable), a1 (A/A) and
    slow (the same weights, served with a delay)."""
    target, _ = load_target("smollm2-135m")
    root = tmp_path_factory.mktemp("drafts")
    for revision in ("a0", "a1", "slow"):
        write_revision(target, root, revision, seed=7)
    return root


def offer(client: redis.Redis, drafts: Path, revision: str, created: float) -> None:
    meta = json.loads((drafts / revision / META_FILE).read_text())
    record = CandidateRecord(
        revision=revision, parent=None, path=str(drafts / revision), sha256=meta["sha256"],
        created=created, step=1, traces_seen=1,
    )  # fmt: skip
    protocol.offer_candidate(client, KEYS, record)


@pytest.fixture
def server(
    request: pytest.FixtureRequest, redis_url: str, drafts: Path, tmp_path: Path
) -> Iterator[str]:
    port, max_batch = free_port(), request.param
    log = (tmp_path / "server.log").open("wb")
    command = [
        sys.executable, "-m", "aurora", "serve", "--model", "smollm2-135m",
        "--speculator", f"{KEYS.namespace}/{KEYS.name}", "--redis-url", redis_url,
        "--checkpoint-dir", str(drafts), "--port", str(port), "--draft", "ngram",
        "--spec-tokens", "3", "--max-batch", str(max_batch), "--threads", "1",
        "--server-id", "gate-server", "--poll-interval", "0.2",
        "--test-slow-revision", f"slow:{SLOW_MS}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONSAFEPATH": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # requests still in flight: no need to finish them
            process.kill()
            process.wait(30)
        log.close()


def traffic(url: str) -> Load:
    """CLIENTS threads sending recurring code prompts back to back until stopped."""
    prompts = [p.text for p in load_domain("code")[:24]]
    return Load(url, CLIENTS, max_new_tokens=8, seed=0, prompts=prompts, domain="code")


def rounds(
    client: redis.Redis, rollout: RolloutPolicy, state: RolloutState, until: set[str]
) -> tuple[Decision, RolloutState]:
    """Run the loop once a second until it decides one of `until` (25 minutes at most)."""
    window = loop.SampleWindow(size=loop.window_size(rollout))
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        result = loop.run_round(client, KEYS, rollout, state, window, time.time())
        state = result.decision.new_state
        if result.decision.action in until:
            return result.decision, state
        time.sleep(1)
    raise AssertionError(f"no {until} within 25 minutes; last: {result.decision.reason}")


def served_stable(client: redis.Redis, revision: str) -> bool:
    return any(r.stable == revision for r in protocol.get_loaded(client, KEYS).values())


@pytest.mark.timeout(3600)  # minutes of real decoding on a CPU
@pytest.mark.parametrize("server", [1, 4], indirect=True, ids=["max-batch-1", "max-batch-4"])
def test_an_aa_canary_is_not_promoted_and_a_known_slowdown_is_rolled_back(
    server: str, redis_client: redis.Redis, drafts: Path, request: pytest.FixtureRequest
) -> None:
    max_batch = 4 if request.node.callspec.id == "max-batch-4" else 1
    rollout = policy(max_batch)
    # Given a server whose stable draft is a0,
    offer(redis_client, drafts, "a0", created=1.0)
    state = RolloutState(stable_revision="a0", tried_through=1.0)
    first = loop.run_round(redis_client, KEYS, rollout, state, loop.SampleWindow(100), time.time())
    assert first.published is not None and first.published.stable is not None
    deadline = time.monotonic() + 120
    while not served_stable(redis_client, "a0"):
        assert time.monotonic() < deadline, "the server did not load a0"
        time.sleep(0.2)
    with traffic(server) as load:
        # when the same draft is offered again as a1 (an A/A canary),
        offer(redis_client, drafts, "a1", created=2.0)
        started = loop.run_round(
            redis_client, KEYS, rollout, first.decision.new_state, loop.SampleWindow(100),
            time.time(),
        )  # fmt: skip
        assert started.decision.action == "StartCanary"
        decision, state = rounds(
            redis_client, rollout, started.decision.new_state, {"Promote", "Rollback", "Hold"}
        )
        # then it is not promoted: inconclusive at maxCanarySamples, its interval holding 1.0,
        assert decision.action == "Hold", decision.reason
        m = decision.measurement
        assert m is not None and m.speedup_vs_stable is not None
        assert m.speedup_vs_stable.lower <= 1.0 <= m.speedup_vs_stable.upper, decision.reason
        assert m.candidate.samples >= rollout.max_canary_samples
        # and when a candidate is offered that its server slows down on every verify step,
        offer(redis_client, drafts, "slow", created=3.0)
        decision, state = rounds(redis_client, rollout, state, {"Promote", "Rollback"})
    # then it supersedes the held A/A canary and is rolled back, a0 serving on.
    assert decision.action == "Rollback", decision.reason
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.upper < float(rollout.regression_threshold)
    assert (state.stable_revision, state.candidate_revision) == ("a0", None)
    assert load.failures == []
    if max_batch > 1:  # the server did batch, and every batch was one cohort of one arm
        stats = [s for _, s in protocol.read_stats(redis_client, KEYS)]
        assert max(s.batch_rows for s in stats) > 1.0
        cohorts: dict[str, set[tuple[str, str]]] = {}
        for s in stats:
            cohorts.setdefault(s.cohort, set()).add((s.arm, s.revision))
        assert all(s.cohort for s in stats) and all(len(arms) == 1 for arms in cohorts.values())


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("server", [1], indirect=True, ids=["max-batch-1"])
def test_over_suffix_decoding_a_head_is_canaried_as_a_hybrid_and_measured_under_its_name(
    server: str, redis_client: redis.Redis, drafts: Path
) -> None:
    # Given a server whose stable draft is suffix decoding, and the trainer's head a1 offered
    rollout = policy(1)
    state = RolloutState(stable_revision="suffix")
    window = loop.SampleWindow(size=loop.window_size(rollout))
    offer(redis_client, drafts, "a1", created=time.time())
    # when the rollout loop runs a round
    started = loop.run_round(redis_client, KEYS, rollout, state, window, time.time())
    # then a1 goes to canary as hybrid:a1, served from a1's checkpoint
    assert started.decision.action == "StartCanary", started.decision.reason
    assert started.published is not None and started.published.candidate is not None
    assert started.published.candidate.revision == "hybrid:a1"
    assert started.published.candidate.path == str(drafts / "a1")
    deadline = time.monotonic() + 300
    while not any(
        (r.stable, r.candidate) == ("suffix", "hybrid:a1")
        for r in protocol.get_loaded(redis_client, KEYS).values()
    ):
        assert time.monotonic() < deadline, protocol.get_loaded(redis_client, KEYS)
        time.sleep(0.2)
    # and under traffic the server reports its requests under that name, which the gate
    # measures against suffix decoding
    state = started.decision.new_state
    with traffic(server) as load:
        deadline = time.monotonic() + 600
        while True:
            result = loop.run_round(redis_client, KEYS, rollout, state, window, time.time())
            state, m = result.decision.new_state, result.decision.measurement
            assert m is not None
            if min(m.candidate.samples, m.stable.samples) >= 3:
                break
            assert time.monotonic() < deadline, result.decision.reason
            time.sleep(1)
    assert (m.candidate.revision, m.stable.revision) == ("hybrid:a1", "suffix")
    assert m.candidate.accept_length is not None and m.candidate.accept_length >= 1.0
    assert load.failures == []
