"""`aurora bench decode` and `aurora bench batch` on the default model, tiny settings: the
shared set-up (threads, target, EOS id, tokenised prompts) feeds both, and each reports
what it decoded against its reference. No timing is asserted."""

from __future__ import annotations

import pytest

from aurora.errors import UsageError
from aurora.runtime.bench import bench_setup, decode_benchmark, default_prompts
from aurora.runtime.bench_batch import batch_benchmark
from aurora.runtime.bench_config import BatchBenchConfig, DecodeBenchConfig
from aurora.runtime.protocol import Builtin

pytestmark = pytest.mark.integration


def test_the_setup_tokenises_every_prompt_and_knows_the_eos_id() -> None:
    setup = bench_setup("smollm2-135m", ["def f(x):", "Once upon a time"], threads=1)
    assert len(setup.prompt_ids) == 2 and all(setup.prompt_ids)
    assert setup.eos_ids == [setup.eos_id] and setup.eos_id is not None


def test_decode_benchmark_outputs_match_plain_greedy_decoding() -> None:
    train, _ = default_prompts("code", 2, 0)
    config = DecodeBenchConfig(prompts=1, max_new_tokens=6, spec_tokens=3, threads=1)
    result = decode_benchmark(config, train[:1])
    methods = result["methods"]
    assert set(methods) == {"hf_generate", "hf_prompt_lookup", "plain", Builtin.NGRAM}
    assert methods["plain"]["identical"] and methods[Builtin.NGRAM]["identical"]
    assert result["prompts"] == 1 and methods["plain"]["new_tokens"] == 6


def test_batch_benchmark_decodes_what_batch_size_one_decodes() -> None:
    prompts = ["def add(a, b):", "The capital of France is", "1, 2, 3,"]
    config = BatchBenchConfig(batch=(2, 1, 2), max_new_tokens=6, spec_tokens=3, threads=1)
    assert config.batch == (1, 2)  # sorted, each size once
    result = batch_benchmark(config, prompts)
    configs = {(c["draft"], c["max_batch"]): c for c in result["configs"]}
    assert set(configs) == {(d, b) for d in (Builtin.NONE, Builtin.NGRAM) for b in (1, 2)}
    assert all(c["identical_to_batch1"] for c in configs.values())
    assert configs[Builtin.NONE, 2]["accept_length"] is None
    assert result["requests"] == 3


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"prompts": 0}, "--prompts"), ({"batch": (0, 2)}, "--batch"), ({"repeats": 0}, "--repeats")],
)
def test_a_batch_benchmark_that_cannot_run_is_refused_naming_the_flag(
    options: dict[str, object], flag: str
) -> None:
    with pytest.raises(UsageError, match=flag):
        BatchBenchConfig(**options)  # type: ignore[arg-type]


def test_instruction_prompts_are_answered_not_ended_at_once() -> None:
    """Math word problems sent as raw text make SmolLM2-Instruct end its turn at once (the
    benchmarks once served them so: 0 tokens); through the chat template it answers."""
    from aurora.runtime.engine import generate
    from aurora.runtime.workloads import load_domain

    problem = load_domain("math")[0]
    setup = bench_setup("smollm2-135m", [problem.text, problem], threads=1)
    raw, templated = (
        generate(setup.model, ids, max_new_tokens=8, eos_ids=setup.eos_ids)
        for ids in setup.prompt_ids
    )
    assert raw.finish_reason == "stop" and len(raw.output_ids) <= 1
    assert templated.finish_reason == "length" and len(templated.output_ids) == 8
