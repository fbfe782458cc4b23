"""Status: what the operator observed, as conditions, figures and history (pure)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rollout_support import candidate_record, request_stats
from structural_schema import validate

from aurora.operator import crd, events
from aurora.operator.spec import MAX_REVISION_HISTORY, SpeculatorStatus
from aurora.operator.status import Observation, build_status, merge_patch
from aurora.runtime.protocol import LoadedReport, RequestStats
from aurora.runtime.rollout import Decision, RolloutPolicy, RolloutState, decide

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
STATUS_SCHEMA = crd.openapi_schema()["properties"]["status"]
POLICY = RolloutPolicy.model_validate(
    {"minSamples": 30, "maxCanarySamples": 120, "bootstrapResamples": 200, "seed": 1}
)
EXPECTED = {"chat-server": 2}


def deployment(
    name: str = "chat-server", replicas: int = 2, ready: int = 2, updated: int = 2, total: int = 2,
    generation: int = 4, observed: int = 4, conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "kind": "Deployment",
        "metadata": {"name": name, "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": total,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": ready,
            "conditions": conditions or [],
        },
    }


def samples(revision: str, arm: str, n: int, tokens_per_s: float) -> list[RequestStats]:
    rng = random.Random(f"{revision}:{arm}")
    return [
        request_stats(
            revision,
            arm,
            rng.gauss(tokens_per_s, 1.0),
            created=100.0 + i,
            accept_length=3.0 if arm != "baseline" else 1.0,
        )
        for i in range(n)
    ]


def canary_decision() -> Decision:
    """r1 is stable; the trainer offers r2: the policy starts a canary."""
    state = RolloutState(stable_revision="r1")
    traffic = samples("r1", "stable", 60, 30.0) + samples("r1", "baseline", 40, 20.0)
    return decide(POLICY, state, [candidate_record("r2", 200.0)], traffic, [], 300.0)


def promote_decision(state: RolloutState) -> Decision:
    traffic = (
        samples("r1", "stable", 60, 30.0)
        + samples("r2", "candidate", 60, 40.0)
        + samples("r1", "baseline", 40, 20.0)
    )
    return decide(POLICY, state, [candidate_record("r2", 200.0)], traffic, [], 400.0)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_first_status_has_three_conditions_for_this_generation() -> None:
    status = build_status(Observation(4, expected_servers=EXPECTED, servers=[deployment()]), {}, T0)
    by_type = conditions(status)
    assert sorted(by_type) == ["Degraded", "Progressing", "Ready"]
    assert by_type["Ready"]["status"] == "True" and by_type["Ready"]["reason"] == "Serving"
    assert by_type["Degraded"]["status"] == "False"
    assert all(
        c["observedGeneration"] == 4 and c["lastTransitionTime"] == "2026-03-01T12:00:00Z"
        for c in by_type.values()
    )
    assert status["observedGeneration"] == 4
    assert status["servers"] == {"desired": 2, "ready": 2, "updated": 2}
    assert validate(STATUS_SCHEMA, status) == []
    SpeculatorStatus.model_validate(status)


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = build_status(Observation(4, expected_servers=EXPECTED, servers=[deployment()]), {}, T0)
    # Same verdict later, new message: the transition time stays.
    second = build_status(
        Observation(5, expected_servers=EXPECTED, servers=[deployment(generation=5, observed=5)]),
        first,
        T0 + timedelta(minutes=5),
    )
    assert conditions(second)["Ready"]["lastTransitionTime"] == "2026-03-01T12:00:00Z"
    assert conditions(second)["Ready"]["observedGeneration"] == 5
    # Servers go away: Ready flips and gets a new transition time.
    third = build_status(
        Observation(5, expected_servers=EXPECTED, servers=[deployment(ready=0)]),
        second,
        T0 + timedelta(minutes=9),
    )
    assert conditions(third)["Ready"]["status"] == "False"
    assert conditions(third)["Ready"]["reason"] == "ServersNotReady"
    assert conditions(third)["Ready"]["lastTransitionTime"] == "2026-03-01T12:09:00Z"


def test_old_replicas_still_serving_is_not_done() -> None:
    # The new template is on 2 pods but an old pod still serves: rolling out, not done.
    status = build_status(
        Observation(4, expected_servers=EXPECTED, servers=[deployment(updated=2, total=3)]), {}, T0
    )
    assert conditions(status)["Progressing"]["status"] == "True"
    assert conditions(status)["Progressing"]["reason"] == "RollingOut"
    assert "1 old" in conditions(status)["Progressing"]["message"]
    assert conditions(status)["Ready"]["status"] == "True"  # it still serves meanwhile


@pytest.mark.parametrize(
    ("servers", "expected_text"),
    [
        ([deployment(observed=3)], "has not seen the latest spec"),
        ([deployment(replicas=1)], "has 1 replicas, the spec wants 2"),
        ([], "not created yet"),
    ],
)
def test_servers_are_rolled_out_only_when_the_controller_caught_up(
    servers: list[dict[str, Any]], expected_text: str
) -> None:
    status = build_status(Observation(4, expected_servers=EXPECTED, servers=servers), {}, T0)
    assert conditions(status)["Progressing"]["reason"] == "RollingOut"
    assert expected_text in conditions(status)["Progressing"]["message"]


def test_invalid_spec_keeps_the_rollout_state_and_says_why() -> None:
    decision = canary_decision()
    before = build_status(
        Observation(
            4,
            expected_servers=EXPECTED,
            servers=[deployment()],
            rollout_state=decision.new_state,
            decision=decision,
        ),
        {},
        T0,
    )
    errors = ["spec.engine: engine.kind sglang runs on GPUs: set engine.gpus to 1 or more"]
    after = build_status(Observation(5, spec_errors=errors), before, T0 + timedelta(minutes=1))
    by_type = conditions(after)
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("False", "InvalidSpec")
    assert (by_type["Degraded"]["status"], by_type["Degraded"]["reason"]) == ("True", "InvalidSpec")
    assert "set engine.gpus" in by_type["Ready"]["message"]
    assert after["observedGeneration"] == 5
    assert after["rollout"] == before["rollout"] and after["candidateRevision"] == "r2"
    assert validate(STATUS_SCHEMA, after) == []


def test_redis_unreachable_is_degraded_and_changes_nothing_served() -> None:
    decision = canary_decision()
    before = build_status(
        Observation(
            4,
            expected_servers=EXPECTED,
            servers=[deployment()],
            rollout_state=decision.new_state,
            decision=decision,
        ),
        {},
        T0,
    )
    after = build_status(
        Observation(
            4, expected_servers=EXPECTED, servers=[deployment()],
            redis_error="Redis at redis:6379/0 unreachable (ConnectionError: refused)",
        ),
        before,
        T0 + timedelta(seconds=10),
    )  # fmt: skip
    degraded = conditions(after)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "RedisUnavailable")
    assert (
        "redis:6379" in degraded["message"] and "serving continues unchanged" in degraded["message"]
    )
    assert conditions(after)["Ready"]["status"] == "True"
    for field in (
        "rollout",
        "activeRevision",
        "candidateRevision",
        "phase",
        "measurement",
        "revisionHistory",
    ):
        assert after[field] == before[field], field


def test_canary_then_promotion_in_status_and_history() -> None:
    started = canary_decision()
    assert started.action == "StartCanary"
    canary = build_status(
        Observation(
            4,
            expected_servers=EXPECTED,
            servers=[deployment()],
            rollout_state=started.new_state,
            decision=started,
        ),
        {},
        T0,
    )
    assert (canary["activeRevision"], canary["candidateRevision"], canary["phase"]) == (
        "r1",
        "r2",
        "Canary",
    )
    assert conditions(canary)["Progressing"]["reason"] == "Canary"
    assert canary["revisionHistory"][0]["outcome"] == "Canary"
    assert canary["measurement"]["acceptLength"] == "3.00"
    assert canary["measurement"]["samples"] == 60 and canary["measurement"]["baselineSamples"] == 40

    promoted = promote_decision(started.new_state)
    assert promoted.action == "Promote"
    after = build_status(
        Observation(
            4,
            expected_servers=EXPECTED,
            servers=[deployment()],
            rollout_state=promoted.new_state,
            decision=promoted,
        ),
        canary,
        T0 + timedelta(minutes=3),
    )
    assert after["phase"] == "Promoting"
    assert conditions(after)["Progressing"]["reason"] == "Promoting"
    assert [r["outcome"] for r in after["revisionHistory"]] == ["Promoting", "Canary"]
    assert float(after["revisionHistory"][0]["speedup"]) > 1.05
    assert float(after["measurement"]["candidateSpeedup"]) > 1.05
    assert after["measurement"]["candidateSamples"] == 60
    assert validate(STATUS_SCHEMA, after) == []
    SpeculatorStatus.model_validate(after)  # every key is one the models declare

    # Every server loaded r2 as stable: promoted, and the candidate is gone from status.
    loads = [
        LoadedReport(server="chat-server-a-1", stable="r2"),
        LoadedReport(server="chat-server-b-1", stable="r2"),
    ]
    done = decide(POLICY, promoted.new_state, [candidate_record("r2", 200.0)], [], loads, 500.0)
    final = build_status(
        Observation(
            4,
            expected_servers=EXPECTED,
            servers=[deployment()],
            rollout_state=done.new_state,
            decision=done,
        ),
        after,
        T0 + timedelta(minutes=5),
    )
    assert final["activeRevision"] == "r2" and "candidateRevision" not in final
    patch = merge_patch(after, final)
    assert patch["candidateRevision"] is None  # the merge patch removes it on the server
    assert "candidateSpeedup" not in final["measurement"]
    assert patch["measurement"]["candidateSpeedup"] is None


def test_revision_history_is_bounded_newest_first() -> None:
    previous = [
        {"revision": f"r{i}", "outcome": "Rejected", "reason": "", "time": "2026-01-01T00:00:00Z"}
        for i in range(10)
    ]
    decision = canary_decision()
    history = events.revision_history(previous, decision.events, decision.measurement)
    assert len(history) == MAX_REVISION_HISTORY
    assert history[0]["revision"] == "r2" and history[1]["revision"] == "r0"


def test_scaled_to_zero_is_ready_with_nothing_serving() -> None:
    status = build_status(
        Observation(
            4,
            expected_servers={"chat-server": 0},
            servers=[deployment(replicas=0, ready=0, updated=0, total=0)],
        ),
        {},
        T0,
    )
    assert conditions(status)["Ready"]["reason"] == "ScaledToZero"


def test_a_stuck_deployment_and_a_slow_stable_revision_are_degraded() -> None:
    stuck = deployment(
        updated=1, conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                "message": 'ReplicaSet "chat-server-7f" has timed out progressing.'}],
    )  # fmt: skip
    status = build_status(Observation(4, expected_servers=EXPECTED, servers=[stuck]), {}, T0)
    assert conditions(status)["Degraded"]["reason"] == "ProgressDeadlineExceeded"
    # The stable revision measured slower than no speculation at all: with the policy's
    # fallback off a person must act (Degraded); with it on (the default) the policy fell
    # back to plain decoding itself, which is reported, not Degraded.
    state = RolloutState(stable_revision="r1")
    slow = samples("r1", "stable", 60, 15.0) + samples("r1", "baseline", 60, 25.0)
    for policy, reason, active in (
        (POLICY.model_copy(update={"fallback_on_regression": False}), "StableRegressed", "r1"),
        (POLICY, "AsExpected", "none"),
    ):
        decision = decide(policy, state, [], slow, [], 300.0)
        assert decision.stable_regressed
        status = build_status(
            Observation(
                4,
                expected_servers=EXPECTED,
                servers=[deployment()],
                rollout_state=decision.new_state,
                decision=decision,
            ),
            {},
            T0,
        )
        assert conditions(status)["Degraded"]["reason"] == reason
        assert status["measurement"]["stableRegressed"] is True
        assert status["activeRevision"] == active


def test_rollout_disabled_reports_it() -> None:
    status = build_status(
        Observation(4, expected_servers=EXPECTED, servers=[deployment()], rollout_enabled=False),
        {},
        T0,
    )
    assert conditions(status)["Progressing"]["reason"] == "RolloutDisabled"


def test_merge_patch_changes_removes_and_leaves_alone() -> None:
    before = {"a": 1, "keep": {"x": 1, "y": 2}, "gone": True, "list": [1, 2]}
    after = {"a": 2, "keep": {"x": 1}, "list": [1, 2], "new": "v"}
    assert merge_patch(before, after) == {"a": 2, "keep": {"y": None}, "gone": None, "new": "v"}
    assert merge_patch(after, after) == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Promote:r7", ("Promote", "r7")),
        ("Rollback: r7 ", ("Rollback", "r7")),
        ("promote:r7", None),
        ("Promote:", None),
    ],
)
def test_override_annotation(value: str, expected: tuple[str, str] | None) -> None:
    override, error = events.parse_override({events.OVERRIDE_ANNOTATION: value})
    if expected is None:
        assert override is None and error is not None and "Promote:<revision>" in error
    else:
        assert (
            override is not None
            and (override.action, override.revision) == expected
            and error is None
        )
    assert events.parse_override({}) == (None, None)
