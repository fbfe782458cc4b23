"""A Llama-family forward for batched decoding, in one file of plain PyTorch.

It computes what Hugging Face's ``LlamaForCausalLM`` computes (RMSNorm, RoPE,
grouped-query attention, SiLU MLP, tied or untied LM head) with the loaded
model's own weight tensors (nothing is copied), but keeps its own static KV cache
``[layers, rows, kv_heads, max_len, head_dim]`` in which every row has its own
length. ``forward(tokens[B, T], rows[B], starts[B])`` writes the keys and values
of row ``b``'s tokens at positions ``starts[b]..starts[b]+T-1`` of cache row
``rows[b]`` and lets each query attend to its row's positions ``j <= position``.
Nothing is ever cropped: a row's length is whatever its caller says it is (the
next ``start``); positions written past it (rejected drafts, padding) are masked
out until a later write overwrites them.

Configurations it does not compute exactly (rope scaling, sliding windows,
other architectures) are refused with ``UnsupportedModel`` so that callers fall
back to the model's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class UnsupportedModel(ValueError):
    """The model is not one this forward computes exactly; use the model's own forward."""


@dataclass
class LlamaOutput:
    """Logits [B, T, V] (or [B, 1, V] with ``last_only``) and the requested hidden
    states, indexed like Hugging Face's ``output_hidden_states``: 0 is the embedding
    output, i in 1..n-1 the output of layer i-1, n the final normed output."""

    logits: Tensor
    hidden_states: dict[int, Tensor]


def check_supported(config: Any) -> None:
    """Raise UnsupportedModel naming the config field when ``forward`` would not
    compute what the model computes."""
    model_type = getattr(config, "model_type", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    )
    problems = [
        (model_type == "llama", "model_type", model_type, "llama"),
        (rope_type in ("default", None), "rope type", rope_type, "default (no rope scaling)"),
        (
            getattr(config, "hidden_act", "silu") == "silu",
            "hidden_act",
            getattr(config, "hidden_act", None),
            "silu",
        ),
        (
            int(getattr(config, "pretraining_tp", 1) or 1) == 1,
            "pretraining_tp",
            getattr(config, "pretraining_tp", None),
            "1",
        ),
        (
            getattr(config, "sliding_window", None) is None,
            "sliding_window",
            getattr(config, "sliding_window", None),
            "None",
        ),
    ]
    for ok, name, value, supported in problems:
        if not ok:
            raise UnsupportedModel(
                f"config {name}={value!r} is not supported by the batched Llama forward "
                f"(needs {supported}); serve this model unbatched (--max-batch 1)"
            )


def rope_theta(config: Any) -> float:
    """The rope base of a Hugging Face config: ``rope_parameters["rope_theta"]`` (where
    transformers 5 keeps it, and what its rotary embedding reads) before the older
    top-level ``rope_theta``, else Llama's 10000."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def rope_frequencies(theta: float, head_dim: int, device: Any = None) -> Tensor:
    """Inverse frequencies [head_dim / 2] of the default rope, in float32, computed as
    Hugging Face computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [*positions.shape, head_dim] for integer ``positions``: the angles in
    float32, then cast to ``dtype``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the halves of the last dimension of ``x`` by the angles of ``cos``/``sin``
    (broadcast against ``x``): Llama's rotary position embedding."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Hugging Face's LlamaRMSNorm: the statistics in float32, the result cast
    back to the input's dtype, then scaled by ``weight``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class Llama:
    """The batched forward over a loaded Hugging Face Llama and a KV cache of ``rows``
    rows. The cache starts at ``max_len`` positions per row and doubles when a
    forward needs more."""

    def __init__(self, model: Any, rows: int, max_len: int = 256) -> None:
        config = model.config
        check_supported(config)
        if rows < 1:
            raise ValueError(f"rows={rows}: the KV cache needs at least one row")
        self.config, self.rows = config, rows
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.get_output_embeddings()
        self.n_layers = len(self.layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.inv_freq = rope_frequencies(rope_theta(config), self.head_dim, self.device)
        self.max_len = 0
        shape = (self.n_layers, rows, self.n_kv, 0, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.reserve(max_len)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per row (doubling), keeping what is cached."""
        if length <= self.max_len:
            return
        new_len = max(length, 2 * self.max_len)
        grown = (self.n_layers, self.rows, self.n_kv, new_len, self.head_dim)
        k = torch.zeros(grown, dtype=self.dtype, device=self.device)
        v = torch.zeros(grown, dtype=self.dtype, device=self.device)
        k[:, :, :, : self.max_len] = self.k
        v[:, :, :, : self.max_len] = self.v
        self.k, self.v, self.max_len = k, v, new_len

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        rows: Tensor,
        starts: Tensor,
        hidden_layers: Sequence[int] = (),
        *,
        last_only: bool = False,
    ) -> LlamaOutput:
        """tokens [B, T] for cache rows ``rows`` [B] (distinct) at positions
        ``starts[b] + t``. Returns the logits and the hidden states at the
        ``hidden_layers`` indices (Hugging Face numbering, see LlamaOutput)."""
        t = tokens.shape[1]
        tokens, rows, starts = (x.to(self.device) for x in (tokens, rows, starts))
        span = int(starts.max()) + t  # the longest row's length after this forward
        self.reserve(span)
        positions = starts[:, None] + torch.arange(t, device=self.device)  # [B, T]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [B, T, hd]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd], broadcast over heads
        visible = torch.arange(span, device=self.device) <= positions[:, :, None]  # [B, T, S]
        mask = visible[:, None]
        wanted = set(hidden_layers)
        hidden: dict[int, Tensor] = {}
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            if i in wanted:
                hidden[i] = x
            x = x + self._attention(layer, i, x, rows, positions, span, cos, sin, mask)
            x = x + self._mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        x = _rms_norm(self.norm, x)
        if self.n_layers in wanted:
            hidden[self.n_layers] = x
        if last_only:
            x = x[:, -1:]
        return LlamaOutput(self.lm_head(x), hidden)

    def _attention(
        self,
        layer: Any,
        index: int,
        x: Tensor,
        rows: Tensor,
        positions: Tensor,
        span: int,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
    ) -> Tensor:
        attn, (b, t, _) = layer.self_attn, x.shape
        h = _rms_norm(layer.input_layernorm, x)
        q = _linear(attn.q_proj, h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = _linear(attn.k_proj, h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = _linear(attn.v_proj, h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache_k, cache_v = self.k[index], self.v[index]  # [rows, kv, max_len, hd]
        cache_k[rows[:, None], :, positions] = k.transpose(1, 2)
        cache_v[rows[:, None], :, positions] = v.transpose(1, 2)
        keys, values = cache_k[rows, :, :span], cache_v[rows, :, :span]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return _linear(attn.o_proj, out.transpose(1, 2).reshape(b, t, -1))

    def _mlp(self, mlp: Any, x: Tensor) -> Tensor:
        return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _linear(module: Any, x: Tensor) -> Tensor:
    return module(x)  # an nn.Linear, or the PackedLinear that load_target made of it


def _rms_norm(norm: Any, x: Tensor) -> Tensor:
    return rms_norm(x, norm.weight, norm.variance_epsilon)
