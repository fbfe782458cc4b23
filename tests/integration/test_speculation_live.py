"""Suffix decoding, the adaptive head and the hybrid on the real default model: every
output equals plain decoding (alone and batched), the server's global suffix tree learns
each finished request, and a hybrid revision round-trips through the desired state, the
loaded report, the stats and the response. Lengths stay short (<= 24 tokens)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from live_server import LiveServer, live_servers, wait_for

from aurora.runtime.checkpoint import save_checkpoint
from aurora.runtime.cost import Adaptive, VerifyCost
from aurora.runtime.draft import DraftConfig, EagleDraftHead, EagleProposer
from aurora.runtime.engine import BatchDecoder, generate
from aurora.runtime.llama import Llama
from aurora.runtime.models import load_target
from aurora.runtime.protocol import (
    Builtin,
    DesiredState,
    Keys,
    RevisionRef,
    get_loaded,
    hybrid_revision,
    read_stats,
    set_desired,
)
from aurora.runtime.suffix import HybridProposer, SuffixCache, SuffixProposer

pytestmark = pytest.mark.integration

KEYS = Keys("default", "local")
PROMPTS = [
    "def fibonacci(n):",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
    "The capital of France is",
    "Lena buys 3 boxes of 12 pencils and gives away 7. How many pencils are left?",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    torch.set_num_threads(1)  # two shared cores: more threads run slower
    return load_target("smollm2-135m")


def scratch_head(target: Any, seed: int = 0) -> EagleDraftHead:
    torch.manual_seed(seed)
    config = DraftConfig.for_target(target.config, "smollm2-135m")
    return EagleDraftHead(config, target.get_input_embeddings()).eval().requires_grad_(False)


def test_new_proposers_decode_exactly_what_plain_decoding_gives(model: tuple[Any, Any]) -> None:
    # given the plain outputs of a few prompts, and a global tree that learned the first two
    target, tokenizer = model
    eos = [tokenizer.eos_token_id]
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    plain = [generate(target, ids, max_new_tokens=24, eos_ids=eos).output_ids for ids in prompts]
    cache = SuffixCache()
    for output in plain[:2]:
        cache.add(output)
    cost = VerifyCost()
    adaptive = EagleProposer(scratch_head(target), Builtin.SCRATCH, Adaptive(cost, min_prob=0.0))
    proposers = {
        "suffix": SuffixProposer(cache, cost=cost),
        "adaptive": adaptive,
        "hybrid": HybridProposer(SuffixProposer(cache, cost=cost), adaptive),
    }
    # when each decodes every prompt alone, and all of them together in a batch of 4 rows
    requests = []
    for name, proposer in proposers.items():
        for ids, want in zip(prompts, plain, strict=True):
            alone = generate(target, ids, proposer=proposer, k=4, max_new_tokens=24, eos_ids=eos)  # type: ignore[arg-type]
            assert alone.output_ids == want, (name, tokenizer.decode(ids))
            requests.append(dict(prompt_ids=ids, proposer=proposer, k=4, max_new_tokens=24))
    rows = BatchDecoder(Llama(target, rows=4), eos_ids=eos).decode_all(requests)
    # then every output is plain decoding's, token for token
    for i, row in enumerate(rows):
        assert row.generation is not None, row.error
        assert row.generation.output_ids == plain[i % len(prompts)]
    # and the suffix drafts the learned outputs back: those prompts' drafts were accepted
    learned = [rows[i].generation for i in (0, 1)]
    assert all(g is not None and g.accept_length > 2.0 for g in learned)


@pytest.fixture
def serve(model: tuple[Any, Any]) -> Iterator[Callable[..., LiveServer]]:
    with live_servers(model) as start:
        yield start


def generate_body(text: str, n: int) -> dict[str, Any]:
    return {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0}}


def test_the_server_learns_every_finished_request_and_serves_a_hybrid_revision(
    model: tuple[Any, Any],
    serve: Callable[..., LiveServer],
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    target, tokenizer = model
    # given a server drafting with suffix decoding, and a head checkpoint on disk
    server = serve(draft=Builtin.SUFFIX, redis_url=redis_url, checkpoint_dir=str(tmp_path))
    head = scratch_head(target, seed=3)
    path = save_checkpoint(
        tmp_path,
        "r1",
        head.state_dict(),
        parent=None,
        step=1,
        traces_seen=0,
        evaluation={},
        draft_config=head.config.to_dict(),
    )
    prompt = PROMPTS[1]
    want = generate(
        target, tokenizer(prompt).input_ids, max_new_tokens=20, eos_ids=[tokenizer.eos_token_id]
    ).output_ids
    # when a prompt is served twice
    first = server.post("/generate", generate_body(prompt, 20)).json()
    again = server.post("/generate", generate_body(prompt, 20)).json()
    # then both are plain decoding's output, and the second drafts the first's output back
    assert first["output_ids"] == again["output_ids"] == want
    assert again["meta_info"]["draft_revision"] == Builtin.SUFFIX
    assert again["meta_info"]["spec_accept_length"] > first["meta_info"]["spec_accept_length"]
    assert server.runtime.speculation.cache.added == 2

    # when the desired state names the hybrid over r1
    hybrid = hybrid_revision("r1")
    set_desired(
        redis_client,
        KEYS,
        DesiredState(stable=RevisionRef(revision=hybrid, path=str(path)), generation=1),
    )
    report = wait_for(
        lambda: (
            (r := get_loaded(redis_client, KEYS).get("test-server")) and r.stable == hybrid and r
        ),
        "the hybrid revision loaded",
    )
    assert report.error is None
    reply = server.post("/generate", generate_body(prompt, 20)).json()
    # then it serves under its own name, in the response and in the stats, losslessly
    assert reply["meta_info"]["draft_revision"] == hybrid
    assert reply["output_ids"] == want

    def hybrid_stats() -> list[Any]:
        return [s for _, s in read_stats(redis_client, KEYS) if s.revision == hybrid]

    stats = wait_for(hybrid_stats, "stats of the hybrid revision")
    assert stats[0].arm == "stable" and stats[0].new_tokens == 20
    # and a hybrid over a revision that is not a head is refused, naming it
    set_desired(
        redis_client,
        KEYS,
        DesiredState(stable=RevisionRef(revision=hybrid_revision("ngram"), path=""), generation=2),
    )
    report = wait_for(
        lambda: (r := get_loaded(redis_client, KEYS).get("test-server")) and r.error and r,
        "the refused hybrid reported",
    )
    assert "hybrid:ngram" in report.error and report.stable == hybrid


def test_bench_decode_unseen_reports_every_method_on_prompts_nobody_saw(
    model: tuple[Any, Any], tmp_path: Path
) -> None:
    from aurora.runtime.bench import default_prompts
    from aurora.runtime.bench_config import DecodeBenchConfig
    from aurora.runtime.bench_unseen import METHODS, run_unseen

    # given a head whose checkpoint says it was fitted on the first held-out code prompt
    target, _ = model
    _, held = default_prompts("code", 10**6, 0)
    head = scratch_head(target, seed=5)
    path = save_checkpoint(
        tmp_path / "drafts",
        "r-unseen",
        head.state_dict(),
        parent=None,
        step=1,
        traces_seen=1,
        evaluation={"prompts": [held[0].id]},
        draft_config=head.config.to_dict(),
    )
    # when the benchmark runs on code and math, after a warm-up of 3 requests
    config = DecodeBenchConfig(
        unseen=True,
        draft=(str(path),),
        domains=("code", "math"),
        prompts=2,
        warmup=3,
        max_new_tokens=8,
        threads=1,
        workdir=tmp_path,
    )
    result = run_unseen(config)
    # then every method decoded every prompt exactly as plain decoding did
    code = result["domains"]["code"]
    assert code["prompts"] == [p.id for p in held[1:3]]  # the head's prompt left out
    assert code["warmup"] == {"requests": 3, "distinct_prompts": 3}
    for domain in ("code", "math"):
        methods = result["domains"][domain]["methods"]
        assert list(methods) == list(METHODS)
        assert all(row["identical"] for row in methods.values()), domain
        assert methods["plain"]["speedup_vs_plain"] == 1.0
        assert methods["plain"]["speedup_interval_90"] == (1.0, 1.0)  # paired with itself
    assert result["traffic"] == "unseen" and result["suffix_tokens"] == 16
    assert set(result["min_speedup_vs_plain"]) == {"draft_adaptive", "hybrid"}
    assert result["min_speedup_vs_plain"]["hybrid"] == min(
        result["domains"][d]["methods"]["hybrid"]["speedup_vs_plain"] for d in ("code", "math")
    )
    # and the warm-up outputs are cached: a second run does not decode them again
    assert (tmp_path / "warmup").is_dir()
