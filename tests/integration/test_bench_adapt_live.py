"""`aurora bench adapt` end to end, tiny: the default model, a real embedded
redis-server, real trainers; a few short requests over two seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aurora.cli import main
from aurora.runtime import bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_adapt_writes_the_figures_per_arm_with_intervals_over_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stream of 2 prose then 4 unseen code requests, two seeds, plain, static (with
    # a fixed k and adaptive), an online arm with a fixed k and one served adaptive, suffix
    # decoding and the hybrid of suffix and an online head, a static draft fitted in one
    # short epoch, and a publish margin of 0 (any candidate at least as good offline as
    # what is served)
    out, png = tmp_path / "adapt.json", tmp_path / "adapt.png"
    argv = [
        "bench", "adapt", "--schedule", "prose:2,code:4", "--seeds", "2",
        "--arms", "plain,static,static-adaptive,online-fkl,online-adaptive,suffix,hybrid-online",
        "--max-new-tokens", "10", "--spec-tokens", "3", "--fit-prompts", "2", "--fit-epochs", "1",
        "--block", "2", "--steps-per-block", "3", "--window", "2", "--eval-prompts", "2",
        "--publish-margin", "0", "--workdir", str(tmp_path / "work"), "--plot", str(png),
        "--json", str(out),
    ]  # fmt: skip
    written: list[dict] = []
    real_write = bench.write_json
    monkeypatch.setattr(
        bench, "write_json", lambda path, doc: (written.append(doc), real_write(path, doc))
    )
    # When the benchmark runs
    assert main(argv) == 0
    result = json.loads(out.read_text())
    # Then the JSON was written after the first seed too (a stopped run keeps it), then whole
    assert [(doc["seeds"], doc["complete"]) for doc in written] == [([0], False), ([0, 1], True)]
    # Then every arm has its ratios as mean/low/high over the two seeds
    assert result["traffic"] == "unseen" and result["seeds"] == [0, 1]
    arms = {
        "plain", "static", "static-adaptive", "online-fkl", "online-adaptive", "suffix",
        "hybrid-online",
    }  # fmt: skip
    assert set(result["arms"]) == arms
    # (the adaptive online arm is compared with the static draft served adaptive)
    assert result["static_arms"]["online-adaptive"] == "static-adaptive"
    assert result["static_arms"]["online-fkl"] == "static"
    for name, row in result["arms"].items():
        for key in ("throughput_ratio_vs_plain", "throughput_ratio_vs_static"):
            assert set(row[key]) >= {"mean", "low", "high"}, (name, key)
            assert len(row[key]["per_seed"]) == 2
    assert result["arms"]["plain"]["throughput_ratio_vs_plain"]["mean"] == pytest.approx(1.0)
    # and the online arms have traces-to-quality figures for both levels, the others none
    for name in ("online-fkl", "online-adaptive", "hybrid-online"):
        assert set(result["arms"][name]["traces_to_accept_length"]) == {"1.5", "2.0"}
    assert "traces_to_accept_length" not in result["arms"]["static"]
    assert "traces_to_accept_length" not in result["arms"]["suffix"]
    # and in each seed every arm served the same 6 requests, none of them twice
    for seed in result["per_seed"]:
        served = seed["requests_served"]
        prompts = [s["prompt_id"] for s in served["plain"]]
        assert len(prompts) == 6 and len(set(prompts)) == 6
        assert all([s["prompt_id"] for s in served[name]] == prompts for name in served)
        # the static arm never changed revision, the online arms swapped at least once
        assert len({s["revision"] for s in served["static"]}) == 1 and not seed["swaps"]["static"]
        assert {s["revision"] for s in served["suffix"]} == {"suffix"}
        for name in ("online-fkl", "online-adaptive"):
            assert seed["swaps"][name], f"{name} never swapped to a candidate"
        # the curve starts from the static draft, before any post-shift trace
        assert seed["curves"]["online-fkl"][0]["traces"] == 0
    assert png.stat().st_size > 10_000
    # and two one-seed runs merged with --merge give the two-seed figures
    halves = []
    for entry in result["per_seed"]:
        half = tmp_path / f"seed{entry['seed']}.json"
        config = {**result["config"], "seed": entry["seed"], "seeds": 1}
        half.write_text(json.dumps({**result, "config": config, "per_seed": [entry]}))
        halves.append(str(half))
    merged = tmp_path / "merged.json"
    assert main(["bench", "adapt", "--merge", *halves, "--json", str(merged)]) == 0
    pooled = json.loads(merged.read_text())
    assert pooled["seeds"] == [0, 1] and pooled["arms"] == result["arms"]
    assert pooled["goals"] == result["goals"]
    assert [m["seeds"] for m in pooled["merged_from"]] == [[0], [1]]
