"""`aurora bench batch`: continuous batching measured side by side in one run.

The same requests go through the engine's ``BatchDecoder`` with each max batch
size (default 1, 2 and 4), with no draft and with the n-gram draft. All requests
arrive at once; a request joins the batch as soon as a row is free, as in the
server. Per configuration: total tokens/s (every generated token over the wall
time of the whole run, prefills included), the ratio to max batch 1 with the same
draft, mean per-request latency (arrival to last token), mean accepted length,
mean rows per verify step, and whether every output equals max batch 1's.
Configurations are interleaved in a shuffled order per repeat so machine drift
hits all of them alike.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aurora.runtime.bench import bench_setup
from aurora.runtime.bench_config import BatchBenchConfig
from aurora.runtime.draft import NgramProposer, Proposer
from aurora.runtime.engine import BatchDecoder
from aurora.runtime.llama import Llama
from aurora.runtime.protocol import Builtin

DRAFTS = (Builtin.NONE, Builtin.NGRAM)


@dataclass
class BatchRun:
    """What one configuration measured, summed over repeats."""

    draft: str
    max_batch: int
    seconds: float = 0.0
    new_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    accept_lengths: list[float] = field(default_factory=list)
    steps: int = 0  # verify steps
    row_steps: int = 0  # rows verified in them
    outputs: list[list[int]] = field(default_factory=list)

    def summary(self, batch1: BatchRun) -> dict[str, Any]:
        tokens_per_s = self.new_tokens / self.seconds if self.seconds else 0.0
        base = batch1.new_tokens / batch1.seconds if batch1.seconds else 0.0
        return {
            "draft": self.draft,
            "max_batch": self.max_batch,
            "tokens_per_s": tokens_per_s,
            "speedup_vs_batch1": tokens_per_s / base if base else None,
            "mean_latency_s": sum(self.latencies) / len(self.latencies),
            "accept_length": sum(self.accept_lengths) / len(self.accept_lengths)
            if self.draft != Builtin.NONE
            else None,
            "mean_rows_per_step": self.row_steps / self.steps if self.steps else 0.0,
            "identical_to_batch1": self.outputs == batch1.outputs,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
        }


def batch_benchmark(
    config: BatchBenchConfig, prompts: Sequence[str], progress: Any = None
) -> dict[str, Any]:
    """The same requests, all at once, through the batched decoder at each of
    `config.batch`, with no draft and with the n-gram draft (greedy)."""
    model_spec, batches, k = config.model, config.batch, config.spec_tokens
    max_new_tokens, repeats = config.max_new_tokens, config.repeats
    setup = bench_setup(model_spec, prompts, config.threads or None)
    ids, eos = setup.prompt_ids, setup.eos_ids
    llama = Llama(setup.model, rows=max(batches))
    proposers: dict[str, Proposer | None] = {Builtin.NONE: None, Builtin.NGRAM: NgramProposer()}
    runs = {(d, b): BatchRun(d, b) for d in DRAFTS for b in batches}
    warm_up = dict(prompt_ids=ids[0], max_new_tokens=8)  # allocations, a full-size cache
    BatchDecoder(llama, eos_ids=eos).decode_all([warm_up] * max(batches))
    order = list(runs)
    done = 0
    for repeat in range(repeats):
        random.Random(repeat).shuffle(order)
        for key in order:
            run = runs[key]
            decoder = BatchDecoder(llama, max_rows=run.max_batch, eos_ids=eos)
            requests = [
                dict(
                    prompt_ids=p, proposer=proposers[run.draft], k=k, max_new_tokens=max_new_tokens
                )
                for p in ids
            ]
            t = time.perf_counter()
            rows = decoder.decode_all(requests)
            run.seconds += time.perf_counter() - t
            run.steps += decoder.steps
            run.row_steps += decoder.row_steps
            for row in rows:
                if row.generation is None:
                    raise RuntimeError(f"a request failed in the benchmark: {row.error!r}")
                run.new_tokens += len(row.generation.output_ids)
                run.latencies.append(row.finished_at - t)
                run.accept_lengths.append(row.generation.accept_length)
            if repeat == 0:
                run.outputs = [row.generation.output_ids for row in rows if row.generation]
            done += 1
            if progress:
                progress(done, repeats * len(order))
    first = min(batches)
    return {
        "model": model_spec,
        "requests": len(prompts),
        "max_new_tokens": max_new_tokens,
        "k": k,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "batch1": first,
        "configs": [runs[d, b].summary(runs[d, first]) for d in DRAFTS for b in batches],
    }
