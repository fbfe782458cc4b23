"""The engine worker routes batches, not requests, when it batches: a cohort of requests
decoded together shares one routing draw, so an arm's batch sizes do not depend on its
traffic share (the live A/B stays unbiased at --max-batch > 1)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

import pytest
from tiny_llama import tiny_llama
from transformers import LlamaForCausalLM

from aurora.runtime.draft import NgramProposer
from aurora.runtime.server.metrics import ServerMetrics
from aurora.runtime.server.revisions import Revision, RevisionSet, Router, Served
from aurora.runtime.server.worker import Completion, EngineWorker, Job

pytestmark = pytest.mark.unit


class Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_llama(vocab_size=16, sharpen=1.0)


def run(tiny: LlamaForCausalLM, jobs: list[Job], **options: Any) -> tuple[EngineWorker, list[Any]]:
    served = Served(
        Revision("r1", NgramProposer()),
        Revision("r2", NgramProposer()),
        candidate_share=0.4,
        baseline_share=0.2,
    )
    worker = EngineWorker(
        tiny, Tokenizer(), threading.Lock(), RevisionSet(served), Router(3), ServerMetrics(),
        None, server_id="w", spec_tokens=2, eos_ids=[], max_queue=256, trace_sample_rate=0.0,
        trace_topk=0, seed=0, max_batch=4, **options,
    )  # fmt: skip
    batches: list[set[tuple[str, str]]] = []
    assert worker.decoder is not None
    step = worker.decoder.step

    def spy() -> Any:
        assert worker.decoder is not None
        batches.append({(row.owner.arm, row.owner.revision) for row in worker.decoder.rows})
        return step()

    worker.decoder.step = spy  # type: ignore[method-assign]
    for job in jobs:
        worker.submit(job)
    worker.start()
    try:
        results = [job.future.result(timeout=300) for job in jobs]
    finally:
        worker.stop()
    return worker, [results, batches]


def jobs(n: int) -> list[Job]:
    return [Job(prompt_ids=[1, 2, 3, i % 7], max_new_tokens=6, temperature=0.0) for i in range(n)]


def test_a_cohort_shares_one_arm_and_its_size_does_not_depend_on_the_arm(
    tiny: LlamaForCausalLM,
) -> None:
    # Given 96 requests queued at once on a server batching 4 rows,
    _, (completions, batches) = run(tiny, jobs(96))
    # then no batch mixes arms or revisions,
    assert batches and all(len(batch) == 1 for batch in batches)
    # every cohort is one arm, and every cohort, whatever its arm, takes 2 x 4 requests:
    arms: dict[str, set[str]] = defaultdict(set)
    for completion in completions:
        assert isinstance(completion, Completion) and completion.cohort.startswith("w:")
        arms[completion.cohort].add(completion.arm)
    assert all(len(a) == 1 for a in arms.values())
    sizes = Counter(completion.cohort for completion in completions)
    assert sorted(sizes.values()) == [8] * 12
    by_arm = Counter(next(iter(arms[cohort])) for cohort in sizes)
    assert len(by_arm) >= 2, by_arm  # the seeded draws picked more than one arm
    # and each request says how many rows it decoded with (4 while the batch was full).
    assert max(c.batch_rows for c in completions) == pytest.approx(4.0)


def test_a_pinned_request_is_routed_alone_and_unpinned_ones_never_join_it(
    tiny: LlamaForCausalLM,
) -> None:
    work = jobs(12)
    work[0].arm = "baseline"  # pinned, at the head of the queue
    _, (completions, _) = run(tiny, work)
    pinned = completions[0]
    assert pinned.arm == "baseline"
    assert [c for c in completions if c.cohort == pinned.cohort] == [pinned]


def test_the_test_only_slowdown_delays_only_its_revision(
    tiny: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("aurora.runtime.server.worker.time.sleep", slept.append)
    work = jobs(24)
    for i, job in enumerate(work):
        job.revision = "r2" if i % 2 else "r1"
    _, (completions, batches) = run(tiny, work, slow_revision=("r2", 0.05))
    # one delay before every verify step of a batch serving r2, none for r1's
    r2_steps = sum(1 for batch in batches if {revision for _, revision in batch} == {"r2"})
    assert r2_steps > 0 and slept == [0.05] * r2_steps
    assert {c.revision for c in completions} == {"r1", "r2"}
