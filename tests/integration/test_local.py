"""A short `aurora local` loop: real redis-server, real model, real HTTP servers,
real trainer process. A candidate must be trained, evaluated, canaried, and then
promoted or rolled back by the measured numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.local.config import LocalConfig
from aurora.runtime.local.run import LocalMode
from aurora.runtime.rollout import RolloutPolicy

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
        rollout=RolloutPolicy(
            min_samples=10,
            max_canary_samples=30,
            baseline_share="0.25",
            canary_share="0.5",
            on_inconclusive="Rollback",
            gate_initial_draft=False,  # (the day-0 draft is trusted: the decision is on a head)
        ),
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


def test_the_day0_suffix_draft_serves_everyone_only_once_the_gate_promotes_it(
    redis_url: str, tmp_path: Path
) -> None:
    # Given: a local run whose day-0 draft is suffix decoding, gated (the default), on
    # recurring code traffic (8 prompts: suffix decoding replays their continuations)
    config = LocalConfig(
        schedule="code:400",
        distinct_prompts=8,
        redis_url=redis_url,
        workdir=tmp_path,
        minutes=12,
        live=False,
        stop_after_decision=True,
    )
    assert config.rollout.gate_initial_draft and config.initial_draft == protocol.Builtin.SUFFIX
    mode = LocalMode(config)
    # When: it runs until the first decision
    mode.execute()
    # Then: suffix was canaried against plain decoding from the start, and promoted by a
    # lower bound at or above minSpeedup measured against no speculation
    events = mode.run.events
    assert [(e["action"], e["revision"]) for e in events[:1]] == [("StartCanary", "suffix")]
    decided = [e for e in events if e["action"] in ("Promoted", "Rollback", "Reject")]
    assert [(e["action"], e["revision"]) for e in decided] == [("Promoted", "suffix")], [
        e["reason"] for e in events
    ]
    promote = next(e for e in events if e["action"] == "Promote")
    assert promote["reason"].startswith("suffix beats no draft: lower bound")
    assert promote["gated"]["lower"] >= float(config.rollout.min_speedup)
    assert mode.run.failed == 0, list(mode.run.errors)


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                line for line in (entry / "status").read_text().splitlines() if line[:6] == "State:"
            )
        except (OSError, StopIteration):
            continue
        if text in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return found


def test_ctrl_c_stops_every_process_and_still_writes_the_report(tmp_path: Path) -> None:
    # Given: `aurora local` running with its embedded redis-server, serving traffic
    workdir = tmp_path / "run"
    command = [sys.executable, "-P", "-m", "aurora", "local", "--no-live"]
    process = subprocess.Popen(
        [*command, "--workdir", str(workdir), "--minutes", "10", "--max-new-tokens", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # as in a terminal: a suite started in the background (`... &` without job control)
        # has SIGINT ignored, and children would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        server_log = workdir / "logs" / "server-0.log"
        deadline = time.monotonic() + 300
        while not (server_log.is_file() and "POST /generate" in server_log.read_text()):
            assert process.poll() is None, process.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "no request was served within 300 s"
            time.sleep(0.5)
        children = _processes_naming(str(workdir / "checkpoints"))
        assert len(children) == 2  # one server, one trainer
        # When: the user presses Ctrl-C
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    # Then: it exits with 130, says where the report is, and leaves no process behind
    assert process.returncode == 130, output[-2000:]
    assert f"stopped; report in {workdir / 'report'}" in output
    assert _processes_naming(str(workdir / "checkpoints")) == []
    summary = json.loads((workdir / "report" / "report.json").read_text())["summary"]
    assert summary["requests"] >= 1 and summary["failed_requests"] == 0
