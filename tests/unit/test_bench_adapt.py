"""The figures of `aurora bench adapt`: time-weighted throughput, intervals over seeds,
traces to an accept length, the unseen-traffic stream, the arms registry and the
schedule the CLI builds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from aurora.commands.bench import adapt_schedule
from aurora.errors import UsageError
from aurora.runtime.bench_adapt import (
    ARMS,
    AdaptConfig,
    Arm,
    ArmState,
    combine,
    goals,
    interval,
    merge_documents,
    register_arm,
    rolling_mean,
    seed_figures,
    shift_index,
    throughput,
    traces_to,
    trainer_overrides,
    workload,
)
from aurora.runtime.workloads import Schedule

pytestmark = pytest.mark.unit


def test_rolling_mean_uses_the_values_seen_so_far_then_a_trailing_window() -> None:
    assert rolling_mean([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert rolling_mean([], 3) == []


def _request(tokens: int, seconds: float, steps: int = 0, step_tokens: int = 0) -> dict[str, Any]:
    return {
        "decode_tokens": tokens, "decode_seconds": seconds, "verify_steps": steps,
        "step_tokens": step_tokens,
    }  # fmt: skip


def test_throughput_is_total_tokens_over_total_seconds_not_a_mean_of_rates() -> None:
    # A fast short request and a slow long one: rates 10/s and 2/s, mean 6/s; time-weighted 3/s
    assert throughput([_request(10, 1.0), _request(20, 10.0)]) == pytest.approx(30 / 11)
    assert throughput([_request(0, 0.0)]) is None


def test_interval_is_the_t_interval_of_the_mean_over_seeds() -> None:
    figure = interval([1.0, 2.0, 3.0])
    # mean 2, standard deviation 1, t(0.95, 2 df) = 2.920: half-width 2.920 / sqrt(3)
    assert figure["mean"] == pytest.approx(2.0)
    assert figure["low"] == pytest.approx(2.0 - 2.920 / 3**0.5)
    assert figure["high"] == pytest.approx(2.0 + 2.920 / 3**0.5)
    assert figure["per_seed"] == [1.0, 2.0, 3.0] and figure["n"] == 3


def test_interval_of_one_seed_has_no_bounds_and_a_missing_seed_has_no_mean() -> None:
    assert interval([1.5])["low"] is None and interval([1.5])["mean"] == 1.5
    missing = interval([10.0, None, 12.0])
    assert missing["mean"] is None and missing["reached"] == 2


def test_traces_to_interpolates_between_evaluations() -> None:
    curve = [
        {"traces": 0, "accept_length": 1.1},
        {"traces": 4, "accept_length": 1.3},
        {"traces": 8, "accept_length": 1.7},
        {"traces": 12, "accept_length": 1.6},
    ]
    assert traces_to(curve, 1.5) == pytest.approx(6.0)  # halfway from 1.3 (4) to 1.7 (8)
    assert traces_to(curve, 1.1) == 0
    assert traces_to(curve, 2.0) is None


def _state(name: str, served: list[dict[str, Any]], curve: list | None = None) -> ArmState:
    state = ArmState(ARMS[name], None, "r")
    state.served = served
    state.curve = curve or []
    return state


def test_seed_figures_compare_the_window_after_the_shift_against_plain_and_static() -> None:
    # Given 2 requests before the shift and 4 after, a window of the last 2
    def series(rate: float, step_tokens: int = 10) -> list[dict[str, Any]]:
        return [_request(10, 10 / rate, steps=5, step_tokens=step_tokens) for _ in range(6)]

    arms = {
        "plain": _state("plain", series(10.0)),
        "static": _state("static", series(8.0)),
        "online-fkl": _state(
            "online-fkl",
            series(8.0)[:4] + series(15.0, step_tokens=15)[:2],
            [{"traces": 0, "accept_length": 1.2}, {"traces": 2, "accept_length": 1.6}],
        ),
    }
    config = AdaptConfig(window=2, levels=(1.5, 2.0))
    figures = seed_figures(arms, 2, config)
    # Then the ratios are time-weighted throughput over the last 2 requests
    assert figures["online-fkl"]["throughput_ratio_vs_plain"] == pytest.approx(1.5)
    assert figures["online-fkl"]["throughput_ratio_vs_static"] == pytest.approx(15 / 8)
    assert figures["static"]["throughput_ratio_vs_plain"] == pytest.approx(0.8)
    assert figures["online-fkl"]["traces_to_accept_length"] == {
        "1.5": pytest.approx(1.5),
        "2.0": None,
    }
    assert "traces_to_accept_length" not in figures["static"]  # nobody trains it
    # and the tokens per target forward in the window compare with static's too
    assert "accept_length_ratio_vs_static" not in figures["static"]
    assert figures["online-fkl"]["accept_length_ratio_vs_static"] == pytest.approx(1.5)
    # and an arm compares with its own static counterpart (an adaptive online arm with the
    # static draft served adaptive)
    arms["static-adaptive"] = _state("static-adaptive", series(12.0))
    arms["online-adaptive"] = _state("online-adaptive", series(12.0)[:4] + series(18.0)[:2])
    figures = seed_figures(arms, 2, config)
    assert figures["online-adaptive"]["throughput_ratio_vs_static"] == pytest.approx(1.5)
    assert figures["online-adaptive"]["throughput_ratio_vs_plain"] == pytest.approx(1.8)
    # and the combined figures carry mean/low/high for every arm and ratio
    combined = combine([figures, figures])
    assert combined["online-fkl"]["throughput_ratio_vs_plain"]["mean"] == pytest.approx(1.5)
    assert combined["online-fkl"]["throughput_ratio_vs_plain"]["low"] == pytest.approx(1.5)
    assert set(combined["online-fkl"]["traces_to_accept_length"]) == {"1.5", "2.0"}
    json.dumps(combined)  # plain JSON


def _figure(mean: float, low: float, high: float) -> dict[str, Any]:
    return {"mean": mean, "low": low, "high": high, "n": 3, "per_seed": []}


def _doc(seed: int, traces: float, **config: Any) -> dict[str, Any]:
    figures = {
        "plain": {"throughput_ratio_vs_plain": 1.0},
        "online-fkl": {
            "throughput_ratio_vs_plain": 0.9 + seed / 10,
            "traces_to_accept_length": {"1.5": traces},
        },
    }
    return {
        "benchmark": "adapt",
        "complete": True,
        "config": {"seed": seed, "seeds": 1, "workdir": f"w{seed}", "k": 3, "levels": [1.5]}
        | config,
        "eval_prompts": ["code/1", "code/2"],
        "seeds": [seed],
        "per_seed": [{"seed": seed, "figures": figures}],
    }


def test_merge_pools_the_seeds_of_runs_of_one_configuration() -> None:
    # Given three one-seed runs given out of order, one stopped after its seed
    docs = [("b.json", _doc(2, 40.0)), ("a.json", _doc(0, 30.0)), ("c.json", _doc(1, 35.0))]
    docs[0][1]["complete"] = False
    merged = merge_documents(docs)
    # Then the seeds are pooled in order and every interval is over all three
    assert merged["seeds"] == [0, 1, 2] and merged["config"]["seeds"] == 3
    assert merged["config"]["seed"] == 0 and merged["complete"] is False
    ratio = merged["arms"]["online-fkl"]["throughput_ratio_vs_plain"]
    assert ratio["per_seed"] == pytest.approx([0.9, 1.0, 1.1])
    assert ratio["mean"] == pytest.approx(1.0) and ratio["low"] < 1.0 < ratio["high"]
    traces = merged["arms"]["online-fkl"]["traces_to_accept_length"]["1.5"]
    assert traces == interval([30.0, 35.0, 40.0])
    assert [m["file"] for m in merged["merged_from"]] == ["b.json", "a.json", "c.json"]


def test_merge_refuses_other_configurations_repeated_seeds_and_other_documents() -> None:
    with pytest.raises(UsageError, match=r"b\.json.*differs.*in k;"):
        merge_documents([("a.json", _doc(0, 30.0)), ("b.json", _doc(1, 30.0, k=4))])
    with pytest.raises(UsageError, match=r"seed 0 is also in a\.json"):
        merge_documents([("a.json", _doc(0, 30.0)), ("b.json", _doc(0, 30.0))])
    with pytest.raises(UsageError, match=r"b\.json: not a JSON document"):
        merge_documents([("a.json", _doc(0, 30.0)), ("b.json", {"benchmark": "decode"})])
    with pytest.raises(UsageError, match="at least two"):
        merge_documents([("a.json", _doc(0, 30.0))])
    other = _doc(1, 30.0)
    other["eval_prompts"] = ["code/3"]
    with pytest.raises(UsageError, match=r"b\.json: its evaluation prompts differ"):
        merge_documents([("a.json", _doc(0, 30.0)), ("b.json", other)])


def test_goals_check_the_negative_variant_against_forward_kl_only() -> None:
    arms = {
        "online-fkl": {
            "throughput_ratio_vs_static": _figure(1.3, 1.1, 1.5),
            "throughput_ratio_vs_plain": _figure(0.9, 0.8, 1.0),
            "traces_to_accept_length": {"1.5": _figure(30.0, 26.0, 34.0)},
        },
        "online-reject": {
            "throughput_ratio_vs_static": _figure(1.2, 1.0, 1.4),
            "traces_to_accept_length": {"1.5": _figure(20.0, 18.0, 22.0)},
        },
        "online-all": {"traces_to_accept_length": {"1.5": _figure(27.0, 20.0, 28.0)}},
    }
    result = goals(arms, (1.5, 2.0))
    assert result["best_online_arm_by_throughput"] == "online-fkl"
    assert result["online_vs_static_at_least_1.25_low_above_1"] is True
    assert result["online_vs_plain_at_least_1.0"] is False
    reject = result["online-reject_vs_online-fkl_traces_to_1.5"]
    assert reject["fewer_fraction"] == pytest.approx(1 / 3)
    assert reject["goal_20pct_fewer_and_separate"] is True
    everything = result["online-all_vs_online-fkl_traces_to_1.5"]
    assert everything["intervals_separate"] is False  # 28 reaches into 26..34
    assert everything["goal_20pct_fewer_and_separate"] is False


def test_goals_rank_online_arms_by_the_ratio_to_plain_when_no_static_arm_ran() -> None:
    arms = {
        "plain": {"throughput_ratio_vs_plain": _figure(1.0, 1.0, 1.0)},
        "online-fkl": {"throughput_ratio_vs_plain": _figure(0.87, 0.83, 0.92)},
        "online-offpath": {"throughput_ratio_vs_plain": _figure(0.89, 0.87, 0.90)},
    }
    result = goals(arms, (1.5,))
    assert result["best_online_arm_by_throughput"] == "online-offpath"
    assert result["online_vs_static_at_least_1.25_low_above_1"] is None
    assert result["online_vs_plain_at_least_1.0"] is False


def test_unseen_traffic_never_serves_a_prompt_twice_and_never_serves_the_eval_prompts() -> None:
    schedule = Schedule.from_string("prose:6,code:40")
    config = AdaptConfig(eval_prompts=8)
    load = workload(schedule, config, seed=1)
    served = [r.prompt.id for r in load.requests]
    assert len(served) == 46 and len(set(served)) == 46
    assert not set(served) & {p.id for p in load.evaluation}
    assert not set(served) & {p.id for p in load.fit}
    assert len(load.evaluation) == 8 and {p.domain for p in load.evaluation} == {"code"}
    # the evaluation prompts and the static draft's prompts do not depend on the seed
    other = workload(schedule, config, seed=2)
    assert [p.id for p in other.evaluation] == [p.id for p in load.evaluation]
    assert [p.id for p in other.fit] == [p.id for p in load.fit]
    assert [r.prompt.id for r in other.requests] != served


def test_unseen_traffic_refuses_a_stream_longer_than_the_prompts() -> None:
    with pytest.raises(UsageError, match="--distinct-prompts N for recurring traffic"):
        workload(Schedule.from_string("prose:2,code:200"), AdaptConfig(), seed=0)


def test_recurring_traffic_is_an_option() -> None:
    load = workload(
        Schedule.from_string("prose:2,code:12"), AdaptConfig(distinct_prompts=3), seed=0
    )
    after = [r.prompt.id for r in load.requests[2:]]
    assert len(set(after)) == 3


def test_the_default_arms_and_their_objectives() -> None:
    config = AdaptConfig(lambda_discard=0.5, lambda_reject=2.0)
    assert config.arm_names == [
        "plain", "static", "online-fkl", "online-offpath", "online-reject", "online-all",
        "suffix", "hybrid-online", "static-adaptive", "online-adaptive",
    ]  # fmt: skip
    overrides = {name: trainer_overrides(ARMS[name], config) for name in config.arm_names[2:6]}
    assert overrides["online-fkl"] == {
        "lambda_discard": 0.0, "lambda_reject": 0.0, "reject_term": "unlikelihood"
    }  # fmt: skip
    assert overrides["online-offpath"]["lambda_discard"] == 0.5
    assert overrides["online-reject"] == {
        "lambda_discard": 0.0, "lambda_reject": 2.0, "reject_term": "unlikelihood"
    }  # fmt: skip
    assert overrides["online-all"]["lambda_reject"] == 2.0
    assert ARMS["plain"].objective is None and ARMS["plain"].draft == "none"
    # suffix decoding is model-free and untrained; the hybrid's head learns with every term
    assert ARMS["suffix"].objective is None and ARMS["suffix"].draft == "none"
    assert ARMS["suffix"].observe is not None and ARMS["suffix"].proposer is not None
    assert trainer_overrides(ARMS["hybrid-online"], config) == overrides["online-all"]
    # the adaptive online arm trains with the trainer's default objective and is compared
    # with the static draft served the same way
    assert trainer_overrides(ARMS["online-adaptive"], config) == overrides["online-offpath"]
    assert ARMS["online-adaptive"].static == "static-adaptive"
    assert ARMS["static-adaptive"].objective is None and ARMS["static-adaptive"].draft == "static"


def test_an_arm_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aurora.runtime.bench_adapt.ARMS", dict(ARMS))
    from aurora.runtime import bench_adapt

    register_arm(Arm("echo", "serves the head it is given", proposer=lambda state: state.head))
    assert "echo" in bench_adapt.ARMS and "echo" in AdaptConfig().arm_names
    assert AdaptConfig(arms="plain,echo").arm_names == ["plain", "echo"]
    with pytest.raises(ValueError, match="registered already"):
        register_arm(Arm("echo", "twice"))
    with pytest.raises(UsageError, match="not registered"):
        AdaptConfig(arms="plain,nope")


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


def test_config_rejects_a_zero_block_and_levels_at_or_below_one() -> None:
    with pytest.raises(UsageError, match="block=0"):
        AdaptConfig(block=0)
    with pytest.raises(UsageError, match="levels"):
        AdaptConfig(levels=(1.0,))
