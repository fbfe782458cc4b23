"""The kopf handlers, called as kopf calls them, with the operator's cluster edge
recorded in memory (tests/operator_harness.py) and no Redis reachable."""

from __future__ import annotations

import socket
from typing import Any

import kopf
import pytest
from operator_harness import Events, RecordingCluster, call, operator_memo, speculator

from aurora.operator import handlers
from aurora.operator.events import OVERRIDE_ANNOTATION
from aurora.operator.spec import GROUP, PLURAL

pytestmark = pytest.mark.unit


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


NOWHERE = {"redisUrl": f"redis://127.0.0.1:{closed_port()}/0"}


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    return Events().install(monkeypatch)


def test_handlers_are_registered_for_speculators() -> None:
    registry = kopf.get_default_registry()
    changing = [
        (h.id, h.reason, h.field) for h in registry._changing.get_all_handlers()  # type: ignore[attr-defined]
        if h.selector is not None and h.selector.any_name == PLURAL and h.selector.group == GROUP
    ]  # fmt: skip
    assert ("reconcile", "create", None) in changing
    assert ("reconcile/spec", "update", ("spec",)) in changing
    assert ("cleanup", "delete", None) in changing
    (timer,) = [h for h in registry._spawning.get_all_handlers() if h.id == "rollout"]  # type: ignore[attr-defined]
    assert timer.interval == handlers.TICK_SECONDS


def test_invalid_spec_is_reported_once_and_touches_no_child(events: Events) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    bad = speculator(engine={"kind": "sglang", "replicas": 2})  # no GPUs, no draft
    after, _ = call(handlers.reconcile, bad, memo)
    assert cluster.applied == [] and cluster.deleted == []
    assert conditions(after)["Ready"] == ("False", "InvalidSpec")
    assert conditions(after)["Degraded"] == ("True", "InvalidSpec")
    assert "set engine.gpus to 1 or more" in after["status"]["conditions"][0]["message"]
    assert events.reasons() == ["InvalidSpec"]
    # The operator restarts (resume) on the same generation: no second Event, no crash loop.
    again, _ = call(handlers.reconcile, after, memo)
    assert events.reasons() == ["InvalidSpec"] and cluster.applied == []
    # The timer keeps reporting it, and does nothing else.
    ticked, _ = call(handlers.rollout, again, memo)
    assert conditions(ticked)["Ready"] == ("False", "InvalidSpec") and cluster.applied == []


def test_valid_spec_applies_every_child_and_reports_the_generation(events: Events) -> None:
    cluster = RecordingCluster()
    after, _ = call(
        handlers.reconcile, speculator(generation=3, traces=NOWHERE), operator_memo(cluster)
    )
    assert sorted(cluster.applied) == [
        ("ConfigMap", "chat-config"), ("Deployment", "chat-server"), ("Deployment", "chat-trainer"),
        ("PersistentVolumeClaim", "chat-checkpoints"), ("Service", "chat"), ("Service", "chat-trainer"),
    ]  # fmt: skip
    assert after["status"]["observedGeneration"] == 3
    assert conditions(after)["Ready"] == ("True", "Serving")
    assert events.posted == []


def test_a_refused_child_is_degraded_and_the_rest_still_applied(events: Events) -> None:
    cluster = RecordingCluster(refuse={"chat-checkpoints"})
    after, _ = call(handlers.reconcile, speculator(traces=NOWHERE), operator_memo(cluster))
    assert ("Deployment", "chat-server") in cluster.applied
    assert conditions(after)["Degraded"] == ("True", "ApplyFailed")
    assert "PersistentVolumeClaim chat-checkpoints" in after["status"]["conditions"][2]["message"]
    assert events.reasons() == ["ApplyFailed"]


def test_timer_takes_back_drift_and_reports_redis_away_without_touching_serving(
    events: Events,
) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(handlers.reconcile, speculator(traces=NOWHERE), memo)
    cluster.scale("chat-server", 5)  # someone ran kubectl scale
    applied_before = len(cluster.applied)
    ticked, _ = call(handlers.rollout, created, memo)
    assert cluster.objects[("Deployment", "chat-server")]["spec"]["replicas"] == 1
    assert len(cluster.applied) > applied_before
    degraded = next(c for c in ticked["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RedisUnavailable")
    assert (
        "unreachable" in degraded["message"]
        and "serving continues unchanged" in degraded["message"]
    )
    assert conditions(ticked)["Ready"] == ("True", "Serving")
    assert "rollout" not in ticked["status"]  # no rollout state invented while blind


def test_the_timer_runs_a_round_only_every_interval(events: Events) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(
        handlers.reconcile, speculator(traces=NOWHERE, rollout={"intervalSeconds": 3600}), memo
    )
    first, patch = call(handlers.rollout, created, memo)
    assert patch  # the first round ran (and found Redis away)
    _, patch = call(handlers.rollout, first, memo)
    assert not patch  # within the interval: nothing done, nothing written


def test_switching_engine_removes_the_canary_deployment(events: Events) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    sglang = speculator(
        engine={"kind": "sglang", "replicas": 2, "gpus": 1},
        draft={"initial": "ngram"},
        traces=NOWHERE,
    )
    call(handlers.reconcile, sglang, memo)
    assert ("Deployment", "chat-server-canary") in cluster.objects
    torch = speculator(generation=2, engine={"kind": "torch", "replicas": 2}, traces=NOWHERE)
    call(handlers.reconcile, torch, memo)
    assert cluster.deleted == [("Deployment", "chat-server-canary")]
    assert ("Deployment", "chat-server-canary") not in cluster.objects


def test_an_unknown_override_is_refused_and_cleared(events: Events) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(handlers.reconcile, speculator(traces=NOWHERE), memo)
    created["metadata"]["annotations"] = {OVERRIDE_ANNOTATION: "Ship it"}
    after, _ = call(handlers.rollout, created, memo)
    assert "InvalidOverride" in events.reasons()
    assert OVERRIDE_ANNOTATION not in after["metadata"].get("annotations", {})


def test_deletion_with_redis_gone_retries_then_lets_go(events: Events) -> None:
    memo = operator_memo(RecordingCluster())
    obj = speculator(traces=NOWHERE)
    with pytest.raises(kopf.TemporaryError, match="cannot delete Redis keys aurora:team-a:chat"):
        call(handlers.cleanup, obj, memo, retry=0)
    last = handlers.WRITER_WAIT_ATTEMPTS + handlers.DELETE_ATTEMPTS - 1
    call(handlers.cleanup, obj, memo, retry=last)
    assert events.reasons() == ["RedisKeysLeft"]


def test_deletion_stops_the_writers_before_the_redis_keys_go(events: Events) -> None:
    # Given a Speculator whose servers and trainer run (they write its Redis keys),
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(handlers.reconcile, speculator(traces=NOWHERE), memo)
    deployments = {n for kind, n in cluster.objects if kind == "Deployment"}
    assert deployments
    # when it is deleted, then its Deployments go first and the keys wait for them,
    with pytest.raises(kopf.TemporaryError, match="before deleting Redis keys"):
        call(handlers.cleanup, created, memo, retry=0)
    assert {n for kind, n in cluster.deleted if kind == "Deployment"} == deployments
    assert events.reasons() == []
    # and once no writer is left, the keys are deleted (here: Redis is unreachable).
    with pytest.raises(kopf.TemporaryError, match="cannot delete Redis keys"):
        call(handlers.cleanup, created, memo, retry=1)


def test_the_finalizer_is_only_for_speculators_whose_traces_are_deleted() -> None:
    def spec(**fields: Any) -> kopf.Spec:
        return kopf.Body({"spec": fields}).spec

    assert handlers._deletes_traces(spec=spec(traces={"deletionPolicy": "Delete"}))
    assert handlers._deletes_traces(spec=spec())
    assert not handlers._deletes_traces(spec=spec(traces={"deletionPolicy": "Retain"}))


def test_the_timer_never_reports_a_generation_it_has_not_applied(events: Events) -> None:
    # The spec changes and the timer happens to run before the update handler: it
    # applies the new generation itself rather than claim it in observedGeneration.
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(handlers.reconcile, speculator(traces=NOWHERE), memo)
    changed = speculator(generation=2, traces=NOWHERE, target={"model": "/models/other"})
    changed["status"] = created["status"]
    ticked, _ = call(handlers.rollout, changed, memo)
    server = cluster.objects[("Deployment", "chat-server")]
    command = server["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1] == "/models/other"
    assert ticked["status"]["observedGeneration"] == 2


@pytest.mark.parametrize(
    ("argv", "clusterwide", "namespaces"),
    [
        (["--all-namespaces"], True, []),
        ([], True, []),
        (["-n", "team-a", "-n", "team-*"], False, ["team-a", "team-*"]),
    ],
)
def test_the_operator_command_runs_kopf_standalone_with_a_liveness_endpoint(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], clusterwide: bool, namespaces: list[str]
) -> None:
    from aurora.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("AURORA_RUNTIME_IMAGE", "registry.local/aurora-runtime:dev")
    assert main(["operator", *argv, "--metrics-port", "0", "--liveness-port", "8181"]) == 0
    (kwargs,) = calls
    assert kwargs["standalone"] is True and kwargs["peering_name"] is None
    assert (kwargs["clusterwide"], list(kwargs["namespaces"])) == (clusterwide, namespaces)
    assert kwargs["liveness_endpoint"] == "http://0.0.0.0:8181/healthz"
    memo = kwargs["memo"]
    assert memo.images.runtime == "registry.local/aurora-runtime:dev" and memo.redis_clients == {}


def test_a_speculator_being_deleted_is_left_to_the_garbage_collector(events: Events) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    created, _ = call(handlers.reconcile, speculator(traces=NOWHERE), memo)
    created["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    cluster.applied.clear()
    _, patch = call(handlers.rollout, created, memo)
    assert cluster.applied == [] and not patch
