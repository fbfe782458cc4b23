"""Load through hot swaps and a Redis outage: the one-minute CI version of `make chaos`
(aurora.runtime.chaos). A real `aurora serve` process, four concurrent clients, three
swaps confirmed by the server's loaded reports, Redis killed (SIGKILL) and restarted on
the same port mid-run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from aurora.runtime.chaos import ChaosConfig, percentile, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

log = logging.getLogger(__name__)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_serving_fails_no_request_through_swaps_and_a_redis_outage(
    model: tuple[Any, Any], tmp_path: Path
) -> None:
    # Given a server under load from four clients
    config = ChaosConfig(
        workdir=tmp_path,
        duration_s=45,
        clients=4,
        swaps=3,
        redis_kills=1,
        max_new_tokens=4,
        trainer_kills=0,
    )
    # When the desired revisions change three times and Redis dies and comes back
    report = run(config, target=model[0])
    log.warning("chaos report: %s", report.to_json())
    # Then no request failed, and latency percentiles were measured
    assert report.requests > 20 and report.failed == 0, report.failures
    assert report.latency_p50_s is not None and report.latency_p99_s is not None
    # and every swap was confirmed by the server's loaded report, without a load error
    assert report.swaps_confirmed == report.swaps_published == 3, report.swap_errors
    assert set(report.served_by) == {"ngram", "r1", "r2", "r3"}
    # and what could not be published while Redis was down was dropped and counted, and
    # every request's trace and stats were either published or counted as dropped
    assert report.redis_kills == 1 and report.dropped.get("trace/redis_unavailable", 0) > 0
    for kind in ("trace", "stats"):
        dropped = sum(v for k, v in report.dropped.items() if k.startswith(f"{kind}/"))
        assert report.published[kind] + dropped == report.requests, kind
    # and traces flowed again after the restart, without restarting the server
    assert len(report.redis_recovery_s) == 1
    assert report.ok
