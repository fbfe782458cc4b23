"""The operator's Prometheus metrics: what the rollout policy measured and decided,
per Speculator. Served on the operator's metrics port (`aurora operator --metrics-port`)."""

from __future__ import annotations

import contextlib
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from aurora.runtime.rollout import Decision, EventAction

COMPARISONS = ("candidate_vs_stable", "stable_vs_baseline")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.speedup = Gauge(
            "aurora_rollout_speedup",
            "Measured decode speedup (comparison: candidate_vs_stable, stable_vs_baseline)",
            ["namespace", "speculator", "comparison"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "aurora_rollout_decisions",
            "Rollout events by action (StartCanary, Promote, Promoted, Rollback, Reject, Hold, Superseded, Fallback)",
            ["namespace", "speculator", "action"],
            registry=self.registry,
        )
        self.trace_lag = Gauge(
            "aurora_rollout_trace_lag",
            "Traces published but not yet incorporated by the trainer, as the operator sees it",
            ["namespace", "speculator"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "aurora_rollout_redis_errors",
            "Rollout rounds that could not reach Redis",
            ["namespace", "speculator"],
            registry=self.registry,
        )

    def record(self, namespace: str, name: str, decision: Decision, trace_lag: int) -> None:
        m = decision.measurement
        figures = dict.fromkeys(COMPARISONS)
        if m is not None:
            figures["candidate_vs_stable"] = m.speedup_vs_stable
            figures["stable_vs_baseline"] = m.stable_speedup_vs_baseline
        for comparison, speedup in figures.items():
            if speedup is not None:
                self.speedup.labels(namespace, name, comparison).set(speedup.estimate)
            else:  # no such figure now (e.g. no canary): no stale series either
                with contextlib.suppress(KeyError):
                    self.speedup.remove(namespace, name, comparison)
        for event in decision.events:
            self.decisions.labels(namespace, name, event.action).inc()
        self.trace_lag.labels(namespace, name).set(trace_lag)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted Speculator's series."""
        removals = [
            *((self.speedup, (namespace, name, c)) for c in COMPARISONS),
            *((self.decisions, (namespace, name, a)) for a in get_args(EventAction)),
            (self.trace_lag, (namespace, name)),
            (self.redis_errors, (namespace, name)),
        ]
        for metric, labels in removals:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
