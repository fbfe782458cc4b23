"""`aurora local` bookkeeping against a real redis-server, without spawning processes:
the gate that holds day-0 traffic until the first promotion, the swap timings read
from the servers' loaded reports, and the report folder built from them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.local.config import LocalConfig
from aurora.runtime.local.report import LocalRun, Sample, write_report
from aurora.runtime.local.run import LocalMode

pytestmark = pytest.mark.integration


def _mode(redis_url: str, tmp_path: Path, **overrides: object) -> LocalMode:
    config = LocalConfig(redis_url=redis_url, workdir=tmp_path, servers=2, live=False)
    for name, value in overrides.items():
        setattr(config, name, value)
    mode = LocalMode(config)
    mode.client = redis.Redis.from_url(redis_url)
    protocol.delete_all(mode.client, config.keys)
    return mode


def test_first_phase_is_held_until_requests_after_the_kth_promotion(
    redis_url: str, tmp_path: Path
) -> None:
    mode = _mode(
        redis_url, tmp_path, schedule="code:60,prose:100", shift_after_promotions=2, shift_delay=3
    )
    # Past its count but before any promotion, the first phase goes on; later phases never
    # wait
    mode.run.requests = 100
    assert mode._hold_phase(0) is True
    assert mode._hold_phase(1) is False
    # One promotion is not enough
    mode._track_swap("Promoted", "r1", time.time())
    mode.run.requests = 120
    assert mode._hold_phase(0) is True
    # The second at request 120: held for 3 more requests, then released
    mode._track_swap("Promoted", "r2", time.time())
    assert mode.run.promotion_requests == [100, 120]
    mode.run.requests = 122
    assert mode._hold_phase(0) is True
    mode.run.requests = 123
    assert mode._hold_phase(0) is False


def test_the_hold_ends_at_its_limit_without_promotions(redis_url: str, tmp_path: Path) -> None:
    mode = _mode(redis_url, tmp_path, schedule="code:60,prose:100", hold_limit=3.0)
    mode.run.requests = 179
    assert mode._hold_phase(0) is True
    mode.run.requests = 180
    assert mode._hold_phase(0) is False


def test_gate_off_or_stopping_follows_the_counts(redis_url: str, tmp_path: Path) -> None:
    assert _mode(redis_url, tmp_path, shift_after_promotions=0)._hold_phase(0) is False
    stopping = _mode(redis_url, tmp_path)
    stopping.stop.set()
    assert stopping._hold_phase(0) is False  # a run that ends does not keep drawing requests


def test_swap_timings_come_from_every_servers_loaded_report(redis_url: str, tmp_path: Path) -> None:
    # Given: a candidate published at t0, sent to canary 0.4 s later
    mode = _mode(redis_url, tmp_path)
    keys = mode.config.keys
    t0 = time.time() - 10
    mode.run.started = t0 - 100
    protocol.offer_candidate(
        mode.client,
        keys,
        protocol.CandidateRecord(
            revision="r1", path="/c/r1", sha256="0" * 64, created=t0, step=1, traces_seen=8
        ),
    )
    mode._track_swap("StartCanary", "r1", t0 + 0.4)
    # When: only one of the two servers has swapped, nothing is confirmed yet
    protocol.report_loaded(
        mode.client,
        keys,
        protocol.LoadedReport(server="s0", stable="none", candidate="r1", swapped=t0 + 0.9),
    )
    mode._confirm_swaps()
    assert "canary_serving" not in mode.run.swaps["r1"]
    # the second one reports too: the slowest server's swap time counts
    protocol.report_loaded(
        mode.client,
        keys,
        protocol.LoadedReport(server="s1", stable="none", candidate="r1", swapped=t0 + 1.3),
    )
    mode._confirm_swaps()
    assert mode.run.swaps["r1"]["canary_serving"] == pytest.approx(t0 + 1.3)
    # Then a promotion and a fallback are timed from their decisions
    mode._track_swap("Promote", "r1", t0 + 50)
    mode._track_swap("Promoted", "r1", t0 + 51)  # confirmed: times nothing
    mode._track_swap("Fallback", "r1", t0 + 80)  # the event names the regressed revision
    for server, at in (("s0", t0 + 50.5), ("s1", t0 + 50.7)):
        protocol.report_loaded(
            mode.client, keys, protocol.LoadedReport(server=server, stable="r1", swapped=at)
        )
    mode._confirm_swaps()
    for server, at in (("s0", t0 + 80.2), ("s1", t0 + 80.6)):
        protocol.report_loaded(
            mode.client, keys, protocol.LoadedReport(server=server, stable="none", swapped=at)
        )
    mode._confirm_swaps()
    mode.run.events.append({"t": 90.0, "action": "TrafficShift", "revision": None, "reason": "x"})
    report = write_report(mode.run, tmp_path / "report")
    summary = json.loads((report / "report.json").read_text())["summary"]
    swaps = {row["revision"]: row for row in summary["swaps"]}
    assert swaps["r1"]["publish_to_all_serving_s"] == pytest.approx(1.3)
    assert swaps["r1"]["waited_for_policy_s"] == pytest.approx(0.4)
    assert swaps["r1"]["canary_decision_to_all_serving_s"] == pytest.approx(0.9)
    assert swaps["r1"]["stable_decision_to_all_serving_s"] == pytest.approx(0.7)
    assert swaps["none"]["stable_decision_to_all_serving_s"] == pytest.approx(0.6)
    assert summary["max_checkpoint_to_all_servers_s"] == pytest.approx(1.3)
    assert summary["traffic_shift_s"] == 90.0
    markdown = (report / "report.md").read_text()
    assert "| r1 | 1.30 | 0.40 | 0.90 | 0.70 |" in markdown


def test_a_candidate_that_waited_for_the_policy_is_not_counted_as_swap_time(
    redis_url: str, tmp_path: Path
) -> None:
    mode = _mode(redis_url, tmp_path, servers=1)
    t0 = time.time() - 100
    mode.run.started = t0
    protocol.offer_candidate(
        mode.client,
        mode.config.keys,
        protocol.CandidateRecord(
            revision="r2", path="/c/r2", sha256="0" * 64, created=t0, step=1, traces_seen=8
        ),
    )
    mode._track_swap("StartCanary", "r2", t0 + 60)  # queued behind another canary
    protocol.report_loaded(
        mode.client,
        mode.config.keys,
        protocol.LoadedReport(server="s0", stable="r1", candidate="r2", swapped=t0 + 60.5),
    )
    mode._confirm_swaps()
    summary = json.loads((write_report(mode.run, tmp_path / "r") / "report.json").read_text())
    row = summary["summary"]["swaps"][0]
    assert row["waited_for_policy_s"] == pytest.approx(60.0)
    assert row["canary_decision_to_all_serving_s"] == pytest.approx(0.5)
    assert summary["summary"]["max_checkpoint_to_all_servers_s"] is None


def test_a_run_starts_at_day_0_without_an_earlier_runs_checkpoints(
    redis_url: str, tmp_path: Path
) -> None:
    old = tmp_path / "checkpoints" / "r00000322-7866c2"
    old.mkdir(parents=True)
    (old / "draft.safetensors").write_bytes(b"an earlier run's draft")
    (tmp_path / "logs").mkdir()
    _mode(redis_url, tmp_path).fresh_workdir()
    assert (tmp_path / "checkpoints").is_dir() and not any((tmp_path / "checkpoints").iterdir())
    assert (tmp_path / "logs").is_dir()  # only checkpoints go


def test_the_report_counts_only_speedups_backed_by_enough_requests(tmp_path: Path) -> None:
    # Given a timeline whose highest rolling figure rests on 3 requests, and two promotions
    run = LocalRun(LocalConfig(workdir=tmp_path))  # local mode's minSamples: 12

    def sample(t: float, speedup: float, samples: int) -> Sample:
        return Sample(t, 10, 0, "r1", None, 2.0, speedup, samples, None, "code")

    run.timeline = [sample(1, 1.3, 20), sample(2, 2.4, 3), sample(3, 1.6, 12)]
    for revision, estimate in (("r1", 1.2), ("r2", 1.52)):
        bounds = {"estimate": estimate, "lower": estimate - 0.1, "upper": estimate + 0.1}
        run.events.append(
            {
                "t": 5.0,
                "action": "Promote",
                "revision": revision,
                "reason": "beats",
                "speedup_vs_no_speculation": {**bounds, "confidence": 0.9},
            }
        )
    # When the report is written
    folder = write_report(run, tmp_path / "report")
    summary = json.loads((folder / "report.json").read_text())["summary"]
    # Then the 3-request figure is left out, and the best promotion is quoted with its bounds
    assert summary["max_speedup_vs_no_speculation"] == 1.6
    assert summary["final_speedup_vs_no_speculation"] == 1.6
    assert summary["best_promoted_speedup_vs_no_speculation"]["estimate"] == 1.52
    assert "1.52x (90% bounds 1.42x-1.62x)" in (folder / "report.md").read_text()
