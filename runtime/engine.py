"""The speculative decoding loop (torch engine).

One request at a time, any Hugging Face causal LM with a KV cache: prefill,
draft k tokens, verify them in one target forward, accept (exact match at
temperature 0, rejection sampling with residual resampling above it, which
keeps the target's distribution), roll the cache back to what was accepted,
repeat. k = 0 or no proposer is plain decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from aurora.runtime.draft import Proposal, Proposer


@dataclass
class StepRecord:
    """One verify step: what the draft proposed, how much the target accepted, and
    the target's top-k (ids, log-probs) at each proposed position."""

    proposed: list[int]
    accepted: int
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    steps: list[StepRecord]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prefill_s: float
    decode_s: float
    revision: str = ""
    stop_text: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def accept_length(self) -> float:
        """Mean tokens per target forward during decoding, bonus token included (tau)."""
        if not self.steps:
            return 1.0
        return sum(s.accepted + 1 for s in self.steps) / len(self.steps)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after prefill: what a user feels while streaming."""
        n = len(self.output_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def crop_cache(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def accept(
    logits: Tensor, proposal: Proposal, temperature: float, generator: torch.Generator | None
) -> tuple[int, int]:
    """Verify a proposal against the target's logits [k+1, V] for the positions
    that predict each draft token and the one after. Returns (accepted count,
    the next token: the target's correction at the first rejection, or the bonus
    token when all were accepted)."""
    drafted = proposal.tokens
    if temperature <= 0:
        target = torch.argmax(logits, dim=-1).tolist()
        n = 0
        while n < len(drafted) and drafted[n] == target[n]:
            n += 1
        return n, int(target[n])
    p = torch.softmax(logits.float() / temperature, dim=-1)
    for i, token in enumerate(drafted):
        q_token = 1.0 if proposal.probs is None else float(proposal.probs[i, token])
        r = float(torch.rand((), generator=generator))
        if q_token > 0 and r < min(1.0, float(p[i, token]) / q_token):
            continue
        if proposal.probs is None:
            residual = p[i].clone()
            residual[token] = 0
        else:
            residual = torch.clamp(p[i] - proposal.probs[i].to(p.dtype), min=0)
        total = float(residual.sum())
        if total <= 0:  # p == q at this position: any sample from p is exact
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


@torch.inference_mode()
def generate(
    target: Any,
    prompt_ids: Sequence[int],
    *,
    proposer: Proposer | None = None,
    k: int = 0,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_ids: Sequence[int] = (),
    stop: Callable[[list[int]], int | None] | None = None,
    generator: torch.Generator | None = None,
    trace_topk: int = 0,
    before_step: Callable[[], None] | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt_ids``.

    ``stop(output_ids)`` may return a cut length when a stop string appeared;
    ``before_step`` runs between decode steps (the server swaps draft revisions
    there, so a swap never lands inside a verify step)."""
    device = next(target.parameters()).device
    speculate = proposer is not None and k > 0
    need_features = speculate and proposer is not None and proposer.needs_features
    session = proposer.start(list(prompt_ids)) if speculate and proposer is not None else None
    eos = set(eos_ids)
    cache = DynamicCache()
    tokens = list(prompt_ids)
    t0 = time.perf_counter()
    out = target(
        torch.tensor([tokens], device=device),
        cache=cache,
        use_cache=True,
        output_hidden_states=need_features,
    )
    features = _features(proposer, out) if need_features else None
    tokens.append(_sample(out.logits[0, -1], temperature, generator))
    t1 = time.perf_counter()
    steps: list[StepRecord] = []
    n_prompt = len(prompt_ids)
    finish, stop_text = "length", None
    while True:
        output = tokens[n_prompt:]
        if output[-1] in eos:
            finish = "stop"
            break
        if stop is not None and (cut := stop(output)) is not None:
            del tokens[n_prompt + cut :]
            finish, stop_text = "stop", "stop"
            break
        if len(output) >= max_new_tokens:
            break
        if before_step is not None:
            before_step()
        budget = max_new_tokens - len(output)
        proposal = (
            session.propose(tokens, features, min(k, budget - 1), temperature, generator)
            if session is not None and budget > 1
            else Proposal([])
        )
        verify_in = [tokens[-1], *proposal.tokens]
        processed = len(tokens) - 1  # the target has seen every token but the last
        out = target(
            torch.tensor([verify_in], device=device),
            cache=cache,
            use_cache=True,
            output_hidden_states=need_features,
        )
        logits = out.logits[0]
        n_acc, next_token = accept(logits, proposal, temperature, generator)
        crop_cache(cache, processed + 1 + n_acc)
        if need_features:
            features = _features(proposer, out)[: n_acc + 1]
        new = [*proposal.tokens[:n_acc], next_token]
        if speculate:
            steps.append(_record(proposal, n_acc, logits, trace_topk))
        for i, token in enumerate(new):  # EOS inside the accepted run ends the output there
            if token in eos:
                new = new[: i + 1]
                break
        tokens.extend(new[: max_new_tokens - len(output)])
    t2 = time.perf_counter()
    return Generation(
        prompt_ids=list(prompt_ids),
        output_ids=tokens[n_prompt:],
        steps=steps,
        finish_reason=finish,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        revision=proposer.revision if speculate and proposer is not None else "",
        stop_text=stop_text,
    )


def _features(proposer: Any, out: Any) -> Tensor:
    return proposer.head.fuse(out.hidden_states)[0]


def _record(proposal: Proposal, accepted: int, logits: Tensor, topk: int) -> StepRecord:
    record = StepRecord(proposed=list(proposal.tokens), accepted=accepted)
    if topk > 0 and proposal.tokens:
        logprobs = torch.log_softmax(logits[: len(proposal.tokens)].float(), dim=-1)
        values, ids = logprobs.topk(topk, dim=-1)
        record.topk_ids = ids.tolist()
        record.topk_logprobs = [[round(v, 4) for v in row] for row in values.tolist()]
    return record
