"""A tiny random Llama and random EAGLE-3 heads on it: what the unit tests of the decode
loop, the batched forward and the draft head run on (no model download, milliseconds)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aurora.runtime.draft import DraftConfig, EagleDraftHead


def tiny_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """Four layers, hidden size 32, grouped-query attention (4 heads, 2 KV heads)."""
    options: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaConfig(**{**options, **overrides})


def tiny_llama(vocab_size: int, sharpen: float, seed: int = 0) -> LlamaForCausalLM:
    """A frozen tiny Llama whose output logits are scaled by `sharpen`: sharper
    distributions than the random initialisation gives."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size)).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def random_head(
    model: LlamaForCausalLM, seed: int, fuse_layers: tuple[int, int, int]
) -> EagleDraftHead:
    """An EAGLE-3 head on `model` with normal(0, 0.3) weights (not a pass-through), over
    the whole vocabulary, in eval mode."""
    torch.manual_seed(seed)
    config = DraftConfig.for_target(
        model.config, "tiny", fuse_layers=fuse_layers, draft_vocab_size=model.config.vocab_size
    )
    head = EagleDraftHead(config, model.get_input_embeddings())
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()
