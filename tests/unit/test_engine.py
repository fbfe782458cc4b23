"""The decode loop and the draft head on a tiny random Llama: losslessness,
rejection sampling, and parity between what is served and what is trained."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tiny_llama import random_head, tiny_llama
from transformers import LlamaForCausalLM

from aurora.runtime.draft import EagleDraftHead, EagleProposer, NgramProposer, Proposal
from aurora.runtime.engine import accept, generate
from aurora.runtime.trainer.objective import (
    Objective,
    aurora_loss,
    build_example,
    build_vocabulary,
    draft_chains,
    simulated_accept_length,
)

pytestmark = pytest.mark.unit

VOCAB = 8


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, sharpen=20)


def _head(model: LlamaForCausalLM, seed: int = 0) -> EagleDraftHead:
    return random_head(model, seed, fuse_layers=(0, 1, 2))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculation_is_identical_to_plain_decoding(tiny: LlamaForCausalLM, k: int) -> None:
    rng = random.Random(k)
    for trial in range(6):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        plain = generate(tiny, prompt, max_new_tokens=24)
        for proposer in (NgramProposer(), EagleProposer(_head(tiny, trial), "r")):
            spec = generate(tiny, prompt, proposer=proposer, k=k, max_new_tokens=24)
            assert spec.output_ids == plain.output_ids
            assert len(spec.steps) <= len(plain.output_ids)


def test_eos_and_max_tokens_end_the_output(tiny: LlamaForCausalLM) -> None:
    prompt = [1, 2, 3]
    plain = generate(tiny, prompt, max_new_tokens=30)
    eos = plain.output_ids[5]
    cut = generate(tiny, prompt, proposer=NgramProposer(), k=4, max_new_tokens=30, eos_ids=[eos])
    assert cut.output_ids == plain.output_ids[: plain.output_ids.index(eos) + 1]
    assert cut.finish_reason == "stop"
    short = generate(tiny, prompt, proposer=NgramProposer(), k=4, max_new_tokens=7)
    assert short.output_ids == plain.output_ids[:7] and short.finish_reason == "length"


def _chi_square(counts: dict[int, int], probs: torch.Tensor, n: int) -> float:
    return sum(
        (counts.get(i, 0) - n * float(p)) ** 2 / (n * float(p))
        for i, p in enumerate(probs)
        if p > 1e-3
    )


@pytest.mark.parametrize("sampled_draft", [False, True])
def test_rejection_sampling_preserves_the_target_distribution(sampled_draft: bool) -> None:
    # Given target logits and a draft that disagrees with them
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=gen) * 2
    q = torch.softmax(torch.randn(2, VOCAB, generator=gen) * 2, dim=-1)
    p0 = torch.softmax(logits[0], dim=-1)
    counts: dict[int, int] = {}
    n = 20_000
    # When the first emitted token is drawn many times through accept()
    for _ in range(n):
        draft = [int(torch.multinomial(q[0], 1, generator=gen)), 3] if sampled_draft else [5, 3]
        proposal = Proposal(draft, q if sampled_draft else None)
        accepted, correction = accept(logits, proposal, 1.0, gen)
        first = draft[0] if accepted >= 1 else correction
        counts[first] = counts.get(first, 0) + 1
    # Then it follows the target's distribution (chi-square, 7 dof, p ≈ 0.001 at 24.3)
    assert _chi_square(counts, p0, n) < 24.3


@pytest.mark.slow
def test_speculative_sampling_matches_the_model_two_tokens_deep(tiny: LlamaForCausalLM) -> None:
    prompt = [1, 4, 2]
    with torch.no_grad():
        p1 = torch.softmax(tiny(torch.tensor([prompt])).logits[0, -1], -1)
        joint = torch.zeros(VOCAB, VOCAB)
        for a in range(VOCAB):
            p2 = torch.softmax(tiny(torch.tensor([[*prompt, a]])).logits[0, -1], -1)
            joint[a] = p1[a] * p2
    gen = torch.Generator().manual_seed(0)
    head = _head(tiny)
    counts: dict[int, int] = {}
    n = 3000
    for _ in range(n):
        out = generate(
            tiny,
            prompt,
            proposer=EagleProposer(head, "r"),
            k=3,
            max_new_tokens=2,
            temperature=1.0,
            generator=gen,
        ).output_ids
        key = out[0] * VOCAB + out[1]
        counts[key] = counts.get(key, 0) + 1
    flat = joint.flatten()
    kept = [i for i, p in enumerate(flat) if n * float(p) >= 5]
    stat = sum((counts.get(i, 0) - n * float(flat[i])) ** 2 / (n * float(flat[i])) for i in kept)
    assert stat < 2.5 * len(kept)  # far below what a biased sampler gives on this many cells


def _record(model: LlamaForCausalLM, prompt: list[int], k: int) -> SimpleNamespace:
    g = generate(model, prompt, proposer=NgramProposer(), k=k, max_new_tokens=40, trace_topk=4)
    return SimpleNamespace(
        trace_id="t", domain="d", prompt_ids=prompt, output_ids=g.output_ids, steps=g.steps
    )


def test_offline_chains_are_what_the_server_would_draft(tiny: LlamaForCausalLM) -> None:
    # The trainer's batched chain computation must equal the serving session's drafts.
    head = _head(tiny, 3)
    prompt = [1, 2, 3, 1, 2]
    record = _record(tiny, prompt, 3)
    ex = build_example(tiny, head, record, topk=4)
    drafts, first = draft_chains(head, ex, 3)
    tokens = ex.tokens.tolist()
    for row, anchor in enumerate(range(first, first + drafts.shape[0])):
        context = tokens[: anchor + 2]
        with torch.no_grad():
            out = tiny(torch.tensor([context[:-1]]), output_hidden_states=True)
        session = EagleProposer(head, "r").start(prompt)
        served = session.propose(context, head.fuse(out.hidden_states)[0], 3, 0.0, None).tokens
        assert served == drafts[row].tolist()


@pytest.mark.slow
def test_aurora_loss_trains_the_head_towards_the_target(tiny: LlamaForCausalLM) -> None:
    head = _head(tiny, 4).train()
    records = [_record(tiny, [i, (i + 3) % VOCAB, 2], 3) for i in range(4)]
    head.set_vocabulary(build_vocabulary([r.output_ids for r in records], VOCAB, VOCAB))
    examples = [build_example(tiny, head, r, topk=4) for r in records]
    assert any(ex.branches for ex in examples)  # rejected proposals are trained on
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)

    def total() -> float:
        with torch.no_grad():
            return sum(
                float(aurora_loss(head, ex, Objective(lambda_discard=1.0)).total) for ex in examples
            )

    before = total()
    for _ in range(40):
        for ex in examples:
            optimizer.zero_grad()
            aurora_loss(head, ex, Objective(lambda_discard=1.0)).total.backward()
            optimizer.step()
    assert total() < 0.5 * before
    head.eval()
    drafts, first = draft_chains(head, examples[0], 3)
    emitted, steps = simulated_accept_length(drafts, examples[0].tokens, first)
    assert emitted / steps > 1.5


def test_simulated_accept_length_walks_verify_steps() -> None:
    tokens = torch.tensor([9, 9, 1, 2, 3, 4, 5, 6])  # prompt [9, 9]; output 1..6
    perfect = torch.tensor([[t + 1, t + 2] for t in range(1, 7)])  # anchor p drafts x[p+2], x[p+3]
    emitted, steps = simulated_accept_length(perfect, tokens, first_anchor=1)
    assert emitted / steps == 2.5  # 3 tokens, then 2 where the output ends
    wrong = torch.full((6, 2), 0)
    emitted, steps = simulated_accept_length(wrong, tokens, first_anchor=1)
    assert emitted == steps


def test_ngram_proposer_continues_the_latest_occurrence() -> None:
    session = NgramProposer().start([])
    tokens = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7]
    assert session.propose(tokens, None, 3, 0.0, None).tokens == [9, 2, 5]
    assert NgramProposer().start([]).propose([1, 2, 3], None, 3, 0.0, None).tokens == []
