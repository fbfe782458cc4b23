"""The rollout decision: which draft revision serves, and when a candidate replaces it.

Pure and deterministic (stdlib, pydantic and the protocol's records): the rollout loop
(`aurora.runtime.rollout.loop`, run by the operator's kopf timer and by `aurora local`)
calls `decide` with what it observed, persists `Decision.new_state`, publishes
`Decision.desired` and turns `Decision.events` into Kubernetes Events. Same inputs, same
decision.

State machine (`RolloutState.phase`; event actions in brackets, kept in the bounded history)::

    Idle        -> Canary          newest eligible candidate [StartCanary]
    Idle        -> Idle            newest eligible candidate is not loadable [Reject]; within
                                   the back-off after a rollback (Wait, no event)
    Canary      -> Promoting       lower bound >= minSpeedup [Promote]
    Canary      -> Idle            upper bound < regressionThreshold [Rollback] (RolledBack);
                                   a server failed to load it [Reject] (Rejected)
    Canary      -> Hold | Idle     inconclusive at maxCanarySamples: onInconclusive Hold [Hold]
                                   or Rollback [Rollback]
    Canary|Hold -> Canary          a newer candidate supersedes it [Superseded, StartCanary]
    Canary|Hold -> Promoting|Idle  a person's `Override` [Promote | Rollback]
    Promoting   -> Idle            every server reports it as stable [Promoted]; a server
                                   failed to load it [Reject], the old stable stays
    Idle|Canary|Hold -> same       stable slower than no speculation, fallbackOnRegression
                                   [Fallback]: stable becomes "none" (plain decoding)
    Idle|Canary|Hold -> same       the traffic mix changed: the window restarts [MixChange]

- Idle: the stable revision serves alone (None = no draft, plain decoding). The newest
  candidate (by `created`) that is newer than every candidate already tried, not rejected
  and not the stable one starts a canary; older ones are skipped for good. Over a stable
  that drafts with suffix decoding (suffix, hybrid:<head>) and with `hybridCanaries`, the
  trainer's candidate is canaried as hybrid:<candidate> (suffix decoding and its head;
  `canary_name`), and promoted under that name. After the gate rolls a candidate back
  (regression, or onInconclusive Rollback) the next canary waits
  `rollbackBackoffSeconds`, doubled for each rollback in a row up to
  `maxRollbackBackoffSeconds` (`RolloutState.next_canary_at`); a new stable (Promoted,
  Fallback) ends the streak. A person's rollback and a rejected checkpoint never wait.
- Canary: the candidate serves `canaryShare` of requests (or replicas; the caller decides),
  `baselineShare` is served without speculation. A candidate arriving mid-canary waits for
  the canary to resolve, except that with `replaceCanaryWithNewer` a candidate trained from
  the canary (its `parent` is the canary) supersedes it at once.
- Hold: inconclusive; the candidate keeps its canary share and a person decides (an
  `Override`), like an Argo Rollouts pause. A newer candidate supersedes a held one, so the
  pipeline never blocks on a person.
- Promoting: desired stable is the candidate; `stable_revision` stays the old one until
  every server reports the new one loaded (servers still serving the old revision never
  count as promoted). A load failure then rejects it and the old stable stays desired.
- Rolled back and rejected revisions go to `RolloutState.rejected` and are never retried.

Measurement (`aurora.runtime.rollout.statistics` has the method and its assumptions): per
arm (stable, candidate, baseline = speculation off), throughput is total decode tokens
over total decode seconds of its requests in the comparison window (time-weighted), with
ms per token beside it; a speedup is the candidate's (or stable's) throughput over its
comparator's, with one-sided bounds from a confidence sequence at `falsePromotionRate`,
valid however often the rule is checked. The window is the same period for every arm:
it starts at the last change of what is served (StartCanary, Promoted, Rollback, Reject,
Superseded, Fallback; `RolloutState.window_since`) and restarts where the traffic mix
changes (domain or prompt length; [MixChange]), the comparison then running on the new
mix alone at a smaller share of the error rate. Once both arms hold `minSamples` in the
window: Promote when the lower bound >= minSpeedup; Rollback when the upper bound <
regressionThreshold (validated <= minSpeedup, so the two never both hold); otherwise keep
collecting until the candidate has `maxCanarySamples` requests in the window, then follow
`onInconclusive`. A stable revision whose upper bound against no speculation is below 1.0
(both arms holding minSamples) is flagged `Measurement.stable_regressed` and named in the
reason. With `fallbackOnRegression` (the default) the policy then falls back to plain
decoding: stable becomes `NO_DRAFT` ("none"), a running canary carries on against it, and
the next candidate that beats plain decoding is promoted as usual (traffic shifted and
the draft went stale: stop paying for it until the trainer catches up). Otherwise the
decision does not change and the operator reports it as Degraded. A fallback never
happens while Promoting (servers are mid-swap) and never from no draft, so it cannot
flip-flop. Every reason quotes the gated figure with its comparator, window and counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from aurora.runtime.protocol import (
    BUILTIN_REVISIONS,
    HYBRID_PREFIX,
    Builtin,
    CandidateRecord,
    DesiredState,
    LoadedReport,
    RequestStats,
    RevisionRef,
    head_of,
    hybrid_head,
    hybrid_revision,
)
from aurora.runtime.rollout.policy import WIRE_MODEL, RolloutPolicy
from aurora.runtime.rollout.statistics import (
    ArmTotals,
    mix_change,
    restart_alpha,
    speedup_bounds,
    totals,
)

Arm = Literal["stable", "candidate", "baseline"]
Phase = Literal["Idle", "Canary", "Hold", "Promoting"]
Action = Literal["None", "StartCanary", "Promote", "Rollback", "Reject", "Hold", "Wait", "Fallback"]
EventAction = Literal[
    "StartCanary",
    "Promote",
    "Promoted",
    "Rollback",
    "Reject",
    "Hold",
    "Superseded",
    "Fallback",
    "MixChange",
]
# The revision servers serve without a draft; as `stable_revision` it is an explicit
# fallback to plain decoding (None means "whatever servers started with").
NO_DRAFT = Builtin.NONE

# Day-0 drafts that need no training: gated like any candidate when the caller asks
# (`day_zero`), since their speed depends on the traffic as much as a learned draft's.
MODEL_FREE = (Builtin.SUFFIX, Builtin.NGRAM)

HISTORY_LIMIT = 20
REJECTED_LIMIT = 50


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes status, Redis), snake_case in Python."""

    model_config = WIRE_MODEL


class Override(_Model):
    """A person's decision on the current canary (e.g. from an annotation)."""

    action: Literal["Promote", "Rollback"]
    revision: str


class RolloutEvent(_Model):
    time: float
    action: EventAction
    revision: str | None
    reason: str


class RolloutState(_Model):
    """What the caller persists between decisions (Kubernetes status or Redis); plain JSON.

    During Promoting, `stable_revision` is still the old revision (what servers are known
    to serve) and `candidate_revision` the one being promoted.
    """

    phase: Phase = "Idle"
    stable_revision: str | None = None
    candidate_revision: str | None = None
    canary_started_at: float | None = None
    phase_since: float | None = None
    # `created` of the newest candidate ever acted on; older candidates are never offered.
    tried_through: float | None = None
    # The comparison window: requests created since then count (None: all); restarts by a
    # traffic-mix change since the last change of what is served.
    window_since: float | None = None
    window_restarts: int = Field(default=0, ge=0)
    # Candidates the gate rolled back since the last promotion (or fallback), and when
    # the next canary may start (rollbackBackoffSeconds, doubling with each of them).
    rollbacks_in_a_row: int = Field(default=0, ge=0)
    next_canary_at: float | None = None
    rejected: list[str] = Field(default_factory=list)
    history: list[RolloutEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> RolloutState:
        if (self.phase == "Idle") != (self.candidate_revision is None):
            raise ValueError(
                f"rolloutState: phase {self.phase!r} with candidateRevision {self.candidate_revision!r}; "
                "Idle has no candidate and every other phase has one"
            )
        return self


class ArmStats(_Model):
    """One arm in the window: time-weighted throughput (total decode tokens over total
    decode seconds) and ms per decode token."""

    revision: str | None
    samples: int
    decode_tokens_per_s: float | None
    ms_per_token: float | None = None
    accept_length: float | None
    new_tokens: int


class Speedup(_Model):
    """An arm's throughput over its comparator's on the same window, with one-sided
    confidence-sequence bounds (each at level 1 - confidence, valid at every look)."""

    estimate: float
    lower: float
    upper: float
    comparator: str = ""  # what it is measured against: a revision, or "no speculation"
    samples: int = 0  # the measured arm's requests in the window
    comparator_samples: int = 0


class Measurement(_Model):
    confidence: float  # of each one-sided bound: 1 - the window's share of falsePromotionRate
    stable: ArmStats
    candidate: ArmStats
    baseline: ArmStats
    speedup_vs_stable: Speedup | None
    stable_speedup_vs_baseline: Speedup | None
    candidate_speedup_vs_baseline: Speedup | None
    stable_regressed: bool
    window_since: float | None = None  # requests created since then count
    window_seconds: float = 0.0  # from window_since (or the first request) to now
    window_restarts: int = 0  # traffic-mix restarts since the last change of what is served


@dataclass(frozen=True)
class Decision:
    """The next step. `measurement` holds the figures it was based on (the state's
    revisions before the decision); `events` are those appended to the history by it."""

    action: Action
    reason: str
    new_state: RolloutState
    # What servers should serve, as published to them: the previously published state
    # when nothing changed (the same object), or when `problem` says why it cannot change.
    desired: DesiredState | None
    measurement: Measurement | None
    events: tuple[RolloutEvent, ...] = ()
    problem: str | None = None

    @property
    def stable_regressed(self) -> bool:
        return self.measurement is not None and self.measurement.stable_regressed


# ---------------------------------------------------------------- statistics


def _usable(sample: RequestStats) -> bool:
    seconds = sample.decode_seconds
    return 0 < seconds < math.inf


def _arm_stats(revision: str | None, arm: list[RequestStats]) -> tuple[ArmStats, ArmTotals]:
    sums = totals(arm)
    n = len(arm)
    stats = ArmStats(
        revision=revision,
        samples=n,
        decode_tokens_per_s=sums.tokens_per_s,
        ms_per_token=sums.ms_per_token,
        accept_length=math.fsum(s.accept_length for s in arm) / n if n else None,
        new_tokens=sum(s.new_tokens for s in arm),
    )
    return stats, sums


def _speedup(
    numerator: ArmTotals, denominator: ArmTotals, comparator: str, alpha: float, rho: float
) -> Speedup | None:
    bounds = speedup_bounds(numerator, denominator, alpha, rho)
    if bounds is None:
        return None
    return Speedup(
        estimate=bounds.estimate,
        lower=bounds.lower,
        upper=bounds.upper,
        comparator=comparator,
        samples=numerator.requests,
        comparator_samples=denominator.requests,
    )


_ORDER = attrgetter("created", "arm", "revision", "server", "cohort")


def in_window(samples: Iterable[RequestStats], since: float | None) -> list[RequestStats]:
    """The requests created since `since`, oldest first (sums are exact, so the figures
    do not depend on the input order)."""
    kept = samples if since is None else (s for s in samples if s.created >= since)
    return sorted(kept, key=_ORDER)


def measure(
    samples: Sequence[RequestStats],
    stable: str | None,
    candidate: str | None,
    policy: RolloutPolicy,
    *,
    since: float | None = None,
    restarts: int = 0,
    now: float | None = None,
) -> Measurement:
    """Live figures for the stable and candidate revisions and the no-speculation baseline
    on the requests created since `since` (the comparison window; None: all of them).

    Samples of other revisions are ignored. With `stable` None (no draft) the stable arm is
    every request served without a draft (arm "stable" or "baseline"), which then is also
    the baseline, and `stable_speedup_vs_baseline` is None. With `stable` NO_DRAFT (after a
    fallback) likewise, except that only requests labelled "none" count from the stable
    arm. `restarts` traffic-mix restarts leave this window a smaller share of the error
    rate. Deterministic: same samples in any order give the same measurement.
    """
    return _measure(in_window(samples, since), stable, candidate, policy, since, restarts, now)


def _measure(
    window: list[RequestStats],
    stable: str | None,
    candidate: str | None,
    policy: RolloutPolicy,
    since: float | None,
    restarts: int,
    now: float | None,
) -> Measurement:
    """`measure` on the requests of the window, already in order."""
    usable = [s for s in window if _usable(s)]
    if stable is None:
        stable_arm = [s for s in usable if s.arm in ("stable", "baseline")]
        baseline_arm = stable_arm
    elif stable == NO_DRAFT:
        # After a fallback: the old stable's drafted requests no longer count.
        stable_arm = [
            s
            for s in usable
            if s.arm == "baseline" or (s.arm == "stable" and s.revision in ("", NO_DRAFT))
        ]
        baseline_arm = stable_arm
    else:
        stable_arm = [s for s in usable if s.arm == "stable" and s.revision == stable]
        baseline_arm = [s for s in usable if s.arm == "baseline"]
    candidate_arm = [s for s in usable if s.arm == "candidate" and s.revision == candidate]
    stable_stats, stable_sums = _arm_stats(stable, stable_arm)
    candidate_stats, candidate_sums = _arm_stats(candidate, candidate_arm)
    baseline_stats, baseline_sums = _arm_stats(None, baseline_arm)
    alpha = restart_alpha(float(policy.false_promotion_rate), restarts)
    rho = policy.min_samples / 2  # tightest around 4 x minSamples effective requests
    plain = "no speculation"
    vs_stable = _speedup(candidate_sums, stable_sums, _name(stable, plain), alpha, rho)
    if stable is None or stable == NO_DRAFT:
        stable_vs_baseline, candidate_vs_baseline = None, vs_stable
    else:
        stable_vs_baseline = _speedup(stable_sums, baseline_sums, plain, alpha, rho)
        candidate_vs_baseline = _speedup(candidate_sums, baseline_sums, plain, alpha, rho)
    regressed = (
        stable_vs_baseline is not None
        and min(stable_stats.samples, baseline_stats.samples) >= policy.min_samples
        and stable_vs_baseline.upper < 1.0
    )
    counted = [s.created for s in (*stable_arm, *candidate_arm, *baseline_arm)]
    start = since if since is not None else min(counted, default=None)
    end = now if now is not None else max(counted, default=None)
    return Measurement(
        confidence=1 - alpha,
        stable=stable_stats,
        candidate=candidate_stats,
        baseline=baseline_stats,
        speedup_vs_stable=vs_stable,
        stable_speedup_vs_baseline=stable_vs_baseline,
        candidate_speedup_vs_baseline=candidate_vs_baseline,
        stable_regressed=regressed,
        window_since=since,
        window_seconds=max(0.0, end - start) if start is not None and end is not None else 0.0,
        window_restarts=restarts,
    )


# ---------------------------------------------------------------- decisions


def _regression(m: Measurement) -> str:
    """The figures behind a regression flag."""
    assert m.stable_speedup_vs_baseline is not None
    return (
        f"{_ratio(m.stable_speedup_vs_baseline, m.confidence)} on {m.stable.samples} requests "
        f"against {m.baseline.samples} without speculation, {_window(m)}"
    )


def _name(revision: str | None, none: str = "no draft") -> str:
    return revision if revision not in (None, NO_DRAFT) else none


def _suffix_backed(revision: str | None) -> bool:
    """Whether a revision drafts with suffix decoding (suffix, or hybrid:<head>)."""
    return revision == Builtin.SUFFIX or (
        revision is not None and hybrid_head(revision) is not None
    )


def canary_name(policy: RolloutPolicy, stable: str | None, revision: str) -> str:
    """The name the trainer's candidate `revision` is canaried under against `stable`:
    hybrid:<revision> over a suffix-decoding stable when the policy has hybridCanaries
    (a head alone rarely beats suffix decoding where suffix decoding wins), else itself."""
    if (
        policy.hybrid_canaries
        and _suffix_backed(stable)
        and revision not in BUILTIN_REVISIONS
        and hybrid_head(revision) is None
    ):
        return hybrid_revision(revision)
    return revision


def _served_names(revision: str) -> set[str]:
    """The names a trainer's revision can be served under: alone or as a hybrid's head."""
    return {revision, HYBRID_PREFIX + revision}


def _names(override: Override, revision: str) -> bool:
    """Whether a person's override names `revision` (a hybrid also by its head's name, the
    revision the trainer offered)."""
    return override.revision in (revision, head_of(revision))


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S UTC")


def _percent(fraction: float) -> str:
    text = f"{fraction:.1%}"
    return text.replace(".0%", "%")


def _ratio(speedup: Speedup, confidence: float) -> str:
    return (
        f"{speedup.estimate:.3f}x ({_percent(confidence)} confidence sequence "
        f"{speedup.lower:.3f}x-{speedup.upper:.3f}x, time-weighted)"
    )


def _window(m: Measurement) -> str:
    """The comparison window in words: since when, how long, restarted or not."""
    if m.window_since is None:
        text = f"window of {m.window_seconds:.0f} s"
    else:
        text = f"window since {_clock(m.window_since)} ({m.window_seconds:.0f} s)"
    if m.window_restarts:
        text += f", restarted {m.window_restarts}x by a traffic-mix change"
    return text


def _figures(m: Measurement) -> str:
    """The canary's numbers in one phrase, for reasons: the gated figure with its
    comparator, window and counts, then both against no speculation."""
    text = f"{m.candidate.samples} candidate / {m.stable.samples} stable requests"
    if m.candidate.ms_per_token is not None and m.stable.ms_per_token is not None:
        text += f" ({m.candidate.ms_per_token:.1f} / {m.stable.ms_per_token:.1f} ms per token)"
    if m.speedup_vs_stable is not None:
        text = (
            f"speedup {_ratio(m.speedup_vs_stable, m.confidence)} vs "
            f"{m.speedup_vs_stable.comparator} on {text}"
        )
    text += f", {_window(m)}"
    against = [
        f"{label} {s.estimate:.3f}x ({s.lower:.3f}x-{s.upper:.3f}x)"
        for label, s in (
            ("candidate", m.candidate_speedup_vs_baseline),
            ("stable", m.stable_speedup_vs_baseline),
        )
        if s is not None and m.stable.revision not in (None, NO_DRAFT)
    ]
    if against and m.baseline.samples:
        text += f"; vs no speculation ({m.baseline.samples} requests): {', '.join(against)}"
    return text


def _mix(requests: Sequence[RequestStats]) -> str:
    """A traffic mix in words: its main domain and median prompt length."""
    domains = Counter(s.domain or "unlabelled" for s in requests)
    domain, count = domains.most_common(1)[0]
    lengths = sorted(s.prompt_tokens for s in requests)
    text = f"{count / len(requests):.0%} {domain}"
    if lengths[-1] > 0:
        text += f", median prompt {lengths[len(lengths) // 2]} tokens"
    return text


def _desired(
    policy: RolloutPolicy,
    state: RolloutState,
    candidates: Sequence[CandidateRecord],
    published: DesiredState | None,
    now: float,
) -> tuple[DesiredState | None, str | None]:
    """(what servers should serve, None) with each revision's checkpoint path; the
    generation moves only when something changed. A wanted revision with no candidate
    record (and not already published) leaves `published` as it is, with the problem:
    nothing half-formed reaches the servers."""
    if state.phase == "Promoting":
        stable, candidate = state.candidate_revision, None
    else:
        stable, candidate = state.stable_revision, state.candidate_revision
    paths = {c.revision: c.path for c in candidates}
    known = [published.stable, published.candidate] if published is not None else []

    def ref(revision: str | None) -> RevisionRef | None:
        if revision is None:
            return None
        if revision in BUILTIN_REVISIONS:  # plain decoding or a model-free draft
            return RevisionRef(revision=revision, path="")
        if head_of(revision) in paths:  # (a hybrid's path is its head's checkpoint)
            return RevisionRef(revision=revision, path=paths[head_of(revision)])
        for old in known:
            if old is not None and old.revision == revision:
                return old
        raise LookupError(
            f"revision {revision} has no candidate record in Redis (was it withdrawn?): "
            "cannot tell servers where its checkpoint is"
        )

    try:
        refs = ref(stable), ref(candidate)
    except LookupError as error:
        return published, str(error)
    share = float(policy.canary_share) if candidate is not None else 0.0
    content = (*refs, share, float(policy.baseline_share))
    if published is not None and content == (
        published.stable,
        published.candidate,
        published.candidate_share,
        published.baseline_share,
    ):
        return published, None
    generation = published.generation + 1 if published is not None else 1
    return DesiredState(
        stable=refs[0],
        candidate=refs[1],
        candidate_share=share,
        baseline_share=float(policy.baseline_share),
        generation=generation,
        updated=now,
    ), None


@dataclass
class _Tick:
    """One call of `decide`: the observations, and the events appended so far."""

    policy: RolloutPolicy
    candidates: Sequence[CandidateRecord]
    loads: Sequence[LoadedReport]
    now: float
    measurement: Measurement | None
    published: DesiredState | None
    events: list[RolloutEvent] = field(default_factory=list)

    def record(
        self,
        state: RolloutState,
        action: EventAction,
        revision: str | None,
        reason: str,
        **changes: Any,
    ) -> RolloutState:
        event = RolloutEvent(time=self.now, action=action, revision=revision, reason=reason)
        self.events.append(event)
        if "phase" in changes:
            changes["phase_since"] = self.now
        if {"stable_revision", "candidate_revision"} & changes.keys():
            # What is served changed: comparisons start over, on the new arms only.
            changes.update(window_since=self.now, window_restarts=0)
        if "stable_revision" in changes:  # a new stable: rollbacks against the old one end
            changes.update(rollbacks_in_a_row=0, next_canary_at=None)
        history = [*state.history, event][-HISTORY_LIMIT:]
        return state.model_copy(update={**changes, "history": history})

    def decision(self, action: Action, reason: str, state: RolloutState) -> Decision:
        m = self.measurement
        if m is not None and m.stable_regressed:
            reason += f"; stable {_name(m.stable.revision)} is slower than no speculation: " + (
                _regression(m)
            )
        desired, problem = _desired(self.policy, state, self.candidates, self.published, self.now)
        return Decision(action, reason, state, desired, m, tuple(self.events), problem)

    def newest_eligible(self, state: RolloutState) -> CandidateRecord | None:
        taken = {*state.rejected, state.stable_revision, state.candidate_revision}
        eligible = [
            c
            for c in self.candidates
            if not _served_names(c.revision) & taken
            and (state.tried_through is None or c.created > state.tried_through)
        ]
        return max(eligible, key=lambda c: (c.created, c.revision), default=None)

    def load_failure(self, revision: str) -> LoadedReport | None:
        for load in sorted(self.loads, key=lambda load: load.server):
            if load.error and (
                load.error_revision == revision
                or (load.error_revision is None and revision not in (load.stable, load.candidate))
            ):
                return load
        return None

    def retire(
        self, state: RolloutState, action: EventAction, reason: str, backoff: bool = False
    ) -> tuple[RolloutState, str]:
        """End the current candidate for good (Rollback or Reject): stable serves alone.
        With `backoff` (the gate rolled it back) the next canary waits
        rollbackBackoffSeconds, doubled for each earlier rollback in a row; the reason,
        returned with the state, says how long."""
        revision = state.candidate_revision
        assert revision is not None
        changes: dict[str, Any] = {}
        if backoff:
            count = state.rollbacks_in_a_row + 1
            policy = self.policy
            wait = min(
                policy.max_rollback_backoff_seconds,
                policy.rollback_backoff_seconds * 2 ** min(count - 1, 30),
            )
            changes = {"rollbacks_in_a_row": count, "next_canary_at": self.now + wait}
            if wait > 0:
                ordinal = "1 rollback" if count == 1 else f"{count} rollbacks in a row"
                reason += f"; after {ordinal} the next canary waits {wait} s"
        state = self.record(
            state,
            action,
            revision,
            reason,
            phase="Idle",
            candidate_revision=None,
            canary_started_at=None,
            rejected=[*state.rejected, revision][-REJECTED_LIMIT:],
            **changes,
        )
        return state, reason

    def end(
        self,
        state: RolloutState,
        action: Literal["Rollback", "Reject"],
        reason: str,
        backoff: bool = False,
    ) -> Decision:
        """The decision that retires the current candidate (`retire`)."""
        state, reason = self.retire(state, action, reason, backoff)
        return self.decision(action, reason, state)

    def fallback(self, state: RolloutState) -> RolloutState | None:
        """Stable is slower than no speculation: the state serving plain decoding instead
        (None when the policy keeps the regressed stable, or there is nothing to fall from)."""
        m = self.measurement
        stable = state.stable_revision
        if (
            not self.policy.fallback_on_regression
            or m is None
            or not m.stable_regressed
            or stable in (None, NO_DRAFT)
        ):
            return None
        reason = (
            f"stable {stable} is slower than no speculation: {_regression(m)}; "
            "falling back to plain decoding"
        )
        if state.candidate_revision is not None:
            reason += f" (canary {state.candidate_revision} carries on against it)"
        return self.record(state, "Fallback", stable, reason, stable_revision=NO_DRAFT)

    def restart_on_mix_change(
        self, state: RolloutState, window: list[RequestStats]
    ) -> tuple[RolloutState, list[RequestStats]]:
        """The state with the window restarted where the traffic mix changed within it
        (a MixChange event) and the requests of the window, or both unchanged."""
        cut = mix_change(window)
        if cut is None:
            return state, window
        before, after = window[:cut], window[cut:]
        at = _clock(after[0].created)
        reason = (
            f"traffic mix changed at {at} ({_mix(before)} -> {_mix(after)}): comparisons "
            f"restart there; the {len(before)} requests before it no longer count"
        )
        state = self.record(
            state,
            "MixChange",
            state.candidate_revision or state.stable_revision,
            reason,
            window_since=after[0].created,
            window_restarts=state.window_restarts + 1,
        )
        return state, [s for s in after if s.created >= after[0].created]

    # -- phases

    def idle(self, state: RolloutState, done: str = "") -> Decision:
        candidate = self.newest_eligible(state)
        if candidate is None:
            return self.decision(
                "None", done or f"serving {_name(state.stable_revision)}; no new candidate", state
            )
        prefix = f"{done}; " if done else ""
        if state.next_canary_at is not None and self.now < state.next_canary_at:
            count = state.rollbacks_in_a_row
            reason = (
                f"{prefix}backing off after {count} rollback{'s' if count != 1 else ''} in a "
                f"row: the next canary starts at {_clock(state.next_canary_at)} (in "
                f"{state.next_canary_at - self.now:.0f} s) with the newest candidate then "
                f"(now {candidate.revision}); {_name(state.stable_revision)} keeps serving"
            )
            return self.decision("Wait", reason, state)
        if not candidate.loadable:
            reason = f"{prefix}trainer marked {candidate.revision} not loadable; {_name(state.stable_revision)} keeps serving"
            state = self.record(
                state,
                "Reject",
                candidate.revision,
                reason,
                tried_through=candidate.created,
                rejected=[*state.rejected, candidate.revision][-REJECTED_LIMIT:],
            )
            return self.decision("Reject", reason, state)
        served = canary_name(self.policy, state.stable_revision, candidate.revision)
        reason = (
            f"canary {served} against {_name(state.stable_revision)} on "
            f"{self.policy.canary_share:.0%} of requests"
        )
        if served != candidate.revision:
            reason += f" (suffix decoding and {candidate.revision}'s head: hybridCanaries)"
        if candidate.offline_accept_length is not None:
            reason += f"; offline accept length {candidate.offline_accept_length:.2f}"
            if candidate.stable_offline_accept_length is not None:
                reason += f" vs {candidate.stable_offline_accept_length:.2f}"
        state = self.record(
            state,
            "StartCanary",
            served,
            reason,
            phase="Canary",
            candidate_revision=served,
            canary_started_at=self.now,
            tried_through=candidate.created,
        )
        return self.decision("StartCanary", prefix + reason, state)

    def canary(self, state: RolloutState, override: Override | None) -> Decision:
        revision, stable = state.candidate_revision, _name(state.stable_revision)
        assert revision is not None and self.measurement is not None
        m, policy = self.measurement, self.policy
        if failure := self.load_failure(revision):
            reason = f"server {failure.server} failed to load {revision}: {failure.error}; {stable} keeps serving"
            return self.end(state, "Reject", reason)
        offered = next((c for c in self.candidates if c.revision == head_of(revision)), None)
        if offered is not None and not offered.loadable:
            reason = f"trainer marked {revision} not loadable; {stable} keeps serving"
            return self.end(state, "Reject", reason)
        if override is not None and _names(override, revision):
            if override.action == "Promote":
                return self.promote(state, f"{revision} promoted by a person; {_figures(m)}")
            reason = f"{revision} rolled back by a person; {_figures(m)}"
            return self.end(state, "Rollback", reason)
        newer = self.newest_eligible(state)
        if (
            newer is not None
            and newer.loadable
            and (
                state.phase == "Hold"
                or (policy.replace_canary_with_newer and newer.parent == head_of(revision))
            )
        ):
            reason = f"{newer.revision} (trained from {_name(newer.parent)}) supersedes {state.phase.lower()} {revision}"
            state = self.record(
                state,
                "Superseded",
                revision,
                reason,
                phase="Idle",
                candidate_revision=None,
                canary_started_at=None,
            )
            return self.idle(state, done=reason)
        if state.phase == "Hold":
            reason = (
                f"holding {revision} on {policy.canary_share:.0%} of requests: inconclusive, a person "
                f"decides (or a newer candidate supersedes it); {_figures(m)}"
            )
            return self.decision("Hold", reason, state)
        speedup = m.speedup_vs_stable
        if speedup is None or min(m.candidate.samples, m.stable.samples) < policy.min_samples:
            reason = (
                f"collecting samples: {revision} {m.candidate.samples}/{policy.min_samples}, "
                f"stable {stable} {m.stable.samples}/{policy.min_samples} ({_window(m)})"
            )
            if self.loads and all(revision not in (s.stable, s.candidate) for s in self.loads):
                reason += f"; no server has loaded {revision} yet"
            return self.decision("Wait", reason, state)
        if speedup.lower >= float(policy.min_speedup):
            return self.promote(
                state,
                f"{revision} beats {stable}: lower bound {speedup.lower:.3f}x >= "
                f"minSpeedup {policy.min_speedup} (falsePromotionRate "
                f"{policy.false_promotion_rate}); {_figures(m)}",
            )
        if speedup.upper < float(policy.regression_threshold):
            reason = (
                f"{revision} regresses against {stable}: upper bound {speedup.upper:.3f}x < "
                f"regressionThreshold {policy.regression_threshold}; {_figures(m)}"
            )
            return self.end(state, "Rollback", reason, backoff=True)
        if m.candidate.samples < policy.max_canary_samples:
            reason = (
                f"inconclusive so far ({m.candidate.samples}/{policy.max_canary_samples} samples): "
                f"needs lower bound >= {policy.min_speedup} or upper bound < "
                f"{policy.regression_threshold}; {_figures(m)}"
            )
            if newer is not None:
                reason += f"; {newer.revision} waits for this canary"
            return self.decision("Wait", reason, state)
        reason = (
            f"{revision} inconclusive after {m.candidate.samples} samples "
            f"(onInconclusive {policy.on_inconclusive}); {_figures(m)}"
        )
        if policy.on_inconclusive == "Rollback":
            return self.end(state, "Rollback", reason, backoff=True)
        return self.decision(
            "Hold", reason, self.record(state, "Hold", revision, reason, phase="Hold")
        )

    def promote(self, state: RolloutState, reason: str) -> Decision:
        state = self.record(state, "Promote", state.candidate_revision, reason, phase="Promoting")
        return self.decision("Promote", reason, state)

    def promoting(self, state: RolloutState, override: Override | None) -> Decision:
        revision, previous = state.candidate_revision, _name(state.stable_revision)
        assert revision is not None
        if override is not None and override.action == "Rollback" and _names(override, revision):
            reason = f"promotion of {revision} rolled back by a person; {previous} stays stable"
            return self.end(state, "Rollback", reason)
        if failure := self.load_failure(revision):
            reason = f"server {failure.server} failed to load {revision} as stable: {failure.error}; {previous} stays stable"
            return self.end(state, "Reject", reason)
        if not self.loads:
            reason = f"promoting {revision}: no server has reported what it serves yet"
            return self.decision("Wait", reason, state)
        pending = sorted(load.server for load in self.loads if load.stable != revision)
        if pending:
            noun = "server" if len(pending) == 1 else "servers"
            reason = f"waiting for {noun} {', '.join(pending)} to load {revision}"
            return self.decision("Wait", reason, state)
        reason = f"{revision} promoted: every server serves it ({len(self.loads)} of {len(self.loads)}, was {previous})"
        state = self.record(
            state,
            "Promoted",
            revision,
            reason,
            phase="Idle",
            stable_revision=revision,
            candidate_revision=None,
            canary_started_at=None,
        )
        return self.idle(state, done=reason)


def decide(
    policy: RolloutPolicy,
    state: RolloutState,
    candidates: Sequence[CandidateRecord],
    samples: Sequence[RequestStats],
    loads: Sequence[LoadedReport],
    now: float,
    *,
    override: Override | None = None,
    published: DesiredState | None = None,
) -> Decision:
    """The next rollout step from the persisted state and what was observed since.

    `candidates`: the trainer's candidate records; `samples`: requests the servers
    reported (those in the comparison window count, see `measure`); `loads`: one live report per
    server; `now`: the caller's clock (seconds, as `created`); `published`: the desired
    state servers were last told (the decision's `desired` builds on it).
    Pure and deterministic; one transition per call except that a completed promotion or a
    superseded canary goes straight on to the next candidate's canary.
    """
    tick = _Tick(policy, candidates, loads, now, None, published)
    if state.stable_revision is not None or state.candidate_revision is not None:
        window = in_window(samples, state.window_since)
        if state.phase != "Promoting":  # (the window restarts once servers confirm anyway)
            state, window = tick.restart_on_mix_change(state, window)
        tick.measurement = _measure(
            window,
            state.stable_revision,
            state.candidate_revision,
            policy,
            state.window_since,
            state.window_restarts,
            now,
        )
    measurement = tick.measurement
    if state.phase == "Promoting":
        return tick.promoting(state, override)
    if (fallen := tick.fallback(state)) is not None:
        desired, problem = _desired(policy, fallen, candidates, published, now)
        reason = tick.events[-1].reason
        return Decision(
            "Fallback", reason, fallen, desired, measurement, tuple(tick.events), problem
        )
    if state.phase in ("Canary", "Hold"):
        return tick.canary(state, override)
    return tick.idle(state)


def gates_day_zero(initial: str | None, policy: RolloutPolicy) -> bool:
    """Whether the day-0 draft is canaried against plain decoding (`day_zero`). A policy
    that does not run (a Speculator's `rollout.enabled: false`) gates nothing: nobody
    would ever promote the draft."""
    return policy.gate_initial_draft and getattr(policy, "enabled", True) and initial in MODEL_FREE


def server_day_zero(initial: str, policy: RolloutPolicy) -> str:
    """What servers start with: plain decoding while the day-0 draft is gated, else it."""
    return NO_DRAFT if gates_day_zero(initial, policy) else initial


def day_zero(
    initial: str | None, policy: RolloutPolicy, now: float
) -> tuple[RolloutState, DesiredState]:
    """The rollout state and the desired state servers start from.

    `initial` is the day-0 draft (None or "none": plain decoding). With
    `gateInitialDraft` and a model-free day-0 draft (suffix, ngram), nothing is trusted
    unmeasured: servers start without a draft (`server_day_zero`) and the day-0 draft is
    canaried against them on `canaryShare` of requests like any candidate (a StartCanary
    event at `now`), serving everyone only once its lower bound passes `minSpeedup`; a
    rollback leaves plain decoding serving and the trainer's candidates canary against
    that. Otherwise the day-0 draft is stable at once."""
    initial = None if initial in (None, NO_DRAFT) else initial
    baseline = float(policy.baseline_share)
    if initial is not None and gates_day_zero(initial, policy):
        reason = (
            f"canary the day-0 draft {initial} against no draft on {policy.canary_share:.0%} "
            "of requests: it serves everyone once its measured speedup passes the gate"
        )
        event = RolloutEvent(time=now, action="StartCanary", revision=initial, reason=reason)
        state = RolloutState(
            phase="Canary",
            candidate_revision=initial,
            canary_started_at=now,
            phase_since=now,
            window_since=now,
            history=[event],
        )
        desired = DesiredState(
            stable=None,
            candidate=RevisionRef(revision=initial, path=""),
            candidate_share=float(policy.canary_share),
            baseline_share=baseline,
            generation=1,
            updated=now,
        )
        return state, desired
    stable = RevisionRef(revision=initial, path="") if initial else None
    desired = DesiredState(
        stable=stable, candidate_share=0.0, baseline_share=baseline, generation=1, updated=now
    )
    return RolloutState(stable_revision=initial), desired
