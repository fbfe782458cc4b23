"""Prepacked fp32 weights: the same products as ``F.linear``, used only for the row
counts where they were measured faster, never on a path that needs gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_llama
from torch import nn

from aurora.runtime import packed
from aurora.runtime.engine import generate
from aurora.runtime.llama import Llama

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not packed.available(), reason="this PyTorch build has no MKL packed GEMM"),
]


def counting_mkl(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the row count of every packed product."""
    calls: list[int] = []
    real = packed._mkl_linear

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(packed, "_mkl_linear", spy)
    return calls


def test_faster_rows_keeps_only_row_counts_that_gain_the_margin() -> None:
    plain = {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
    fast = {2: 0.95, 3: 0.9, 4: 0.7, 5: 1.2}
    assert packed.faster_rows(plain, fast, margin=0.1) == [3, 4]
    assert packed.faster_rows(plain, fast, margin=0.2) == [4]


@pytest.mark.parametrize("shape", [(4, 16), (1, 4, 16), (2, 2, 16)])
def test_packed_linear_computes_what_f_linear_computes(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    weight, bias = linear.weight, linear.bias
    x = torch.randn(*shape)
    expected = F.linear(x, weight, bias)
    packed.pack(linear, rows=[4])
    assert isinstance(linear, packed.PackedLinear) and linear.weight is weight
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    assert set(linear.state_dict()) == {"weight", "bias"}  # the packed copy is not saved


def test_only_the_chosen_row_counts_take_the_packed_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counting_mkl(monkeypatch)
    linear = packed.pack(nn.Linear(8, 8, bias=False), rows=[4])
    with torch.inference_mode():
        for rows in (1, 3, 4, 5):
            linear(torch.randn(rows, 8))
    assert calls == [4]


def test_inputs_that_need_gradients_take_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_mkl(monkeypatch)
    linear = packed.pack(nn.Linear(8, 8), rows=[4])
    x = torch.randn(4, 8, requires_grad=True)
    linear(x).sum().backward()
    assert calls == [] and x.grad is not None


def test_pack_linears_with_no_gaining_row_count_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_llama(32, sharpen=4)
    monkeypatch.setattr(packed, "measure", lambda weights, rows: ({4: 1.0}, {4: 1.0}))
    assert packed.pack_linears(model) == []
    assert not any(isinstance(m, packed.PackedLinear) for m in model.modules())


def test_a_packed_model_decodes_what_the_unpacked_one_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy speculative decoding and the batched forward give the same tokens, and
    the verify forwards (k = 3 draft tokens: 4 rows) take the packed product."""
    model = tiny_llama(32, sharpen=4)
    prompt = [1, 2, 3, 4, 5]
    before = generate(model, prompt, max_new_tokens=12).output_ids
    logits_before = (
        Llama(model, rows=1)
        .forward(torch.tensor([prompt[:4]]), torch.tensor([0]), torch.tensor([0]))
        .logits
    )
    calls = counting_mkl(monkeypatch)
    assert packed.pack_linears(model, rows=[4]) == [4]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, packed.PackedLinear) for m in linears)
    assert generate(model, prompt, max_new_tokens=12).output_ids == before
    logits = (
        Llama(model, rows=1)
        .forward(torch.tensor([prompt[:4]]), torch.tensor([0]), torch.tensor([0]))
        .logits
    )
    torch.testing.assert_close(logits, logits_before, rtol=1e-5, atol=1e-5)
    assert calls and set(calls) == {4}  # the batched forward's 4-row products
