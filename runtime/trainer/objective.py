"""The Aurora objective: training examples from traces, the loss, and offline evaluation.

A trace gives the served continuation and, per verify step, what the draft
proposed and how much the target accepted. The trainer's replica of the target
recomputes the fused-layer features and the target's distribution along the
served sequence (one forward per trace). Then

    loss = sum_s 0.8^(s-1) * KL(p_target || p_draft) along the served continuation,
           unrolled for s = 1..S training-time-test steps (the draft is fed its own
           hidden state, as when it drafts a chain)
         + lambda_discard * sum_s 0.8^(s-1) * KL(p_target || p_draft) along the
           rejected proposals: the chain states the draft visited after its first
           wrong token, labelled by the target's top-k logged at those positions.

Positions follow the indexing of `aurora.runtime.draft`: the pair (F[i], x[i+1])
predicts x[i+2], whose target distribution is the target's output at position i+1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aurora.runtime.draft import EagleDraftHead, NgramSession

LABEL_TOPK = 32


@dataclass
class Branch:
    """A verify step's proposal, anchored at target position ``anchor``."""

    anchor: int
    proposed: list[int]
    accepted: int
    label_ids: Tensor | None = None  # [k, K] target top-k at each proposed position
    label_logprobs: Tensor | None = None


@dataclass
class TraceExample:
    trace_id: str
    domain: str
    tokens: Tensor  # [T] prompt + output
    n_prompt: int
    features: Tensor  # [T, 3H] float16, fused-layer target hidden states
    label_ids: Tensor  # [T, K] target top-K ids of the distribution at each position
    label_logprobs: Tensor  # [T, K] float16
    branches: list[Branch] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.tokens, self.features, self.label_ids, self.label_logprobs)
        )


def anchors_of(n_prompt: int, steps: Sequence[Any]) -> list[int]:
    """The anchor position of each verify step: the draft's step 1 pairs the
    target feature at the anchor with the last committed token."""
    anchors, committed = [], n_prompt + 1  # prefill emits one token
    for step in steps:
        anchors.append(committed - 2)
        committed += step.accepted + 1
    return anchors


@torch.no_grad()  # not inference_mode: the tensors are used in autograd later
def build_example(
    target: Any, head: EagleDraftHead, record: Any, topk: int = LABEL_TOPK
) -> TraceExample:
    """Recompute features and labels for a trace with the target replica."""
    device = next(target.parameters()).device
    tokens = torch.tensor([*record.prompt_ids, *record.output_ids], dtype=torch.long, device=device)
    out = target(tokens[None], output_hidden_states=True, use_cache=False)
    features = head.fuse(out.hidden_states)[0].to(torch.float16)
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
    values, ids = logprobs.topk(topk, dim=-1)
    branches = []
    for step, anchor in zip(
        record.steps, anchors_of(len(record.prompt_ids), record.steps), strict=True
    ):
        if step.accepted + 2 > len(step.proposed):
            continue  # nothing after the first rejected token: the served continuation covers it
        if step.topk_ids is not None and step.topk_logprobs is not None:
            label_ids = torch.tensor(step.topk_ids, dtype=torch.long)
            label_lp = torch.tensor(step.topk_logprobs, dtype=torch.float16)
        else:  # recompute the target along the rejected branch
            prefix = tokens[: anchor + 2].tolist()
            branch = torch.tensor([[*prefix, *step.proposed[:-1]]], device=device)
            lp = torch.log_softmax(
                target(branch, use_cache=False).logits[0, anchor + 1 :].float(), -1
            )
            v, i = lp.topk(topk, dim=-1)
            label_ids, label_lp = i.cpu(), v.to(torch.float16).cpu()
        branches.append(Branch(anchor, list(step.proposed), step.accepted, label_ids, label_lp))
    return TraceExample(
        trace_id=record.trace_id,
        domain=record.domain or "",
        tokens=tokens.cpu(),
        n_prompt=len(record.prompt_ids),
        features=features.cpu(),
        label_ids=ids.cpu(),
        label_logprobs=values.to(torch.float16).cpu(),
        branches=branches,
    )


def _kl(
    logits: Tensor, label_ids: Tensor, label_logprobs: Tensor, t2d: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward KL(p || q) per row, with p the target's top-K restricted to the draft
    vocabulary and renormalised. Returns (kl [N], valid [N] bool)."""
    draft_ids = t2d[label_ids]  # [N, K], -1 outside the draft vocabulary
    inside = draft_ids >= 0
    lp = label_logprobs.float().masked_fill(~inside, float("-inf"))
    valid = inside.any(dim=-1)
    p = torch.softmax(lp.masked_fill(~valid[:, None], 0.0), dim=-1) * inside
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(-1, draft_ids.clamp(min=0))
    log_p = torch.log(p.clamp(min=1e-12))
    kl = (p * (log_p - log_q)).sum(-1)
    return kl * valid, valid


@dataclass(frozen=True)
class Objective:
    """The objective's terms and weights (see the module docstring)."""

    ttt_steps: int = 3  # training-time-test steps unrolled along the served continuation
    step_decay: float = 0.8  # weight of step s: step_decay ** (s - 1)
    lambda_discard: float = 0.5  # weight of the off-path KL; 0 trains on the served path only


@dataclass
class LossParts:
    total: Tensor
    served: float
    rejected: float
    positions: int


def aurora_loss(
    head: EagleDraftHead,
    ex: TraceExample,
    objective: Objective = Objective(),
    *,
    t2d: Tensor | None = None,
) -> LossParts:
    """The Aurora objective for one trace (see the module docstring)."""
    ttt_steps, decay = objective.ttt_steps, objective.step_decay
    lambda_discard = objective.lambda_discard
    device = head.d2t.device
    t2d = head.target_to_draft() if t2d is None else t2d
    x = ex.tokens.to(device)
    n = x.shape[0] - 1  # positions 0..T-2 pair with a next token
    feats = ex.features[:n].to(device, torch.float32)
    label_ids, label_lp = ex.label_ids.to(device), ex.label_logprobs.to(device)
    positions = torch.arange(n, device=device)
    g, keys, values = head.step1(feats, x[1:], positions)
    step1_hidden = g
    served_sum, weight_sum = torch.zeros((), device=device), 0.0
    # Step 1 at position i predicts x[i+2]: label row i+1.
    kl, valid = _kl(head.logits(g[: n - 1]), label_ids[1:n], label_lp[1:n], t2d)
    served_sum = served_sum + kl.sum()
    weight_sum += float(valid.sum())
    chain_k = chain_v = None
    for s in range(2, ttt_steps + 1):
        a = n - s  # anchors p = 0..a-1 have a step-s position p+s-1 <= n-1 with label p+s
        if a <= 0:
            break
        anchors = torch.arange(a, device=device)
        g, chain_k, chain_v = head.chain(
            g[:a],
            x[anchors + s],
            anchors + s - 1,
            keys,
            values,
            anchors,
            None if chain_k is None else chain_k[:a],
            None if chain_v is None else chain_v[:a],
        )
        kl, valid = _kl(head.logits(g), label_ids[anchors + s], label_lp[anchors + s], t2d)
        w = decay ** (s - 1)
        served_sum = served_sum + w * kl.sum()
        weight_sum += w * float(valid.sum())
    rejected_sum, rejected_weight = _branch_loss(head, ex, step1_hidden, keys, values, decay, t2d)
    total = (served_sum + lambda_discard * rejected_sum) / max(
        weight_sum + lambda_discard * rejected_weight, 1.0
    )
    return LossParts(
        total=total,
        served=float(served_sum.detach()) / max(weight_sum, 1.0),
        rejected=float(rejected_sum.detach()) / max(rejected_weight, 1.0),
        positions=int(weight_sum),
    )


def _branch_loss(
    head: EagleDraftHead,
    ex: TraceExample,
    step1_hidden: Tensor,
    keys: Tensor,
    values: Tensor,
    decay: float,
    t2d: Tensor,
) -> tuple[Tensor, float]:
    device = keys.device
    total, weight = torch.zeros((), device=device), 0.0
    by_k: dict[int, list[Branch]] = {}
    for b in ex.branches:
        if b.label_ids is not None and b.anchor < keys.shape[0]:
            by_k.setdefault(len(b.proposed), []).append(b)
    for k, group in by_k.items():
        anchors = torch.tensor([b.anchor for b in group], device=device)
        proposed = torch.tensor([b.proposed for b in group], device=device)  # [B, k]
        accepted = torch.tensor([b.accepted for b in group], device=device)
        lab_ids = torch.stack([b.label_ids for b in group]).to(device)  # type: ignore[misc]
        lab_lp = torch.stack([b.label_logprobs for b in group]).to(device)  # type: ignore[misc]
        g = step1_hidden[anchors]  # step 1 is the served pair at the anchor
        chain_k = chain_v = None
        for s in range(2, k + 1):
            g, chain_k, chain_v = head.chain(
                g, proposed[:, s - 2], anchors + s - 1, keys, values, anchors, chain_k, chain_v
            )
            rejected_state = accepted + 2 <= s  # the input prefix holds a rejected token
            if not bool(rejected_state.any()):
                continue
            kl, valid = _kl(head.logits(g), lab_ids[:, s - 1], lab_lp[:, s - 1], t2d)
            mask = (valid & rejected_state).float()
            total = total + decay ** (s - 1) * (kl * mask).sum()
            weight += decay ** (s - 1) * float(mask.sum())
    return total, weight


# ---------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def draft_chains(head: EagleDraftHead, ex: TraceExample, k: int) -> tuple[Tensor, int]:
    """Greedy k-token chains the head would draft from every anchor of the output
    region, fed its own tokens as at inference. Returns (drafts [A, k], first anchor)."""
    device = head.d2t.device
    x = ex.tokens.to(device)
    n = x.shape[0] - 1
    first = max(ex.n_prompt - 1, 0)
    if n - first <= 1:
        return torch.empty(0, k, dtype=torch.long), first
    g, keys, values = head.step1(
        ex.features[:n].to(device, torch.float32), x[1:], torch.arange(n, device=device)
    )
    anchors = torch.arange(first, n - 1, device=device)
    g = g[anchors]
    token = head.d2t[head.logits(g).argmax(-1)]
    drafts = [token]
    chain_k = chain_v = None
    for s in range(2, k + 1):
        g, chain_k, chain_v = head.chain(
            g, token, anchors + s - 1, keys, values, anchors, chain_k, chain_v
        )
        token = head.d2t[head.logits(g).argmax(-1)]
        drafts.append(token)
    return torch.stack(drafts, dim=1).cpu(), first


def simulated_accept_length(drafts: Tensor, tokens: Tensor, first_anchor: int) -> tuple[int, int]:
    """Walk the served continuation as chain drafting would: at each verify step
    the target accepts the draft's leading matches plus one token. Returns
    (tokens emitted, verify steps)."""
    seq = tokens.tolist()
    emitted = steps = 0
    p = first_anchor
    while p + 2 < len(seq) and p - first_anchor < drafts.shape[0]:
        row = drafts[p - first_anchor].tolist()
        a = 0
        while a < len(row) and p + 2 + a < len(seq) - 1 and row[a] == seq[p + 2 + a]:
            a += 1
        emitted += a + 1
        steps += 1
        p += a + 1
    return emitted, steps


def ngram_chains(ex: TraceExample, k: int, max_ngram: int = 3) -> tuple[Tensor, int]:
    """The n-gram proposer's drafts from every anchor of the output region."""
    seq = ex.tokens.tolist()
    first = max(ex.n_prompt - 1, 0)
    session = NgramSession(max_ngram, 1)
    rows = []
    for p in range(first, len(seq) - 2):
        proposal = session.propose(seq[: p + 2], None, k, 0.0, None).tokens
        rows.append(proposal + [-1] * (k - len(proposal)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, k), first


def evaluate(
    examples: Iterable[TraceExample], k: int, head: EagleDraftHead | None = None
) -> dict[str, Any]:
    """Offline accept length of a head (or, with head=None, the n-gram proposer)
    on held-out traces, overall and per domain."""
    totals: dict[str, list[int]] = {}
    traces = 0
    for ex in examples:
        traces += 1
        drafts, first = draft_chains(head, ex, k) if head is not None else ngram_chains(ex, k)
        emitted, steps = simulated_accept_length(drafts, ex.tokens, first)
        for key in ("all", ex.domain or "default"):
            acc = totals.setdefault(key, [0, 0])
            acc[0] += emitted
            acc[1] += steps
    per = {d: (e / s if s else 1.0) for d, (e, s) in totals.items()}
    return {
        "accept_length": per.pop("all", 1.0),
        "per_domain": per,
        "traces": traces,
        "steps": totals.get("all", [0, 0])[1],
    }


def build_vocabulary(token_streams: Iterable[Sequence[int]], size: int, vocab_size: int) -> Tensor:
    """The draft vocabulary: the ``size`` most frequent target ids in the given
    token streams, filled up with the lowest unused ids (deterministic)."""
    counts: Counter[int] = Counter()
    for stream in token_streams:
        counts.update(int(t) for t in stream)
    chosen = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    taken = set(chosen)
    filler = (t for t in range(vocab_size) if t not in taken)
    while len(chosen) < size:
        chosen.append(next(filler))
    return torch.tensor(sorted(chosen), dtype=torch.long)
