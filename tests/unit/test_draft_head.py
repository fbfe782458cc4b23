"""The draft head computes with the target's RMSNorm and rope (`aurora.runtime.llama`):
its outputs are those of the formulas it carried before they were shared, and the
target's rope is Hugging Face's."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from aurora.runtime import draft
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.llama import apply_rope, rms_norm, rope_cos_sin, rope_frequencies, rope_theta

pytestmark = pytest.mark.unit


def previous_rms_norm(module: draft.RMSNorm, x: Tensor) -> Tensor:
    """The draft's RMSNorm before it was shared (statistics in the input's dtype)."""
    return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps))


def previous_rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """The draft's rope before it was shared (inverse frequencies as theta ** -(i / half))."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=100000.0,
    )


def head_outputs(head: EagleDraftHead) -> list[Tensor]:
    """Step 1 over 12 positions, two chained steps from 3 anchors, and their logits."""
    gen = torch.Generator().manual_seed(1)
    h = head.config.hidden_size
    features = torch.randn(12, 3 * h, generator=gen)
    tokens = torch.randint(0, 64, (12,), generator=gen)
    g, keys, values = head.step1(features, tokens, torch.arange(12))
    anchors = torch.tensor([3, 7, 11])
    outputs = [g, head.logits(g)]
    chained, ck, cv = g[anchors], None, None
    for s in (2, 3):
        chained, ck, cv = head.chain(
            chained, tokens[anchors], anchors + s - 1, keys, values, anchors, ck, cv
        )
        outputs += [chained, head.logits(chained)]
    return outputs


def test_the_draft_head_outputs_are_those_of_its_previous_norm_and_rope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a random draft head (float32, as it is trained and as CPU servers run it)
    torch.manual_seed(0)
    config = DraftConfig.for_target(tiny_config(), "tiny", fuse_layers=(0, 1, 2))
    head = EagleDraftHead(config, torch.nn.Embedding(64, 32)).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    # When it computes with the shared RMSNorm and rope, and with the previous formulas
    with torch.no_grad():
        shared = head_outputs(head)
        monkeypatch.setattr(draft.RMSNorm, "forward", previous_rms_norm)
        monkeypatch.setattr(draft, "rotate", previous_rotate)
        previous = head_outputs(head)
    # Then every hidden state and logit agrees to float32 rounding
    for a, b in zip(shared, previous, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rms_norm_takes_its_statistics_in_float32_as_hugging_face_does() -> None:
    hf = LlamaRMSNorm(32, eps=1e-5)
    torch.nn.init.normal_(hf.weight)
    x = torch.randn(5, 32, dtype=torch.bfloat16) * 30
    with torch.no_grad():
        expected = hf.to(torch.bfloat16)(x)
        mine = rms_norm(x, hf.weight, 1e-5)
    assert torch.equal(mine, expected)


def test_rope_is_hugging_faces_default_rope() -> None:
    config = tiny_config()
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(40)[None]
    x = torch.randn(1, 40, 8)
    cos_hf, sin_hf = rotary(x, positions)
    inv_freq = rope_frequencies(rope_theta(config), 8)
    assert torch.equal(inv_freq, rotary.inv_freq)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    torch.testing.assert_close(cos, cos_hf)
    torch.testing.assert_close(sin, sin_hf)
    rotated = apply_rope(x, cos, sin)
    assert rotated.shape == x.shape
    # rotating by the angle of position 0 is the identity
    assert torch.equal(apply_rope(x[:, :1], cos[:, :1], sin[:, :1]), x[:, :1])
