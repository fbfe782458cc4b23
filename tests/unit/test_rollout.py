"""The rollout policy as a specification: given a state and observations, when the timer
calls `decide`, then this is the next step. Samples are synthetic, from seeded generators."""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal

import pytest
from pydantic import ValidationError
from rollout_support import candidate_record, request_stats

from aurora.runtime.protocol import (
    CandidateRecord,
    DesiredState,
    LoadedReport,
    RequestStats,
    RevisionRef,
)
from aurora.runtime.rollout import (
    HISTORY_LIMIT,
    NO_DRAFT,
    Decision,
    Override,
    RolloutEvent,
    RolloutPolicy,
    RolloutState,
    day_zero,
    gates_day_zero,
    measure,
    server_day_zero,
)
from aurora.runtime.rollout import decide as rollout_decide

pytestmark = pytest.mark.unit

POLICY = RolloutPolicy(
    min_speedup="1.05",
    min_samples=30,
    max_canary_samples=120,
    canary_share="0.5",
    baseline_share="0.1",
    regression_threshold="0.97",
)
NOW = 5000.0


def requests(
    revision: str, arm: str, n: int, tokens_per_s: float, *, seed: int = 0, start: float = 1000.0
) -> list[RequestStats]:
    """n requests whose decode throughput scatters 8% around `tokens_per_s`."""
    rng = random.Random(f"{seed}:{revision}:{arm}")
    return [
        request_stats(
            revision,
            arm,
            rng.gauss(tokens_per_s, 0.08 * tokens_per_s),
            accept_length=rng.uniform(1.0, 4.0) if arm != "baseline" else 1.0,
            new_tokens=rng.randint(16, 128),
            created=start + i,
        )
        for i in range(n)
    ]


def traffic(
    *,
    stable: float = 30.0,
    candidate: float = 30.0,
    baseline: float = 20.0,
    n: int = 60,
    n_baseline: int = 40,
    stable_revision: str = "r1",
    candidate_revision: str = "r2",
    seed: int = 0,
    start: float = 1000.0,
) -> list[RequestStats]:
    return [
        *requests(stable_revision, "stable", n, stable, seed=seed, start=start),
        *requests(candidate_revision, "candidate", n, candidate, seed=seed, start=start),
        *requests(stable_revision, "baseline", n_baseline, baseline, seed=seed, start=start),
    ]


def offer(
    revision: str, created: float, parent: str | None = None, **extra: object
) -> CandidateRecord:
    names = {"offline_accept_length": "candidate", "stable_offline_accept_length": "stable"}
    return candidate_record(
        revision, created, parent, **{names.get(k, k): v for k, v in extra.items()}
    )


def serving(*servers: str, stable: str | None, candidate: str | None = None) -> list[LoadedReport]:
    return [LoadedReport(server=s, stable=stable, candidate=candidate) for s in servers]


# What servers were told before each test: where r1's and r2's checkpoints are.
PUBLISHED = DesiredState(
    stable=RevisionRef(revision="r1", path="/ckpt/r1"),
    candidate=RevisionRef(revision="r2", path="/ckpt/r2"),
    candidate_share=0.5,
    baseline_share=0.1,
    generation=3,
)


def decide(*args: object, **kwargs: object) -> Decision:
    kwargs.setdefault("published", PUBLISHED)
    return rollout_decide(*args, **kwargs)  # type: ignore[arg-type]


def served(decision: Decision) -> tuple[str | None, str | None]:
    """The (stable, candidate) revisions the decision tells servers to serve."""
    desired = decision.desired
    assert desired is not None, decision.problem
    stable, candidate = desired.stable, desired.candidate
    return (
        stable.revision if stable is not None else None,
        candidate.revision if candidate is not None else None,
    )


def canary(stable: str | None = "r1", candidate: str = "r2", created: float = 2.0) -> RolloutState:
    """The state right after `candidate` started its canary against `stable`."""
    idle = RolloutState(stable_revision=stable)
    started = decide(POLICY, idle, [offer(candidate, created, stable)], [], [], 1000.0)
    assert started.action == "StartCanary"
    return started.new_state


def test_no_candidate_serves_stable_only() -> None:
    state = RolloutState(stable_revision="r1")
    decision = decide(POLICY, state, [], traffic(n=0), serving("a", stable="r1"), NOW)
    assert decision.action == "None"
    assert decision.new_state == state
    assert served(decision) == ("r1", None)
    assert decision.desired is not None and decision.desired.candidate_share == 0.0
    assert decision.events == ()


def test_new_candidate_starts_a_canary_and_records_it() -> None:
    state = RolloutState(stable_revision="r1")
    decision = decide(
        POLICY,
        state,
        [
            offer("r1", 1.0),
            offer("r2", 2.0, "r1", offline_accept_length=2.9, stable_offline_accept_length=2.6),
        ],
        [],
        serving("a", stable="r1"),
        NOW,
        published=None,  # servers were told nothing yet
    )
    assert decision.action == "StartCanary"
    assert decision.new_state.phase == "Canary"
    assert decision.new_state.canary_started_at == NOW
    desired = decision.desired
    assert desired is not None
    # the new desired state for servers: the candidate's checkpoint, its share, a new generation
    assert (desired.stable, desired.candidate) == (
        RevisionRef(revision="r1", path="/ckpt/r1"),
        RevisionRef(revision="r2", path="/ckpt/r2"),
    )
    assert (desired.candidate_share, desired.baseline_share) == (0.5, 0.1)
    assert (desired.generation, desired.updated) == (1, NOW)
    assert "2.90 vs 2.60" in decision.reason
    assert [e.action for e in decision.new_state.history] == ["StartCanary"]
    assert decision.events == tuple(decision.new_state.history)


def test_day0_candidate_canaries_against_plain_decoding() -> None:
    # Given no stable draft: every non-candidate request is plain decoding.
    state = canary(stable=None, candidate="r1")
    samples = [
        *requests("", "stable", 60, 20.0),
        *requests("", "baseline", 10, 20.0),
        *requests("r1", "candidate", 60, 30.0),
    ]
    decision = decide(POLICY, state, [], samples, serving("a", stable=None, candidate="r1"), NOW)
    assert decision.action == "Promote"
    m = decision.measurement
    assert m is not None and m.stable.samples == 70
    assert m.speedup_vs_stable == m.candidate_speedup_vs_baseline
    assert m.stable_speedup_vs_baseline is None
    assert served(decision)[0] == "r1"
    assert (
        decision.reason.startswith("r1 beats no draft") and "vs no speculation" in decision.reason
    )


@pytest.mark.parametrize("initial", ["suffix", "ngram"])
def test_a_gated_model_free_day0_draft_is_canaried_against_no_draft(initial: str) -> None:
    # Given a run that starts on a model-free day-0 draft, gated
    state, desired = day_zero(initial, POLICY, 1000.0)
    assert gates_day_zero(initial, POLICY) and server_day_zero(initial, POLICY) == "none"
    # Then servers start without a draft and canary it on the canary share
    assert (state.phase, state.stable_revision, state.candidate_revision) == (
        "Canary",
        None,
        initial,
    )
    assert desired.stable is None and desired.candidate == RevisionRef(revision=initial, path="")
    assert (desired.candidate_share, desired.baseline_share) == (0.5, 0.1)
    assert [e.action for e in state.history] == ["StartCanary"]
    assert state.window_since == 1000.0  # only requests since the start count
    # When it is 1.5x plain decoding, then it is promoted by the gate, with no trainer record
    samples = [
        *requests("", "stable", 60, 20.0, start=1001.0),
        *requests(initial, "candidate", 60, 30.0, start=1001.0),
    ]
    loads = serving("a", stable=None, candidate=initial)
    decision = rollout_decide(POLICY, state, [], samples, loads, NOW, published=desired)
    assert decision.action == "Promote", decision.reason
    assert served(decision) == (initial, None)
    assert decision.reason.startswith(f"{initial} beats no draft")
    # and when it is slower than plain decoding, it is rolled back: plain decoding serves
    slow = [*samples[:60], *requests(initial, "candidate", 60, 15.0, start=1001.0)]
    rolled = rollout_decide(POLICY, state, [], slow, loads, NOW, published=desired)
    assert rolled.action == "Rollback", rolled.reason
    assert served(rolled) == (None, None) and initial in rolled.new_state.rejected


@pytest.mark.parametrize(
    ("initial", "gate"), [("suffix", False), ("scratch", True), ("none", True), (None, True)]
)
def test_an_ungated_or_learned_day0_draft_is_stable_at_once(
    initial: str | None, gate: bool
) -> None:
    policy = POLICY.model_copy(update={"gate_initial_draft": gate})
    state, desired = day_zero(initial, policy, 1000.0)
    expected = None if initial in (None, "none") else initial
    assert (state.phase, state.stable_revision, state.history) == ("Idle", expected, [])
    assert (desired.stable.revision if desired.stable else None) == expected
    assert desired.candidate is None and desired.candidate_share == 0.0
    if initial is not None:
        assert not gates_day_zero(initial, policy) and server_day_zero(initial, policy) == initial


@pytest.mark.parametrize("n", [0, 10])
def test_too_few_samples_waits_and_changes_nothing(n: int) -> None:
    state = canary()
    decision = decide(POLICY, state, [], traffic(candidate=60.0, n=n), [], NOW)
    assert decision.action == "Wait"
    assert f"r2 {n}/30" in decision.reason and f"stable r1 {n}/30" in decision.reason
    assert decision.new_state == state
    assert served(decision)[1] == "r2"


def test_no_server_has_loaded_the_candidate_is_said_while_waiting() -> None:
    decision = decide(POLICY, canary(), [], [], serving("a", "b", stable="r1"), NOW)
    assert decision.action == "Wait"
    assert "no server has loaded r2 yet" in decision.reason


@pytest.mark.parametrize("servers", [("a",), ("a", "b", "c")])
def test_clear_win_promotes_then_waits_for_every_server(servers: tuple[str, ...]) -> None:
    # Given a candidate 30% faster than stable with enough samples on both arms.
    samples = traffic(stable=30.0, candidate=39.0)
    decision = decide(
        POLICY, canary(), [], samples, serving(*servers, stable="r1", candidate="r2"), NOW
    )
    assert decision.action == "Promote"
    assert decision.new_state.phase == "Promoting"
    assert decision.new_state.stable_revision == "r1"  # not promoted until servers confirm
    assert served(decision) == ("r2", None)
    assert "1.3" in decision.reason and "minSpeedup 1.05" in decision.reason
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.lower >= 1.05

    # When only the first server has loaded r2, then wait for the others.
    promoting = decision.new_state
    loads = [*serving(servers[0], stable="r2"), *serving(*servers[1:], stable="r1", candidate="r2")]
    waiting = decide(POLICY, promoting, [], samples, loads, NOW + 10)
    if len(servers) > 1:
        assert waiting.action == "Wait"
        assert f"waiting for servers {', '.join(servers[1:])} to load r2" in waiting.reason
        assert waiting.new_state == promoting
        waiting = decide(POLICY, promoting, [], samples, serving(*servers, stable="r2"), NOW + 20)

    # When every server reports r2 as stable, then the promotion is complete.
    assert waiting.action == "None"
    done = waiting.new_state
    assert (done.phase, done.stable_revision, done.candidate_revision) == ("Idle", "r2", None)
    assert [e.action for e in done.history] == ["StartCanary", "Promote", "Promoted"]
    assert f"every server serves it ({len(servers)} of {len(servers)}" in waiting.reason


def test_promotion_does_not_complete_without_server_reports() -> None:
    promoting = decide(POLICY, canary(), [], traffic(candidate=39.0), [], NOW).new_state
    decision = decide(POLICY, promoting, [], [], [], NOW + 10)
    assert decision.action == "Wait"
    assert decision.new_state.phase == "Promoting"


def test_completed_promotion_goes_on_to_the_newest_candidate() -> None:
    promoting = decide(POLICY, canary(), [], traffic(candidate=39.0), [], NOW).new_state
    offered = [offer("r2", 2.0, "r1"), offer("r3", 3.0, "r2")]
    decision = decide(POLICY, promoting, offered, [], serving("a", stable="r2"), NOW + 10)
    assert decision.action == "StartCanary"
    assert (decision.new_state.stable_revision, decision.new_state.candidate_revision) == (
        "r2",
        "r3",
    )
    assert [e.action for e in decision.events] == ["Promoted", "StartCanary"]


def test_win_within_the_noise_is_not_promoted() -> None:
    # Given a candidate whose point estimate clears minSpeedup but whose lower bound does not.
    samples = traffic(stable=30.0, candidate=33.0, n=30)
    decision = decide(POLICY, canary(), [], samples, [], NOW)
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.estimate >= 1.05 > m.speedup_vs_stable.lower
    assert decision.action == "Wait"
    assert decision.new_state.phase == "Canary"


def test_clear_regression_rolls_back_and_stable_keeps_serving() -> None:
    decision = decide(POLICY, canary(), [offer("r2", 2.0, "r1")], traffic(candidate=24.0), [], NOW)
    assert decision.action == "Rollback"
    state = decision.new_state
    assert (state.phase, state.stable_revision, state.candidate_revision) == ("Idle", "r1", None)
    assert state.rejected == ["r2"]
    assert served(decision) == ("r1", None)
    assert "regressionThreshold 0.97" in decision.reason and "0.8" in decision.reason


def test_loss_within_the_noise_is_not_rolled_back() -> None:
    # Given a point estimate below regressionThreshold whose upper bound is not.
    decision = decide(POLICY, canary(), [], traffic(stable=30.0, candidate=29.6, n=30), [], NOW)
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.estimate < 0.97 <= m.speedup_vs_stable.upper
    assert decision.action == "Wait"


def test_inconclusive_keeps_collecting_below_max_samples() -> None:
    decision = decide(POLICY, canary(), [], traffic(candidate=30.3, n=60), [], NOW)
    assert decision.action == "Wait"
    assert "inconclusive so far (60/120 samples)" in decision.reason


def test_inconclusive_at_max_samples_holds_for_a_person() -> None:
    # Given a 1% difference: too small to promote, too small to call a regression.
    samples = traffic(candidate=30.3, n=120)
    decision = decide(POLICY, canary(), [], samples, [], NOW)
    assert decision.action == "Hold"
    assert decision.new_state.phase == "Hold"
    assert served(decision)[1] == "r2"
    assert decision.desired is not None and decision.desired.candidate_share == 0.5
    assert [e.action for e in decision.events] == ["Hold"]

    # When the timer fires again, then it keeps holding without new events.
    again = decide(POLICY, decision.new_state, [], samples, [], NOW + 10)
    assert (again.action, again.events) == ("Hold", ())
    assert again.new_state == decision.new_state

    # When a person promotes it, then it is promoted.
    person = Override(action="Promote", revision="r2")
    promoted = decide(POLICY, decision.new_state, [], samples, [], NOW + 20, override=person)
    assert promoted.action == "Promote" and "by a person" in promoted.reason


def test_inconclusive_at_max_samples_rolls_back_when_policy_says_so() -> None:
    policy = POLICY.model_copy(update={"on_inconclusive": "Rollback"})
    decision = decide(policy, canary(), [], traffic(candidate=30.3, n=120), [], NOW)
    assert decision.action == "Rollback"
    assert decision.new_state.rejected == ["r2"]
    assert "onInconclusive Rollback" in decision.reason


def test_held_canary_is_superseded_by_a_newer_candidate() -> None:
    held = decide(POLICY, canary(), [], traffic(candidate=30.3, n=120), [], NOW).new_state
    decision = decide(POLICY, held, [offer("r3", 3.0, "r1")], [], [], NOW + 10)
    assert decision.action == "StartCanary"
    assert decision.new_state.candidate_revision == "r3"
    assert [e.action for e in decision.events] == ["Superseded", "StartCanary"]


def test_candidate_arriving_mid_canary_waits_for_it_to_resolve() -> None:
    # Given r2 canarying and r3 (trained from r2) offered with the default policy.
    state = canary()
    offered = [offer("r2", 2.0, "r1"), offer("r3", 3.0, "r2")]
    decision = decide(POLICY, state, offered, traffic(candidate=30.3, n=60), [], NOW)
    assert decision.action == "Wait"
    assert decision.new_state.candidate_revision == "r2"
    assert "r3 waits for this canary" in decision.reason

    # When r2 resolves, then r3 gets the next canary.
    rolled_back = decide(POLICY, state, offered, traffic(candidate=24.0), [], NOW).new_state
    later = NOW + POLICY.rollback_backoff_seconds  # (the back-off after a rollback)
    next_canary = decide(POLICY, rolled_back, offered, [], [], later)
    assert next_canary.action == "StartCanary"
    assert next_canary.new_state.candidate_revision == "r3"


def test_descendant_replaces_canary_when_policy_allows() -> None:
    policy = POLICY.model_copy(update={"replace_canary_with_newer": True})
    state = canary()
    descendant = decide(policy, state, [offer("r3", 3.0, "r2")], [], [], NOW)
    assert descendant.action == "StartCanary"
    assert descendant.new_state.candidate_revision == "r3"
    assert descendant.new_state.canary_started_at == NOW
    assert [e.action for e in descendant.events] == ["Superseded", "StartCanary"]
    # A newer candidate trained from something else does not interrupt the canary.
    sibling = decide(policy, state, [offer("r3", 3.0, "r1")], [], [], NOW)
    assert (sibling.action, sibling.new_state.candidate_revision) == ("Wait", "r2")


def test_stable_slower_than_plain_decoding_falls_back_to_no_draft() -> None:
    # Given stable r1 measurably slower than the no-speculation baseline,
    state = RolloutState(stable_revision="r1")
    slow = traffic(stable=18.0, baseline=20.0, n=60, n_baseline=40)
    # when the policy runs, then it falls back to plain decoding and says why.
    decision = decide(POLICY, state, [], slow, [], NOW)
    assert decision.action == "Fallback" and decision.stable_regressed
    assert "stable r1 is slower than no speculation" in decision.reason
    assert "falling back to plain decoding" in decision.reason
    assert decision.new_state.stable_revision == NO_DRAFT == served(decision)[0]
    assert decision.new_state.phase == "Idle"
    assert [(e.action, e.revision) for e in decision.events] == [("Fallback", "r1")]
    # From no draft there is nothing to fall back from: a new window starts, the old
    # stable's drafted requests no longer count, and the next round just serves plain
    # decoding (no flip-flop).
    assert decision.new_state.window_since == NOW
    later = traffic(stable=18.0, baseline=20.0, n=60, n_baseline=40, start=NOW)
    again = decide(POLICY, decision.new_state, [], later, [], NOW + 100)
    assert again.action == "None" and not again.stable_regressed and not again.events
    m = again.measurement
    assert m is not None and m.stable.revision == NO_DRAFT
    assert m.stable.samples == 40  # the baseline requests only; r1's 60 are not plain


def labelled(requests: list[RequestStats], domain: str, prompt_tokens: int) -> list[RequestStats]:
    return [
        r.model_copy(update={"domain": domain, "prompt_tokens": prompt_tokens}) for r in requests
    ]


def test_a_traffic_shift_restarts_the_window_and_the_stable_is_judged_on_the_new_mix() -> None:
    # Given stable r1 fast on 90 code requests, then slower than plain decoding on 60 prose
    # requests (traffic shifted): over both it still looks about 1.2x faster,
    state = RolloutState(stable_revision="r1", window_since=900.0)
    before = [
        *labelled(requests("r1", "stable", 90, 30.0, start=1000.0), "code", 180),
        *labelled(requests("r1", "baseline", 40, 20.0, start=1000.0), "code", 180),
    ]
    after = [
        *labelled(requests("r1", "stable", 60, 16.0, seed=1, start=2000.0), "prose", 30),
        *labelled(requests("r1", "baseline", 40, 20.0, seed=1, start=2000.0), "prose", 30),
    ]
    whole = measure([*before, *after], "r1", None, POLICY, since=900.0)
    assert whole.stable_speedup_vs_baseline is not None
    assert whole.stable_speedup_vs_baseline.estimate > 1.0
    # when the policy runs, then the mix change restarts the window where prose began,
    decision = decide(POLICY, state, [], [*before, *after], [], NOW)
    assert [e.action for e in decision.events] == ["MixChange", "Fallback"]
    assert "100% code, median prompt 180 tokens -> 100% prose" in decision.events[0].reason
    m = decision.measurement
    assert m is not None and m.window_since == 2000.0 and m.window_restarts == 1
    assert (m.stable.samples, m.baseline.samples) == (60, 40)  # the prose requests alone
    # at a smaller share of the error rate, and stable, slower there, falls back.
    assert m.confidence == pytest.approx(1 - 0.05 * 0.9 * 0.1)
    assert m.stable_speedup_vs_baseline is not None
    assert m.stable_speedup_vs_baseline.upper < 1.0
    assert decision.action == "Fallback"
    assert decision.new_state.window_restarts == 0  # the fallback starts a new window


def test_the_same_mix_does_not_restart_the_window() -> None:
    state = RolloutState(stable_revision="r1", window_since=900.0)
    steady = labelled(traffic(n=60, n_baseline=40), "code", 180)
    decision = decide(POLICY, state, [], steady, [], NOW)
    assert decision.events == () and decision.new_state.window_since == 900.0


def test_regressed_stable_is_only_flagged_when_fallback_is_off() -> None:
    policy = POLICY.model_copy(update={"fallback_on_regression": False})
    state = RolloutState(stable_revision="r1")
    slow = traffic(stable=18.0, baseline=20.0, n=60, n_baseline=40)
    decision = decide(policy, state, [], slow, [], NOW)
    assert decision.action == "None" and decision.stable_regressed
    assert "stable r1 is slower than no speculation" in decision.reason
    assert decision.new_state == state and served(decision)[0] == "r1"


def test_regression_within_the_noise_or_with_few_samples_keeps_stable() -> None:
    state = RolloutState(stable_revision="r1")
    # With too few baseline requests it is not claimed.
    sparse = decide(POLICY, state, [], traffic(stable=18.0, n=60, n_baseline=10), [], NOW)
    assert sparse.action == "None" and not sparse.stable_regressed
    # Slightly slower within the noise (upper bound above 1.0) is not claimed either.
    noisy = decide(POLICY, state, [], traffic(stable=19.4, n=30, n_baseline=30), [], NOW)
    m = noisy.measurement
    assert m is not None and m.stable_speedup_vs_baseline is not None
    assert m.stable_speedup_vs_baseline.estimate < 1.0 <= m.stable_speedup_vs_baseline.upper
    assert noisy.action == "None" and not noisy.stable_regressed
    # A stable faster than plain decoding is not flagged.
    assert not decide(POLICY, state, [], traffic(stable=30.0), [], NOW).stable_regressed


def test_fallback_during_a_canary_keeps_the_canary_against_plain_decoding() -> None:
    # Given a canary r2 against a stable r1 that turned slower than no speculation,
    state = canary()
    slow = traffic(stable=18.0, candidate=19.0, baseline=20.0, n=60, n_baseline=40)
    decision = decide(POLICY, state, [], slow, serving("a", stable="r1", candidate="r2"), NOW)
    # then stable falls back to no draft and r2 keeps its canary share,
    assert decision.action == "Fallback"
    assert (decision.new_state.phase, decision.new_state.candidate_revision) == ("Canary", "r2")
    assert served(decision) == (NO_DRAFT, "r2")
    assert "canary r2 carries on" in decision.reason
    # and r2 is now measured against plain decoding: a candidate faster than no
    # speculation is promoted, one slower is rolled back.
    fast = [
        *requests("r2", "candidate", 60, 26.0, start=NOW),
        *requests("r1", "baseline", 40, 20.0, start=NOW),
    ]
    promoted = decide(POLICY, decision.new_state, [], fast, [], NOW + 100)
    assert promoted.action == "Promote" and served(promoted)[0] == "r2"
    assert promoted.reason.startswith("r2 beats no draft")
    slower = [
        *requests("r2", "candidate", 60, 17.0, start=NOW),
        *requests("r1", "baseline", 40, 20.0, start=NOW),
    ]
    assert decide(POLICY, decision.new_state, [], slower, [], NOW + 100).action == "Rollback"


def test_no_fallback_while_promoting() -> None:
    state = canary().model_copy(update={"phase": "Promoting"})
    slow = traffic(stable=18.0, baseline=20.0, n=60, n_baseline=40)
    decision = decide(POLICY, state, [], slow, serving("a", stable="r1"), NOW)
    assert decision.action == "Wait" and decision.new_state.stable_revision == "r1"


def test_server_that_cannot_load_the_candidate_rejects_it() -> None:
    loads = [
        LoadedReport(server="a", stable="r1", candidate="r2"),
        LoadedReport(server="b", stable="r1", error="CUDA out of memory", error_revision="r2"),
    ]
    decision = decide(POLICY, canary(), [], traffic(candidate=39.0), loads, NOW)
    assert decision.action == "Reject"
    assert "server b" in decision.reason and "CUDA out of memory" in decision.reason
    assert served(decision) == ("r1", None)
    assert decision.new_state.rejected == ["r2"]


def test_stale_load_error_about_another_revision_is_ignored() -> None:
    loads = [LoadedReport(server="a", stable="r1", error="bad checkpoint", error_revision="r0")]
    decision = decide(POLICY, canary(), [], [], loads, NOW)
    assert decision.action == "Wait"


def test_server_that_cannot_load_the_promoted_revision_keeps_the_old_stable() -> None:
    promoting = decide(POLICY, canary(), [], traffic(candidate=39.0), [], NOW).new_state
    loads = [
        LoadedReport(server="a", stable="r2"),
        LoadedReport(server="b", stable="r1", error="shape mismatch"),
    ]
    decision = decide(POLICY, promoting, [], [], loads, NOW + 10)
    assert decision.action == "Reject"
    assert "server b" in decision.reason and "shape mismatch" in decision.reason
    assert decision.new_state.stable_revision == "r1"
    assert served(decision)[0] == "r1"


def test_candidate_marked_not_loadable_is_rejected_without_canary() -> None:
    state = RolloutState(stable_revision="r1")
    decision = decide(POLICY, state, [offer("r2", 2.0, "r1", loadable=False)], [], [], NOW)
    assert decision.action == "Reject"
    assert decision.new_state.phase == "Idle" and decision.new_state.rejected == ["r2"]
    assert served(decision)[1] is None


def test_rejected_and_older_revisions_are_never_offered_again() -> None:
    # Given r3 rolled back after r2 was skipped for being older.
    state = canary(candidate="r3", created=3.0)
    offered = [offer("r2", 2.0, "r1"), offer("r3", 3.0, "r1")]
    rolled_back = decide(
        POLICY, state, offered, traffic(candidate=24.0, candidate_revision="r3"), [], NOW
    )
    assert rolled_back.action == "Rollback"
    # When the trainer keeps offering them, then nothing starts.
    for tick in range(3):
        again = decide(POLICY, rolled_back.new_state, offered, [], [], NOW + tick)
        assert again.action == "None"
    # A rejected revision re-published with a newer timestamp is still refused.
    republished = decide(POLICY, rolled_back.new_state, [offer("r3", 9.0, "r1")], [], [], NOW)
    assert republished.action == "None"


def test_same_inputs_give_the_same_decision_in_any_order() -> None:
    samples = traffic(candidate=31.5, n=80)
    first = decide(POLICY, canary(), [], samples, [], NOW)
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    second = decide(POLICY, canary(), [], shuffled, [], NOW)
    assert first == second
    assert isinstance(first, Decision) and first.measurement is not None


def test_bounds_bracket_the_estimate_and_widen_with_a_lower_error_rate() -> None:
    samples = traffic(stable=30.0, candidate=36.0, baseline=20.0, n=60, n_baseline=40)
    m = measure(samples, "r1", "r2", POLICY)
    s = m.speedup_vs_stable
    assert s is not None and s.lower < s.estimate < s.upper
    assert s.estimate == pytest.approx(1.2, abs=0.05)
    assert (s.comparator, s.samples, s.comparator_samples) == ("r1", 60, 60)
    assert m.candidate_speedup_vs_baseline is not None
    assert m.candidate_speedup_vs_baseline.estimate == pytest.approx(1.8, abs=0.1)
    assert m.candidate_speedup_vs_baseline.comparator == "no speculation"
    assert (m.stable.samples, m.candidate.samples, m.baseline.samples) == (60, 60, 40)
    # each bound at the first window's share of falsePromotionRate (0.9 of it; the rest is
    # kept for windows after traffic-mix restarts)
    assert m.confidence == pytest.approx(1 - 0.05 * 0.9)
    strict = measure(samples, "r1", "r2", POLICY.model_copy(update={"false_promotion_rate": 0.01}))
    assert strict.speedup_vs_stable is not None
    assert strict.speedup_vs_stable.lower < s.lower
    assert strict.confidence == pytest.approx(1 - 0.01 * 0.9)


def test_throughput_is_time_weighted_not_a_mean_of_rates() -> None:
    # Given a candidate 1.6x stable on half the requests and 0.7x on the other half: the
    # mean of per-request rates says 1.15x, yet its requests take longer on average.
    stable = [request_stats("r1", "stable", 30.0, created=1000.0 + i) for i in range(80)]
    candidate = [
        request_stats("r2", "candidate", 30.0 * (1.6 if i % 2 else 0.7), created=1000.0 + i)
        for i in range(80)
    ]
    decision = decide(POLICY, canary(), [], [*stable, *candidate], [], NOW)
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.estimate == pytest.approx(1 / ((1 / 1.6 + 1 / 0.7) / 2))
    assert m.speedup_vs_stable.estimate < 1.0
    assert m.candidate.ms_per_token == pytest.approx(1000 / 30 * (1 / 1.6 + 1 / 0.7) / 2)
    assert decision.action != "Promote"


def test_only_requests_from_the_canarys_own_period_count() -> None:
    # Given stable r1 measured fast before the canary started (the machine was quieter)
    # and both arms equally fast since,
    earlier = requests("r1", "stable", 200, 45.0, start=0.0)
    since = traffic(stable=30.0, candidate=30.0, n=60)
    decision = decide(POLICY, canary(), [], [*earlier, *since], [], NOW)
    m = decision.measurement
    # then the comparison reads only the canary's period: no regression, no promotion.
    assert m is not None and m.stable.samples == 60 and m.window_since == 1000.0
    assert m.speedup_vs_stable is not None
    assert m.speedup_vs_stable.lower < 1.0 < m.speedup_vs_stable.upper
    assert decision.action == "Wait"


def test_windows_start_over_when_what_is_served_changes() -> None:
    started = canary()
    assert (started.window_since, started.window_restarts) == (1000.0, 0)
    promoting = decide(POLICY, started, [], traffic(candidate=39.0), [], NOW).new_state
    assert promoting.window_since == 1000.0  # Promote itself serves nothing new yet
    done = decide(POLICY, promoting, [], [], serving("a", stable="r2"), NOW + 10).new_state
    assert (done.stable_revision, done.window_since) == ("r2", NOW + 10)
    rolled_back = decide(POLICY, canary(), [], traffic(candidate=24.0), [], NOW + 20).new_state
    assert rolled_back.window_since == NOW + 20


def test_a_candidate_equal_to_stable_is_not_promoted_however_often_it_is_checked() -> None:
    # A/A canaries checked every 4 requests up to maxCanarySamples: none is promoted.
    outcomes = []
    for seed in range(40):
        rng = random.Random(seed)
        state, samples = canary(), []
        for i in range(3 * POLICY.max_canary_samples):
            arm = "candidate" if rng.random() < 0.5 else "stable"
            rate = rng.lognormvariate(math.log(30.0), 0.25)
            samples.append(
                request_stats("r2" if arm == "candidate" else "r1", arm, rate, created=1000.0 + i)
            )
            if i % 4 == 3:
                decision = decide(POLICY, state, [], samples, [], 1000.0 + i)
                state = decision.new_state
                if decision.action in ("Promote", "Rollback", "Hold"):
                    break
        outcomes.append(decision.action)
    assert "Promote" not in outcomes
    assert outcomes.count("Hold") >= 35  # inconclusive, as an equal candidate should be


def test_measure_ignores_other_revisions_and_unusable_samples() -> None:
    stale = requests("r0", "candidate", 50, 90.0)
    broken = [request_stats("r2", "candidate", 0.0, created=1.0)]
    clean = measure(traffic(n=40), "r1", "r2", POLICY)
    noisy = measure([*traffic(n=40), *stale, *broken], "r1", "r2", POLICY)
    assert noisy == clean


def test_rollout_state_round_trips_through_json() -> None:
    state = decide(POLICY, canary(), [], traffic(candidate=39.0), [], NOW).new_state
    state = state.model_copy(update={"rejected": ["r0"]})
    wire = state.model_dump_json()
    assert '"candidateRevision":"r2"' in wire  # camelCase, as in Kubernetes status
    assert RolloutState.model_validate_json(wire) == state
    assert RolloutState.model_validate(json.loads(wire)) == state


def test_history_is_bounded() -> None:
    state = RolloutState(stable_revision="r1")
    for i in range(HISTORY_LIMIT + 5):
        state = decide(
            POLICY, state, [offer(f"x{i}", float(i), loadable=False)], [], [], float(i)
        ).new_state
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].revision == f"x{HISTORY_LIMIT + 4}"
    assert isinstance(state.history[0], RolloutEvent)


def test_inconsistent_persisted_state_is_refused() -> None:
    with pytest.raises(ValidationError, match="candidateRevision"):
        RolloutState(phase="Canary", stable_revision="r1")


def test_policy_accepts_decimal_strings() -> None:
    policy = RolloutPolicy.model_validate(
        {
            "minSpeedup": "1.10",
            "canaryShare": "0.25",
            "baselineShare": "0",
            "falsePromotionRate": "0.01",
        }
    )
    assert policy.min_speedup == Decimal("1.10")
    assert (policy.canary_share, policy.baseline_share, policy.false_promotion_rate) == (
        Decimal("0.25"),
        Decimal("0"),
        Decimal("0.01"),
    )
    assert json.loads(policy.model_dump_json())["minSpeedup"] == "1.10"


@pytest.mark.parametrize(
    ("field", "value", "example"),
    [
        ("minSpeedup", "1,05", "1.05"),
        ("minSpeedup", "-1.05", "1.05"),
        ("minSpeedup", "0", "1.05"),
        ("minSpeedup", "fast", "1.05"),
        ("regressionThreshold", "97%", "0.97"),
        ("canaryShare", "1.5", "0.5"),
        ("canaryShare", "0", "0.5"),
        ("baselineShare", "half", "0.1"),
        ("falsePromotionRate", "0.5", "0.05"),
        ("falsePromotionRate", "0", "0.05"),
        ("falsePromotionRate", "5%", "0.05"),
        ("minSamples", 9, "at least 10"),
    ],
)
def test_bad_decimal_strings_name_the_field_and_an_example(
    field: str, value: str, example: str
) -> None:
    with pytest.raises(ValidationError) as error:
        RolloutPolicy.model_validate({field: value})
    message = str(error.value)
    assert field in message and example in message


def test_inconsistent_policy_names_both_fields() -> None:
    with pytest.raises(ValidationError, match=r"rollout\.regressionThreshold.*rollout\.minSpeedup"):
        RolloutPolicy(min_speedup="1.0", regression_threshold="1.02")
    with pytest.raises(ValidationError, match=r"rollout\.canaryShare.*rollout\.baselineShare"):
        RolloutPolicy(canary_share="0.9", baseline_share="0.1")
    with pytest.raises(ValidationError, match=r"rollout\.maxCanarySamples"):
        RolloutPolicy(min_samples=50, max_canary_samples=40)


def test_a_decision_quotes_its_gated_figure_comparator_window_and_counts() -> None:
    decision = decide(POLICY, canary(), [], traffic(candidate=39.0), [], NOW)
    assert decision.action == "Promote"
    reason = decision.reason
    m = decision.measurement
    assert m is not None and m.speedup_vs_stable is not None
    s = m.speedup_vs_stable
    assert f"lower bound {s.lower:.3f}x >= minSpeedup 1.05 (falsePromotionRate 0.05)" in reason
    assert f"speedup {s.estimate:.3f}x (95.5% confidence sequence" in reason
    assert "time-weighted) vs r1 on 60 candidate / 60 stable requests" in reason
    assert f"({m.candidate.ms_per_token:.1f} / {m.stable.ms_per_token:.1f} ms per token)" in reason
    assert "window since 00:16:40 UTC (4000 s)" in reason  # the canary started at t=1000
    assert "vs no speculation (40 requests): candidate" in reason


# ------------------------------------------------------- hybrid canaries over suffix decoding


def test_over_a_suffix_stable_a_learned_candidate_is_canaried_and_promoted_as_a_hybrid() -> None:
    # Given suffix decoding stable and the trainer's head r2 offered
    idle = RolloutState(stable_revision="suffix")
    started = decide(POLICY, idle, [offer("r2", 2.0)], [], [], 1000.0, published=None)
    # then r2 is canaried as hybrid:r2, served from r2's checkpoint
    assert started.action == "StartCanary"
    assert started.new_state.candidate_revision == "hybrid:r2"
    assert started.desired is not None and started.desired.candidate == RevisionRef(
        revision="hybrid:r2", path="/ckpt/r2"
    )
    assert "canary hybrid:r2 against suffix" in started.reason and "r2's head" in started.reason
    # when hybrid:r2 measures faster than suffix, it is promoted under that name
    samples = traffic(candidate=39.0, stable_revision="suffix", candidate_revision="hybrid:r2")
    promoting = decide(POLICY, started.new_state, [offer("r2", 2.0)], samples, [], NOW)
    assert promoting.action == "Promote", promoting.reason
    assert served(promoting) == ("hybrid:r2", None)
    loads = serving("a", stable="hybrid:r2")
    done = decide(POLICY, promoting.new_state, [offer("r2", 2.0)], [], loads, NOW + 1).new_state
    assert (done.phase, done.stable_revision) == ("Idle", "hybrid:r2")
    # and the next head is canaried as a hybrid over the hybrid stable, its checkpoint
    # path known even once r2's record is gone
    nxt = decide(
        POLICY, done, [offer("r3", 3.0, "r2")], [], loads, NOW + 2, published=promoting.desired
    )
    assert nxt.new_state.candidate_revision == "hybrid:r3"
    assert nxt.desired is not None
    assert (nxt.desired.stable, nxt.desired.candidate) == (
        RevisionRef(revision="hybrid:r2", path="/ckpt/r2"),
        RevisionRef(revision="hybrid:r3", path="/ckpt/r3"),
    )


@pytest.mark.parametrize(
    ("stable", "policy", "expected"),
    [
        ("r1", POLICY, "r2"),  # a head stable: a head against a head
        (None, POLICY, "r2"),  # plain decoding
        ("none", POLICY, "r2"),  # after a fallback
        ("suffix", POLICY.model_copy(update={"hybrid_canaries": False}), "r2"),
        ("ngram", POLICY, "r2"),
        ("suffix", POLICY, "hybrid:r2"),
        ("hybrid:r1", POLICY, "hybrid:r2"),
    ],
)
def test_a_candidate_is_canaried_as_a_hybrid_only_over_suffix_decoding(
    stable: str | None, policy: RolloutPolicy, expected: str
) -> None:
    started = decide(policy, RolloutState(stable_revision=stable), [offer("r2", 2.0)], [], [], NOW)
    assert started.new_state.candidate_revision == expected


def test_a_rolled_back_hybrid_canary_is_never_offered_again_alone_or_as_a_hybrid() -> None:
    state = RolloutState(stable_revision="suffix", rejected=["hybrid:r2"])
    decision = decide(POLICY, state, [offer("r2", 2.0)], [], [], NOW)
    assert decision.action == "None"
    state = RolloutState(stable_revision="r1", rejected=["hybrid:r2"])
    assert decide(POLICY, state, [offer("r2", 2.0)], [], [], NOW).action == "None"


def test_a_hybrid_canary_is_superseded_by_a_candidate_trained_from_its_head() -> None:
    policy = POLICY.model_copy(update={"replace_canary_with_newer": True})
    started = decide(
        policy, RolloutState(stable_revision="suffix"), [offer("r2", 2.0)], [], [], NOW
    )
    offered = [offer("r2", 2.0), offer("r3", 3.0, "r2")]
    decision = decide(policy, started.new_state, offered, [], [], NOW + 1)
    assert decision.new_state.candidate_revision == "hybrid:r3", decision.reason
    assert "supersedes canary hybrid:r2" in decision.reason


# ------------------------------------------------------------- back-off after rollbacks


def rolled_back(state: RolloutState, at: float, candidate: str) -> RolloutState:
    """`state` (a canary of `candidate` against r1) after the gate rolls it back at `at`."""
    samples = traffic(candidate=20.0, candidate_revision=candidate, start=at - 200)
    decision = decide(POLICY, state, [], samples, [], at)
    assert decision.action == "Rollback", decision.reason
    return decision.new_state


def test_after_a_rollback_the_next_canary_waits_and_the_wait_doubles_until_a_promotion() -> None:
    # Given r2 rolled back by the gate at NOW
    state = rolled_back(canary(), NOW, "r2")
    assert (state.rollbacks_in_a_row, state.next_canary_at) == (1, NOW + 30)
    assert "after 1 rollback the next canary waits 30 s" in state.history[-1].reason
    # when r3 arrives within the back-off, it waits, and the reason says until when
    offered = [offer("r3", 3.0, "r1")]
    waiting = decide(POLICY, state, offered, [], [], NOW + 10)
    assert (waiting.action, waiting.new_state) == ("Wait", state)
    assert served(waiting) == ("r1", None)
    assert "backing off after 1 rollback in a row" in waiting.reason
    assert "in 20 s" in waiting.reason and "now r3" in waiting.reason
    # then once it is over, the newest candidate by then (r4, not r3) is canaried
    offered.append(offer("r4", 4.0, "r1"))
    started = decide(POLICY, state, offered, [], [], NOW + 30)
    assert (started.action, started.new_state.candidate_revision) == ("StartCanary", "r4")
    # and a second rollback in a row doubles the wait, capped at maxRollbackBackoffSeconds
    state = rolled_back(started.new_state, NOW + 300, "r4")
    assert (state.rollbacks_in_a_row, state.next_canary_at) == (2, NOW + 300 + 60)
    capped = POLICY.model_copy(update={"max_rollback_backoff_seconds": 45})
    assert decide(capped, state, [], [], [], NOW).new_state == state  # (nothing offered)
    again = state.model_copy(update={"phase": "Canary", "candidate_revision": "r5"})
    samples = traffic(candidate=20.0, candidate_revision="r5", start=NOW + 300)
    third = decide(capped, again, [], samples, [], NOW + 400)
    assert (third.new_state.rollbacks_in_a_row, third.new_state.next_canary_at) == (3, NOW + 445)
    # a promotion ends the streak
    promoting = decide(
        POLICY,
        canary(candidate="r6", created=6.0),
        [],
        traffic(candidate=39.0, candidate_revision="r6"),
        [],
        NOW,
    )
    streak = promoting.new_state.model_copy(
        update={"rollbacks_in_a_row": 4, "next_canary_at": NOW + 900}
    )
    done = decide(POLICY, streak, [], [], serving("a", stable="r6"), NOW + 1).new_state
    assert (done.stable_revision, done.rollbacks_in_a_row, done.next_canary_at) == ("r6", 0, None)


def test_a_persons_rollback_and_a_rejected_checkpoint_do_not_back_off() -> None:
    by_person = decide(
        POLICY, canary(), [], [], [], NOW, override=Override(action="Rollback", revision="r2")
    )
    assert by_person.action == "Rollback"
    assert (by_person.new_state.rollbacks_in_a_row, by_person.new_state.next_canary_at) == (0, None)
    loads = [LoadedReport(server="a", stable="r1", error="bad checkpoint", error_revision="r2")]
    rejected = decide(POLICY, canary(), [], [], loads, NOW)
    assert rejected.action == "Reject"
    assert rejected.new_state.next_canary_at is None
    # and with rollbackBackoffSeconds 0 the next canary starts at once
    no_wait = POLICY.model_copy(update={"rollback_backoff_seconds": 0})
    samples = traffic(candidate=20.0)
    state = decide(no_wait, canary(), [], samples, [], NOW).new_state
    started = decide(no_wait, state, [offer("r3", 3.0, "r1")], [], [], NOW)
    assert started.action == "StartCanary"
    assert "waits" not in state.history[-1].reason


def test_the_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"rollout\.maxRollbackBackoffSeconds"):
        RolloutPolicy(rollback_backoff_seconds=60, max_rollback_backoff_seconds=30)


@pytest.mark.parametrize("named", ["hybrid:r2", "r2"])
def test_a_person_may_name_a_hybrid_canary_by_its_own_name_or_its_heads(named: str) -> None:
    started = decide(
        POLICY, RolloutState(stable_revision="suffix"), [offer("r2", 2.0)], [], [], NOW
    )
    override = Override(action="Promote", revision=named)
    decision = decide(
        POLICY, started.new_state, [offer("r2", 2.0)], [], [], NOW + 1, override=override
    )
    assert decision.action == "Promote" and served(decision) == ("hybrid:r2", None)
    rollback = Override(action="Rollback", revision=named)
    undone = decide(POLICY, decision.new_state, [], [], [], NOW + 2, override=rollback)
    assert undone.action == "Rollback" and undone.new_state.stable_revision == "suffix"
