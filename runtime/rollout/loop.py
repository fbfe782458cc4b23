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


@dataclass
class SampleWindow:
    """The most recent request statistics per (arm, revision), read from the stats
    stream incrementally: each round reads only entries newer than `cursor`. After an
    operator restart the window refills from the stream (bounded by its MAXLEN)."""

    size: int
    cursor: str = "-"
    arms: dict[tuple[str, str], deque[RequestStats]] = field(default_factory=dict)
    malformed: int = 0

    def add(self, stats: RequestStats) -> None:
        key = (stats.arm, stats.revision)
        arm = self.arms.get(key)
        if arm is None:
            arm = self.arms[key] = deque(maxlen=self.size)
        arm.append(stats)

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
        return [sample for arm in self.arms.values() for sample in arm]

    def keep_only(self, revisions: Iterable[str | None]) -> None:
        """Forget arms of revisions that no longer matter (baseline arms stay)."""
        # "" and "none" both name serving without a draft (servers report "none").
        keep = {revision for revision in revisions if revision is not None} | {"", Builtin.NONE}
        for arm, revision in list(self.arms):
            if arm != "baseline" and revision not in keep:
                del self.arms[(arm, revision)]


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
        )
    )
    problem = decision.problem if publish else None
    return Round(decision, published, changed, lag, problem, tuple(stale))


def delete_speculator_keys(client: redis.Redis, keys: Keys) -> int:
    """Remove every Redis key of the Speculator (traces, stats, candidates, ...)."""
    return protocol.delete_all(client, keys)
