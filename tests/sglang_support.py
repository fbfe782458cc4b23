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
from aurora.runtime.sglang import PRIMARY_VERSION
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


def sglang_source(version: str = PRIMARY_VERSION) -> Path:
    """A supported SGLang release's wheel, unpacked (downloaded once into
    $AURORA_HOME/sglang). Outside CI a failed download skips, loudly; in CI (PyPI
    reachable) it fails."""
    from aurora.runtime.sglang.source import SourceUnavailable, source_root

    try:
        return source_root(version)
    except SourceUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SKIPPED LOUDLY: the SGLang {version} wheel is unavailable: {error}")


# SGLang's HTTP API for weight updates cannot run here (no GPU); FakeSGLang plays it with
# an httpx MockTransport doing what each release's scheduler does with a weight push:
# 0.5.12 hands the tensors to the draft and then the target model via the custom loader;
# 0.5.23 loads only the selected runners, and only inside begin/end_weight_update.


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


def deserialize(payload: str) -> list[tuple[str, torch.Tensor]]:
    return pickle.loads(base64.b64decode(payload))


class FakeSGLang:
    """One SGLang server of ``version`` with ``tp_size`` ranks, over HTTP."""

    def __init__(
        self,
        hot_token_id: torch.Tensor | None = VOCAB,
        *,
        version: str = PRIMARY_VERSION,
        tp_size: int = 1,
    ) -> None:
        self.version, self.tp_size = version, tp_size
        self.draft, self.target = LlamaForCausalLMEagle3(hot_token_id), LlamaForCausalLM()
        self.calls: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.paused: str | None = None  # the pause mode while paused
        self.session: str | None = None  # 0.5.23: the open weight-update session's selector
        self.flushed = 0
        self.client = httpx.Client(
            base_url="http://sglang", transport=httpx.MockTransport(self.handle)
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        path = request.url.path
        self.calls.append(path)
        self.bodies.append(body)
        new = self.version != "0.5.12"
        if path == "/pause_generation":
            assert body["mode"] == ("retract" if new else "in_place")
            self.paused = body["mode"]
        elif path == "/continue_generation":
            self.paused = None
        elif path == "/begin_weight_update":
            assert new, "0.5.12 has no /begin_weight_update"
            if self.session is not None:
                return _refuse("a weight-update session is already open")
            self.session = body.get("selector", "all")
        elif path == "/end_weight_update":
            if self.session is None:
                return _refuse("no weight-update session is open")
            self.session = None
        elif path == "/update_weights_from_tensor":
            return self.update(body, new)
        elif path == "/get_weights_by_name":
            name = body["name"].removeprefix("draft:")
            if name not in self.draft.params:
                return _refuse(f"no {name}")
            return httpx.Response(
                200, json=self.draft.params[name][: body["truncate_size"]].tolist()
            )
        return httpx.Response(200, json={"success": True, "message": "ok"})

    def update(self, body: dict[str, Any], new: bool) -> httpx.Response:
        assert self.paused, "the pusher pauses generation first"
        payloads = body["serialized_named_tensors"]
        assert len(payloads) == self.tp_size, "one payload per tensor-parallel rank"
        ranks = [deserialize(p) for p in payloads]  # each rank reads its own entry
        if new:
            if self.session is None:
                return _refuse(
                    "update_weights_from_tensor must run between begin_weight_update() and "
                    "end_weight_update()"
                )
            assert body["selector"] == "draft" and body["flush_cache"] is True
            load_draft_only(self.draft, ranks[0])
            self.flushed += 1
        else:
            assert "selector" not in body and body["flush_cache"] is False
            for model in (self.draft, self.target):  # EAGLEWorker.update_weights_from_tensor
                load_draft_only(model, ranks[0])
        return httpx.Response(200, json={"success": True, "message": "ok"})


def _refuse(message: str) -> httpx.Response:
    return httpx.Response(400, json={"success": False, "message": message})
