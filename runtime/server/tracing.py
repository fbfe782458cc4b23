"""Traces and per-request stats, from the decode worker to Redis without ever
blocking or failing a request.

The worker offers records to a bounded in-memory buffer (a full buffer drops the
record and counts it); one publisher thread XADDs them with the shared protocol
codec. While Redis is unreachable the publisher drops what arrives (counted) and
retries the connection with exponential backoff, so it recovers on its own.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from aurora.runtime.protocol import (
    EngineGeneration,
    Keys,
    RequestStats,
    TraceRecord,
    build_trace,
    publish_stats,
    publish_trace,
)
from aurora.runtime.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    kind: str  # "trace" | "stats"
    make: Callable[[], TraceRecord | RequestStats]  # built by the publisher, off the decode path


class TracePublisher:
    """Bounded buffer plus one publisher thread; ``offer_*`` never block."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        metrics: ServerMetrics,
        *,
        server: str,
        trace_maxlen: int,
        stats_maxlen: int,
        buffer: int = 1024,
        max_backoff: float = 2.0,
    ) -> None:
        self.client, self.keys, self.metrics, self.server = client, keys, metrics, server
        self.maxlen = {"trace": trace_maxlen, "stats": stats_maxlen}
        self.max_backoff = max_backoff
        self._buffer: queue.Queue[_Item | None] = queue.Queue(maxsize=buffer)
        self._retry_at = 0.0  # while Redis is away: drop until then, then try again
        self._backoff = 0.0
        self._thread = threading.Thread(
            target=self._loop, name="aurora-trace-publisher", daemon=True
        )
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish what is buffered (within ``timeout``) and stop."""
        self._stopping = True
        with contextlib.suppress(queue.Full):
            self._buffer.put(None, timeout=timeout)
        self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._backoff == 0.0

    def offer_trace(
        self, generation: EngineGeneration, *, revision: str, domain: str, temperature: float
    ) -> bool:
        """Queue the trace of a finished generation; False when it was dropped."""
        return self._offer(
            _Item(
                "trace",
                lambda: build_trace(
                    generation,
                    revision=revision,
                    server=self.server,
                    domain=domain,
                    temperature=temperature,
                ),
            )
        )

    def offer_stats(self, stats: RequestStats) -> bool:
        """Queue one request's stats; False when they were dropped."""
        return self._offer(_Item("stats", lambda: stats))

    def _offer(self, item: _Item) -> bool:
        if self._stopping:
            self.metrics.dropped.labels(kind=item.kind, reason="shutdown").inc()
            return False
        try:
            self._buffer.put_nowait(item)
            return True
        except queue.Full:
            self.metrics.dropped.labels(kind=item.kind, reason="buffer_full").inc()
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the buffer is empty (for tests and shutdown); True if it emptied."""
        deadline = time.monotonic() + timeout
        while self._buffer.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._buffer.unfinished_tasks

    def _loop(self) -> None:
        while True:
            item = self._buffer.get()
            try:
                if item is None:
                    return
                self._publish(item)
            finally:
                self._buffer.task_done()

    def _publish(self, item: _Item) -> None:
        if time.monotonic() < self._retry_at:
            self.metrics.dropped.labels(kind=item.kind, reason="redis_unavailable").inc()
            return
        try:
            record = item.make()
            if isinstance(record, TraceRecord):
                publish_trace(self.client, self.keys, record, self.maxlen["trace"])
            else:
                publish_stats(self.client, self.keys, record, self.maxlen["stats"])
        except (redis.RedisError, OSError) as error:
            self.metrics.dropped.labels(kind=item.kind, reason="redis_unavailable").inc()
            if self._backoff == 0.0:
                log.warning(
                    "cannot publish %s to Redis (%s): dropping traces and stats until it is back",
                    item.kind,
                    type(error).__name__,
                )
            self._backoff = min(max(self._backoff * 2, 0.1), self.max_backoff)
            self._retry_at = time.monotonic() + self._backoff
            return
        except (ValidationError, ValueError) as error:  # a bug in a record: drop it, keep going
            self.metrics.dropped.labels(kind=item.kind, reason="invalid").inc()
            log.error("dropping an invalid %s record: %s", item.kind, type(error).__name__)
            return
        if self._backoff:
            log.info("Redis is reachable again: publishing traces and stats")
        self._backoff, self._retry_at = 0.0, 0.0
        self.metrics.published.labels(kind=item.kind).inc()
