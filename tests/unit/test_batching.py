"""The batched Llama forward and continuous batching, on a tiny random Llama: the
forward computes what Hugging Face computes, and every row of a batch decodes
exactly what ``generate`` decodes for it alone."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_llama import random_head, tiny_config, tiny_llama
from transformers import LlamaForCausalLM

from aurora.runtime.draft import EagleProposer, NgramProposer
from aurora.runtime.engine import BatchDecoder, Generation, generate
from aurora.runtime.llama import Llama, UnsupportedModel

pytestmark = pytest.mark.unit

VOCAB = 16


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, sharpen=8)


def eagle(model: LlamaForCausalLM, seed: int) -> EagleProposer:
    return EagleProposer(random_head(model, seed, fuse_layers=(0, 1, 3)), f"eagle-{seed}")


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


# ------------------------------------------------------------------ the forward


def test_forward_matches_hugging_face_per_row_at_its_own_positions(
    tiny: LlamaForCausalLM,
) -> None:
    # given two sequences of different lengths prefilled into rows 2 and 0 of a small cache
    rng = random.Random(1)
    a, b = torch.tensor([prompt(rng, 11)]), torch.tensor([prompt(rng, 6)])
    with torch.no_grad():
        ref_a = tiny(a, output_hidden_states=True)
        ref_b = tiny(b, output_hidden_states=True)
    llama = Llama(tiny, rows=3, max_len=4)  # forces the cache to grow
    llama.forward(a[:, :7], torch.tensor([2]), torch.tensor([0]))
    llama.forward(b[:, :3], torch.tensor([0]), torch.tensor([0]))
    # when one batched forward continues both (row 0 padded with a junk token)
    tokens = torch.stack([a[0, 7:11], torch.cat([b[0, 3:6], torch.tensor([5])])])
    out = llama.forward(tokens, torch.tensor([2, 0]), torch.tensor([7, 3]), range(5))
    # then logits and every hidden state equal Hugging Face's at those positions
    torch.testing.assert_close(out.logits[0], ref_a.logits[0, 7:11])
    torch.testing.assert_close(out.logits[1, :3], ref_b.logits[0, 3:6])
    assert sorted(out.hidden_states) == list(range(5)) == list(range(len(ref_a.hidden_states)))
    for i in range(5):
        torch.testing.assert_close(out.hidden_states[i][0], ref_a.hidden_states[i][0, 7:11])
        torch.testing.assert_close(out.hidden_states[i][1, :3], ref_b.hidden_states[i][0, 3:6])


def test_rejected_positions_are_overwritten_not_cropped(tiny: LlamaForCausalLM) -> None:
    # given a row that verified 4 tokens of which only the first was kept
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ref = tiny(seq).logits
    llama = Llama(tiny, rows=1)
    llama.forward(seq[:, :4], torch.tensor([0]), torch.tensor([0]))
    llama.forward(torch.tensor([[1, 7, 7, 7]]), torch.tensor([0]), torch.tensor([3]))
    # when the row continues from its true length, over the stale keys
    out = llama.forward(seq[:, 4:], torch.tensor([0]), torch.tensor([4]))
    # then it computes what the model computes for the true sequence
    torch.testing.assert_close(out.logits[0], ref[0, 4:])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    model = LlamaForCausalLM(tiny_config(VOCAB, **overrides))
    with pytest.raises(UnsupportedModel, match=field) as error:
        Llama(model, rows=1)
    assert "--max-batch 1" in str(error.value)


# ------------------------------------------------------------------ the batch


def decode_all(decoder: BatchDecoder, requests: list[dict]) -> list[Generation]:
    rows = decoder.decode_all(requests)
    assert all(row.error is None for row in rows), [row.error for row in rows]
    return [row.generation for row in rows if row.generation is not None]


def test_every_row_decodes_what_generate_gives_it_alone(tiny: LlamaForCausalLM) -> None:
    # given mixed greedy requests: plain, n-gram and EAGLE drafts, k 1..4, prompt lengths 1..14
    rng = random.Random(7)
    requests = []
    for i in range(9):
        proposer = [None, NgramProposer(), eagle(tiny, i)][i % 3]
        requests.append(
            dict(
                prompt_ids=prompt(rng, rng.randint(1, 14)),
                proposer=proposer,
                k=rng.randint(1, 4),
                max_new_tokens=rng.randint(1, 20),
            )
        )
    # when they go through a batch of 3 rows (rows join and leave between steps)
    batched = decode_all(BatchDecoder(Llama(tiny, rows=3), eos_ids=[0]), requests)
    # then each output, finish reason and step record equals generate's
    for request, got in zip(requests, batched, strict=True):
        alone = generate(tiny, eos_ids=[0], **request)  # type: ignore[arg-type]
        assert got.output_ids == alone.output_ids
        assert got.finish_reason == alone.finish_reason
        assert [(s.proposed, s.accepted) for s in got.steps] == [
            (s.proposed, s.accepted) for s in alone.steps
        ]
        assert got.revision == alone.revision


def test_sampled_rows_make_the_same_draws_as_generate(tiny: LlamaForCausalLM) -> None:
    # given sampled requests, each with its own seeded generator
    rng = random.Random(3)
    requests = [
        dict(
            prompt_ids=prompt(rng, 5 + i),
            proposer=[None, NgramProposer(), eagle(tiny, 9)][i % 3],
            k=3,
            max_new_tokens=16,
            temperature=1.0,
        )
        for i in range(6)
    ]

    def seeded(request: dict, seed: int) -> dict:
        return {**request, "generator": torch.Generator().manual_seed(seed)}

    # when decoded in a batch of 4 and alone with the same seeds
    batched = decode_all(
        BatchDecoder(Llama(tiny, rows=4)), [seeded(r, i) for i, r in enumerate(requests)]
    )
    # then the outputs agree token for token: the rows draw from the target's distribution
    # exactly as generate does (whose rejection sampling test_engine checks statistically)
    for i, (request, got) in enumerate(zip(requests, batched, strict=True)):
        assert got.output_ids == generate(tiny, **seeded(request, i)).output_ids  # type: ignore[arg-type]


def test_stop_callbacks_and_a_failing_row_leave_the_others_alone(tiny: LlamaForCausalLM) -> None:
    class Broken:
        revision, needs_features = "broken", False

        def start(self, prompt_ids: list[int]) -> object:
            return self

        def propose(self, *args: object) -> object:
            raise RuntimeError("draft bug")

    decoder = BatchDecoder(Llama(tiny, rows=3))
    plain = generate(tiny, [1, 2, 3], max_new_tokens=12).output_ids
    good = decoder.add([1, 2, 3], proposer=NgramProposer(), k=2, max_new_tokens=12)
    bad = decoder.add([4, 5], proposer=Broken(), k=2, max_new_tokens=12)  # type: ignore[arg-type]
    cut = decoder.add([1, 2, 3], max_new_tokens=12, stop=lambda out: 2 if len(out) >= 4 else None)
    finished = decoder.step()
    assert finished == [bad] and isinstance(bad.error, RuntimeError)
    while decoder.rows:
        decoder.step()
    assert good.generation is not None and good.generation.output_ids == plain
    assert cut.generation is not None and cut.generation.output_ids == plain[:2]
    assert cut.generation.finish_reason == "stop" and decoder.capacity == 3


def test_a_removed_row_frees_its_cache_row(tiny: LlamaForCausalLM) -> None:
    decoder = BatchDecoder(Llama(tiny, rows=2), max_rows=1)
    row = decoder.add([1, 2], max_new_tokens=50)
    with pytest.raises(RuntimeError, match="wait for capacity"):
        decoder.add([3], max_new_tokens=5)
    decoder.remove(row)
    again = decoder.add([3, 4], max_new_tokens=6)
    while decoder.rows:
        decoder.step()
    assert again.generation is not None
    assert again.generation.output_ids == generate(tiny, [3, 4], max_new_tokens=6).output_ids
