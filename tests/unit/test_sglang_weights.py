"""Draft hot swaps into SGLang: the pusher's HTTP sequence and the draft-only loader.

SGLang cannot run here (no GPU), so its HTTP API is played by an httpx MockTransport
that does what 0.5.12's scheduler does with update_weights_from_tensor: hand the same
tensors to the draft and then the target model through the custom loader."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from sglang_support import (
    VOCAB,
    FakeSGLang,
    LlamaForCausalLM,
    LlamaForCausalLMEagle3,
    save_revision,
    serialize,
)

from aurora.runtime.sglang.export import export_revision
from aurora.runtime.sglang.weights import DraftPusher, SwapError, load_draft_only

pytestmark = pytest.mark.unit


def test_a_push_pauses_loads_only_the_draft_verifies_and_resumes(tmp_path: Path) -> None:
    sglang = FakeSGLang()
    pusher = DraftPusher(sglang.client, tp_size=2, serialize=serialize, served_d2t=VOCAB)
    result = pusher.push(save_revision(tmp_path, "r00000002-aaaaaa", seed=2))
    assert result.revision == "r00000002-aaaaaa" and result.pause_ms >= 0
    assert sglang.calls == ["/pause_generation", "/update_weights_from_tensor"] + [
        "/get_weights_by_name"
    ] * 3 + ["/continue_generation"]
    assert not sglang.paused
    assert "model.layers.0.self_attn.q_proj.weight" in sglang.draft.params


def test_a_new_draft_vocabulary_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    sglang = FakeSGLang()
    pusher = DraftPusher(sglang.client, serialize=serialize, served_d2t=VOCAB)
    other = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 40, 50, 60, 63])
    with pytest.raises(SwapError, match=r"another draft vocabulary.*restart"):
        pusher.push(save_revision(tmp_path, "r3", vocab=other))
    assert sglang.calls == []


def test_a_push_the_server_did_not_apply_fails_verification_and_still_resumes(
    tmp_path: Path,
) -> None:
    # the server's draft has another vocabulary than the pusher believes: the loader
    # refuses the weights, and the read-back shows it
    sglang = FakeSGLang(hot_token_id=torch.arange(12))
    sglang.draft.params = {n: torch.zeros(1, 48) for n in ("model.fc.weight",)} | {
        "model.norm.weight": torch.zeros(16),
        "lm_head.weight": torch.zeros(12, 16),
    }
    pusher = DraftPusher(sglang.client, serialize=serialize)
    with pytest.raises(SwapError, match="does not hold the pushed values"):
        pusher.push(save_revision(tmp_path, "r4", seed=4))
    assert sglang.calls[-1] == "/continue_generation" and not sglang.paused


def test_an_sglang_error_names_the_endpoint(tmp_path: Path) -> None:
    client = httpx.Client(
        base_url="http://sglang",
        transport=httpx.MockTransport(
            lambda request: httpx.Response(
                400, json={"success": False, "message": "dp_size must be 1"}
            )
        ),
    )
    with pytest.raises(SwapError, match="/pause_generation answered 400: dp_size must be 1"):
        DraftPusher(client, serialize=serialize).push(save_revision(tmp_path, "r5"))


def test_the_draft_only_loader_takes_an_exported_draft_and_ignores_the_target(
    tmp_path: Path,
) -> None:
    draft = export_revision(save_revision(tmp_path / "c", "r6", seed=6), tmp_path / "out")
    model = LlamaForCausalLMEagle3(
        hot_token_id=VOCAB.cuda() if torch.cuda.is_available() else VOCAB
    )
    load_draft_only(model, list(draft.tensors.items()))
    assert torch.equal(model.params["model.fc.weight"], draft.tensors["fc.weight"].float())
    assert "model.d2t" not in model.params and "model.t2d" not in model.params
    load_draft_only(LlamaForCausalLM(), list(draft.tensors.items()))  # no AssertionError
