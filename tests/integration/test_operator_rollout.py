"""The operator's handlers driving a rollout through a real redis-server: status holds
the rollout state, Events tell the story, an operator restart resumes from status."""

from __future__ import annotations

import random
from typing import Any

import kopf
import pytest
import redis
from operator_harness import Events, RecordingCluster, call, operator_memo, speculator

from aurora.operator import handlers
from aurora.operator.events import OVERRIDE_ANNOTATION
from aurora.runtime import protocol
from aurora.runtime.protocol import CandidateRecord, Keys, LoadedReport, RequestStats

pytestmark = pytest.mark.integration

KEYS = Keys("team-a", "chat")
# (the day-0 draft, suffix by default, is trusted here: these tests follow learned candidates)
ROLLOUT = {
    "minSamples": 30, "maxCanarySamples": 100, "intervalSeconds": 1, "gateInitialDraft": False
}  # fmt: skip


def offer(client: redis.Redis, revision: str, created: float) -> None:
    protocol.offer_candidate(
        client, KEYS,
        CandidateRecord(revision=revision, path=f"/checkpoints/{revision}", sha256="0" * 64,
                        created=created, step=10, traces_seen=100),
    )  # fmt: skip


def traffic(client: redis.Redis, revision: str, arm: str, n: int, tokens_per_s: float) -> None:
    rng = random.Random(f"{revision}:{arm}:{n}")
    for _ in range(n):
        protocol.publish_stats(
            client, KEYS,
            RequestStats(revision=revision, arm=arm, server="chat-server-1", decode_tokens_per_s=rng.gauss(tokens_per_s, 0.5),  # type: ignore[arg-type]
                         accept_length=2.5, new_tokens=64, verify_steps=25, latency_s=1.0),
            maxlen=10_000,
        )  # fmt: skip


def tick(obj: dict[str, Any], memo: kopf.Memo) -> dict[str, Any]:
    memo.last_round = 0.0  # each call is a new round, whatever the clock says
    after, _ = call(handlers.rollout, obj, memo)
    return after


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    return Events().install(monkeypatch)


def test_candidate_canary_promotion_and_restart_resume(
    redis_client: redis.Redis, redis_url: str, events: Events
) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    obj, _ = call(
        handlers.reconcile, speculator(traces={"redisUrl": redis_url}, rollout=ROLLOUT), memo
    )

    # Given the trainer offers r1: the next round starts a canary, in status and as an Event.
    offer(redis_client, "r1", created=100.0)
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Canary" and obj["status"]["candidateRevision"] == "r1"
    assert obj["status"]["rollout"]["phase"] == "Canary"
    assert events.reasons() == ["StartCanary"]
    desired = protocol.get_desired(redis_client, KEYS)
    assert (
        desired is not None and desired.candidate is not None and desired.candidate.revision == "r1"
    )

    # The operator restarts: a fresh memo (no sample window), the state only in status.
    memo = operator_memo(cluster)
    traffic(redis_client, "", "baseline", 50, 20.0)
    traffic(redis_client, "r1", "candidate", 50, 30.0)
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Promoting", obj["status"]["conditions"]
    assert events.reasons()[-1] == "Promote"
    assert float(obj["status"]["measurement"]["candidateSpeedup"]) > 1.3

    # Servers load r1 as stable: promoted, active revision r1, history newest first.
    protocol.report_loaded(redis_client, KEYS, LoadedReport(server="chat-server-1", stable="r1"))
    obj = tick(obj, memo)
    status = obj["status"]
    assert status["activeRevision"] == "r1" and "candidateRevision" not in status
    assert [r["outcome"] for r in status["revisionHistory"]] == ["Promoted", "Promoting", "Canary"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False",
    }  # fmt: skip
    assert events.reasons() == ["StartCanary", "Promote", "Promoted"]


def test_the_gated_day0_suffix_draft_is_canaried_from_the_first_round(
    redis_client: redis.Redis, redis_url: str, events: Events
) -> None:
    # Given a Speculator on the default day-0 draft (suffix) with the gate on (the default)
    memo = operator_memo(RecordingCluster())
    rollout = {**ROLLOUT, "gateInitialDraft": True}
    obj, _ = call(
        handlers.reconcile, speculator(traces={"redisUrl": redis_url}, rollout=rollout), memo
    )
    # When the first round runs: suffix goes to canary against plain decoding, with its Event,
    # and the servers are told to serve it on the canary share only
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Canary" and obj["status"]["candidateRevision"] == "suffix"
    assert events.reasons() == ["StartCanary"]
    desired = protocol.get_desired(redis_client, KEYS)
    assert desired is not None and desired.stable is None
    assert desired.candidate == protocol.RevisionRef(revision="suffix", path="")
    # Then measured 1.5x plain decoding it is promoted, and once servers serve it, stable
    traffic(redis_client, "", "stable", 50, 20.0)
    traffic(redis_client, "suffix", "candidate", 50, 30.0)
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Promoting", obj["status"]["conditions"]
    protocol.report_loaded(
        redis_client, KEYS, LoadedReport(server="chat-server-1", stable="suffix")
    )
    obj = tick(obj, memo)
    assert obj["status"]["activeRevision"] == "suffix"
    assert events.reasons() == ["StartCanary", "Promote", "Promoted"]


def test_a_person_rolls_back_a_canary_with_the_override_annotation(
    redis_client: redis.Redis, redis_url: str, events: Events
) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster)
    obj, _ = call(
        handlers.reconcile, speculator(traces={"redisUrl": redis_url}, rollout=ROLLOUT), memo
    )
    offer(redis_client, "r1", created=100.0)
    obj = tick(obj, memo)
    obj["metadata"]["annotations"] = {OVERRIDE_ANNOTATION: "Rollback:r1"}
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Idle" and "r1" in obj["status"]["rollout"]["rejected"]
    assert ("Warning", "Rollback") in [(t, r) for t, r, _ in events.posted]
    assert OVERRIDE_ANNOTATION not in obj["metadata"]["annotations"]  # consumed
    desired = protocol.get_desired(redis_client, KEYS)
    assert desired is not None and desired.candidate is None


def test_gitops_replacing_annotations_does_not_lose_the_rollout(
    redis_client: redis.Redis, redis_url: str, events: Events
) -> None:
    # Argo CD re-applies the manifest (metadata and spec), never status: the canary goes on.
    memo = operator_memo(RecordingCluster())
    obj, _ = call(
        handlers.reconcile, speculator(traces={"redisUrl": redis_url}, rollout=ROLLOUT), memo
    )
    offer(redis_client, "r1", created=100.0)
    obj = tick(obj, memo)
    obj["metadata"]["annotations"] = {
        "argocd.argoproj.io/tracking-id": "app:aurora.dev/Speculator:team-a/chat"
    }
    obj = tick(obj, memo)
    assert obj["status"]["phase"] == "Canary" and obj["status"]["candidateRevision"] == "r1"
    assert events.reasons() == ["StartCanary"]


def test_deleting_the_speculator_removes_its_redis_keys(
    redis_client: redis.Redis, redis_url: str, events: Events
) -> None:
    offer(redis_client, "r1", created=1.0)
    traffic(redis_client, "r1", "stable", 3, 30.0)
    redis_client.set("aurora:team-a:other:desired", "{}")
    call(
        handlers.cleanup,
        speculator(traces={"redisUrl": redis_url}),
        operator_memo(RecordingCluster()),
        retry=0,
    )
    assert not redis_client.keys(f"{KEYS.prefix}:*")
    assert redis_client.exists("aurora:team-a:other:desired") == 1
    assert events.reasons() == ["RedisKeysDeleted"]
