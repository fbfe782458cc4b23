"""The suffix tree and the server's global suffix cache: counts equal brute force after
any sequence of updates, drafts equal a brute-force reference, memory stays under the
cap (estimated and measured), and malformed or oversized input changes nothing."""

from __future__ import annotations

import contextlib
import gc
import random
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aurora.runtime import suffix as suffix_module
from aurora.runtime.suffix import MAX_TOKEN_ID, Draft, SuffixCache, SuffixTree

pytestmark = pytest.mark.unit


def _occurrences(sequences: Sequence[Sequence[int]], string: tuple[int, ...]) -> int:
    n = len(string)
    return sum(
        1 for seq in sequences for i in range(len(seq) - n + 1) if tuple(seq[i : i + n]) == string
    )


def reference_speculate(
    sequences: Sequence[Sequence[int]],
    depth: int,
    context: Sequence[int],
    max_tokens: int,
    *,
    factor: float = 1.0,
    offset: float = 0.0,
    min_prob: float = 0.1,
    exclude_self: bool = False,
) -> Draft:
    """SuffixTree.speculate by counting substrings directly (the specification)."""
    alphabet = sorted({t for seq in sequences for t in seq})
    best = Draft()
    for m in range(min(len(context), depth - 1), 0, -1):
        matched = tuple(context[len(context) - m :])
        if _occurrences(sequences, matched) == 0:
            continue
        cap = min(max_tokens, int(m * factor + offset), depth - m)
        draft, current, prob, own = Draft(match_len=m), matched, 1.0, int(exclude_self)
        while len(draft.tokens) < cap:
            counts = {t: _occurrences(sequences, (*current, t)) for t in alphabet}
            counts = {t: c for t, c in counts.items() if c}
            if not counts:
                break
            token = max(counts, key=lambda t: (counts[t], -t))
            total = _occurrences(sequences, current) - own
            own = 0
            if total <= 0 or prob * counts[token] / total < min_prob:
                break
            prob *= counts[token] / total
            draft.tokens.append(token)
            draft.probs.append(prob)
            current = (*current, token)
        if draft.score > best.score:
            best = draft
    return best


# ------------------------------------------------------------------ tree updates

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("extend"),
            st.integers(0, 3),
            st.lists(st.integers(0, 3), max_size=9),
        ),
        st.tuples(st.just("remove"), st.integers(0, 3), st.just([])),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.integers(2, 7), ops=operations)
def test_counts_equal_brute_force_after_any_extends_and_removes(
    depth: int, ops: list[tuple[str, int, list[int]]]
) -> None:
    tree, held = SuffixTree(depth), {}
    for op, seq_id, tokens in ops:
        if op == "extend":
            tree.extend(seq_id, tokens)
            held.setdefault(seq_id, []).extend(tokens)
        elif seq_id in held:
            tree.remove(seq_id)
            del held[seq_id]
        else:
            with pytest.raises(KeyError):
                tree.remove(seq_id)
        tree.check()  # every count equals a brute-force count; counters exact
    assert {k: list(v) for k, v in tree.sequences.items()} == held


def test_extending_token_by_token_builds_the_same_tree_as_all_at_once() -> None:
    rng = random.Random(0)
    seq = [rng.randrange(3) for _ in range(60)]
    whole, grown = SuffixTree(6), SuffixTree(6)
    whole.extend(0, seq)
    for i in range(0, len(seq), 7):
        grown.extend(0, seq[i : i + 7])
    for tree in (whole, grown):
        tree.check()
    assert (whole.nodes, whole.leaves) == (grown.nodes, grown.leaves)


# ------------------------------------------------------------------ drafting


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(2, 8),
    sequences=st.lists(st.lists(st.integers(0, 3), max_size=14), min_size=1, max_size=4),
    context=st.lists(st.integers(0, 4), max_size=8),
    max_tokens=st.integers(0, 6),
    factor=st.sampled_from([0.5, 1.0, 2.0]),
    min_prob=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_drafts_equal_the_brute_force_reference(
    depth: int,
    sequences: list[list[int]],
    context: list[int],
    max_tokens: int,
    factor: float,
    min_prob: float,
) -> None:
    tree = SuffixTree(depth)
    for i, seq in enumerate(sequences):
        tree.extend(i, seq)
    got = tree.speculate(context, max_tokens, factor=factor, min_prob=min_prob)
    want = reference_speculate(
        sequences, depth, context, max_tokens, factor=factor, min_prob=min_prob
    )
    assert (got.tokens, got.match_len) == (want.tokens, want.match_len if want.tokens else 0)
    assert got.probs == pytest.approx(want.probs)


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 3), min_size=1, max_size=24), depth=st.integers(2, 8))
def test_a_requests_own_tree_never_counts_the_context_itself(seq: list[int], depth: int) -> None:
    tree = SuffixTree(depth)
    tree.extend(0, seq)
    got = tree.speculate(seq, 6, exclude_self=True)
    want = reference_speculate([seq], depth, seq, 6, exclude_self=True)
    assert got.tokens == want.tokens
    assert got.probs == pytest.approx(want.probs)


def test_a_longer_match_drafts_further_and_the_most_frequent_continuation_wins() -> None:
    tree = SuffixTree(16)
    tree.extend(0, [7, 1, 2, 3, 4, 5, 6])
    tree.extend(1, [1, 2, 9])
    tree.extend(2, [8, 2, 9])
    short = tree.speculate([2], 8)  # match 1: one token, "9" follows "2" twice out of three
    assert short.tokens == [9] and short.probs == pytest.approx([2 / 3])
    long = tree.speculate([7, 1, 2], 8)  # match 3: up to three tokens
    assert long.tokens == [3, 4, 5] and long.match_len == 3 and long.probs == [1.0, 1.0, 1.0]
    assert tree.speculate([7, 1, 2], 8, factor=2.0).tokens == [3, 4, 5, 6]
    assert tree.speculate([7, 1, 2], 2).tokens == [3, 4]
    assert tree.speculate([0, 9], 8).tokens == []  # "9" ends every sequence it is in


def test_the_running_probability_stops_the_draft_below_min_prob() -> None:
    tree = SuffixTree(8)
    for i, tail in enumerate([[3, 4], [3, 5], [3, 6], [7, 8]]):
        tree.extend(i, [1, 2, *tail])
    draft = tree.speculate([1, 2], 4, min_prob=0.5)
    assert draft.tokens == [3] and draft.probs == pytest.approx([0.75])
    assert tree.speculate([1, 2], 4, min_prob=0.2).tokens == [3, 4]  # 0.75 * 1/3 = 0.25


# ------------------------------------------------------------------ the global cache


def _measured_bytes(build) -> tuple[int, object]:  # type: ignore[no-untyped-def]
    """The bytes still held after ``build()`` that were allocated by runtime/suffix.py's own
    lines: other threads left running by earlier tests in the same process (servers, Redis
    clients) allocate meanwhile, and a whole-process count charged them to the tree."""
    gc.collect()
    tracemalloc.start()
    try:
        held = build()
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    own = snapshot.filter_traces([tracemalloc.Filter(True, suffix_module.__file__)])
    return sum(stat.size for stat in own.statistics("filename")), held


WORKLOADS = {
    "novel text, large vocabulary": lambda rng: [rng.randrange(49152) for _ in range(120)],
    "four-token vocabulary": lambda rng: [rng.randrange(4) for _ in range(120)],
    "a phrase repeated": lambda rng: [rng.randrange(49152) for _ in range(5)] * 24,
    "zipf-distributed tokens": lambda rng: [
        int(rng.paretovariate(1.0)) % 49152 for _ in range(120)
    ],
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_memory_stays_under_the_cap_measured_by_tracemalloc(workload: str) -> None:
    cap = 150_000
    rng = random.Random(1)
    outputs = [WORKLOADS[workload](rng) for _ in range(60)]

    def build() -> SuffixCache:
        cache = SuffixCache(cap, max_depth=24)
        for output in outputs:
            cache.add(output)
            assert cache.estimated_bytes() <= cap  # after every update
        return cache

    used, cache = _measured_bytes(build)
    assert isinstance(cache, SuffixCache)
    assert used <= cache.estimated_bytes() <= cap
    assert cache.evicted > 0 and cache.requests + cache.evicted == 60
    cache.tree.check()


def test_the_least_recently_used_output_is_evicted_first() -> None:
    rng = random.Random(2)
    outputs = [[rng.randrange(1000, 49152) for _ in range(50)] for _ in range(4)]
    probe = SuffixCache(10**9)
    for output in outputs[:3]:
        probe.add(output)
    cap = probe.estimated_bytes() + 100  # room for three outputs, not four
    cache = SuffixCache(cap)
    for output in outputs[:3]:
        cache.add(output)
    # Draft from the oldest output: it becomes the most recently used.
    assert cache.speculate(outputs[0][10:14], 4).tokens == outputs[0][14:18]
    cache.add(outputs[3])
    assert cache.speculate(outputs[0][10:14], 4).tokens == outputs[0][14:18]  # kept
    assert cache.speculate(outputs[1][10:14], 4).tokens == []  # evicted instead
    assert cache.requests == 3 and cache.evicted == 1


BAD_TOKENS = [-1, MAX_TOKEN_ID + 1, 2**70, 1.5, "7", None, True, [1]]


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=repr)
def test_a_malformed_output_is_refused_and_changes_nothing(bad: object) -> None:
    cache = SuffixCache(10**7)
    cache.add([1, 2, 3, 4, 5])
    before = (cache.tree.nodes, cache.tree.leaves, cache.tree.tokens, cache.requests)
    with pytest.raises(ValueError, match="token ids must be integers"):
        cache.add([1, 2, bad, 4])  # type: ignore[list-item]
    assert (cache.tree.nodes, cache.tree.leaves, cache.tree.tokens, cache.requests) == before
    cache.tree.check()
    assert cache.speculate([1, 2, 3], 2).tokens == [4, 5]


def test_an_oversized_output_is_cut_and_one_over_the_cap_alone_is_not_kept() -> None:
    cache = SuffixCache(10**8, max_request_tokens=100)
    assert cache.add(list(range(1000)))
    assert cache.tree.tokens == 100
    small = SuffixCache(5_000)
    small.add([1, 2, 3])
    assert not small.add(list(range(1000, 1100)))  # alone over 5 kB
    assert small.requests == 0 and small.estimated_bytes() == 0
    small.tree.check()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    outputs=st.lists(
        st.one_of(
            st.lists(st.integers(0, 5), max_size=40),
            st.lists(st.one_of(st.integers(-5, 5), st.none(), st.floats()), max_size=10),
            st.lists(st.integers(0, MAX_TOKEN_ID + 5), max_size=10),
        ),
        max_size=25,
    ),
    cap=st.integers(0, 60_000),
)
def test_fuzzed_updates_keep_the_cache_consistent_and_under_its_cap(
    outputs: list[list[object]], cap: int
) -> None:
    cache = SuffixCache(cap, max_depth=6, max_request_tokens=30)
    for output in outputs:
        with contextlib.suppress(ValueError):  # malformed: refused, nothing changed
            cache.add(output)  # type: ignore[arg-type]
        assert cache.estimated_bytes() <= cap
    cache.tree.check()
    assert list(cache.tree.sequences) == list(cache._order)
