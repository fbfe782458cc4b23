"""A short `aurora local` loop: real redis-server, real model, real HTTP servers,
real trainer process. A candidate must be trained, evaluated, canaried, and then
promoted or rolled back by the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.local import LocalConfig, LocalMode

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_local_loop_trains_canaries_and_decides_by_measurement(
    redis_url: str, tmp_path: Path
) -> None:
    # Given: a local run on recurring code prompts with small thresholds so it decides quickly
    config = LocalConfig(
        schedule="code:400",
        redis_url=redis_url,
        workdir=tmp_path,
        minutes=12,
        max_new_tokens=32,
        clients=2,
        first_candidate_after=6,
        publish_every=6,
        min_accept_length=1.0,
        min_samples=4,
        max_canary_samples=12,
        baseline_share="0.25",
        canary_share="0.5",
        steps_per_trace=6,
        live=False,
        stop_after_decision=True,
    )
    mode = LocalMode(config)
    # When: it runs until the policy promotes or rolls back a candidate
    report = mode.execute()
    # Then: the trainer offered an evaluated candidate
    client = redis.Redis.from_url(redis_url)
    candidates = protocol.list_candidates(client, config.keys)
    assert candidates, "the trainer published no candidate"
    assert {"candidate", "stable"} <= set(candidates[0].evaluation)
    # the candidate went to canary, and the decision quotes measured numbers
    actions = [e["action"] for e in mode.run.events]
    assert "StartCanary" in actions
    decided = [e for e in mode.run.events if e["action"] in ("Promoted", "Rollback", "Reject")]
    assert decided, f"no decision in {actions}; last reason: {mode.run.last_reason}"
    assert "speedup" in json.dumps(mode.run.events).lower()
    # no request failed, and the report folder has all three artefacts
    assert mode.run.failed == 0, list(mode.run.errors)
    summary = json.loads((report / "report.json").read_text())["summary"]
    assert summary["requests"] == mode.run.requests > 0  # in-flight requests finished first
    assert (report / "report.md").is_file() and (report / "timeline.png").stat().st_size > 0
    # the canaried revision's swap was timed from the servers' own reports
    canaried = next(e["revision"] for e in mode.run.events if e["action"] == "StartCanary")
    timed = {row["revision"]: row for row in summary["swaps"]}[canaried]
    assert 0 <= timed["canary_decision_to_all_serving_s"] < 60
