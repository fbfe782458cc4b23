"""The SGLang plugin's pure parts: settings, tree → chain verify steps, meta_info stats."""

from __future__ import annotations

import pytest
import torch

from aurora.runtime.engine import StepRecord
from aurora.runtime.sglang.plugin import PluginSettings, VerifyBatch, _trim, verify_steps
from aurora.runtime.sglang.weights import request_stats

pytestmark = pytest.mark.unit

ENV = {
    "AURORA_REDIS_URL": "redis://r:6379/0",
    "AURORA_SPECULATOR": "prod/llama",
    "HOSTNAME": "pod-1",
}


def test_settings_are_off_without_redis_and_name_a_bad_variable() -> None:
    assert PluginSettings.from_env({}) is None
    assert PluginSettings.from_env({"AURORA_REDIS_URL": "redis://r"}) is None
    settings = PluginSettings.from_env(
        {**ENV, "AURORA_SERVER_ROLE": "canary", "AURORA_TRACE_TOPK": "0"}
    )
    assert settings is not None
    assert (settings.keys.prefix, settings.server, settings.arm, settings.topk) == (
        "aurora:prod:llama",
        "pod-1",
        "candidate",
        0,
    )
    with pytest.raises(ValueError, match=r"AURORA_TRACE_SAMPLE_RATE=2\.0"):
        PluginSettings.from_env({**ENV, "AURORA_TRACE_SAMPLE_RATE": "2"})
    with pytest.raises(ValueError, match="AURORA_SPECULATOR='llama'"):
        PluginSettings.from_env({**ENV, "AURORA_SPECULATOR": "llama"})


def _batch(candidates, next_token, accepted, counts=None, topk=None) -> VerifyBatch:
    ids = logprobs = None
    if topk is not None:
        ids, logprobs = topk
    return VerifyBatch(
        rids=[f"req-{i}" for i in range(len(candidates))],
        candidates=torch.tensor(candidates),
        next_token=torch.tensor(next_token),
        accepted=torch.tensor(accepted),
        accepted_counts=counts,
        topk_ids=ids,
        topk_logprobs=logprobs,
    )


def test_a_chain_step_is_what_the_draft_proposed_and_how_much_was_accepted() -> None:
    # given two requests drafting chains of 3 (node 0 is the last verified token), V2 rows
    batch = _batch(
        candidates=[[7, 11, 12, 13], [9, 21, 22, 23]],
        next_token=[[1, 2, 3, -1], [1, 2, 3, -1]],
        accepted=[[0, 1, -1, -1], [4, 5, 6, 7]],  # flat node indices, -1 padded
    )
    steps = verify_steps(batch)
    assert steps == {
        "req-0": StepRecord(proposed=[11, 12, 13], accepted=1),
        "req-1": StepRecord(proposed=[21, 22, 23], accepted=3),
    }


def test_a_tree_step_is_the_accepted_path_then_the_first_child_chain_with_parent_topk() -> None:
    # node 0 root; 1 and 2 its children; 3 and 4 children of 1 (first child 3)
    candidates = [[7, 30, 31, 40, 41], [7, 30, 31, 40, 41]]
    next_token = [[1, 3, -1, -1, -1], [1, 3, -1, -1, -1]]
    # V1 layout: one flat list of accepted flat indices, split by per-request counts
    accepted = [0, 2, 5]  # req 0 took branch 2; req 1 rejected at the root
    topk_ids = [[100 + node, 200 + node] for node in range(10)]
    topk_logprobs = [[-0.5, -1.5] for _ in range(10)]
    steps = verify_steps(
        _batch(candidates, next_token, accepted, counts=[2, 1], topk=(topk_ids, topk_logprobs))
    )
    assert steps["req-0"].proposed == [31] and steps["req-0"].accepted == 1
    assert steps["req-0"].topk_ids == [[100, 200]]  # decided at the root
    assert steps["req-1"].proposed == [30, 40] and steps["req-1"].accepted == 0
    assert steps["req-1"].topk_ids == [[105, 205], [106, 206]]  # root, then node 1 of row 1


def test_steps_past_the_delivered_output_are_trimmed() -> None:
    steps = [StepRecord([1, 2], 2), StepRecord([3], 0), StepRecord([4], 1)]
    # steps start at output positions 1, 4 and 5 (prefill token at 0)
    assert _trim(steps, 5) == steps[:2]  # position 5 was never delivered
    assert _trim(steps, 4) == steps[:1]
    assert _trim(steps, 6) == steps
    assert _trim(steps, 1) == []


@pytest.mark.parametrize(
    "meta",
    [
        # 0.5.12+: new names and their aliases
        {"spec_num_correct_drafts": 30, "spec_accepted_drafts": 30, "spec_verify_ct": 20},
        # 0.5.3-0.5.10
        {"spec_accept_token_num": 30, "spec_draft_token_num": 60, "spec_verify_ct": 20},
        # only SGLang's own figure
        {"spec_accept_length": 2.5, "spec_verify_ct": 20},
    ],
    ids=["0.5.12", "0.5.9", "accept_length-only"],
)
def test_meta_info_of_every_release_gives_the_same_accept_length(meta) -> None:
    stats = request_stats(
        {"completion_tokens": 51, "e2e_latency": 2.0, "weight_version": "r7", **meta},
        revision="fallback",
        arm="stable",
        server="pod-1",
        ttft_s=0.5,
    )
    assert stats.accept_length == pytest.approx(2.5)
    assert stats.verify_steps == 20 and stats.new_tokens == 51
    assert stats.decode_tokens_per_s == pytest.approx(50 / 1.5)
    assert stats.revision == "r7"  # the pusher sets weight_version to the revision


def test_meta_info_of_0_5_2_and_of_plain_decoding() -> None:
    old = request_stats(
        {"completion_tokens": 40, "spec_verify_ct": 10, "e2e_latency": 1.0},
        revision="r1",
        arm="stable",
        server="s",
    )
    assert old.accept_length == 4.0 and old.revision == "r1"
    plain = request_stats({"completion_tokens": 10, "e2e_latency": 1.0, "weight_version": "default"},
                          revision="r1", arm="stable", server="s")  # fmt: skip
    assert (plain.accept_length, plain.verify_steps, plain.revision) == (1.0, 0, "r1")
