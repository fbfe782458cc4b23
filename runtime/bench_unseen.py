"""`aurora bench decode --unseen`: every proposer against plain decoding on prompts that
neither the draft head nor the suffix tree has seen.

Per domain (code, prose, math, chat): the prompts are the domain's held-out half
(``default_prompts``), less any whose text the draft head was fitted on (its checkpoint
lists them) or the suffix tree saw. Each domain starts a fresh server-wide suffix cache;
with ``warmup`` > 0 it first learns the outputs of that many requests drawn from the
domain's other prompts (cycled when the domain has fewer; cached on disk, since greedy
outputs do not change). Then, prompt by prompt, every method decodes it (in a
per-prompt shuffled order, so machine drift hits them alike) and the cache learns the
plain output, as a server learns every finished request. With ``recurring`` the cache
first learns the measured prompts' own outputs too (they were served before): the
figures are then labelled recurring, not unseen.

Methods: transformers' generate and prompt lookup, our engine plain, n-gram, suffix, the
learned head with a fixed k, the learned head adaptive, and the hybrid. The verify cost
the adaptive methods use is measured at start, as a server does.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aurora.runtime.bench import _hf, default_prompts, fit_draft
from aurora.runtime.bench_config import DecodeBenchConfig
from aurora.runtime.checkpoint import CheckpointStore, load_draft
from aurora.runtime.cost import Adaptive, VerifyCost, measure_draft_step, measure_generate_cost
from aurora.runtime.draft import EagleProposer, NgramProposer
from aurora.runtime.engine import draft_length, generate
from aurora.runtime.models import load_target
from aurora.runtime.protocol import Builtin
from aurora.runtime.suffix import HybridProposer, SuffixCache, SuffixProposer
from aurora.runtime.trainer.config import FitConfig
from aurora.runtime.workloads import BUILTIN_DOMAINS, Prompt, load_domain, prompt_ids

METHODS: tuple[str, ...] = (
    "hf_generate",
    "hf_prompt_lookup",
    "plain",
    Builtin.NGRAM,
    Builtin.SUFFIX,
    "draft_fixed",
    "draft_adaptive",
    "hybrid",
)
GOAL_METHODS = ("draft_adaptive", "hybrid")  # min_speedup_vs_plain is reported for these


@dataclass
class MethodTotals:
    new_tokens: int = 0
    seconds: float = 0.0
    per_prompt: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    verify_steps: int = 0
    accept_lengths: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def fitted_draft(config: DecodeBenchConfig, target: tuple[Any, Any], progress: Any) -> Path:
    """``config.draft``, or a draft fitted on the code domain's training half, cached in the
    workdir under a key of what shapes it."""
    if config.draft:
        return Path(config.draft[0])
    train, _ = default_prompts("code", config.fit_prompts, config.seed)
    key = hashlib.sha256(
        json.dumps(
            [
                config.model,
                [p.id for p in train],
                config.fit_epochs,
                config.max_new_tokens,
                config.spec_tokens,
            ]
        ).encode()
    ).hexdigest()[:12]
    root = config.workdir / "drafts" / key
    cached = CheckpointStore(root).latest() if root.is_dir() else None
    if cached is not None:
        return root / cached.revision
    _, tokenizer = target
    streams = [tokenizer(p.text).input_ids for d in BUILTIN_DOMAINS for p in load_domain(d)[:200]]
    fit = FitConfig(
        model=config.model,
        epochs=config.fit_epochs,
        max_new_tokens=config.max_new_tokens,
        spec_tokens=config.spec_tokens,
        out=root,
    )
    return fit_draft(fit, train, progress=progress, vocabulary_streams=streams, target=target)


def fitted_texts(meta_prompts: Sequence[str]) -> set[str]:
    """The texts of the prompt ids a checkpoint says it was fitted on."""
    texts: set[str] = set()
    for domain in {pid.split("/", 1)[0] for pid in meta_prompts}:
        if domain in BUILTIN_DOMAINS:
            texts |= {p.text for p in load_domain(domain) if p.id in set(meta_prompts)}
    return texts


def warm_outputs(
    config: DecodeBenchConfig,
    target: tuple[Any, Any],
    prompts: Sequence[Prompt],
    progress: Callable[[str, int, int], None] | None,
) -> list[list[int]]:
    """Greedy outputs of ``prompts`` (decoded with suffix decoding, which is lossless),
    cached in the workdir by model, prompt text and length."""
    model, tokenizer = target
    path = (
        config.workdir / "warmup" / f"{config.model.replace('/', '_')}-{config.max_new_tokens}.json"
    )
    cache: dict[str, list[int]] = json.loads(path.read_text()) if path.is_file() else {}
    proposer = SuffixProposer(SuffixCache())
    outputs = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt)
        key = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        if key not in cache:
            g = generate(
                model,
                ids,
                proposer=proposer,
                k=config.spec_tokens,
                max_new_tokens=config.max_new_tokens,
                eos_ids=[tokenizer.eos_token_id],
            )
            cache[key] = g.output_ids
            proposer.cache.add(g.output_ids)  # type: ignore[union-attr]
            if i % 10 == 9 or i == len(prompts) - 1:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cache))
        outputs.append(cache[key])
        if progress:
            progress("warm-up", i + 1, len(prompts))
    return outputs


def run_unseen(
    config: DecodeBenchConfig, progress: Callable[..., None] | None = None
) -> dict[str, Any]:
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = target = load_target(config.model)
    eos = [tokenizer.eos_token_id]
    draft_path = fitted_draft(config, target, progress)
    head, meta = load_draft(draft_path, model, dtype=model.dtype)
    seen_by_draft = fitted_texts(meta.evaluation.get("prompts", []))
    reach = config.suffix_tokens or None
    cost = VerifyCost(measure_generate_cost(model, max(config.spec_tokens, reach or 0) + 1))
    adaptive = Adaptive(cost, draft_step_s=measure_draft_step(head))
    fixed = EagleProposer(head, meta.revision)
    learned = EagleProposer(head, meta.revision, adaptive)
    ids0 = tokenizer("def f(x):").input_ids
    generate(model, ids0, max_new_tokens=8)  # warm-up
    _hf(model, ids0, 8, eos[0])

    domains: dict[str, Any] = {}
    for domain in config.domains:
        _, held = default_prompts(domain, 10**6, config.seed)
        measured = [p for p in held if p.text not in seen_by_draft][: config.prompts]
        measured_texts = {p.text for p in measured}
        others = [p for p in load_domain(domain) if p.text not in measured_texts]
        cache = SuffixCache()
        warm: list[Prompt] = []
        if config.warmup and others:
            pool = others[:]
            random.Random(config.seed).shuffle(pool)
            warm = [pool[i % len(pool)] for i in range(config.warmup)]
            for output in warm_outputs(
                config, target, warm, lambda *a, d=domain: progress and progress(d, *a)
            ):
                cache.add(output)
        assert not measured_texts & ({p.text for p in warm} | seen_by_draft)
        if config.recurring:  # served before: the tree holds their continuations
            for output in warm_outputs(
                config, target, measured, lambda *a, d=domain: progress and progress(d, *a)
            ):
                cache.add(output)
        proposers: dict[str, Any] = {
            "plain": None,
            Builtin.NGRAM: NgramProposer(),
            Builtin.SUFFIX: SuffixProposer(cache, cost=cost, spec_tokens=reach),
            "draft_fixed": fixed,
            "draft_adaptive": learned,
            "hybrid": HybridProposer(
                SuffixProposer(cache, cost=cost, spec_tokens=reach),
                learned,
                head_tokens=config.spec_tokens,
            ),
        }
        totals = {m: MethodTotals() for m in METHODS}
        for i, prompt in enumerate(measured):
            ids = prompt_ids(tokenizer, prompt)
            order = list(METHODS)
            random.Random(f"{domain}/{i}").shuffle(order)
            for method in order:
                t = totals[method]
                start = time.perf_counter()
                if method.startswith("hf_"):
                    lookup = config.spec_tokens if method == "hf_prompt_lookup" else 0
                    out = _hf(model, ids, config.max_new_tokens, eos[0], lookup=lookup)
                else:
                    g = generate(
                        model,
                        ids,
                        proposer=proposers[method],
                        k=draft_length(proposers[method], config.spec_tokens),
                        max_new_tokens=config.max_new_tokens,
                        eos_ids=eos,
                        cost=cost,  # every verify forward refines it, as in a server
                    )
                    out = g.output_ids
                    t.accept_lengths.append(g.accept_length)
                    t.verify_steps += len(g.steps) if g.steps else max(len(out) - 1, 0)
                elapsed = time.perf_counter() - start
                t.seconds += elapsed
                t.new_tokens += len(out)
                t.per_prompt.append((len(out), elapsed))
                t.outputs.append(out)
            cache.add(totals["plain"].outputs[-1])  # the server learns the finished request
            if progress:
                progress(domain, "prompt", i + 1, len(measured))
        domains[domain] = {
            "prompts": [p.id for p in measured],
            "warmup": {"requests": len(warm), "distinct_prompts": len({p.text for p in warm})},
            "suffix_cache": {"requests": cache.requests, "bytes": cache.estimated_bytes()},
            "methods": _summarize(totals),
        }
    return {
        "model": config.model,
        "draft": {
            "path": str(draft_path),
            "revision": meta.revision,
            "fitted_on": len(seen_by_draft),
        },
        "traffic": "recurring" if config.recurring else "unseen",
        "k": config.spec_tokens,
        "suffix_tokens": reach or config.spec_tokens,
        "max_new_tokens": config.max_new_tokens,
        "prompts_per_domain": config.prompts,
        "warmup": config.warmup,
        "threads": torch.get_num_threads(),
        "verify_cost_ms": cost.milliseconds(observed=False, digits=2),
        # as the served forwards refined it by the end (VerifyCost.observe)
        "verify_cost_ms_observed": cost.milliseconds(observed=True, digits=2),
        "draft_step_ms": round(adaptive.draft_step_s * 1000, 3),
        "domains": domains,
        "min_speedup_vs_plain": {
            m: min(d["methods"][m]["speedup_vs_plain"] for d in domains.values())
            for m in GOAL_METHODS
        }
        if domains
        else {},
    }


def speedup_interval(
    method: Sequence[tuple[int, float]],
    plain: Sequence[tuple[int, float]],
    *,
    resamples: int = 2000,
    level: float = 0.90,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A ``level`` bootstrap interval of the time-weighted speedup (total tokens over
    total seconds, over plain's on the same prompts), resampling prompts with the pairs
    kept together: how far the figure could move on other prompts of the domain and
    other moments of a shared machine. None with fewer than 2 prompts."""
    n = len(plain)
    if n < 2 or len(method) != n:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        mine = sum(method[i][0] for i in picks) / sum(method[i][1] for i in picks)
        base = sum(plain[i][0] for i in picks) / sum(plain[i][1] for i in picks)
        ratios.append(mine / base)
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[min(int((1 - tail) * resamples), resamples - 1)]


def _summarize(totals: dict[str, MethodTotals]) -> dict[str, Any]:
    plain = totals["plain"]
    plain_rate = plain.new_tokens / plain.seconds if plain.seconds else 0.0
    rows = {}
    for method, t in totals.items():
        rate = t.new_tokens / t.seconds if t.seconds else 0.0
        rows[method] = {
            "tokens_per_s": rate,
            "speedup_vs_plain": rate / plain_rate if plain_rate else None,
            "speedup_interval_90": speedup_interval(t.per_prompt, plain.per_prompt),
            "accept_length": sum(t.accept_lengths) / len(t.accept_lengths)
            if t.accept_lengths
            else None,
            "identical": t.outputs == plain.outputs,
            "new_tokens": t.new_tokens,
            "verify_steps": t.verify_steps or None,
        }
    return rows
