"""The SGLang plugin's pure parts: settings, tree → chain verify steps, the bounded top-k
capture, which ranks emit, the version check, meta_info stats."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from aurora.runtime.engine import StepRecord
from aurora.runtime.sglang import (
    SUPPORTED_VERSIONS,
    UnsupportedVersion,
    plugin,
    require_supported,
)
from aurora.runtime.sglang.plugin import (
    PluginSettings,
    VerifyBatch,
    _topk,
    _trim,
    topk_chunk_rows,
    verify_steps,
)
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
    with pytest.raises(ValueError, match="AURORA_SGLANG_RESTART='yes': use 1"):
        PluginSettings.from_env({**ENV, "AURORA_SGLANG_RESTART": "yes"})
    with pytest.raises(ValueError, match="AURORA_SERVER_ROLE='primary'"):
        PluginSettings.from_env({**ENV, "AURORA_SERVER_ROLE": "primary"})


def test_only_the_tested_releases_are_supported_and_the_error_lists_them() -> None:
    assert SUPPORTED_VERSIONS == ("0.5.12", "0.5.23")
    assert require_supported("0.5.23") == "0.5.23"
    for other in ("0.5.14", "0.5.11", None):
        with pytest.raises(UnsupportedVersion, match=r"tested against 0\.5\.12, 0\.5\.23 only"):
            require_supported(other)


def test_an_unsupported_sglang_stops_a_tracing_server_but_not_an_idle_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("aurora.runtime.sglang.installed_version", lambda: "0.5.19")
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AURORA_SPECULATOR", raising=False)
    plugin.register()  # idle: SGLang runs as if Aurora were not installed
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"SGLang 0\.5\.19 installed.*0\.5\.12, 0\.5\.23"):
        plugin.register()
    assert plugin._capture is None


def test_top_k_is_taken_in_chunks_within_the_memory_budget_and_equals_the_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1 MiB of fp32 working memory over a 20k vocabulary: 13 rows per chunk
    assert topk_chunk_rows(20_000, 1) == 13
    assert topk_chunk_rows(10**9, 1) == 1  # never zero rows
    torch.manual_seed(0)
    logits = torch.randn(40, 20_000, dtype=torch.bfloat16)
    seen: list[int] = []
    logsumexp = torch.logsumexp

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(tensor.numel() * tensor.element_size())
        return logsumexp(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "logsumexp", recording)
    ids, logprobs = _topk(logits, 4, memory_mb=1)
    assert max(seen) <= 1 << 20 and len(seen) == 4  # 13 + 13 + 13 + 1 rows
    monkeypatch.setattr(torch, "logsumexp", logsumexp)
    whole = torch.log_softmax(logits.float(), dim=-1)
    expected_values, expected_ids = torch.topk(whole, 4, dim=-1)
    assert torch.equal(ids, expected_ids)
    assert torch.allclose(logprobs, expected_values, atol=1e-5)


def _parallel_state(monkeypatch: pytest.MonkeyPatch, attn_tp: int, attn_cp: int) -> None:
    state = types.ModuleType("sglang.srt.distributed.parallel_state")
    state.get_attn_tensor_model_parallel_rank = lambda: attn_tp  # type: ignore[attr-defined]
    state.get_attn_context_model_parallel_rank = lambda: attn_cp  # type: ignore[attr-defined]
    package = types.ModuleType("sglang.srt.distributed")
    package.parallel_state = state  # type: ignore[attr-defined]
    for name, module in (("sglang", types.ModuleType("sglang")),
                         ("sglang.srt", types.ModuleType("sglang.srt")),
                         ("sglang.srt.distributed", package),
                         ("sglang.srt.distributed.parallel_state", state)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize(
    ("attn_tp", "attn_cp", "emits"),
    [(0, 0, True), (1, 0, False), (0, 1, False)],
    ids=["group-leader", "other-tp-rank", "other-cp-rank"],
)
def test_the_first_rank_of_every_attention_data_parallel_group_emits(
    monkeypatch: pytest.MonkeyPatch, attn_tp: int, attn_cp: int, emits: bool
) -> None:
    # With DP attention every group has its own attention-TP rank 0 (its global TP rank
    # differs): each group's requests are traced by that rank, once.
    _parallel_state(monkeypatch, attn_tp, attn_cp)
    capture = object()
    monkeypatch.setattr(plugin, "_capture", capture)
    monkeypatch.setattr(plugin, "_emits", None)
    assert (plugin._emitting() is capture) == emits


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
