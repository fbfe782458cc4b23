"""The figures of `aurora bench adapt`: rolling means, recovery, ratios, and the
schedule the CLI builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from aurora.commands.bench import adapt_schedule
from aurora.errors import UsageError
from aurora.runtime.bench_adapt import (
    AdaptConfig,
    first_reaching,
    recovery_requests,
    rolling_mean,
    shift_index,
    summarize,
    window_ratio,
)
from aurora.runtime.workloads import Schedule

pytestmark = pytest.mark.unit


def test_rolling_mean_uses_the_values_seen_so_far_then_a_trailing_window() -> None:
    assert rolling_mean([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert rolling_mean([], 3) == []


def test_recovery_counts_requests_until_the_rolling_level_holds_to_the_end() -> None:
    # Given post-shift accept lengths that dip, touch the level once, fall back, then hold
    after = [1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 2.0]
    # When the level is 1.5 with a window of 1 (raw values)
    # Then the first touch (request 3) does not count, the hold from request 5 does
    assert recovery_requests(after, 1.5, 1) == 5
    # and reaching it once is what first_reaching reports
    assert first_reaching(after, 1.5, 1) == 3


def test_recovery_is_none_when_the_level_is_lost_at_the_end_or_never_reached() -> None:
    assert recovery_requests([2.0, 2.0, 1.0], 1.5, 1) is None
    assert recovery_requests([1.0, 1.1], 1.5, 2) is None
    assert first_reaching([1.0, 1.1], 1.5, 2) is None


def test_recovery_with_a_rolling_window_smooths_single_dips() -> None:
    # A single dip to 1.4 between 2.0s keeps the 2-request mean at 1.7 >= 1.5
    assert recovery_requests([1.0, 2.0, 2.0, 1.4, 2.0], 1.5, 2) == 2


def test_window_ratio_is_the_ratio_of_means_from_start() -> None:
    assert window_ratio([1.0, 30.0, 30.0], [1.0, 20.0, 10.0], 1) == pytest.approx(2.0)
    assert window_ratio([1.0], [0.0], 0) is None
    assert window_ratio([1.0], [1.0], 5) is None


def _series(accept: list[float], tps: list[float], trained: int = 0) -> dict[str, list]:
    return {"accept_length": accept, "tokens_per_s": tps, "trained_traces": [trained] * len(tps)}


def test_summarize_reports_ratios_over_the_last_window_and_recovery_against_static() -> None:
    # Given 2 requests before the shift and 4 after; static drops after the shift,
    # online recovers from the 3rd post-shift request, lambda0 never does
    arms = {
        "static": _series([2.0, 2.0, 1.0, 1.0, 1.0, 1.0], [20, 20, 10, 10, 10, 10]),
        "online": _series([2.0, 2.0, 1.0, 1.2, 2.0, 2.0], [20, 20, 10, 12, 15, 15], trained=30),
        "lambda0": _series([2.0, 2.0, 1.0, 1.0, 1.2, 1.2], [20, 20, 10, 10, 11, 11]),
    }
    config = AdaptConfig(window=2, rolling=1, recover_fraction=0.9, target_accept_length=1.8)
    # When summarized with the shift at request 2
    result = summarize(arms, 2, config)
    # Then throughput compares the last 2 requests, and recovery uses 0.9 x static's 2.0
    assert result["throughput_ratio_online_vs_static"] == pytest.approx(1.5)
    assert result["throughput_ratio_lambda0_vs_static"] == pytest.approx(1.1)
    assert result["recovery_level"] == pytest.approx(1.8)
    assert result["recovery_requests"] == {"static": None, "online": 3, "lambda0": None}
    assert result["traces_to_target"]["online"] == {"post_shift_traces": 3, "trained_traces": 30}
    assert result["traces_to_target"]["lambda0"] is None
    assert result["last_window"] == {"start": 4, "requests": 2}
    # and the ladder counts post-shift traces until each accept length is first reached
    assert result["traces_to_accept_length"]["1.2"] == {"online": 2, "lambda0": 3}
    assert result["traces_to_accept_length"]["1.5"] == {"online": 3, "lambda0": None}
    json.dumps(result)  # the --json document is plain JSON


def test_summarize_never_compares_pre_shift_requests() -> None:
    # A window longer than the post-shift part starts at the shift
    arms = {name: _series([2.0, 1.0, 1.0], [10, 5, 5]) for name in ("static", "online", "lambda0")}
    result = summarize(arms, 1, AdaptConfig(window=10))
    assert result["last_window"] == {"start": 1, "requests": 2}


def test_summarize_needs_requests_on_both_sides_of_the_shift() -> None:
    arms = {name: _series([2.0, 1.0], [10, 5]) for name in ("static", "online", "lambda0")}
    with pytest.raises(UsageError, match="before and after"):
        summarize(arms, 2, AdaptConfig())


def test_the_shift_is_where_the_second_phase_starts() -> None:
    assert shift_index(Schedule.from_string("prose:16,code:64")) == 16
    with pytest.raises(UsageError, match="needs a shift"):
        shift_index(Schedule.from_string("code:10"))


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "schedule": None,
        "prompts": None,
        "requests_before": 16,
        "requests_after": 64,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_cli_schedule_defaults_to_prose_then_code_and_takes_prompt_files(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine.jsonl", tmp_path / "theirs.jsonl"
    assert adapt_schedule(_args()) == "prose:16,code:64"  # from the flags given
    assert adapt_schedule(_args(prompts=[str(mine)], requests_after=5)) == f"prose:16,file:{mine}:5"
    assert adapt_schedule(_args(prompts=[str(mine), str(theirs)])) == (
        f"file:{mine}:16,file:{theirs}:64"
    )
    assert adapt_schedule(_args(schedule="math:3,chat:4")) == "math:3,chat:4"
    with pytest.raises(UsageError, match="--requests-after 0"):
        adapt_schedule(_args(requests_after=0))
    with pytest.raises(UsageError, match="3 times"):
        adapt_schedule(_args(prompts=[str(mine)] * 3))


def test_config_rejects_a_zero_block() -> None:
    with pytest.raises(UsageError, match="block=0"):
        AdaptConfig(block=0)
