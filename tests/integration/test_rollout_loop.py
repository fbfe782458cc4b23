"""One rollout round (the loop the operator and local mode run) against a real redis-server: read what servers and
the trainer published, decide, publish what should be served."""

from __future__ import annotations

import random
import socket

import pytest
import redis

from aurora.runtime import protocol
from aurora.runtime.protocol import CandidateRecord, Keys, LoadedReport, RequestStats
from aurora.runtime.rollout import RolloutPolicy, RolloutState, loop

pytestmark = pytest.mark.integration

KEYS = Keys("team-a", "chat")
POLICY = RolloutPolicy.model_validate(
    {"minSamples": 30, "maxCanarySamples": 100, "bootstrapResamples": 200, "seed": 3}
)


def offer(client: redis.Redis, revision: str, created: float, step: int) -> None:
    record = CandidateRecord(
        revision=revision, path=f"/checkpoints/{revision}", sha256="0" * 64, created=created,
        step=step, traces_seen=step * 10, evaluation={"candidate": 2.4, "stable": 2.0},
    )  # fmt: skip
    protocol.offer_candidate(client, KEYS, record)


def publish(client: redis.Redis, revision: str, arm: str, n: int, tokens_per_s: float) -> None:
    rng = random.Random(f"{revision}:{arm}")
    for i in range(n):
        stats = RequestStats(
            revision=revision, arm=arm, server="chat-server-a-1",  # type: ignore[arg-type]
            decode_tokens_per_s=rng.gauss(tokens_per_s, 1.0), accept_length=2.5 if arm != "baseline" else 1.0,
            new_tokens=64, verify_steps=20, latency_s=1.0, created=1000.0 + i,
        )  # fmt: skip
        protocol.publish_stats(client, KEYS, stats, maxlen=10_000)


def test_candidate_goes_to_canary_is_promoted_and_reaches_every_live_server(
    redis_client: redis.Redis,
) -> None:
    window = loop.SampleWindow(size=POLICY.max_canary_samples)
    # Given a trainer that offered r1 and servers still on the initial draft,
    offer(redis_client, "r1", created=100.0, step=50)
    # when the operator runs a round, then r1 goes to canary and servers are told so.
    first = loop.run_round(redis_client, KEYS, POLICY, RolloutState(), window, now=200.0)
    assert first.decision.action == "StartCanary" and first.changed
    desired = protocol.get_desired(redis_client, KEYS)
    assert desired is not None and desired.candidate is not None
    assert (desired.candidate.revision, desired.candidate.path) == ("r1", "/checkpoints/r1")
    assert desired.stable is None and desired.candidate_share == 0.5 and desired.generation == 1

    # A round with nothing new publishes nothing new.
    again = loop.run_round(redis_client, KEYS, POLICY, first.decision.new_state, window, now=210.0)
    assert again.decision.action == "Wait" and not again.changed
    assert protocol.get_desired(redis_client, KEYS) == desired

    # Given measured traffic where r1 decodes 1.5x faster than plain decoding,
    publish(redis_client, "", "baseline", 60, 20.0)
    publish(redis_client, "r1", "candidate", 60, 30.0)
    promoted = loop.run_round(
        redis_client, KEYS, POLICY, again.decision.new_state, window, now=300.0
    )
    assert promoted.decision.action == "Promote"
    desired = protocol.get_desired(redis_client, KEYS)
    assert desired is not None and desired.stable is not None and desired.stable.revision == "r1"
    assert desired.candidate is None and desired.generation == 2

    # Servers report: a live pod serves r1; reports from a deleted pod and from a server
    # silent for minutes must not hold up the promotion, and are removed.
    for server, stable, updated in (
        ("chat-server-7d9f-x2k4p-17", "r1", 305.0),
        ("chat-server-7d9f-old00-9", None, 305.0),
        ("chat-server-7d9f-x2k4p-3", None, 100.0),
    ):
        report = LoadedReport(server=server, stable=stable, updated=updated)
        protocol.report_loaded(redis_client, KEYS, report)
    done = loop.run_round(
        redis_client, KEYS, POLICY, promoted.decision.new_state, window, now=310.0,
        live_pods=["chat-server-7d9f-x2k4p"],
    )  # fmt: skip
    assert [e.action for e in done.decision.events] == ["Promoted"]
    assert done.decision.new_state.stable_revision == "r1"
    assert done.stale_servers == ("chat-server-7d9f-old00-9", "chat-server-7d9f-x2k4p-3")
    assert set(protocol.get_loaded(redis_client, KEYS)) == {"chat-server-7d9f-x2k4p-17"}


def test_regressed_stable_falls_back_to_no_draft_through_redis(redis_client: redis.Redis) -> None:
    window = loop.SampleWindow(size=POLICY.max_canary_samples)
    # Given r1 promoted earlier, now measured slower than plain decoding (traffic shifted),
    offer(redis_client, "r1", created=100.0, step=50)
    protocol.set_desired(
        redis_client,
        KEYS,
        protocol.DesiredState(stable=protocol.RevisionRef(revision="r1", path="/checkpoints/r1")),
    )
    publish(redis_client, "r1", "stable", 60, 18.0)
    publish(redis_client, "r1", "baseline", 40, 20.0)
    state = RolloutState(stable_revision="r1", tried_through=100.0)
    # when the operator runs a round, then servers are told to decode without a draft,
    fallen = loop.run_round(redis_client, KEYS, POLICY, state, window, now=300.0)
    assert fallen.decision.action == "Fallback" and fallen.changed
    desired = protocol.get_desired(redis_client, KEYS)
    assert desired is not None and desired.stable == protocol.RevisionRef(revision="none", path="")
    # and once they decode without it, the next round leaves things be (no flip-flop).
    publish(redis_client, "none", "stable", 40, 20.0)
    steady = loop.run_round(
        redis_client, KEYS, POLICY, fallen.decision.new_state, window, now=310.0
    )
    assert steady.decision.action == "None" and not steady.changed


def test_without_pods_only_the_heartbeat_age_decides_who_is_alive() -> None:
    reports = {
        "host-1": LoadedReport(server="host-1", stable="r1", updated=1000.0),
        "host-2": LoadedReport(server="host-2", stable="r0", updated=900.0),
    }
    live, stale = loop.live_loads(reports, None, now=1030.0)
    assert [r.server for r in live] == ["host-1"] and stale == ["host-2"]


def test_sample_window_reads_incrementally_and_stays_bounded(redis_client: redis.Redis) -> None:
    window = loop.SampleWindow(size=25)
    publish(redis_client, "r1", "stable", 40, 30.0)
    assert window.refresh(redis_client, KEYS) == 40
    assert len(window.samples()) == 25  # the most recent 25 of the arm
    assert window.refresh(redis_client, KEYS) == 0  # nothing new: nothing re-read
    publish(redis_client, "r2", "candidate", 5, 30.0)
    assert window.refresh(redis_client, KEYS) == 5
    window.keep_only(["r2"])
    assert {s.revision for s in window.samples()} == {"r2"}


def test_no_draft_samples_survive_pruning_on_day_0(redis_client: redis.Redis) -> None:
    # Servers label requests served without a draft with revision "none"; on day 0 (no
    # stable revision) they are the stable arm and must not be pruned away.
    window = loop.SampleWindow(size=25)
    publish(redis_client, "none", "stable", 6, 30.0)
    publish(redis_client, "r1", "candidate", 6, 45.0)
    window.refresh(redis_client, KEYS)
    window.keep_only([None, "r1"])
    assert {(s.arm, s.revision) for s in window.samples()} == {
        ("stable", "none"),
        ("candidate", "r1"),
    }


def test_trace_lag_counts_undelivered_and_unacked_traces(redis_client: redis.Redis) -> None:
    assert protocol.trace_lag(redis_client, KEYS) == 0
    for i in range(5):
        redis_client.xadd(KEYS.traces, {"trace_id": f"t{i}"})
    assert protocol.trace_lag(redis_client, KEYS) == 5  # no trainer yet
    redis_client.xgroup_create(KEYS.traces, "trainer", id="0")
    delivered = redis_client.xreadgroup("trainer", "worker-1", {KEYS.traces: ">"}, count=2)
    assert protocol.trace_lag(redis_client, KEYS) == 5  # 2 pending + 3 never delivered
    ids = [entry_id for _, entries in delivered for entry_id, _ in entries]
    redis_client.xack(KEYS.traces, "trainer", *ids)
    assert protocol.trace_lag(redis_client, KEYS) == 3


def test_a_wanted_revision_without_a_record_is_not_published(redis_client: redis.Redis) -> None:
    # The status says r9 is stable, but the trainer withdrew its record: the round runs,
    # reports the problem and leaves servers as they are.
    window = loop.SampleWindow(size=POLICY.max_canary_samples)
    result = loop.run_round(
        redis_client, KEYS, POLICY, RolloutState(stable_revision="r9"), window, now=50.0
    )
    assert result.problem is not None and "r9" in result.problem and "withdrawn" in result.problem
    assert protocol.get_desired(redis_client, KEYS) is None and not result.changed


def test_deletion_removes_only_this_speculators_keys(redis_client: redis.Redis) -> None:
    other = Keys("team-a", "chat-2")
    offer(redis_client, "r1", created=1.0, step=1)
    publish(redis_client, "r1", "stable", 3, 30.0)
    redis_client.set(other.desired, "{}")
    assert loop.delete_speculator_keys(redis_client, KEYS) == 2
    assert redis_client.exists(other.desired) == 1
    assert not redis_client.keys(f"{KEYS.prefix}:*")


def test_unreachable_redis_fails_fast_with_a_clear_message() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    client = loop.connect(url, password="hunter2", timeout=0.5)
    window = loop.SampleWindow(size=10)
    with pytest.raises(loop.REDIS_ERRORS) as error:
        loop.run_round(client, KEYS, POLICY, RolloutState(), window, now=1.0)
    message = loop.redis_problem(url, error.value)
    assert f"127.0.0.1:{port}" in message and "unreachable" in message and "hunter2" not in message
