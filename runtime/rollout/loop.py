"""The rollout loop: one round through Redis. Read what the servers and the trainer
published (request statistics, candidates, loaded revisions), run the rollout decision
(`aurora.runtime.rollout.decision.decide`), and publish what should be served (`desired`).

The Redis edge of the rollout, shared by the operator's kopf timer and `aurora local`;
it imports neither kopf nor the Kubernetes client, so it is tested against a real
redis-server. The rollout state itself is not kept here: the caller passes it in and
stores `Round.decision.new_state` (the operator in the Speculator's status).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import redis

from aurora.runtime import protocol
from aurora.runtime.protocol import (
    Builtin,
    DesiredState,
    Keys,
    LoadedReport,
    RequestStats,
    trace_lag,
)
from aurora.runtime.rollout.decision import Decision, Override, RolloutState, decide
from aurora.runtime.rollout.policy import RolloutPolicy

log = logging.getLogger(__name__)

# Bounds what one round reads, so a burst of traffic cannot stall the timer.
MAX_STATS_PER_ROUND = 50_000
MIN_WINDOW = 5_000  # requests a SampleWindow keeps at least
# Servers repeat their loaded report every 10 s (a heartbeat); six missed ones: gone.
LOADED_REPORT_TTL = 60.0
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.AuthenticationError,
    redis.ResponseError,
)


def connect(url: str, password: str | None, timeout: float = 2.0) -> redis.Redis:
    """A client that fails fast (`protocol.connect`): the timer retries on its next
    tick, and an unreachable Redis must surface as Degraded, not a hang."""
    return protocol.connect(url, password, timeout=timeout)


def redis_problem(url: str, error: Exception) -> str:
    """One line for status: which Redis, what failed (never the password)."""
    where = url.split("@")[-1]
    kind = type(error).__name__
    detail = str(error).splitlines()[0] if str(error) else kind
    return f"Redis at {where} unreachable ({kind}: {detail})"


def window_size(policy: RolloutPolicy) -> int:
    """Requests a SampleWindow keeps: enough that a canary's whole window fits even at a
    small canary share (the decision compares arms over the same period, so no arm may
    lose its oldest requests while another keeps them)."""
    share = max(float(policy.canary_share), 0.05)
    return max(MIN_WINDOW, math.ceil(2 * policy.max_canary_samples / share))


@dataclass
class SampleWindow:
    """The most recent request statistics, read from the stats stream incrementally: each
    round reads only entries newer than `cursor`. One deque for every arm, in stream
    order, so what it holds is one period for all arms. After an operator restart the
    window refills from the stream (bounded by its MAXLEN)."""

    size: int
    cursor: str = "-"
    requests: deque[RequestStats] = field(default_factory=deque)
    malformed: int = 0

    def __post_init__(self) -> None:
        self.requests = deque(self.requests, maxlen=self.size)

    def add(self, stats: RequestStats) -> None:
        self.requests.append(stats)

    def refresh(self, client: redis.Redis, keys: Keys, limit: int = MAX_STATS_PER_ROUND) -> int:
        """Read new stats entries (at most `limit`); returns how many were read."""
        page = protocol.read_stats(client, keys, since_id=self.cursor, count=limit)
        for _, stats in page:
            self.add(stats)
        self.malformed += page.malformed
        if page.last_id is not None:
            self.cursor = page.last_id
        return len(page) + page.malformed

    def samples(self) -> list[RequestStats]:
        return list(self.requests)

    def keep_only(self, revisions: Iterable[str | None], since: float | None = None) -> None:
        """Forget requests of revisions that no longer matter (baseline ones stay), and
        with `since`, those created before it (the comparison window's start)."""
        # "" and "none" both name serving without a draft (servers report "none").
        keep = {revision for revision in revisions if revision is not None} | {"", Builtin.NONE}
        self.requests = deque(
            (
                s
                for s in self.requests
                if (s.arm == "baseline" or s.revision in keep)
                and (since is None or s.created >= since)
            ),
            maxlen=self.size,
        )


def live_loads(
    reports: Mapping[str, LoadedReport],
    live_pods: Sequence[str] | None,
    now: float,
    ttl: float = LOADED_REPORT_TTL,
) -> tuple[list[LoadedReport], list[str]]:
    """(reports of live servers, ids of stale ones). A server repeats its report as a
    heartbeat, so one not refreshed within `ttl` seconds is gone. Server ids are
    `<hostname>-<pid>` and a pod's hostname is its name, so with `live_pods` known a
    report whose hostname names no live pod comes from a deleted pod. Either way a
    gone server must not hold up a promotion. Without pods (None or empty: servers not
    run by a kubelet, or local mode) only the age counts."""
    pods = set(live_pods or ())
    live: list[LoadedReport] = []
    stale: list[str] = []
    for server, report in sorted(reports.items()):
        in_pod = not pods or server in pods or server.rpartition("-")[0] in pods
        if in_pod and now - report.updated <= ttl:
            live.append(report)
        else:
            stale.append(server)
    return live, stale


@dataclass(frozen=True)
class Round:
    """What one round saw and did."""

    decision: Decision
    published: DesiredState | None  # the desired state now in Redis (None: nothing yet)
    changed: bool  # this round wrote a new desired state
    trace_lag: int
    problem: str | None = None  # the round ran but could not publish, and why
    stale_servers: tuple[str, ...] = ()


def run_round(
    client: redis.Redis,
    keys: Keys,
    policy: RolloutPolicy,
    state: RolloutState,
    window: SampleWindow,
    now: float,
    *,
    live_pods: Sequence[str] | None = None,
    override: Override | None = None,
    publish: bool = True,
) -> Round:
    """Read, decide, publish. Raises the redis error when Redis is unreachable (the
    caller reports Degraded and changes nothing). With `publish` False the policy
    runs but the desired state in Redis is left alone (rollout disabled)."""
    window.refresh(client, keys)
    candidates = protocol.list_candidates(client, keys)
    live, stale = live_loads(protocol.get_loaded(client, keys), live_pods, now)
    previous = protocol.get_desired(client, keys)
    decision = decide(
        policy,
        state,
        candidates,
        window.samples(),
        live,
        now,
        override=override,
        published=previous,
    )
    lag = trace_lag(client, keys)
    published, changed = previous, False
    if publish and decision.desired is not None and decision.desired is not previous:
        protocol.set_desired(client, keys, decision.desired)
        published, changed = decision.desired, True
    if stale:
        client.hdel(keys.loaded, *stale)
    new = decision.new_state
    window.keep_only(
        (
            new.stable_revision,
            new.candidate_revision,
            state.stable_revision,
            state.candidate_revision,
        ),
        since=new.window_since,
    )
    problem = decision.problem if publish else None
    return Round(decision, published, changed, lag, problem, tuple(stale))


def delete_speculator_keys(client: redis.Redis, keys: Keys) -> int:
    """Remove every Redis key of the Speculator (traces, stats, candidates, ...)."""
    return protocol.delete_all(client, keys)
