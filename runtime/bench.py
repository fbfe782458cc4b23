"""Benchmarks that compare side by side in one run and report ratios.

`decode`: on the same prompts, interleaved per prompt so that machine drift hits
every method alike: transformers' generate, transformers' prompt lookup, our
engine plain, with the n-gram proposer, and with trained draft checkpoints.
Reports tokens/s, mean accepted length, speedup ratios, output identity and the
achieved weight-read bandwidth against the machine's measured copy bandwidth.

`fit_draft`: trains a draft head offline on the engine's own greedy
continuations of a prompt set, with the same objective the online trainer uses;
handy to bootstrap a draft or to get one for `decode`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from aurora.runtime.bench_config import DecodeBenchConfig
from aurora.runtime.checkpoint import load_draft, new_revision_id, save_checkpoint
from aurora.runtime.draft import DraftConfig, EagleDraftHead, EagleProposer, NgramProposer
from aurora.runtime.engine import generate
from aurora.runtime.models import load_target
from aurora.runtime.protocol import Builtin
from aurora.runtime.trainer.config import FitConfig
from aurora.runtime.workloads import Prompt, load_domain, prompt_ids, split_prompts

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    new_tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    accept_lengths: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (read + write) of a large tensor, the ceiling for decoding."""
    src = torch.empty(megabytes * (1 << 20) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _hf(model: Any, ids: list[int], max_new: int, eos: int | None, lookup: int = 0) -> list[int]:
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": False, "pad_token_id": eos}
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), **kwargs)
    return [int(t) for t in out[0, len(ids) :]]


@dataclass
class BenchSetup:
    """What every decode benchmark starts from: the target, its EOS id and the prompts
    tokenised."""

    model: Any
    eos_id: int | None
    prompt_ids: list[list[int]]

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id] if self.eos_id is not None else []


def bench_setup(
    model_spec: str, prompts: Sequence[str | Prompt], threads: int | None
) -> BenchSetup:
    """Set torch's threads (None: its default), load the target and tokenise `prompts`:
    a string as raw text, a workload Prompt as a server receives it (`prompt_ids`)."""
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_target(model_spec)
    encoded = [
        list(tokenizer(p).input_ids) if isinstance(p, str) else prompt_ids(tokenizer, p)
        for p in prompts
    ]
    return BenchSetup(model, tokenizer.eos_token_id, encoded)


def decode_benchmark(
    config: DecodeBenchConfig, prompts: Sequence[Prompt], progress: Any = None
) -> dict[str, Any]:
    """transformers' generate and prompt lookup, our engine plain, with the n-gram proposer
    and with each of `config.draft`, on the same prompts (interleaved), greedy."""
    model_spec, k, max_new_tokens = config.model, config.spec_tokens, config.max_new_tokens
    drafts = [Builtin.NGRAM, *config.draft]
    setup = bench_setup(model_spec, prompts, config.threads or None)
    model, eos = setup.model, setup.eos_id
    proposers: dict[str, Any] = {}
    for spec in drafts:
        if spec == Builtin.NGRAM:
            proposers[Builtin.NGRAM] = NgramProposer()
        else:
            head, meta = load_draft(spec, model)
            proposers[f"draft:{meta.revision}"] = EagleProposer(head, meta.revision)
    methods = ["hf_generate", "hf_prompt_lookup", "plain", *proposers]
    results = {m: MethodResult(m) for m in methods}
    generate(model, setup.prompt_ids[0], max_new_tokens=8)  # warm-up
    _hf(model, setup.prompt_ids[0], 8, eos)
    for i, ids in enumerate(setup.prompt_ids):
        order = methods[:]
        random.Random(i).shuffle(order)  # no method always runs first (cache warmth)
        for method in order:
            r = results[method]
            t = time.perf_counter()
            if method == "hf_generate":
                out = _hf(model, ids, max_new_tokens, eos)
                r.forwards += len(out)
            elif method == "hf_prompt_lookup":
                out = _hf(model, ids, max_new_tokens, eos, lookup=k)
            else:
                g = generate(
                    model,
                    ids,
                    proposer=proposers.get(method),
                    k=0 if method == "plain" else k,
                    max_new_tokens=max_new_tokens,
                    eos_ids=setup.eos_ids,
                )
                out = g.output_ids
                r.forwards += 1 + (len(g.steps) if g.steps else len(out) - 1)
                r.accept_lengths.append(g.accept_length)
            r.seconds += time.perf_counter() - t
            r.new_tokens += len(out)
            r.outputs.append(out)
        if progress:
            progress(i + 1, len(prompts))
    bandwidth = memory_bandwidth_gbs()
    wbytes = weight_bytes(model)
    reference = results["hf_generate"].outputs
    plain = results["plain"].tokens_per_s
    rows = {}
    for m, r in results.items():
        rows[m] = {
            "tokens_per_s": r.tokens_per_s,
            "speedup_vs_plain": r.tokens_per_s / plain if plain else None,
            "speedup_vs_hf_generate": r.tokens_per_s / results["hf_generate"].tokens_per_s,
            "accept_length": sum(r.accept_lengths) / len(r.accept_lengths)
            if r.accept_lengths
            else None,
            "identical": r.outputs == reference,
            "new_tokens": r.new_tokens,
            "weight_read_gbs": wbytes * r.forwards / r.seconds / 1e9 if r.forwards else None,
        }
    return {
        "model": model_spec,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "k": k,
        "threads": torch.get_num_threads(),
        "memory_copy_bandwidth_gbs": bandwidth,
        "weight_bytes": wbytes,
        "methods": rows,
    }


def fit_draft(
    config: FitConfig,
    prompts: Sequence[Prompt],
    *,
    heldout: Sequence[Prompt] = (),
    progress: Any = None,
    vocabulary_streams: Sequence[Sequence[int]] = (),
    target: tuple[Any, Any] | None = None,
) -> Path:
    """Train a draft head offline on the target's greedy continuations of ``prompts``
    and save it as a checkpoint (a regular revision directory under ``config.out``),
    one trace per optimizer step (`trainer.step.optimizer_step`, the online trainer's
    step). ``vocabulary_streams`` are extra token streams counted when choosing the
    draft vocabulary; ``target`` is an already loaded (model, tokenizer)."""
    from types import SimpleNamespace

    from aurora.runtime.trainer.objective import (
        Objective,
        build_example,
        build_vocabulary,
        evaluate,
    )
    from aurora.runtime.trainer.step import make_optimizer, optimizer_step

    model, tokenizer = target or load_target(config.model)
    draft_config = DraftConfig.for_target(
        model.config, config.model, draft_vocab_size=config.draft_vocab
    )
    head = EagleDraftHead(draft_config, model.get_input_embeddings())
    k = config.spec_tokens

    def traces(items: Sequence[Prompt]) -> list[Any]:
        records = []
        for p in items:
            ids = prompt_ids(tokenizer, p)
            g = generate(
                model,
                ids,
                proposer=NgramProposer(),
                k=k,
                max_new_tokens=config.max_new_tokens,
                trace_topk=8,
                eos_ids=[tokenizer.eos_token_id],
            )
            records.append(
                SimpleNamespace(
                    trace_id=p.id,
                    domain=p.domain,
                    prompt_ids=ids,
                    output_ids=g.output_ids,
                    steps=g.steps,
                )
            )
            if progress:
                progress("generate", len(records), len(items))
        return records

    train, held = traces(prompts), traces(heldout)
    vocab = build_vocabulary(
        [*([*r.prompt_ids, *r.output_ids] for r in train), *vocabulary_streams],
        config.draft_vocab,
        draft_config.target_vocab_size,
    )
    head.set_vocabulary(vocab)
    examples = [build_example(model, head, r) for r in train]
    held_examples = [build_example(model, head, r) for r in held]
    optimizer = make_optimizer(head, config.lr, weight_decay=0.01)  # torch's AdamW default
    objective = Objective(lambda_discard=config.lambda_discard)
    t2d = head.target_to_draft()
    history = []
    epochs = config.epochs
    for epoch in range(epochs):
        random.Random(epoch).shuffle(examples)
        for ex in examples:
            optimizer_step(head, optimizer, [ex], objective, lr=config.lr, clip=1.0, t2d=t2d)
        scores = {"epoch": epoch + 1, "train": evaluate(examples[:8], k, head)["accept_length"]}
        if held_examples:
            scores["heldout"] = evaluate(held_examples, k, head)["accept_length"]
        history.append(scores)
        if progress:
            progress("epoch", epoch + 1, epochs, scores)
    revision = new_revision_id(epochs * len(examples))
    return save_checkpoint(
        config.out,
        revision,
        {k_: v.detach().cpu() for k_, v in head.state_dict().items()},
        parent=None,
        step=epochs * len(examples),
        traces_seen=len(examples),
        evaluation={"offline": history, "prompts": [p.id for p in prompts]},
        draft_config=draft_config.to_dict(),
    )


def default_prompts(
    domain: str, n: int, seed: int, heldout_fraction: float = 0.5
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts of a domain: benchmarks measure on the held-out half."""
    train, held = split_prompts(load_domain(domain), heldout_fraction, seed)
    return train[:n], held[:n]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            data,
            indent=2,
            default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o),
        )
    )
