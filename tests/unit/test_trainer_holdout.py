"""The trainer's held-out set is chosen by prompt: every trace of a prompt falls on the
same side, so the publish gate measures the draft on prompts it never trained on."""

from __future__ import annotations

import random

import pytest

from aurora.runtime.trainer.trainer import held_out

pytestmark = pytest.mark.unit


def test_one_prompt_in_n_is_held_out_by_its_tokens_alone() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(49152) for _ in range(rng.randint(1, 60))] for _ in range(1200)]
    chosen = [held_out(p, 6) for p in prompts]
    # about one in six (binomial: 200 expected, sd 13)
    assert 150 <= sum(chosen) <= 250
    # the same prompt always lands on the same side, whatever trace it comes with
    assert [held_out(list(p), 6) for p in prompts] == chosen
    # and a prompt differing in one token is decided on its own
    assert any(held_out([*p[:-1], p[-1] + 1], 6) != c for p, c in zip(prompts, chosen, strict=True))


def test_holdout_every_zero_holds_nothing_out_and_one_holds_everything() -> None:
    assert not held_out([1, 2, 3], 0)
    assert held_out([1, 2, 3], 1)
