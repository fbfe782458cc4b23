"""The objective's terms on a handcrafted trace: which chain state, which token or
label, which weight each term uses, and that the negative term lowers the rejected
token's probability at exactly that state."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.protocol import TraceRecord, VerifyStep
from aurora.runtime.trainer.objective import (
    ChainTarget,
    Objective,
    TraceExample,
    aurora_loss,
    build_example,
    offpath_targets,
    reject_targets,
)

pytestmark = pytest.mark.unit

VOCAB = 32
K = 4  # width of the logged top-k


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _step(proposed: list[int], accepted: int) -> VerifyStep:
    # The logged top-k at proposed position j starts with id 24 + j, so a test can tell
    # which row a term was labelled with.
    rows = [[24 + j, 1, 2, 3] for j in range(len(proposed))]
    logprobs = [[-0.5, -1.5, -2.5, -3.5] for _ in proposed]
    return VerifyStep(proposed=proposed, accepted=accepted, topk_ids=rows, topk_logprobs=logprobs)


# prompt [5, 6]; the prefill token 7; then, per verify step (anchor p: the draft's step 1
# pairs F[p] with x[p+1] and proposes x[p+2]):
#   anchor 1: proposed 8 9 10, accepted 1 (8), correction 11
#   anchor 3: proposed 12 13 14, all accepted, bonus 15
#   anchor 7: proposed 16 17 18, none accepted, correction 19
#   anchor 8: proposed 20 21, none accepted, correction 22
#   anchor 9: proposed nothing, next token 23
RECORD = TraceRecord(
    trace_id="handcrafted",
    server="test",
    prompt_ids=[5, 6],
    output_ids=[7, 8, 11, 12, 13, 14, 15, 19, 22, 23],
    steps=[
        _step([8, 9, 10], 1),
        _step([12, 13, 14], 3),
        _step([16, 17, 18], 0),
        _step([20, 21], 0),
        _step([], 0),
    ],
    temperature=0.0,
)


def _head(target: LlamaForCausalLM, seed: int = 0) -> EagleDraftHead:
    torch.manual_seed(seed)
    config = DraftConfig.for_target(
        target.config, "tiny", fuse_layers=(0, 1, 2), draft_vocab_size=VOCAB
    )
    head = EagleDraftHead(config, target.get_input_embeddings())
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


@pytest.fixture(scope="module")
def example(target: LlamaForCausalLM) -> TraceExample:
    return build_example(target, _head(target), RECORD, topk=K)


def test_every_judged_verify_step_becomes_a_branch_at_its_anchor(example: TraceExample) -> None:
    assert example.tokens.tolist() == [5, 6, 7, 8, 11, 12, 13, 14, 15, 19, 22, 23]
    branches = [(b.anchor, b.proposed, b.accepted) for b in example.branches]
    assert branches == [
        (1, [8, 9, 10], 1),
        (3, [12, 13, 14], 3),
        (7, [16, 17, 18], 0),
        (8, [20, 21], 0),
    ]  # the step that proposed nothing judged nothing
    # labels only where a state lies after the first rejection (accepted + 2 <= k)
    labelled = [b.anchor for b in example.branches if b.label_ids is not None]
    assert labelled == [1, 7, 8]
    # and at each anchor the served token after the step-1 pair is the first proposal when
    # it was accepted, the target's correction otherwise
    for b in example.branches:
        served = example.tokens[b.anchor + 2].item()
        assert (served == b.proposed[0]) == (b.accepted > 0)


def test_the_off_path_kl_sits_after_the_first_rejection_with_the_logged_labels(
    example: TraceExample,
) -> None:
    targets = offpath_targets(example.branches, 0.8)
    assert [(t.anchor, t.step) for t in targets] == [(1, 3), (7, 2), (7, 3), (8, 2)]
    assert [t.weight for t in targets] == pytest.approx([0.64, 0.8, 0.64, 0.8])
    # state s of a branch is labelled with the top-k logged at proposed position s
    by_anchor = {b.anchor: b for b in example.branches}
    for t in targets:
        assert by_anchor[t.anchor].label_ids[t.step - 1, 0].item() == 24 + t.step - 1  # type: ignore[index]


def test_unlikelihood_targets_the_first_rejected_token_at_the_state_that_proposed_it(
    example: TraceExample,
) -> None:
    targets = reject_targets(example.branches, Objective(step_decay=0.8))
    assert targets == [
        ChainTarget(anchor=1, step=2, token=9, weight=pytest.approx(0.8)),
        ChainTarget(anchor=7, step=1, token=16, weight=pytest.approx(1.0)),
        ChainTarget(anchor=8, step=1, token=20, weight=pytest.approx(1.0)),
    ]  # the fully accepted step has no rejected token


def test_policy_gradient_rewards_acceptance_against_the_traces_acceptance_rate(
    example: TraceExample,
) -> None:
    targets = reject_targets(
        example.branches, Objective(step_decay=0.8, reject_term="policy_gradient")
    )
    b = 4 / 7  # 7 proposals judged (up to and including each first rejection), 4 accepted
    assert [(t.anchor, t.step, t.token) for t in targets] == [
        (1, 1, 8), (1, 2, 9), (3, 1, 12), (3, 2, 13), (3, 3, 14), (7, 1, 16), (8, 1, 20),
    ]  # fmt: skip
    assert [t.weight for t in targets] == pytest.approx(
        [1 - b, 0.8 * -b, 1 - b, 0.8 * (1 - b), 0.64 * (1 - b), -b, -b]
    )


def _state_logits(head: EagleDraftHead, ex: TraceExample, anchor: int, step: int) -> torch.Tensor:
    """The draft's logits at a chain state, computed step by step as a server drafts."""
    n = ex.tokens.shape[0] - 1
    g, keys, values = head.step1(ex.features[:n].float(), ex.tokens[1:], torch.arange(n))
    branch = next(b for b in ex.branches if b.anchor == anchor)
    anchors = torch.tensor([anchor])
    state, ck, cv = g[anchors], None, None
    for s in range(2, step + 1):
        token = torch.tensor([branch.proposed[s - 2]])
        state, ck, cv = head.chain(state, token, anchors + s - 1, keys, values, anchors, ck, cv)
    return head.logits(state)[0]


def test_the_unlikelihood_term_is_minus_log_one_minus_q_of_the_rejected_token(
    target: LlamaForCausalLM, example: TraceExample
) -> None:
    head = _head(target)
    objective = Objective(lambda_discard=0.0, lambda_reject=1.0)
    with torch.no_grad():
        parts = aurora_loss(head, example, objective)
        expected, weights = 0.0, 0.0
        for t in reject_targets(example.branches, objective):
            q = torch.softmax(_state_logits(head, example, t.anchor, t.step), -1)[t.token]
            expected += t.weight * -math.log(1 - float(q))
            weights += t.weight
    assert parts.reject == pytest.approx(expected / weights, rel=1e-5)


def test_a_step_on_the_negative_term_lowers_the_rejected_tokens_probability(
    target: LlamaForCausalLM, example: TraceExample
) -> None:
    head = _head(target)
    objective = Objective(ttt_steps=1, lambda_discard=0.0, lambda_reject=1e6)  # the term alone
    with torch.no_grad():
        before = torch.softmax(_state_logits(head, example, 7, 1), -1)[16].item()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05)
    aurora_loss(head, example, objective).total.backward()
    optimizer.step()
    with torch.no_grad():
        after = torch.softmax(_state_logits(head, example, 7, 1), -1)[16].item()
    assert after < before


def test_a_rejected_token_outside_the_draft_vocabulary_counts_nothing(
    target: LlamaForCausalLM,
) -> None:
    # Given a draft whose vocabulary lacks the three rejected tokens (9, 16, 20)
    torch.manual_seed(0)
    config = DraftConfig.for_target(
        target.config, "tiny", fuse_layers=(0, 1, 2), draft_vocab_size=VOCAB - 3
    )
    head = EagleDraftHead(config, target.get_input_embeddings())
    head.set_vocabulary(torch.tensor([t for t in range(VOCAB) if t not in (9, 16, 20)]))
    example = build_example(target, head, RECORD, topk=K)
    # Then the negative term counts nothing and leaves the loss as it is without it
    with torch.no_grad():
        with_term = aurora_loss(head, example, Objective(lambda_discard=0.0, lambda_reject=1.0))
        without = aurora_loss(head, example, Objective(lambda_discard=0.0, lambda_reject=0.0))
    assert with_term.reject == 0.0
    assert float(with_term.total) == pytest.approx(float(without.total))
