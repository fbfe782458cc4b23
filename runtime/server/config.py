"""The server's configuration as plain data, and its Redis connection.

No torch here: `aurora serve` builds and checks a ServerConfig before loading anything.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import redis

from aurora.errors import UsageError
from aurora.runtime import protocol
from aurora.runtime.models import model_knob
from aurora.runtime.options import knob
from aurora.runtime.protocol import BUILTIN_REVISIONS, Builtin, Keys


def default_server_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ServerConfig:
    """Everything `aurora serve` takes; each knob's flag is generated from its field."""

    model: str = model_knob()
    host: str = knob("127.0.0.1", "address to bind")
    port: int = knob(8000, "TCP port")
    draft: str = knob(
        Builtin.NGRAM,
        "initial draft: scratch (untrained EAGLE head), ngram (prompt lookup), suffix "
        "(suffix decoding over the prompt and every output served), none (no speculation), "
        "a checkpoint directory, or hybrid:HEAD (suffix decoding and the head HEAD, scratch "
        "or a checkpoint directory, whichever drafts further per step)",
    )
    spec_tokens: int = knob(4, "draft tokens per verify step (0 disables speculation)", metavar="K")
    suffix_tokens: int = knob(
        16,
        "the most tokens a suffix draft (suffix, hybrid:HEAD) proposes per verify step: "
        "suffix decoding drafts further on long matches, and the verify-cost model cuts "
        "each draft to what pays (0: --spec-tokens)",
        metavar="N",
    )
    speculator: str = knob(
        "default/local",
        "the Speculator whose Redis keys this server uses",
        metavar="NAMESPACE/NAME",
    )
    redis_url: str | None = knob(
        None,
        "Redis for traces, stats and the desired revisions (password from "
        "$AURORA_REDIS_PASSWORD when the URL has none). Without it the server runs with no "
        "traces, stats or hot swaps",
        env="AURORA_REDIS_URL",
    )
    checkpoint_dir: str | None = knob(
        None,
        "where revision directories live (desired revisions whose path does not exist here "
        "are looked up as CHECKPOINT_DIR/REVISION)",
    )
    candidate_share: float = knob(
        0.0, "fraction of requests for the candidate revision until Redis says otherwise"
    )
    baseline_share: float = knob(
        0.05,
        "fraction of requests served without speculation, the live baseline, until Redis "
        "says otherwise",
    )
    trace_sample_rate: float = knob(1.0, "fraction of finished requests traced to Redis")
    trace_maxlen: int = knob(10000, "approximate bound on the trace stream's length")
    trace_topk: int = 8
    trace_buffer: int = 1024  # traces and stats waiting for Redis, at most
    stats_maxlen: int = 100000
    server_id: str = knob(
        default_factory=default_server_id, help="name in stats and loaded reports (HOSTNAME-PID)"
    )
    device: str = knob("cpu", "torch device")
    dtype: str = knob("float32", "float32, bfloat16 or float16")
    threads: int | None = knob(
        None,
        "torch threads (off: torch's default, one per physical core; on a shared machine "
        "fewer threads can be much faster)",
    )
    max_queue: int = knob(64, "requests waiting beyond this answer 503 with Retry-After")
    max_batch: int = knob(
        4,
        "requests decoded together, continuous batching: they join and leave between verify "
        "steps and one target forward verifies all their drafts (1 = one request at a time; "
        "models other than Llama-family always decode one at a time)",
        metavar="N",
    )
    adaptive: bool = knob(
        True,
        "draft heads draft only what pays: each step stops before a token the head doubts "
        "or that would not raise the expected tokens/s under the verify cost measured at "
        "start, and a head that does not pay proposes nothing between probes",
    )
    suffix_cache_mb: float = knob(
        64.0,
        "memory cap of the suffix tree over served outputs (suffix and hybrid drafts), "
        "least recently used outputs evicted first",
        metavar="MB",
    )
    max_new_tokens_limit: int = knob(2048, "largest max_tokens a request may ask for")
    seed: int = knob(0, "seed for routing, trace sampling and sampling")
    poll_interval: float = knob(0.5, "seconds between reads of the desired revisions in Redis")
    test_slow_revision: str | None = knob(
        None,
        "FOR TESTS OF THE ROLLOUT GATE ONLY: REVISION:MS adds MS milliseconds to every verify "
        "step of requests served by REVISION (a candidate with a known slowdown)",
        metavar="REVISION:MS",
    )

    def __post_init__(self) -> None:
        _ = self.keys  # validates --speculator
        checks = [
            (
                0 <= self.spec_tokens <= 64,
                "--spec-tokens",
                self.spec_tokens,
                "an integer from 0 to 64 (0 = no speculation)",
            ),
            (
                0 <= self.suffix_tokens <= 64,
                "--suffix-tokens",
                self.suffix_tokens,
                "an integer from 0 to 64 (0 = --spec-tokens)",
            ),
            (
                0.0 <= self.candidate_share <= 1.0,
                "--candidate-share",
                self.candidate_share,
                "a fraction from 0 to 1",
            ),
            (
                0.0 <= self.baseline_share <= 1.0,
                "--baseline-share",
                self.baseline_share,
                "a fraction from 0 to 1",
            ),
            (
                self.candidate_share + self.baseline_share <= 1.0,
                "--candidate-share + --baseline-share",
                self.candidate_share + self.baseline_share,
                "shares that add up to at most 1",
            ),
            (
                0.0 <= self.trace_sample_rate <= 1.0,
                "--trace-sample-rate",
                self.trace_sample_rate,
                "a fraction from 0 to 1",
            ),
            (self.trace_maxlen >= 1, "--trace-maxlen", self.trace_maxlen, "at least 1"),
            (self.trace_topk >= 0, "trace_topk", self.trace_topk, "0 (none) or more"),
            (self.trace_buffer >= 1, "trace_buffer", self.trace_buffer, "at least 1"),
            (self.max_queue >= 1, "--max-queue", self.max_queue, "at least 1"),
            (
                1 <= self.max_batch <= 64,
                "--max-batch",
                self.max_batch,
                "an integer from 1 to 64 (1 = one request at a time)",
            ),
            (
                self.max_new_tokens_limit >= 1,
                "--max-new-tokens-limit",
                self.max_new_tokens_limit,
                "at least 1",
            ),
            (self.threads is None or self.threads >= 1, "--threads", self.threads, "at least 1"),
            (self.poll_interval > 0, "--poll-interval", self.poll_interval, "seconds > 0"),
            (self.suffix_cache_mb >= 0, "--suffix-cache-mb", self.suffix_cache_mb, "MB >= 0"),
            (1 <= self.port <= 65535, "--port", self.port, "a TCP port from 1 to 65535"),
            (bool(self.server_id), "--server-id", self.server_id, "a non-empty name"),
        ]
        for ok, flag, value, fix in checks:
            if not ok:
                raise UsageError(f"{flag}={value} is out of range: use {fix}")
        _ = self.slow_revision  # validates --test-slow-revision
        head = protocol.hybrid_head(self.draft)
        if head is not None and head != Builtin.SCRATCH and not Path(head).is_dir():
            raise UsageError(
                f"--draft={self.draft!r}: a hybrid's head must be scratch or a checkpoint "
                "directory, e.g. hybrid:scratch or hybrid:/checkpoints/REVISION"
            )
        if head is None and self.draft not in BUILTIN_REVISIONS and not Path(self.draft).is_dir():
            raise UsageError(
                f"--draft={self.draft!r} is neither one of {', '.join(BUILTIN_REVISIONS)} nor a "
                "checkpoint directory nor hybrid:HEAD: pass a built-in draft, the path of a "
                "revision's directory, or hybrid:scratch"
            )

    @property
    def slow_revision(self) -> tuple[str, float] | None:
        """`--test-slow-revision` as (revision, seconds per verify step)."""
        if self.test_slow_revision is None:
            return None
        revision, _, ms = self.test_slow_revision.rpartition(":")
        try:
            seconds = float(ms) / 1000
        except ValueError:
            seconds = -1.0
        if not revision or not 0 <= seconds <= 10:
            raise UsageError(
                f"--test-slow-revision={self.test_slow_revision!r} must be REVISION:MS with MS "
                "from 0 to 10000, e.g. r2:20"
            )
        return revision, seconds

    @property
    def keys(self) -> Keys:
        namespace, slash, name = self.speculator.partition("/")
        if not slash:
            raise UsageError(
                f"--speculator={self.speculator!r} must be NAMESPACE/NAME, e.g. default/local"
            )
        try:
            return Keys(namespace, name)
        except ValueError as error:
            raise UsageError(f"--speculator={self.speculator!r}: {error}") from None


def connect_redis(url: str, password: str | None = None, timeout: float = 2.0) -> redis.Redis:
    """`protocol.connect`, failing fast; a malformed ``--redis-url`` is a usage error."""
    try:
        return protocol.connect(url, password, timeout=timeout)
    except ValueError as error:
        raise UsageError(f"--redis-url: {error}") from None
