"""Draft hot swaps into SGLang: the pusher's HTTP sequence per release and the draft-only
loader.

SGLang cannot run here (no GPU), so its HTTP API is played by an httpx MockTransport
(sglang_support.FakeSGLang) that does what each release's scheduler does with a push."""

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

from aurora.runtime.sglang import SUPPORTED_VERSIONS, plugin
from aurora.runtime.sglang.export import export_revision
from aurora.runtime.sglang.weights import (
    DraftPusher,
    NeedsRestart,
    SwapError,
    load_draft_only,
)

pytestmark = pytest.mark.unit

PROBES = ["/get_weights_by_name"] * 3


@pytest.mark.parametrize(
    ("version", "sequence"),
    [
        ("0.5.23", ["/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                    "/end_weight_update", *PROBES, "/continue_generation"]),
        ("0.5.12", ["/pause_generation", "/update_weights_from_tensor", *PROBES,
                    "/continue_generation"]),
    ],
)  # fmt: skip
def test_a_push_follows_the_release_protocol_loads_only_the_draft_and_resumes(
    tmp_path: Path, version: str, sequence: list[str]
) -> None:
    sglang = FakeSGLang(version=version, tp_size=2)
    pusher = DraftPusher(
        sglang.client, version=version, tp_size=2, serialize=serialize, served_d2t=VOCAB
    )
    result = pusher.push(save_revision(tmp_path, "r00000002-aaaaaa", seed=2))
    assert result.revision == "r00000002-aaaaaa" and result.pause_ms >= 0
    assert sglang.calls == sequence
    assert sglang.paused is None and sglang.session is None
    assert "model.layers.0.self_attn.q_proj.weight" in sglang.draft.params
    update = sglang.bodies[sglang.calls.index("/update_weights_from_tensor")]
    assert update["weight_version"] == "r00000002-aaaaaa"
    assert update["load_format"] == "aurora.runtime.sglang.weights.load_draft_only"
    if version == "0.5.23":  # the prefix cache (old-draft KV) goes with the old draft
        assert sglang.bodies[1] == {"selector": "draft"} and sglang.flushed == 1


def test_every_tensor_parallel_rank_gets_its_own_serialization(tmp_path: Path) -> None:
    # torch shares a CPU tensor as a file descriptor handed out once: one payload per rank
    calls: list[int] = []

    def counting(named: list) -> str:
        calls.append(len(named))
        return serialize(named) + f"#{len(calls)}"

    pusher = DraftPusher(httpx.Client(), tp_size=4, serialize=counting)
    named = [("norm.weight", torch.ones(2))]
    payloads = pusher.payloads(named)
    assert len(payloads) == 4 and len(set(payloads)) == 4 and calls == [1, 1, 1, 1]


def test_a_new_draft_vocabulary_or_data_parallel_replicas_need_a_restart(tmp_path: Path) -> None:
    sglang = FakeSGLang()
    other = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 40, 50, 60, 63])
    pusher = DraftPusher(sglang.client, serialize=serialize, served_d2t=VOCAB)
    with pytest.raises(NeedsRestart, match=r"another draft vocabulary.*restart"):
        pusher.push(save_revision(tmp_path, "r3", vocab=other))
    replicas = DraftPusher(sglang.client, dp_size=2, serialize=serialize, served_d2t=VOCAB)
    with pytest.raises(NeedsRestart, match="dp_size 2: SGLang refuses"):
        replicas.push(save_revision(tmp_path, "r4"))
    assert sglang.calls == []  # refused before SGLang was paused


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_a_push_the_server_did_not_apply_fails_verification_and_still_resumes(
    tmp_path: Path, version: str
) -> None:
    # the server's draft has another vocabulary than the pusher believes: the loader
    # refuses the weights, and the read-back shows it
    sglang = FakeSGLang(hot_token_id=torch.arange(12), version=version)
    sglang.draft.params = {n: torch.zeros(1, 48) for n in ("model.fc.weight",)} | {
        "model.norm.weight": torch.zeros(16),
        "lm_head.weight": torch.zeros(12, 16),
    }
    pusher = DraftPusher(sglang.client, version=version, serialize=serialize)
    with pytest.raises(SwapError, match="does not hold the pushed values"):
        pusher.push(save_revision(tmp_path, "r4", seed=4))
    assert sglang.calls[-1] == "/continue_generation" and sglang.paused is None
    assert sglang.session is None


def test_a_failed_load_still_ends_the_session_and_resumes(tmp_path: Path) -> None:
    sglang = FakeSGLang()
    failing = httpx.MockTransport(
        lambda request: (
            httpx.Response(400, json={"success": False, "message": "out of memory"})
            if request.url.path == "/update_weights_from_tensor"
            else sglang.handle(request)
        )
    )
    pusher = DraftPusher(httpx.Client(base_url="http://s", transport=failing), serialize=serialize)
    with pytest.raises(SwapError, match="update_weights_from_tensor answered 400: out of memory"):
        pusher.push(save_revision(tmp_path, "r5"))
    assert sglang.calls[-2:] == ["/end_weight_update", "/continue_generation"]
    assert sglang.session is None and sglang.paused is None


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
    generation = plugin._draft_generation
    load_draft_only(model, list(draft.tensors.items()))
    assert torch.equal(model.params["model.fc.weight"], draft.tensors["fc.weight"].float())
    assert "model.d2t" not in model.params and "model.t2d" not in model.params
    # requests running now straddle the swap: the plugin drops their stats and traces
    assert plugin._draft_generation == generation + 1
    load_draft_only(LlamaForCausalLM(), list(draft.tensors.items()))  # no AssertionError
    assert plugin._draft_generation == generation + 1


def test_the_draft_only_loader_refuses_another_vocabulary_and_loads_nothing(
    tmp_path: Path,
) -> None:
    draft = export_revision(save_revision(tmp_path / "c", "r7"), tmp_path / "out")
    model = LlamaForCausalLMEagle3(hot_token_id=torch.arange(12))
    generation = plugin._draft_generation
    load_draft_only(model, list(draft.tensors.items()))
    assert model.params == {} and plugin._draft_generation == generation
