"""Prepacked fp32 weights for the few-token forwards of speculative decoding on a CPU.

A verify forward multiplies k + 1 rows of activations by every weight matrix of
the target. With MKL, ``F.linear`` takes a matrix-vector path for very few rows
but from a few rows on repacks the whole weight matrix into its GEMM layout on
every call. On the 2-core Xeon of our benchmarks this makes a 4-row forward cost
~1.45x a 1-row one, while the same product on a weight packed once at load costs
~1.05x (``scripts/linear_kernels.py``, ``benchmarks/results/linear-kernels.json``).
The cheaper a multi-token verify, the more a draft is worth: this is the CPU's
share of what a GPU gives for free.

Which row counts gain depends on the CPU and the MKL build, so ``pack_linears``
measures it once per model on one decoder layer's matrices and routes only the
row counts where the packed product is clearly faster (``margin``); every other
input, and any input that needs gradients, takes ``F.linear`` unchanged. The
packed copy doubles the memory of the weights it packs.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENV = "AURORA_PACKED_WEIGHTS"  # "0" turns packing off
CANDIDATE_ROWS = tuple(range(2, 17))  # verify forwards of k = 1..15 draft tokens
PACK_BATCH = 4  # the row count MKL sizes its packed layout for; products of any row count use it


def available() -> bool:
    """Whether this PyTorch build has MKL's packed GEMM (x86 builds with MKL)."""
    mkl = getattr(torch.ops, "mkl", None)
    return bool(torch.backends.mkl.is_available()) and all(
        hasattr(mkl, name) for name in ("_mkl_reorder_linear_weight", "_mkl_linear")
    )


def wanted(device: str, dtype: str) -> bool:
    """Packing is on for fp32 models on the CPU unless ``AURORA_PACKED_WEIGHTS=0``."""
    return (
        device == "cpu" and dtype == "float32" and os.environ.get(ENV, "1") != "0" and available()
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that multiplies inputs of
    ``rows`` rows by its weight packed once for MKL's GEMM. Made by ``pack``."""

    packed: Tensor
    rows: frozenset[int]

    def forward(self, x: Tensor) -> Tensor:
        n = x.numel() // x.shape[-1] if x.dim() else 0
        if (
            n not in self.rows
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return F.linear(x, self.weight, self.bias)
        y = _mkl_linear(x.reshape(n, x.shape[-1]), self.packed, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def _mkl_linear(x: Tensor, packed: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, PACK_BATCH)


def pack(linear: nn.Linear, rows: Iterable[int]) -> PackedLinear:
    """Turn ``linear`` into a PackedLinear in place (its class changes, its parameters
    stay the same tensors) that packs inputs of ``rows`` rows."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), PACK_BATCH)
    linear.register_buffer("packed", packed, persistent=False)
    linear.__class__ = PackedLinear
    assert isinstance(linear, PackedLinear)
    linear.rows = frozenset(rows)
    return linear


def faster_rows(
    plain_s: dict[int, float], packed_s: dict[int, float], margin: float = 0.1
) -> list[int]:
    """The row counts where the packed product took at most ``1 - margin`` of the plain one."""
    return sorted(n for n, t in packed_s.items() if n in plain_s and t <= (1 - margin) * plain_s[n])


def measure(
    weights: Sequence[Tensor], rows: Iterable[int], repeats: int = 7
) -> tuple[dict[int, float], dict[int, float]]:
    """Median seconds of ``F.linear`` and of the packed product over ``weights`` per row
    count, the two interleaved (and taking turns to go first) so that a noisy neighbour
    or a warm cache favours neither."""
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_BATCH) for w in weights]

    def plain_products(xs: list[Tensor]) -> None:
        for x, w in zip(xs, weights, strict=True):
            F.linear(x, w)

    def packed_products(xs: list[Tensor]) -> None:
        for x, w, p in zip(xs, weights, packed, strict=True):
            _mkl_linear(x, p, w, None)

    times: dict[str, dict[int, list[float]]] = {"plain": {}, "packed": {}}
    sides = [("plain", plain_products), ("packed", packed_products)]
    with torch.inference_mode():
        for n in rows:
            xs = [torch.randn(n, w.shape[1], dtype=w.dtype) for w in weights]
            for repeat in range(repeats + 1):  # the first round warms up and is dropped
                for side, products in sides if repeat % 2 else sides[::-1]:
                    started = time.perf_counter()
                    products(xs)
                    times[side].setdefault(n, []).append(time.perf_counter() - started)
    plain, fast = (
        {n: statistics.median(ts[1:]) for n, ts in times[s].items()} for s in ("plain", "packed")
    )
    return plain, fast


def pack_linears(model: nn.Module, rows: Iterable[int] | None = None) -> list[int]:
    """Pack every fp32 ``nn.Linear`` of ``model`` for the row counts where packing is
    faster on this machine (measured on the model's first decoder layer unless
    ``rows`` is given). Returns the packed row counts ([] when none gained: nothing
    is changed then)."""
    linears = [
        m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
    ]
    if not linears:
        return []
    if rows is None:
        rows = calibrate(model)
    chosen = sorted(set(rows))
    if chosen:
        for linear in linears:
            pack(linear, chosen)
    return chosen


def calibrate(model: nn.Module) -> list[int]:
    """The row counts (of ``CANDIDATE_ROWS``) where packing is faster on this machine,
    measured on ``model``'s first decoder layer (~0.3 s for a 135M model)."""
    plain, fast = measure([m.weight.detach() for m in _first_layer(model)], CANDIDATE_ROWS)
    rows = faster_rows(plain, fast)
    log.info("packed fp32 weights for %s-row forwards (%s)", rows or "no", _ratios(plain, fast))
    return rows


def _first_layer(model: nn.Module) -> list[nn.Linear]:
    """The linears of the first decoder layer (a Llama-like ``model.model.layers``),
    else every linear but the largest (an LM head dominates and would drown the rest)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None and len(layers):
        found = [m for m in layers[0].modules() if type(m) is nn.Linear]
        if found:
            return found
    by_size = sorted(
        (m for m in model.modules() if type(m) is nn.Linear), key=lambda m: m.weight.numel()
    )
    return by_size[:-1] or by_size


def _ratios(plain: dict[int, float], fast: dict[int, float]) -> str:
    return ", ".join(f"{n}: {fast[n] / plain[n]:.2f}x" for n in sorted(plain))


def packed_rows(model: nn.Module) -> list[int]:
    """The row counts that ``model``'s products are packed for ([] if none)."""
    return next((sorted(m.rows) for m in model.modules() if isinstance(m, PackedLinear)), [])
