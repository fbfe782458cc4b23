"""Suffix decoding, the adaptive learned head and the hybrid: on a tiny random Llama each
decodes exactly what plain decoding gives (greedy, alone and batched) and samples from
the target's distribution; on a scripted head each follows its documented rule."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from aurora.runtime.cost import Adaptive, Throttle, VerifyCost, monotone
from aurora.runtime.draft import DraftConfig, EagleDraftHead, EagleProposer
from aurora.runtime.engine import BatchDecoder, draft_length, generate
from aurora.runtime.llama import Llama
from aurora.runtime.suffix import Draft, HybridProposer, SuffixCache, SuffixProposer

pytestmark = pytest.mark.unit

VOCAB = 8
FLAT = {1: {1: 1.0, 2: 1.0}}  # a verify costs the same for any number of tokens


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.set_num_threads(1)  # a tiny model gains nothing from more, on shared cores it loses
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():  # sharper distributions than the random init gives
        model.lm_head.weight.mul_(20)
    return model


def head_of(model: LlamaForCausalLM, seed: int) -> EagleDraftHead:
    torch.manual_seed(seed)
    config = DraftConfig.for_target(
        model.config, "tiny", fuse_layers=(0, 1, 2), draft_vocab_size=VOCAB
    )
    head = EagleDraftHead(config, model.get_input_embeddings())
    for p in head.parameters():  # a random head that is not a pass-through
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


def proposers(model: LlamaForCausalLM, seed: int, cache: SuffixCache) -> dict[str, object]:
    """Every new proposer, with a prior (not measured) cost model."""
    cost = VerifyCost()
    adaptive = EagleProposer(head_of(model, seed), f"r{seed}", Adaptive(cost, min_prob=0.2))
    return {
        "suffix": SuffixProposer(cost=cost),
        "suffix+cache": SuffixProposer(cache, cost=cost),
        "adaptive": adaptive,
        "hybrid": HybridProposer(SuffixProposer(cache, cost=cost), adaptive),
    }


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_outputs_are_identical_to_plain_decoding(tiny: LlamaForCausalLM, k: int) -> None:
    rng = random.Random(k)
    cache = SuffixCache()
    for trial in range(6):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        plain = generate(tiny, prompt, max_new_tokens=40)
        for name, proposer in proposers(tiny, trial, cache).items():
            spec = generate(tiny, prompt, proposer=proposer, k=k, max_new_tokens=40)  # type: ignore[arg-type]
            assert spec.output_ids == plain.output_ids, name
        cache.add(plain.output_ids)  # the server learns every finished request


def test_a_served_output_is_drafted_back_by_the_global_cache(tiny: LlamaForCausalLM) -> None:
    # given a server that has served this prompt once
    prompt = [3, 1, 4, 1, 5]
    plain = generate(tiny, prompt, max_new_tokens=48)
    cache = SuffixCache()
    cache.add(plain.output_ids)
    # when the prompt comes again, with and without the global cache
    shared = generate(tiny, prompt, proposer=SuffixProposer(cache), k=8, max_new_tokens=48)
    alone = generate(tiny, prompt, proposer=SuffixProposer(), k=8, max_new_tokens=48)
    # then both are plain decoding's output, and the cache's drafts need far fewer verify
    # steps: at most a quarter of plain decoding's, where the request's own tree needs 16
    assert shared.output_ids == alone.output_ids == plain.output_ids
    assert len(alone.steps) == 16 and len(shared.steps) <= len(plain.output_ids) // 4
    assert len(shared.steps[0].proposed) <= 2  # the first match is short, so is its draft


def test_batched_rows_decode_what_generate_gives_them_alone(tiny: LlamaForCausalLM) -> None:
    # given greedy requests over every new proposer, k 1..6 (the prior cost model's
    # table has one row count, so a row decides alone exactly what it decides in a batch)
    rng = random.Random(5)
    cache = SuffixCache()
    cache.add([rng.randrange(VOCAB) for _ in range(60)])
    requests = []
    for i in range(10):
        options = list(proposers(tiny, i, cache).values())
        requests.append(
            dict(
                prompt_ids=[rng.randrange(VOCAB) for _ in range(rng.randint(1, 14))],
                proposer=options[i % len(options)],
                k=rng.randint(1, 6),
                max_new_tokens=rng.randint(1, 30),
            )
        )
    # when they go through a batch of 3 rows
    rows = BatchDecoder(Llama(tiny, rows=3), eos_ids=[0]).decode_all(requests)
    # then each row's output and verify steps equal generate's for it alone (with a fresh
    # proposer built the same way: an adaptive head's prior remembers the batch run)
    for i, (request, row) in enumerate(zip(requests, rows, strict=True)):
        assert row.error is None and row.generation is not None
        options = list(proposers(tiny, i, cache).values())
        request = {**request, "proposer": options[i % len(options)]}
        alone = generate(tiny, eos_ids=[0], **request)  # type: ignore[arg-type]
        assert row.generation.output_ids == alone.output_ids
        assert [(s.proposed, s.accepted) for s in row.generation.steps] == [
            (s.proposed, s.accepted) for s in alone.steps
        ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["suffix+cache", "hybrid"])
def test_sampling_matches_the_model_two_tokens_deep(tiny: LlamaForCausalLM, name: str) -> None:
    prompt = [1, 4, 2]
    with torch.no_grad():
        p1 = torch.softmax(tiny(torch.tensor([prompt])).logits[0, -1], -1)
        joint = torch.zeros(VOCAB, VOCAB)
        for a in range(VOCAB):
            p2 = torch.softmax(tiny(torch.tensor([[*prompt, a]])).logits[0, -1], -1)
            joint[a] = p1[a] * p2
    cache = SuffixCache()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # drafts to propose: sampled continuations of the prompt
        cache.add(
            generate(tiny, prompt, max_new_tokens=4, temperature=1.0, generator=gen).output_ids
        )
    proposer = proposers(tiny, 1, cache)[name]
    counts: dict[int, int] = {}
    n = 3000
    for _ in range(n):
        out = generate(
            tiny,
            prompt,
            proposer=proposer,
            k=3,
            max_new_tokens=2,
            temperature=1.0,
            generator=gen,  # type: ignore[arg-type]
        ).output_ids
        counts[out[0] * VOCAB + out[1]] = counts.get(out[0] * VOCAB + out[1], 0) + 1
    flat = joint.flatten()
    kept = [i for i, p in enumerate(flat) if n * float(p) >= 5]
    stat = sum((counts.get(i, 0) - n * float(flat[i])) ** 2 / (n * float(flat[i])) for i in kept)
    assert stat < 2.5 * len(kept)  # far below what a biased sampler gives on this many cells


# ------------------------------------------------------------------ the rules


class ScriptedHead:
    """A draft head whose s-th chained step puts probability p_s on token t_s (the rest
    spread evenly over a 32-token vocabulary); it counts its logits calls."""

    vocab = 32

    def __init__(self, script: list[tuple[int, float]]) -> None:
        self.script, self.calls = script, 0
        self.config = SimpleNamespace(hidden_size=2, target_vocab_size=self.vocab)
        self.d2t = torch.arange(self.vocab)

    def step1(self, features: Tensor, tokens: Tensor, positions: Tensor, past: object = None):  # type: ignore[no-untyped-def]
        keys = torch.zeros(int(positions[-1]) + 1, 1, 1)
        return torch.zeros(features.shape[0], 1), keys, keys

    def logits(self, g: Tensor) -> Tensor:
        self.calls += 1
        token, p = self.script[int(g[0, 0])]
        probs = torch.full((1, self.vocab), (1 - p) / (self.vocab - 1))
        probs[0, token] = p
        return probs.log()

    def chain(self, g: Tensor, *args: object) -> tuple[Tensor, None, None]:
        return g + 1, None, None


def session(script: list[tuple[int, float]], table=FLAT, step_s=0.0, min_prob=0.3):  # type: ignore[no-untyped-def]
    head = ScriptedHead(script)
    adaptive = Adaptive(VerifyCost(table), draft_step_s=step_s, min_prob=min_prob)
    return head, EagleProposer(head, "scripted", adaptive).start([])  # type: ignore[arg-type]


FEATURE = torch.zeros(1, 6)


def test_the_head_stops_before_a_token_it_doubts() -> None:
    _, s = session([(3, 0.9), (4, 0.8), (5, 0.2), (6, 0.9)], min_prob=0.3)
    proposal = s.propose([1, 2], FEATURE, 4, 0.0, None)
    assert proposal.tokens == [3, 4]
    assert proposal.confidence == pytest.approx([0.9, 0.72])
    assert proposal.probs is None  # greedy and deterministic: lossless at any temperature


def test_the_head_stops_where_one_more_token_would_not_pay() -> None:
    # each extra verified token costs half a 1-token forward: with p = 0.9 per token the
    # expected rate (1 + E_n) / (1 + n / 2) peaks at n = 3 (1.38 against 1.37 at n = 4)
    _, s = session([(7, 0.9)] * 6, table={1: {1: 1.0, 2: 1.5}})
    assert s.propose([1, 2], FEATURE, 6, 0.0, None).tokens == [7, 7, 7]


def test_a_head_that_does_not_pay_drafts_nothing_between_probes() -> None:
    # given a head that drafts one token per step at a cost of 0.5 forwards, always rejected
    _, s = session([(9, 0.99), (9, 0.1)], step_s=0.5)
    tokens, drafted = [1, 2], []
    for _ in range(14):
        proposal = s.propose(tokens, FEATURE, 4, 0.0, None)
        drafted.append(len(proposal.tokens))
        tokens = [*tokens, 0]  # the target's token differs from the draft's: rejected
    # then after the first rejection it skips 1, 2, 4 then 8 steps between probes
    assert drafted == [1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]


def serve_requests(proposer: EagleProposer, steps: int, accept: Callable[[int], bool]) -> list[int]:
    """One request of ``steps`` verify steps with a head always drafting token 9: the
    target commits 9 where ``accept(step)`` (and then the bonus token 0), else 0.
    Returns the tokens drafted per step."""
    s, tokens, drafted = proposer.start([]), [1, 2], []
    for step in range(steps):
        drafted.append(len(s.propose(tokens, FEATURE, 4, 0.0, None).tokens))
        tokens = [*tokens, 9, 0] if drafted[-1] and accept(step) else [*tokens, 0]
    return drafted


def test_a_new_request_starts_from_what_the_head_measured_in_earlier_ones() -> None:
    # given a head that drafts one token per step, always rejected, over several requests
    head = ScriptedHead([(9, 0.99), (9, 0.1)])
    plan = Adaptive(VerifyCost(FLAT), draft_step_s=0.5)
    proposer = EagleProposer(head, "scripted", plan)  # type: ignore[arg-type]
    never = lambda step: False  # noqa: E731
    # the first requests know too little (fewer than 8 drafts scored): each drafts at
    # once and backs off (two probes scored each; the third is never committed)
    assert [serve_requests(proposer, 6, never) for _ in range(4)] == [[1, 0, 1, 0, 0, 1]] * 4
    assert proposer.prior.steps == 8 and proposer.prior.gain < 1
    # then the next starts where they left off: max_skip (16) steps without a draft, then
    # a probe, instead of a failed probe from its first step
    assert serve_requests(proposer, 18, never) == [0] * 16 + [1, 0]
    # and a head without adaptive drafting keeps no prior
    assert EagleProposer(head, "fixed").start([]).prior is None  # type: ignore[arg-type]


def test_a_head_whose_first_drafts_were_rejected_is_not_throttled_for_them() -> None:
    # given a head that pays (a step costs 1.3 forwards: a flat verify and three draft
    # steps of 0.1), whose first two drafts are rejected and every later one accepted
    head = ScriptedHead([(9, 0.99), (9, 0.1)])
    plan = Adaptive(VerifyCost(FLAT), draft_step_s=0.1)
    proposer = EagleProposer(head, "scripted", plan)  # type: ignore[arg-type]
    drafted = serve_requests(proposer, 12, lambda step: step not in (0, 2))
    # (each rejection backs off, 1 then 2 steps; the next probe pays)
    assert drafted == [1, 0, 1, 0, 0] + [1] * 7
    # then its prior is over its drafts (8 scored: 2 * 1 + 6 * 2 tokens for 8 * 1.3
    # forwards), not mostly the first one's, and the next request drafts from its first step
    assert proposer.prior.steps == 8
    assert proposer.prior.gain == pytest.approx(14 / 10.4)
    assert serve_requests(proposer, 4, lambda step: True) == [1] * 4


def test_a_measured_verify_cost_never_falls_with_more_tokens() -> None:
    assert monotone({1: 0.07, 2: 0.13, 3: 0.17, 5: 0.10, 9: 0.12}) == {
        1: 0.07, 2: 0.10, 3: 0.10, 5: 0.10, 9: 0.12
    }  # fmt: skip


def test_throttle_resets_once_a_probe_pays() -> None:
    throttle = Throttle()
    throttle.record(0.5)
    assert [throttle.should_draft() for _ in range(2)] == [False, True]
    throttle.record(3.0)  # the average is back above 1
    assert throttle.gain >= 1 and throttle.backoff == 1 and throttle.should_draft()


def test_hybrid_takes_the_suffix_when_its_score_beats_the_heads_expectation() -> None:
    rival = Draft([5, 6], [0.9, 0.8])  # score 1.7
    # given a head at p = 0.5 per token: after two steps it can reach at most
    # 0.5 + 0.25 + 0.25 * 2 = 1.25 < 1.7, so it stops there and the suffix draft wins
    head, s = session([(3, 0.5)] * 4)
    proposal = s.propose([1, 2], FEATURE, 4, 0.0, None, 1, rival)
    assert proposal.tokens == [5, 6] and head.calls == 2
    # given a confident head (expected 0.95 + 0.90 + 0.86 + 0.81 = 3.52 > 1.7): the head's draft
    _, s = session([(3, 0.95)] * 4)
    assert s.propose([1, 2], FEATURE, 4, 0.0, None, 1, rival).tokens == [3, 3, 3, 3]
    # given no suffix match: the head's draft (0.5 >= min_prob, and a flat verify cost)
    _, s = session([(3, 0.5)] * 4)
    assert s.propose([1, 2], FEATURE, 4, 0.0, None, 1, Draft()).tokens == [3, 3, 3, 3]


def test_the_verify_cost_interpolates_and_picks_the_best_length() -> None:
    cost = VerifyCost({1: {1: 0.04, 5: 0.06}, 4: {1: 0.08, 3: 0.12}})
    assert cost.verify(1, 3) == pytest.approx(0.05)
    assert cost.verify(1, 9) == pytest.approx(0.08)  # extrapolated with the last slope
    assert cost.verify(2, 3) == pytest.approx(0.05)  # the nearest measured size below
    assert cost.verify(8, 2) == pytest.approx(0.10)
    # (1 + E_n) / verify(1, n + 1) for confidences 0.9, 0.5, 0.1
    assert cost.best_length([0.9, 0.5, 0.1], 1) == 2
    assert cost.best_length([0.05], 1) == 0  # 1.05 / 0.045 < 1 / 0.04
    with pytest.raises(ValueError, match="seconds > 0 for 1 token"):
        VerifyCost({1: {2: 0.05}})


def test_observed_verify_forwards_refine_the_measured_cost() -> None:
    # given a table measured at start: 40 ms for 1 token, 50 ms for 5 (cheap extra tokens)
    cost = VerifyCost({1: {1: 0.04, 5: 0.05}})
    assert cost.best_length([0.2, 0.2, 0.2, 0.2], 1) == 4
    # when served 5-token forwards take 80 ms and 1-token ones 40 ms
    cost.observe(1, 5, 0.08)
    cost.observe(1, 1, 0.04)
    # then the 5-token point is at what was observed, 3 tokens between the two points,
    # and the drafts that paid under the table do not any more
    assert cost.verify(1, 5) == pytest.approx(0.08)
    assert cost.verify(1, 3) == pytest.approx(0.045 * (1.0 + 1.6) / 2)
    assert cost.best_length([0.2, 0.2, 0.2, 0.2], 1) == 0  # (1 + 0.8) / 0.08 < 1 / 0.04
    assert cost.seconds() == {1: {1: pytest.approx(0.04), 5: pytest.approx(0.08)}}
    # and later forwards move it as a moving average, one outlier by at most 2x
    for _ in range(200):
        cost.observe(1, 5, 0.06)
    assert cost.verify(1, 5) == pytest.approx(0.06, rel=0.01)
    cost.observe(1, 5, 60.0)  # a 60 s stall
    assert cost.verify(1, 5) == pytest.approx(0.06 * (1 + VerifyCost.OBSERVE_WEIGHT), rel=0.01)
    # and a point never observed follows its nearest observed neighbour (other row
    # counts, measured separately, are untouched), and a new measurement starts again
    wide = VerifyCost({1: {1: 0.04, 5: 0.05, 9: 0.06}, 4: {1: 0.08}})
    wide.observe(1, 5, 0.1)
    assert wide.verify(1, 9) == pytest.approx(0.12) and wide.verify(1, 1) == pytest.approx(0.08)
    assert wide.verify(4, 1) == pytest.approx(0.08)
    wide.update({1: {1: 0.04, 5: 0.05}})
    assert wide.verify(1, 5) == pytest.approx(0.05)
    # and nonsense observations are ignored
    wide.observe(1, 0, 0.1)
    wide.observe(1, 2, 0.0)
    assert wide.scale == {}


def test_the_engine_times_every_verify_forward_into_the_cost(tiny: LlamaForCausalLM) -> None:
    # given a suffix proposer deciding with a cost model, alone and in a batch
    cost = VerifyCost({1: {1: 1e-9, 17: 1e-9}})  # a table far below any real forward
    alone = generate(
        tiny, [3, 1, 4], proposer=SuffixProposer(cost=cost), k=4, max_new_tokens=12, cost=cost
    )
    # then each verify forward was observed once, and the costs now exceed the table's
    assert sum(n for _, n in cost.scale[1].values()) == len(alone.steps)
    assert cost.verify(1, 1) > 1e-9
    batched = VerifyCost({1: {1: 1e-9}, 2: {1: 1e-9, 17: 1e-9}})
    decoder = BatchDecoder(Llama(tiny, rows=2), cost=batched)
    requests = [dict(prompt_ids=[3, 1, 4], proposer=None, k=0, max_new_tokens=6)] * 2
    decoder.decode_all(requests)
    # (both rows decode every step together: each step is one 2-row forward, observed once)
    assert decoder.steps > 0 and decoder.row_steps == 2 * decoder.steps
    assert {t: n for t, (_, n) in batched.scale[2].items()} == {1: decoder.steps}


def test_a_head_that_expected_too_much_trusts_its_probabilities_less() -> None:
    # given a head at p = 0.9 per token under a steep verify cost: it first drafts 3
    _, s = session([(7, 0.9)] * 6, table={1: {1: 1.0, 2: 1.5}})
    assert s.propose([1, 2], FEATURE, 6, 0.0, None).tokens == [7, 7, 7]
    # when only 1 of the 3 is accepted (it expected 0.9 + 0.81 + 0.73 = 2.44): the step
    # did not pay (a skipped step follows), and its calibration falls to 0.5 + 0.5 / 2.44
    assert s.propose([1, 2, 7, 0], FEATURE, 6, 0.0, None).tokens == []
    assert s.throttle.calibration == pytest.approx(0.5 + 0.5 / 2.439)
    # then the next probe drafts 2: scaled by 0.705 the third token no longer pays
    assert s.propose([1, 2, 7, 0, 0], FEATURE, 6, 0.0, None).tokens == [7, 7]


def test_hybrid_skips_the_head_when_the_suffix_beats_what_the_head_delivered() -> None:
    head, s = session([(3, 0.9)] * 4)
    # the head outbids a weak suffix draft and drafts 4 tokens, of which 1 is accepted
    assert s.propose([1, 2], FEATURE, 4, 0.0, None, 1, Draft([5], [0.5])).tokens == [3] * 4
    calls = head.calls
    # a suffix draft scoring 2.0 beats the 1 token the head delivered: the head is not run
    rival = Draft([5, 6], [1.0, 1.0])
    assert s.propose([1, 2, 3, 0], FEATURE, 4, 0.0, None, 1, rival).tokens == [5, 6]
    assert head.calls == calls and s.throttle.accepted == 1.0


def test_suffix_drafts_the_target_keeps_rejecting_are_trusted_less_until_none_pays() -> None:
    # Given a prompt that repeats "1 2 3" and a verify step costing 1.0 for 1 token and
    # 1.3 for 2: one draft token pays when its (calibrated) probability is above 0.3
    cost = VerifyCost({1: {1: 1.0, 2: 1.3}})
    s = SuffixProposer(cost=cost).start([1, 2, 3, 1, 2, 3, 1, 2])
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    proposed = [s.propose(tokens, None, 1, 0.0, None).tokens]
    assert proposed == [[3]] and s.trust == 1.0  # the tree says 3 follows "1 2"
    # When the target answers something else every time ("1 2" follows again, so the
    # tree keeps drafting 3, and each draft is scored against what was committed)
    raw = []
    for i in range(6):
        assert s.last is not None
        raw.append(s.last[1].probs[0])
        tokens = [*tokens, 100 + i, 1, 2]
        proposed.append(s.propose(tokens, None, 1, 0.0, None).tokens)
    # Then trust is delivered over promised tokens, from a prior of 2 delivered as promised
    assert s.delivered == 2.0 and s.promised == pytest.approx(2.0 + sum(raw))
    assert s.trust == pytest.approx(2.0 / (2.0 + sum(raw)))
    # and once trust times the draft's probability is below 0.3 nothing is proposed
    assert s.last is not None and s.trust * s.last[1].probs[0] < 0.3
    assert proposed[-1] == [] and proposed[:2] == [[3], [3]]
    # and the next request starts from what the drafts delivered so far, server-wide
    # (0 of sum(raw) promised tokens, decayed), not from full trust
    proposer = s.proposer
    assert proposer.prior.delivered == 0.0 and proposer.prior.trust == 0.0
    again = proposer.start([1, 2, 3, 1, 2, 3, 1, 2])
    assert again.trust == 0.0 and again.propose(tokens, None, 1, 0.0, None).tokens == []
    # while a proposer with no history starts at full trust
    assert SuffixProposer(cost=cost).start([1, 2]).trust == 1.0


def test_a_suffix_draft_is_scored_only_where_committed_tokens_decide_it() -> None:
    s = SuffixProposer().start([5, 6, 7, 8, 5, 6])
    tokens = [5, 6, 7, 8, 5, 6]
    draft = s.draft(tokens, 2)
    assert draft.tokens == [7, 8] and draft.probs == [1.0, 1.0]
    # when only one token is committed after it (the head's draft was proposed and
    # rejected at once, say) and it matches: 1 delivered of 1 promised, the rest unknown
    s.draft([*tokens, 7], 2)
    assert (s.delivered, s.promised) == (3.0, 3.0)
    # when the next draft's first token is wrong: 0 delivered of its first probability
    last = s.last
    assert last is not None
    s.draft([*tokens, 7, 0, 0], 2)
    assert s.delivered == 3.0 and s.promised == pytest.approx(3.0 + sum(last[1].probs[:2]))
    # and a calibrated draft's probabilities are scaled by trust
    assert s.trust < 1.0


def test_suffix_drafts_reach_their_own_length_and_the_hybrids_head_keeps_k() -> None:
    # Given a suffix proposer reaching 16 tokens and a scripted head at p = 0.95
    suffix = SuffixProposer(cost=VerifyCost(FLAT), spec_tokens=16)
    head = ScriptedHead([(3, 0.95)] * 16)
    learned = EagleProposer(head, "h", Adaptive(VerifyCost(FLAT)))  # type: ignore[arg-type]
    hybrid = HybridProposer(suffix, learned, head_tokens=4)
    # Then decoding uses the proposer's reach in place of the caller's k, k = 0 stays off,
    # and a head or no proposer keeps the caller's k
    assert draft_length(suffix, 4) == draft_length(hybrid, 4) == 16
    assert draft_length(suffix, 0) == 0
    assert draft_length(learned, 4) == 4 and draft_length(None, 4) == 4
    # When a request repeats a 20-token run (its own tree holds it; a 16-token match
    # drafts up to 16)
    run = list(range(40, 60))
    tokens = run + run[:16]
    # Then the suffix draft goes up to 16 tokens, and within the hybrid the head (whose
    # expectation, at most 4 tokens, loses to the suffix's 16) drafts at most 4
    assert suffix.start(tokens).propose(tokens, None, 16, 0.0, None).tokens == (run + run)[16:32]
    s = hybrid.start(tokens)
    assert s.propose(tokens, FEATURE, 16, 0.0, None).tokens == (run + run)[16:32]
    calls = head.calls
    s = hybrid.start([1, 2])  # no suffix match: the head's draft, capped at 4
    assert s.propose([1, 2], FEATURE, 16, 0.0, None).tokens == [3, 3, 3, 3]
    assert head.calls - calls == 4
    with pytest.raises(ValueError, match="spec_tokens=0"):
        SuffixProposer(spec_tokens=0)
