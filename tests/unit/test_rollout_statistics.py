"""The rollout gate's statistics as a specification: the time-weighted statistic, a
confidence sequence that holds at every look, clusters for requests routed together,
and traffic-mix changes found from covariates alone."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import pytest
from rollout_support import request_stats

from aurora.runtime.protocol import RequestStats
from aurora.runtime.rollout.statistics import (
    MIN_CLUSTERS,
    ArmTotals,
    mix_change,
    mixture_multiplier,
    restart_alpha,
    speedup_bounds,
    totals,
)

pytestmark = pytest.mark.unit


def arm(rates: list[float], tokens: int = 33, cohort_size: int = 1) -> ArmTotals:
    return totals(
        request_stats(
            "r",
            "stable",
            rate,
            created=float(i),
            new_tokens=tokens,
            cohort=f"c{i // cohort_size}" if cohort_size > 1 else "",
        )
        for i, rate in enumerate(rates)
    )


def test_an_old_stats_entry_without_decode_seconds_gets_them_from_tokens_and_rate() -> None:
    old = RequestStats.model_validate(
        {"revision": "r1", "arm": "stable", "server": "s", "decode_tokens_per_s": "20.0",
         "accept_length": "2.0", "new_tokens": "41", "verify_steps": "20", "latency_s": "2.5"}
    )  # fmt: skip
    assert (old.decode_s, old.decode_tokens, old.decode_seconds) == (None, 40, 2.0)
    new = old.model_copy(update={"decode_s": 1.5})
    assert new.decode_seconds == 1.5
    one_token = old.model_copy(update={"new_tokens": 1, "decode_tokens_per_s": 0.0})
    assert (one_token.decode_tokens, one_token.decode_seconds) == (0, 0.0)


def test_throughput_is_the_ratio_of_totals() -> None:
    sums = totals(
        [
            request_stats("r", "stable", 10.0, created=0.0, new_tokens=11),  # 10 tokens, 1 s
            request_stats("r", "stable", 40.0, created=1.0, new_tokens=41),  # 40 tokens, 1 s
        ]
    )
    assert (sums.tokens, sums.seconds, sums.tokens_per_s) == (50.0, 2.0, 25.0)
    assert sums.ms_per_token == pytest.approx(40.0)


def test_the_bound_is_wider_than_a_fixed_sample_one_and_widens_with_a_lower_error_rate() -> None:
    z = NormalDist().inv_cdf(0.95)
    for t in (5.0, 50.0, 500.0):
        assert mixture_multiplier(t, 0.05, 15.0) > z
        assert mixture_multiplier(t, 0.01, 15.0) > mixture_multiplier(t, 0.05, 15.0)
    # it grows only like sqrt(log t): valid forever, yet the bound in the effect shrinks
    assert mixture_multiplier(1e6, 0.05, 15.0) < 3 * mixture_multiplier(50.0, 0.05, 15.0)


def test_no_bound_before_both_arms_hold_enough_clusters() -> None:
    few = speedup_bounds(arm([30.0] * (MIN_CLUSTERS - 1)), arm([20.0] * 50), 0.05, 15.0)
    assert few is not None and (few.lower, few.upper) == (0.0, math.inf)
    assert few.estimate == pytest.approx(1.5)


def test_the_lower_bound_stays_below_the_truth_at_every_look_but_rarely() -> None:
    # 200 sequences, each looked at every 16 requests up to 400: the lower bound crosses
    # the true speedup (1.2) in at most 5% of them, over all looks together.
    crossed = 0
    for seed in range(200):
        rng = random.Random(seed)
        rates: dict[str, list[float]] = {"c": [], "s": []}
        for i in range(400):
            name = "c" if rng.random() < 0.5 else "s"
            rates[name].append((1.2 if name == "c" else 1.0) * rng.lognormvariate(3.0, 0.3))
            if i % 16 == 15 and min(len(rates["c"]), len(rates["s"])) >= MIN_CLUSTERS:
                bounds = speedup_bounds(arm(rates["c"]), arm(rates["s"]), 0.05, 15.0)
                assert bounds is not None
                if bounds.lower > 1.2:
                    crossed += 1
                    break
    assert crossed <= 10


def test_requests_routed_together_count_once() -> None:
    # The same 40 requests, each seen twice: as separate requests they fake precision,
    # as pairs routed together (one cohort each) they do not.
    rng = random.Random(0)
    rates = [rng.lognormvariate(3.0, 0.3) for _ in range(40)]
    doubled = [rate for rate in rates for _ in range(2)]
    once = arm(rates).log_variance
    assert once is not None
    fake = arm(doubled).log_variance
    paired = arm(doubled, cohort_size=2).log_variance
    assert fake is not None and paired is not None
    assert fake == pytest.approx(once / 2, rel=0.05)
    assert paired == pytest.approx(once, rel=1e-9)


def test_restarts_share_the_error_rate_so_it_sums_to_at_most_alpha() -> None:
    shares = [restart_alpha(0.05, j) for j in range(30)]
    assert shares[0] == pytest.approx(0.045) and shares[1] < shares[0]
    assert math.fsum(shares) <= 0.05


def stream(*segments: tuple[str, int, int]) -> list[RequestStats]:
    """Requests of (domain, prompt tokens, count) segments, one per second."""
    out: list[RequestStats] = []
    for domain, prompt_tokens, count in segments:
        for _ in range(count):
            out.append(
                request_stats(
                    "r", "stable", 30.0, created=float(len(out)), domain=domain,
                    prompt_tokens=prompt_tokens,
                )
            )  # fmt: skip
    return out


def test_a_domain_shift_is_found_where_it_happened() -> None:
    assert mix_change(stream(("code", 180, 150), ("prose", 30, 70))) == 150


def test_a_prompt_length_change_counts_even_under_one_label() -> None:
    assert mix_change(stream(("", 200, 100), ("", 12, 100))) == 100


def test_an_unchanged_or_mixed_traffic_is_not_a_change() -> None:
    rng = random.Random(1)
    mixed = [
        request_stats("r", "stable", 30.0, created=float(i), domain=rng.choice(["code", "prose"]),
                      prompt_tokens=rng.choice([12, 200]))
        for i in range(400)
    ]  # fmt: skip
    assert mix_change(mixed) is None
    assert mix_change(stream(("code", 180, 300))) is None
    assert mix_change(stream(("code", 180, 20), ("prose", 30, 10))) is None  # too few to tell
