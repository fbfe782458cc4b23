"""What the operator observed to the status it reports: conditions (Ready,
Progressing, Degraded), server replica counts, the measurement, and the merge patch
that writes it. Pure: no kopf, no kubernetes client, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from aurora.operator.events import revision_history, rfc3339
from aurora.operator.spec import fraction_or_none
from aurora.runtime.rollout import NO_DRAFT, Decision, Measurement, RolloutState


@dataclass(frozen=True)
class ConditionState:
    """One condition's verdict this round: status True, False or None (Unknown)."""

    status: bool | None
    reason: str
    message: str = ""


def _status_text(status: bool | None) -> str:
    return "Unknown" if status is None else str(status)


def condition(
    kind: str, state: ConditionState, previous: Sequence[Mapping[str, Any]], generation: int,
    now: datetime,
) -> dict[str, Any]:  # fmt: skip
    """A metav1.Condition; lastTransitionTime moves only when the status flips."""
    status = _status_text(state.status)
    before = next((c for c in previous if c.get("type") == kind), None)
    changed = before is None or before.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": state.reason,
        "message": state.message,
        "lastTransitionTime": (
            rfc3339(now)
            if changed or before is None
            else before.get("lastTransitionTime", rfc3339(now))
        ),
        "observedGeneration": generation,
    }


@dataclass(frozen=True)
class ServerSummary:
    """The server Deployments as observed, against what the spec wants."""

    desired: int
    ready: int
    updated: int
    rolled_out: bool
    message: str
    stuck: str | None = None


def summarize_servers(
    expected: Mapping[str, int], observed: Sequence[Mapping[str, Any]]
) -> ServerSummary:
    """Rolled out only when every wanted server Deployment exists, its controller has
    seen its latest spec, every replica runs the new template and is available, and no
    old replica is left (old pods still serving is not done)."""
    by_name = {d.get("metadata", {}).get("name"): d for d in observed}
    desired = sum(expected.values())
    ready = updated = 0
    problems: list[str] = []
    stuck = None
    for deployment_name, replicas in sorted(expected.items()):
        deployment = by_name.get(deployment_name)
        if deployment is None:
            problems.append(f"Deployment {deployment_name} not created yet")
            continue
        status = deployment.get("status") or {}
        generation = deployment.get("metadata", {}).get("generation", 0)
        wanted = (deployment.get("spec") or {}).get("replicas", replicas)
        d_ready = int(status.get("readyReplicas") or 0)
        d_updated = int(status.get("updatedReplicas") or 0)
        d_available = int(status.get("availableReplicas") or 0)
        d_total = int(status.get("replicas") or 0)
        ready += min(d_ready, replicas)
        updated += min(d_updated, replicas)
        if wanted != replicas:
            problems.append(f"{deployment_name} has {wanted} replicas, the spec wants {replicas}")
        elif int(status.get("observedGeneration") or 0) < generation:
            problems.append(f"{deployment_name}: controller has not seen the latest spec")
        elif d_updated < replicas or d_available < replicas or d_total > replicas:
            problems.append(
                f"{deployment_name}: {d_updated}/{replicas} updated, {d_available} available, "
                f"{max(0, d_total - d_updated)} old"
            )
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "Progressing"
                and cond.get("reason") == "ProgressDeadlineExceeded"
            ):
                stuck = f"{deployment_name}: {cond.get('message', 'progress deadline exceeded')}"
    message = "; ".join(problems) or f"{ready}/{desired} server replicas ready"
    return ServerSummary(desired, ready, updated, not problems, message, stuck)


def measurement_status(m: Measurement) -> dict[str, Any]:
    """The policy's Measurement as status.measurement (decimal strings, sample counts)."""
    out: dict[str, Any] = {
        "acceptLength": fraction_or_none(m.stable.accept_length, 2),
        "tokensPerSecond": fraction_or_none(m.stable.decode_tokens_per_s, 1),
        "samples": m.stable.samples,
        "baselineTokensPerSecond": fraction_or_none(m.baseline.decode_tokens_per_s, 1),
        "baselineSamples": m.baseline.samples,
        "confidence": fraction_or_none(m.confidence, 2),
        "stableRegressed": m.stable_regressed,
    }
    if m.stable_speedup_vs_baseline is not None:
        out["speedup"] = fraction_or_none(m.stable_speedup_vs_baseline.estimate)
    if m.candidate.revision is not None:
        out["candidateAcceptLength"] = fraction_or_none(m.candidate.accept_length, 2)
        out["candidateTokensPerSecond"] = fraction_or_none(m.candidate.decode_tokens_per_s, 1)
        out["candidateSamples"] = m.candidate.samples
        if (vs := m.speedup_vs_stable) is not None:
            out["candidateSpeedup"] = fraction_or_none(vs.estimate)
            out["candidateSpeedupLower"] = fraction_or_none(vs.lower)
            out["candidateSpeedupUpper"] = fraction_or_none(vs.upper)
    return {key: value for key, value in out.items() if value is not None}


@dataclass(frozen=True)
class Observation:
    """What the operator saw in one round. Fields left at None were not looked at this
    round (e.g. Redis in a spec-change reconcile) and keep their previous status."""

    generation: int
    spec_errors: Sequence[str] = ()
    expected_servers: Mapping[str, int] = field(default_factory=dict)
    servers: Sequence[Mapping[str, Any]] | None = None
    apply_error: str | None = None
    redis_error: str | None = None
    rollout_enabled: bool = True
    rollout_state: RolloutState | None = None
    decision: Decision | None = None
    measurement: Measurement | None = None  # when the policy did not run (rollout disabled)
    rollout_error: str | None = None
    trace_lag: int | None = None


def _rollout_condition(
    state: RolloutState | None, decision: Decision | None, enabled: bool
) -> ConditionState:
    if not enabled:
        return ConditionState(
            False, "RolloutDisabled", "spec.rollout.enabled is false: the stable revision serves"
        )
    reason = decision.reason if decision else ""
    if state is None:
        return ConditionState(None, "Unknown", "the rollout policy has not run yet")
    if state.phase == "Canary":
        return ConditionState(True, "Canary", reason or f"canary {state.candidate_revision}")
    if state.phase == "Promoting":
        return ConditionState(True, "Promoting", reason or f"promoting {state.candidate_revision}")
    if state.phase == "Hold":
        return ConditionState(
            False, "Held", reason or f"{state.candidate_revision} held: a person decides"
        )
    return ConditionState(False, "Stable", reason or f"serving {_serving(state.stable_revision)}")


def _serving(stable: str | None) -> str:
    if stable is None:
        return "the initial draft"
    return "no draft (plain decoding)" if stable == NO_DRAFT else stable


def _ready_condition(summary: ServerSummary | None, active: str | None) -> ConditionState:
    if summary is None:
        return ConditionState(None, "Reconciling", "server Deployments not observed yet")
    if summary.desired == 0:
        return ConditionState(True, "ScaledToZero", "spec.engine.replicas is 0: nothing serves")
    if summary.ready == 0:
        return ConditionState(False, "ServersNotReady", summary.message)
    # Serving, possibly with fewer replicas than wanted while they roll.
    return ConditionState(
        True, "Serving", f"{summary.message}; serving {active or 'the initial draft'}"
    )


def _progressing_condition(
    o: Observation, summary: ServerSummary | None, rollout_state: RolloutState | None
) -> ConditionState:
    if summary is not None and not summary.rolled_out:
        return ConditionState(True, "RollingOut", summary.message)
    return _rollout_condition(rollout_state, o.decision, o.rollout_enabled)


def _degraded_condition(o: Observation, summary: ServerSummary | None) -> ConditionState:
    """The first thing that needs a person, in order of how much it blocks."""
    if o.apply_error:
        return ConditionState(True, "ApplyFailed", o.apply_error)
    if o.redis_error:
        return ConditionState(
            True, "RedisUnavailable",
            f"{o.redis_error}; serving continues unchanged and the rollout is paused",
        )  # fmt: skip
    if o.rollout_error:
        return ConditionState(True, "RolloutBlocked", o.rollout_error)
    if summary is not None and summary.stuck:
        return ConditionState(True, "ProgressDeadlineExceeded", summary.stuck)
    # A regressed stable needs a person only when the policy did not fall back itself.
    if o.decision is not None and o.decision.stable_regressed and o.decision.action != "Fallback":
        return ConditionState(True, "StableRegressed", o.decision.reason)
    return ConditionState(False, "AsExpected", "")


def _stored_rollout_state(o: Observation, previous: Mapping[str, Any]) -> RolloutState | None:
    """This round's rollout state, else the one kept in the previous status."""
    if o.rollout_state is not None or not previous.get("rollout"):
        return o.rollout_state
    try:
        return RolloutState.model_validate(previous["rollout"])
    except ValidationError:
        return None


def _rollout_fields(o: Observation, previous: Mapping[str, Any]) -> dict[str, Any]:
    """What this round's rollout round and measurement add to status."""
    fields: dict[str, Any] = {}
    if o.rollout_state is not None:
        fields["rollout"] = o.rollout_state.model_dump(mode="json", by_alias=True)
        fields["activeRevision"] = o.rollout_state.stable_revision
        fields["candidateRevision"] = o.rollout_state.candidate_revision
        fields["phase"] = o.rollout_state.phase
    measurement = o.decision.measurement if o.decision is not None else o.measurement
    if measurement is not None:
        fields["measurement"] = measurement_status(measurement)
    if o.decision is not None:
        fields["revisionHistory"] = revision_history(
            previous.get("revisionHistory") or [], o.decision.events, o.decision.measurement
        )
    if o.trace_lag is not None:
        fields["traceLag"] = o.trace_lag
    return fields


def build_status(
    observation: Observation, previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """The whole status for this round, from what was observed and the previous status
    (conditions keep their lastTransitionTime unless they flip; what was not observed
    this round is carried over). Ready: the servers serve. Progressing: pods rolling or
    a candidate under evaluation. Degraded: something needs a person (invalid spec,
    Redis unreachable, a stuck rollout, a stable revision slower than no speculation)."""
    o = observation
    carried = {k: v for k, v in previous.items() if k not in ("conditions", "observedGeneration")}
    status: dict[str, Any] = {**carried, "observedGeneration": o.generation}
    status.update(_rollout_fields(o, previous))
    summary = None
    if o.servers is not None:
        summary = summarize_servers(o.expected_servers, o.servers)
        status["servers"] = {
            "desired": summary.desired,
            "ready": summary.ready,
            "updated": summary.updated,
        }
    if o.spec_errors:
        message = "; ".join(o.spec_errors)
        ready = progressing = ConditionState(False, "InvalidSpec", message)
        degraded = ConditionState(True, "InvalidSpec", message)
    else:
        ready = _ready_condition(summary, status.get("activeRevision"))
        progressing = _progressing_condition(o, summary, _stored_rollout_state(o, previous))
        degraded = _degraded_condition(o, summary)
    previous_conditions = list(previous.get("conditions") or [])
    status["conditions"] = [
        condition(kind, state, previous_conditions, o.generation, now)
        for kind, state in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))
    ]
    return {key: value for key, value in status.items() if value is not None}


def merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `before` into `after`: changed keys,
    None for keys to remove (e.g. the candidate's figures once its canary ends)."""
    patch: dict[str, Any] = {}
    for key in before.keys() - after.keys():
        patch[key] = None
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif value != old or key not in before:
            patch[key] = value
    return patch
