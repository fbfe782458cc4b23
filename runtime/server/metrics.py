"""Prometheus metrics of one server app (its own registry, so apps in one process,
as in the tests, never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACCEPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)
PAUSE_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aurora_requests",
            "Finished generation requests by arm, draft revision and status "
            "(ok, invalid, error, cancelled, rejected)",
            ["arm", "revision", "status"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "aurora_generated_tokens", "Completion tokens generated", ["arm"], registry=r
        )
        self.accept_length = Histogram(
            "aurora_accept_length",
            "Mean tokens per verify step of a speculative request (bonus token included)",
            ["arm"],
            buckets=ACCEPT_BUCKETS,
            registry=r,
        )
        self.decode_tokens_per_s = Histogram(
            "aurora_decode_tokens_per_second",
            "Decode tokens per second of a request (after the first token)",
            ["arm"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.active_revision = Gauge(
            "aurora_active_revision_info",
            "Draft revisions served now (value 1)",
            ["revision", "role"],
            registry=r,
        )
        self.dropped = Counter(
            "aurora_trace_dropped",
            "Traces and stats dropped instead of published "
            "(kind: trace|stats; reason: buffer_full|redis_unavailable|invalid)",
            ["kind", "reason"],
            registry=r,
        )
        self.published = Counter(
            "aurora_traces_published", "Traces and stats written to Redis", ["kind"], registry=r
        )
        self.swap_pause = Histogram(
            "aurora_swap_pause_seconds",
            "How long a revision swap blocked the decode worker",
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "aurora_queue_depth", "Requests waiting for or in the engine worker", registry=r
        )
        for kind in ("trace", "stats"):  # families appear at 0 before the first event
            self.published.labels(kind=kind)

    def set_active(self, roles: dict[str, str]) -> None:
        """Replace the active revision series with ``roles`` (role → revision)."""
        self.active_revision.clear()
        for role, revision in roles.items():
            self.active_revision.labels(revision=revision, role=role).set(1)

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
