"""The speculative decoding loop (torch engine).

``generate``: one request, any Hugging Face causal LM with a KV cache: prefill,
draft k tokens, verify them in one target forward, accept (exact match at
temperature 0, rejection sampling with residual resampling above it, which
keeps the target's distribution), roll the cache back to what was accepted,
repeat. k = 0 or no proposer is plain decoding.

``BatchDecoder``: the same step for many requests at once over the batched Llama
forward (``aurora.runtime.llama``): one target forward verifies every row's
draft; rows join and leave between steps (continuous batching).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from aurora.runtime.cost import VerifyCost
from aurora.runtime.draft import DraftSession, Proposal, Proposer, tempered_probs
from aurora.runtime.llama import Llama

log = logging.getLogger(__name__)


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
    probs = tempered_probs(logits, temperature)
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
    p = tempered_probs(logits, temperature)
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
    cost: VerifyCost | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt_ids``.

    ``stop(output_ids)`` may return a cut length when a stop string appeared;
    ``before_step`` runs between decode steps (the server swaps draft revisions
    there, so a swap never lands inside a verify step); ``cost`` (the verify cost the
    proposers decide with) observes every verify forward, as timed here."""
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
    while (end := _finished(tokens, n_prompt, eos, stop, max_new_tokens)) is None:
        if before_step is not None:
            before_step()
        room = max_new_tokens - (len(tokens) - n_prompt)
        proposal = _propose(session, tokens, features, k, room, temperature, generator)
        verify_in = [tokens[-1], *proposal.tokens]
        processed = len(tokens) - 1  # the target has seen every token but the last
        started = time.perf_counter()
        out = target(
            torch.tensor([verify_in], device=device),
            cache=cache,
            use_cache=True,
            output_hidden_states=need_features,
        )
        logits = out.logits[0]
        n_acc, next_token = accept(logits, proposal, temperature, generator)  # synchronises
        if cost is not None:
            cost.observe(1, len(verify_in), time.perf_counter() - started)
        crop_cache(cache, processed + 1 + n_acc)
        if need_features:
            features = _features(proposer, out)[: n_acc + 1]
        if speculate:
            steps.append(_record(proposal, n_acc, logits, trace_topk))
        _commit(tokens, proposal, n_acc, next_token, eos, room)
    finish, stop_text = end
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


def _finished(
    tokens: list[int],
    n_prompt: int,
    eos: set[int],
    stop: Callable[[list[int]], int | None] | None,
    max_new_tokens: int,
) -> tuple[str, str | None] | None:
    """(finish reason, stop text) once the output is complete, else None; a stop
    string cuts ``tokens`` where the callback says."""
    output = tokens[n_prompt:]
    if output[-1] in eos:
        return "stop", None
    if stop is not None and (cut := stop(output)) is not None:
        del tokens[n_prompt + cut :]
        return "stop", "stop"
    if len(output) >= max_new_tokens:
        return "length", None
    return None


def draft_length(proposer: Any, k: int) -> int:
    """The k to decode with ``proposer`` when the caller's is ``k``: a proposer that
    sets ``spec_tokens`` (suffix decoding and the hybrid, which draft further on long
    matches) uses its own; k = 0 (no speculation) stays 0."""
    reach = getattr(proposer, "spec_tokens", None)
    return k if proposer is None or k <= 0 or reach is None else reach


def _propose(
    session: DraftSession | None,
    tokens: list[int],
    features: Tensor | None,
    k: int,
    room: int,
    temperature: float,
    generator: torch.Generator | None,
    rows: int = 1,
) -> Proposal:
    # Never draft past max_new_tokens: the verify step adds one token of its own.
    if session is None or room <= 1:
        return Proposal([])
    return session.propose(tokens, features, min(k, room - 1), temperature, generator, rows)


def _commit(
    tokens: list[int], proposal: Proposal, accepted: int, next_token: int, eos: set[int], room: int
) -> None:
    new = [*proposal.tokens[:accepted], next_token]
    for i, token in enumerate(new):  # EOS inside the accepted run ends the output there
        if token in eos:
            new = new[: i + 1]
            break
    tokens.extend(new[:room])


# ---------------------------------------------------------------------------- batching


@dataclass
class Row:
    """One request in a BatchDecoder. ``generation`` is set when it finished,
    ``error`` when it failed; either way it has left the batch."""

    prompt_ids: list[int]
    tokens: list[int]
    slot: int
    proposer: Proposer | None  # None: plain decoding (no draft, k = 0, or the baseline)
    k: int
    max_new_tokens: int
    temperature: float
    stop: Callable[[list[int]], int | None] | None
    generator: torch.Generator | None
    trace_topk: int
    owner: Any = None  # the caller's handle (the server's job)
    session: DraftSession | None = None
    features: Tensor | None = None
    steps: list[StepRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_start: float = 0.0
    generation: Generation | None = None
    error: Exception | None = None
    finished_at: float = 0.0  # perf_counter when it finished or failed

    @property
    def done(self) -> bool:
        return self.generation is not None or self.error is not None

    @property
    def room(self) -> int:
        return self.max_new_tokens - (len(self.tokens) - len(self.prompt_ids))

    @property
    def hidden_indices(self) -> tuple[int, ...]:
        if self.proposer is None or not self.proposer.needs_features:
            return ()
        return tuple(self.proposer.head.hidden_indices)  # type: ignore[attr-defined]

    def fuse(self, hidden: dict[int, Tensor]) -> Tensor:
        return self.proposer.head.fuse(hidden)  # type: ignore[union-attr]


class BatchDecoder:
    """Continuous batching: rows join (``add``, which prefills) and leave between
    steps; ``step`` drafts for every row, verifies all rows' proposals in ONE
    target forward (rows with fewer or no draft tokens are padded), then accepts,
    stops and records per row exactly as ``generate`` does, so every row's output
    is what ``generate`` gives for it alone (greedy: identical; sampled: the same
    draws from the row's own generator).

    A failure inside one row (its draft, its stop callback, its share of the
    forward) fails that row only: when the batched forward raises, each row is
    retried alone and only the rows that still fail get the error."""

    def __init__(
        self,
        model: Llama,
        *,
        max_rows: int | None = None,
        eos_ids: Sequence[int] = (),
        cost: VerifyCost | None = None,
    ):
        rows = model.rows if max_rows is None else max_rows
        self.cost = cost  # learns from every verify forward timed in ``step``
        if not 1 <= rows <= model.rows:
            raise ValueError(f"max_rows={max_rows}: use 1 to the model's {model.rows} cache rows")
        self.model, self.eos = model, set(eos_ids)
        self.rows: list[Row] = []
        # Verify steps taken and rows verified in them: their ratio is the mean batch size.
        self.steps = self.row_steps = 0
        self._free = list(range(rows - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Rows that can join now."""
        return len(self._free)

    @torch.inference_mode()
    def add(
        self,
        prompt_ids: Sequence[int],
        *,
        proposer: Proposer | None = None,
        k: int = 0,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        stop: Callable[[list[int]], int | None] | None = None,
        generator: torch.Generator | None = None,
        trace_topk: int = 0,
        owner: Any = None,
    ) -> Row:
        """Prefill a request into a free row and sample its first token. The row
        comes back ``done`` when that token already ends it; exceptions (the draft's
        ``start``, the forward, the stop callback) propagate and free the row."""
        if not self._free:
            raise RuntimeError(f"all {len(self.rows)} rows are decoding; wait for capacity")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        speculate = proposer is not None and k > 0
        row = Row(
            prompt_ids=list(prompt_ids),
            tokens=list(prompt_ids),
            slot=self._free.pop(),
            proposer=proposer if speculate else None,
            k=k if speculate else 0,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop=stop,
            generator=generator,
            trace_topk=trace_topk,
            owner=owner,
        )
        try:
            if row.proposer is not None:
                row.session = row.proposer.start(list(prompt_ids))
            t0 = time.perf_counter()
            out = self.model.forward(
                torch.tensor([row.tokens]),
                torch.tensor([row.slot]),
                torch.tensor([0]),
                row.hidden_indices,
                last_only=True,
            )
            if row.hidden_indices:
                row.features = row.fuse({i: h[0] for i, h in out.hidden_states.items()})
            row.tokens.append(_sample(out.logits[0, -1], temperature, generator))
            row.decode_start = time.perf_counter()
            row.prefill_s = row.decode_start - t0
            self._settle(row)
        except BaseException:
            self._free.append(row.slot)
            raise
        if row.done:
            self._free.append(row.slot)
            row.finished_at = time.perf_counter()
        else:
            self.rows.append(row)
        return row

    def decode_all(self, requests: Sequence[dict[str, Any]]) -> list[Row]:
        """Decode requests (each the keyword arguments of ``add``) that all arrive
        now, each joining as soon as a row is free; returns their rows in request
        order, finished or failed (an error in a prefill propagates)."""
        rows: list[Row] = []
        pending = list(requests)
        while pending or self.rows:
            while pending and self.capacity:
                rows.append(self.add(**pending.pop(0)))
            self.step()
        return rows

    def remove(self, row: Row) -> None:
        """Take a row out between steps (its client went away); its cache row is reused."""
        if row in self.rows:
            self.rows.remove(row)
            self._free.append(row.slot)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One verify step for every row; returns the rows that finished or failed in
        it (they have left the batch)."""
        rows = list(self.rows)
        if rows:
            self.steps, self.row_steps = self.steps + 1, self.row_steps + len(rows)
        proposals: list[Proposal] = []
        for row in rows:
            try:
                proposals.append(
                    _propose(
                        row.session,
                        row.tokens,
                        row.features,
                        row.k,
                        row.room,
                        row.temperature,
                        row.generator,
                        len(rows),
                    )
                )
            except Exception as error:
                row.error = error
                proposals.append(Proposal([]))
        live = [(row, p) for row, p in zip(rows, proposals, strict=True) if not row.done]
        started = time.perf_counter()
        results = self._verify(live)
        if self.cost is not None and live and not any(isinstance(r, Exception) for r in results):
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)  # kernels run asynchronously there
            width = 1 + max(len(proposal.tokens) for _, proposal in live)  # rows are padded
            self.cost.observe(len(live), width, time.perf_counter() - started)
        for (row, proposal), verified in zip(live, results, strict=True):
            try:
                if isinstance(verified, Exception):
                    raise verified
                logits, hidden = verified
                logits = logits[: len(proposal.tokens) + 1]
                n_acc, next_token = accept(logits, proposal, row.temperature, row.generator)
                if row.hidden_indices:
                    row.features = row.fuse(hidden)[: n_acc + 1]
                if row.session is not None:
                    row.steps.append(_record(proposal, n_acc, logits, row.trace_topk))
                _commit(row.tokens, proposal, n_acc, next_token, self.eos, row.room)
                self._settle(row)
            except Exception as error:
                row.error = error
        finished = [row for row in rows if row.done]
        for row in finished:
            self.remove(row)
            row.finished_at = time.perf_counter()
        return finished

    def _verify(
        self, live: list[tuple[Row, Proposal]]
    ) -> list[tuple[Tensor, dict[int, Tensor]] | Exception]:
        """Per row: target logits [T, V] over (last token, draft tokens, padding) and
        its hidden states, from one forward; rows retried alone if it raises."""
        if not live:
            return []
        try:
            return [*self._forward(live)]
        except Exception as error:
            if len(live) == 1:
                return [error]
            log.warning("batched forward failed (%s); retrying its rows one by one", error)
        results: list[tuple[Tensor, dict[int, Tensor]] | Exception] = []
        for item in live:
            try:
                results.extend(self._forward([item]))
            except Exception as error:
                results.append(error)
        return results

    def _forward(self, live: list[tuple[Row, Proposal]]) -> list[tuple[Tensor, dict[int, Tensor]]]:
        width = 1 + max(len(p.tokens) for _, p in live)
        tokens = [[row.tokens[-1], *p.tokens] for row, p in live]
        out = self.model.forward(
            torch.tensor([t + [t[0]] * (width - len(t)) for t in tokens]),  # pad: any token id
            torch.tensor([row.slot for row, _ in live]),
            torch.tensor([len(row.tokens) - 1 for row, _ in live]),  # what each row's cache holds
            sorted({i for row, _ in live for i in row.hidden_indices}),
        )
        return [
            (out.logits[b], {i: h[b] for i, h in out.hidden_states.items()})
            for b in range(len(live))
        ]

    def _settle(self, row: Row) -> None:
        end = _finished(row.tokens, len(row.prompt_ids), self.eos, row.stop, row.max_new_tokens)
        if end is None:
            return
        row.generation = Generation(
            prompt_ids=row.prompt_ids,
            output_ids=row.tokens[len(row.prompt_ids) :],
            steps=row.steps,
            finish_reason=end[0],
            prefill_s=row.prefill_s,
            decode_s=time.perf_counter() - row.decode_start,
            revision=row.proposer.revision if row.proposer is not None else "",
            stop_text=end[1],
        )
