"""The trainer's /metrics endpoint: up before the model loads (so probes pass while it
loads), then the trainer's own figures, and still answering when Redis is away."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
import redis

from aurora.runtime.embedded_redis import free_port
from aurora.runtime.trainer.metrics import serve_metrics

pytestmark = pytest.mark.unit


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_answer_while_loading_then_report_the_trainer() -> None:
    port = free_port()
    collector = serve_metrics(port, host="127.0.0.1")
    # Given a trainer still loading its model, the endpoint already answers: not ready.
    assert "aurora_trainer_ready 0.0" in scrape(port)

    def lag() -> int:
        return 7

    collector.trainer = SimpleNamespace(
        step=12, traces_seen=40, last_loss=1.5, checkpoint_failing=True, lag=lag,
        revision="r00000012-abcdef", published=None,
    )  # fmt: skip
    text = scrape(port)
    assert "aurora_trainer_ready 1.0" in text
    assert "aurora_trainer_steps_total 12.0" in text
    assert "aurora_trainer_traces_seen_total 40.0" in text
    assert "aurora_trainer_loss 1.5" in text
    assert "aurora_trainer_checkpoint_failing 1.0" in text
    assert "aurora_trainer_trace_lag 7.0" in text
    assert 'aurora_trainer_revision_info{checkpoint="r00000012-abcdef",published=""} 1.0' in text

    # When Redis is away, the lag is left out and everything else still answers.
    def unreachable() -> int:
        raise redis.ConnectionError("Connection refused")

    collector.trainer.lag = unreachable
    text = scrape(port)
    assert "aurora_trainer_trace_lag" not in text.replace("# HELP aurora_trainer_trace_lag", "")
    assert "aurora_trainer_steps_total 12.0" in text
