"""One rollout round through Redis: read what the servers and the trainer published
(request statistics, candidates, loaded revisions), run the rollout policy
(`aurora.runtime.rollout.decide`), and publish what should be served (`desired`).

This is the Redis edge of the operator; it imports neither kopf nor the Kubernetes
client, so it is tested against a real redis-server. The rollout state itself is
not kept here: the caller passes it in and stores `Round.decision.new_state` in the
Speculator's status.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import redis

from aurora.runtime import protocol
from aurora.runtime.protocol import (
    CandidateRecord,
    DesiredState,
    Keys,
    LoadedReport,
    RequestStats,
    RevisionRef,
    trace_lag,
)
from aurora.runtime.rollout import (
    NO_DRAFT,
    Candidate,
    Decision,
    DesiredRevisions,
    Override,
    RequestSample,
    RolloutPolicy,
    RolloutState,
    ServerLoad,
    decide,
)

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
    arms: dict[tuple[str, str], deque[RequestSample]] = field(default_factory=dict)
    malformed: int = 0

    def add(self, stats: RequestStats) -> None:
        key = (stats.arm, stats.revision)
        arm = self.arms.get(key)
        if arm is None:
            arm = self.arms[key] = deque(maxlen=self.size)
        arm.append(
            RequestSample(
                revision=stats.revision,
                arm=stats.arm,
                decode_tokens_per_s=stats.decode_tokens_per_s,
                accept_length=stats.accept_length,
                new_tokens=stats.new_tokens,
                created=stats.created,
            )
        )

    def refresh(self, client: redis.Redis, keys: Keys, limit: int = MAX_STATS_PER_ROUND) -> int:
        """Read new stats entries (at most `limit`); returns how many were read."""
        page = protocol.read_stats(client, keys, since_id=self.cursor, count=limit)
        for _, stats in page:
            self.add(stats)
        self.malformed += page.malformed
        if page.last_id is not None:
            self.cursor = page.last_id
        return len(page) + page.malformed

    def samples(self) -> list[RequestSample]:
        return [sample for arm in self.arms.values() for sample in arm]

    def keep_only(self, revisions: Iterable[str | None]) -> None:
        """Forget arms of revisions that no longer matter (baseline arms stay)."""
        # "" and "none" both name serving without a draft (servers report "none").
        keep = {revision for revision in revisions if revision is not None} | {"", "none"}
        for arm, revision in list(self.arms):
            if arm != "baseline" and revision not in keep:
                del self.arms[(arm, revision)]


def to_candidate(record: CandidateRecord) -> Candidate:
    """The trainer's candidate record as the rollout policy sees it. The trainer's
    evaluation may carry offline accept lengths ("candidate", "stable") and
    "loadable": false for a checkpoint it knows to be broken."""
    evaluation = record.evaluation

    def number(key: str) -> float | None:
        value = evaluation.get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    return Candidate(
        revision=record.revision,
        parent=record.parent,
        created=record.created,
        offline_accept_length=number("candidate"),
        stable_offline_accept_length=number("stable"),
        loadable=evaluation.get("loadable", True) is not False,
    )


def to_load(report: LoadedReport) -> ServerLoad:
    return ServerLoad(
        server=report.server, stable=report.stable, candidate=report.candidate, error=report.error
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


def desired_state(
    desired: DesiredRevisions,
    records: Mapping[str, CandidateRecord],
    previous: DesiredState | None,
    now: float,
) -> DesiredState:
    """The policy's desired revisions as the protocol's DesiredState, with each
    revision's checkpoint path. `generation` moves only when something changed.
    Raises LookupError when a wanted revision has no candidate record (and is not
    what is already published), so nothing half-formed is published."""

    def ref(revision: str | None, old: RevisionRef | None) -> RevisionRef | None:
        if revision is None:
            return None
        if revision == NO_DRAFT:  # a fallback to plain decoding: a built-in, no checkpoint
            return RevisionRef(revision=NO_DRAFT, path="")
        if revision in records:
            return RevisionRef(revision=revision, path=records[revision].path)
        for known in (
            old,
            previous.stable if previous else None,
            previous.candidate if previous else None,
        ):
            if known is not None and known.revision == revision:
                return known
        raise LookupError(
            f"revision {revision} has no candidate record in Redis (was it withdrawn?): "
            "cannot tell servers where its checkpoint is"
        )

    stable = ref(desired.stable, previous.stable if previous else None)
    candidate = ref(desired.candidate, previous.candidate if previous else None)
    content = (stable, candidate, desired.candidate_share, desired.baseline_share)
    if previous is not None and content == (
        previous.stable,
        previous.candidate,
        previous.candidate_share,
        previous.baseline_share,
    ):
        return previous
    return DesiredState(
        stable=stable,
        candidate=candidate,
        candidate_share=desired.candidate_share,
        baseline_share=desired.baseline_share,
        generation=(previous.generation + 1) if previous else 1,
        updated=now,
    )


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
    records = {record.revision: record for record in protocol.list_candidates(client, keys)}
    live, stale = live_loads(protocol.get_loaded(client, keys), live_pods, now)
    decision = decide(
        policy,
        state,
        [to_candidate(record) for record in records.values()],
        window.samples(),
        [to_load(report) for report in live],
        now,
        override=override,
    )
    lag = trace_lag(client, keys)
    previous = protocol.get_desired(client, keys)
    published, changed, problem = previous, False, None
    if publish:
        try:
            wanted = desired_state(decision.desired, records, previous, now)
        except LookupError as error:
            problem = str(error)
        else:
            if wanted is not previous:
                protocol.set_desired(client, keys, wanted)
                published, changed = wanted, True
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
    return Round(decision, published, changed, lag, problem, tuple(stale))


def delete_speculator_keys(client: redis.Redis, keys: Keys) -> int:
    """Remove every Redis key of the Speculator (traces, stats, candidates, ...)."""
    return protocol.delete_all(client, keys)
