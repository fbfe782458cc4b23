"""The trainer's Prometheus endpoint (`aurora train --metrics-port`, 9100 by default).

It answers from the moment the process starts, before the target model has loaded, so
Kubernetes probes see a live process; `aurora_trainer_ready` turns 1 once the trainer
consumes traces. Figures are read from the trainer when scraped (no second bookkeeping).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector


class TrainerCollector(Collector):
    """Collects from ``trainer`` (set once it exists; None while the model loads)."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def collect(self) -> Iterator[Any]:
        t = self.trainer
        yield GaugeMetricFamily(
            "aurora_trainer_ready", "1 once the trainer has loaded and consumes traces",
            value=0 if t is None else 1,
        )  # fmt: skip
        if t is None:
            return
        yield CounterMetricFamily("aurora_trainer_steps", "Optimizer steps taken", value=t.step)
        yield CounterMetricFamily(
            "aurora_trainer_traces_seen", "Traces incorporated into training", value=t.traces_seen
        )
        if not math.isnan(t.last_loss):
            yield GaugeMetricFamily("aurora_trainer_loss", "Last step's loss", value=t.last_loss)
        yield GaugeMetricFamily(
            "aurora_trainer_checkpoint_failing",
            "1 while the last checkpoint write failed (full or read-only volume)",
            value=1 if t.checkpoint_failing else 0,
        )
        with contextlib.suppress(redis.RedisError):  # Redis away: the rest still answers
            yield GaugeMetricFamily(
                "aurora_trainer_trace_lag",
                "Traces published but not yet incorporated (never delivered + pending)",
                value=t.lag(),
            )
        info = InfoMetricFamily("aurora_trainer_revision", "Latest checkpoint and candidate")
        info.add_metric([], {"checkpoint": t.revision or "", "published": t.published or ""})
        yield info


def serve_metrics(port: int, host: str = "0.0.0.0") -> TrainerCollector:
    """Start the endpoint on ``port`` in a background thread; set `.trainer` later."""
    registry = CollectorRegistry()
    collector = TrainerCollector()
    registry.register(collector)
    start_http_server(port, addr=host, registry=registry)
    return collector
