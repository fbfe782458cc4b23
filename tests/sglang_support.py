"""Shared by the SGLang tests: tiny real draft checkpoints and the pinned SGLang source."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from aurora.runtime.checkpoint import save_checkpoint
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.sglang.weights import load_draft_only

CONFIG = DraftConfig(
    target="tiny-llama",
    hidden_size=16,
    target_vocab_size=64,
    fuse_layers=(1, 3, 5),
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    intermediate_size=32,
    draft_vocab_size=12,
)
VOCAB = torch.tensor([0, 2, 3, 5, 8, 13, 21, 34, 40, 50, 60, 63])


def head(seed: int = 0, vocab: torch.Tensor = VOCAB) -> EagleDraftHead:
    torch.manual_seed(seed)
    draft = EagleDraftHead(CONFIG, nn.Embedding(CONFIG.target_vocab_size, CONFIG.hidden_size))
    for parameter in draft.parameters():  # no zero-initialised rows: probes must differ
        nn.init.normal_(parameter, std=0.5)
    draft.set_vocabulary(vocab)
    return draft


def save_revision(root: Path, revision: str, seed: int = 0, vocab: torch.Tensor = VOCAB) -> Path:
    """A real Aurora checkpoint of a tiny EAGLE-3 head."""
    return save_checkpoint(
        root,
        revision,
        head(seed, vocab).state_dict(),
        parent=None,
        step=seed,
        traces_seen=0,
        evaluation={},
        draft_config=CONFIG.to_dict(),
    )


def sglang_source() -> Path:
    """The pinned SGLang wheel, unpacked (downloaded once into $AURORA_HOME/sglang).
    Outside CI a failed download skips, loudly; in CI (PyPI reachable) it fails."""
    from aurora.runtime.sglang.source import SourceUnavailable, source_root

    try:
        return source_root()
    except SourceUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SKIPPED LOUDLY: the pinned SGLang wheel is unavailable: {error}")


# SGLang's HTTP API for weight updates cannot run here (no GPU); FakeSGLang plays it with
# an httpx MockTransport doing what 0.5.12's scheduler does with update_weights_from_tensor:
# hand the same tensors to the draft and then the target model via the custom loader.


class LlamaForCausalLMEagle3:
    """SGLang's EAGLE-3 draft model, as far as loading and reading weights go."""

    def __init__(self, hot_token_id: torch.Tensor | None) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.hot_token_id = hot_token_id

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            key = (
                name
                if name == "lm_head.weight"
                else "model." + name.replace("midlayer", "layers.0")
            )
            self.params[key] = tensor.float()


class LlamaForCausalLM:
    def load_weights(self, weights: Any) -> None:
        raise AssertionError("the target model must never receive draft weights")


def serialize(named: list[tuple[str, torch.Tensor]]) -> str:
    return base64.b64encode(pickle.dumps(named)).decode()


class FakeSGLang:
    def __init__(self, hot_token_id: torch.Tensor | None = VOCAB) -> None:
        self.draft, self.target = LlamaForCausalLMEagle3(hot_token_id), LlamaForCausalLM()
        self.calls: list[str] = []
        self.paused = False
        self.client = httpx.Client(
            base_url="http://sglang", transport=httpx.MockTransport(self.handle)
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        self.calls.append(request.url.path)
        if request.url.path == "/pause_generation":
            assert body == {"mode": "in_place"}
            self.paused = True
        elif request.url.path == "/continue_generation":
            self.paused = False
        elif request.url.path == "/update_weights_from_tensor":
            assert self.paused and body["flush_cache"] is False
            named = pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
            for model in (self.draft, self.target):  # EAGLEWorker.update_weights_from_tensor
                load_draft_only(model, named)
        elif request.url.path == "/get_weights_by_name":
            name = body["name"].removeprefix("draft:")
            if name not in self.draft.params:
                return httpx.Response(400, json={"success": False, "message": f"no {name}"})
            return httpx.Response(
                200, json=self.draft.params[name][: body["truncate_size"]].tolist()
            )
        return httpx.Response(200, json={"success": True, "message": "ok"})
