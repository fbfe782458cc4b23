"""The operator's Prometheus metrics: what the rollout policy measured and decided,
per Speculator, and how its reconciles go (duration, errors, by handler). Served on
the operator's metrics port (`aurora operator --metrics-port`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aurora.runtime.rollout import Decision, EventAction

COMPARISONS = ("candidate_vs_stable", "stable_vs_baseline")


@dataclass
class Outcome:
    """What a handler says about its run: None, or the reason it failed."""

    error: str | None = None


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

        self.reconcile_duration = Histogram(
            "aurora_operator_reconcile_duration_seconds",
            "How long a handler run took (reconcile: spec changes; rollout: a timer round)",
            ["handler"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "aurora_operator_reconcile_errors",
            "Handler runs that failed, by reason (InvalidSpec, RedisNotAllowed, ApplyFailed, "
            "RedisUnavailable, KubernetesUnavailable, or the exception's type)",
            ["handler", "reason"],
            registry=self.registry,
        )

    @contextlib.contextmanager
    def reconciling(self, handler: str) -> Iterator[Outcome]:
        """Time a handler run and count it as failed when it raises or sets
        `outcome.error`."""
        outcome, started = Outcome(), time.perf_counter()
        try:
            yield outcome
        except Exception as error:
            outcome.error = outcome.error or type(error).__name__
            raise
        finally:
            self.reconcile_duration.labels(handler).observe(time.perf_counter() - started)
            if outcome.error:
                self.reconcile_errors.labels(handler, outcome.error).inc()

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
