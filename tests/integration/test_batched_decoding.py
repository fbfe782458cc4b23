"""Continuous batching on the real default model: the batched Llama forward computes
what transformers computes, every row of a mixed batch decodes exactly what plain
decoding gives it alone, and the server's worker decodes concurrent requests
together with one bad request failing alone. Lengths stay short (≤ 24 tokens)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from aurora.runtime.draft import DraftConfig, EagleDraftHead, EagleProposer, NgramProposer
from aurora.runtime.engine import BatchDecoder, generate
from aurora.runtime.llama import Llama
from aurora.runtime.models import load_target
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import Revision, RevisionSet, Router, Served
from aurora.runtime.server.worker import EngineWorker, InternalError, Job

pytestmark = pytest.mark.integration

PROMPTS = [
    "def fibonacci(n):",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
    "The capital of France is",
    "import numpy as np\nimport pandas as pd\n\n# Load the data\ndf = pd.read_csv('data.csv')\n",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    torch.set_num_threads(1)  # two shared cores: more threads run slower
    return load_target("smollm2-135m")


def random_eagle(target: Any) -> EagleProposer:
    torch.manual_seed(0)
    config = DraftConfig.for_target(target.config, "smollm2-135m")
    return EagleProposer(EagleDraftHead(config, target.get_input_embeddings()).eval(), "scratch")


def test_the_batched_forward_matches_transformers_on_the_default_model(
    model: tuple[Any, Any],
) -> None:
    target, tokenizer = model
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    head = random_eagle(target).head
    with torch.inference_mode():
        ref = target(ids, output_hidden_states=True)
    llama = Llama(target, rows=2)
    n = ids.shape[1]
    llama.forward(ids[:, : n - 3], torch.tensor([1]), torch.tensor([0]))
    out = llama.forward(ids[:, n - 3 :], torch.tensor([1]), torch.tensor([n - 3]), [0, 30])
    # the default model reads its fused features at these layers, and the last one is normed
    full = llama.forward(ids, torch.tensor([0]), torch.tensor([0]), head.hidden_indices)
    torch.testing.assert_close(out.logits[0], ref.logits[0, n - 3 :], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.logits[0], ref.logits[0], rtol=1e-4, atol=1e-4)
    for i in (0, 30, *head.hidden_indices):
        got = out.hidden_states[i][0] if i in out.hidden_states else full.hidden_states[i][0]
        want = (
            ref.hidden_states[i][0, n - 3 :] if i in out.hidden_states else ref.hidden_states[i][0]
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        head.fuse(full.hidden_states), head.fuse(ref.hidden_states), rtol=1e-4, atol=1e-4
    )


def test_mixed_rows_decode_exactly_what_plain_decoding_gives(model: tuple[Any, Any]) -> None:
    # given greedy requests of different prompt lengths: plain, n-gram and an untrained EAGLE head
    target, tokenizer = model
    eos = [tokenizer.eos_token_id]
    drafts = [None, NgramProposer(), random_eagle(target)]
    requests = [
        dict(
            prompt_ids=tokenizer(text).input_ids,
            proposer=drafts[i % 3],
            k=3,
            max_new_tokens=16 + 2 * i,
        )
        for i, text in enumerate(PROMPTS + PROMPTS[:1])
    ]
    # when they share a batch of 4 rows, joining as rows free up
    decoder = BatchDecoder(Llama(target, rows=4), eos_ids=eos)
    rows = decoder.decode_all(requests)
    done = [row.generation for row in rows]
    # then every output is plain decoding's, token for token
    assert decoder.row_steps / decoder.steps > 2  # rows were verified together
    for i in range(len(requests)):
        plain = generate(target, rows[i].prompt_ids, max_new_tokens=16 + 2 * i, eos_ids=eos)
        generation = done[i]
        assert generation is not None, rows[i].error
        assert generation.output_ids == plain.output_ids, PROMPTS[i % len(PROMPTS)]
    ngram_steps = [s for i in (1, 4) for s in rows[i].steps]
    assert any(s.accepted for s in ngram_steps)  # the n-gram draft was used


def test_the_worker_decodes_concurrent_jobs_together_and_isolates_a_failure(
    model: tuple[Any, Any],
) -> None:
    target, tokenizer = model

    class Broken:
        revision, needs_features = "broken", False

        def start(self, prompt_ids: list[int]) -> Any:
            return self

        def propose(self, *args: Any) -> Any:
            raise RuntimeError("draft bug")

    # given a worker with up to 3 rows, an n-gram stable and a broken candidate revision
    revisions = RevisionSet(
        Served(Revision("ngram", NgramProposer()), Revision("broken", Broken()))
    )
    worker = EngineWorker(
        target,
        tokenizer,
        threading.Lock(),
        revisions,
        Router(0),
        ServerMetrics(),
        None,
        server_id="test",
        spec_tokens=3,
        eos_ids=[tokenizer.eos_token_id],
        max_queue=8,
        trace_sample_rate=0.0,
        trace_topk=0,
        seed=0,
        max_batch=3,
    )
    assert worker.max_batch == 3 and worker.decoder is not None
    decoder, widths, batches = worker.decoder, [], []
    step = decoder.step

    def spy() -> Any:
        widths.append(len(decoder.rows))
        batches.append({(row.owner.arm, row.owner.revision) for row in decoder.rows})
        return step()

    decoder.step = spy  # type: ignore[method-assign]
    jobs = [
        Job(prompt_ids=tokenizer(text).input_ids, max_new_tokens=12, temperature=0.0)
        for text in PROMPTS[:3]
    ]
    jobs.insert(1, Job(prompt_ids=jobs[0].prompt_ids, max_new_tokens=12, temperature=0.0))
    jobs[1].revision = "broken"
    # when they are all queued at once
    for job in jobs:
        worker.submit(job)
    worker.start()
    try:
        results = [job.future.exception(timeout=300) or job.future.result() for job in jobs]
    finally:
        worker.stop()
    # then the broken one fails alone and the others are plain decoding's outputs
    assert isinstance(results[1], InternalError)
    for job, result in zip(jobs, results, strict=True):
        if job.revision == "broken":
            continue
        plain = generate(target, job.prompt_ids, max_new_tokens=12, eos_ids=worker.eos_ids)
        assert result.output_ids == plain.output_ids  # type: ignore[union-attr]
        assert result.arm == "stable" and result.revision == "ngram"  # type: ignore[union-attr]
    assert worker.depth() == 0
    assert max(widths) == 3  # decoded together, not one after another
    # and a batch never mixes arms or revisions: each request's tokens/s is its arm's own
    assert all(len(batch) == 1 for batch in batches)
