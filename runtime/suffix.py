"""Suffix decoding (SuffixDecoding, arXiv 2411.04975): model-free drafts from suffix
trees, one over the request's own tokens (its prompt and its output so far) and one,
shared by the server, over the outputs it has already served.

``SuffixTree``: a suffix trie over several token sequences, bounded in depth, whose node
for a string u counts u's occurrences. A string that occurs once is not materialised: its
subtree is a leaf, a pointer (sequence, position) into the stored tokens, expanded
("burst") when a second occurrence arrives. Memory grows with the number of tokens and
with the repeated structure, not with depth x tokens.

Drafting (``speculate``): every suffix of the context found in the tree, of match length
m, proposes a walk down the most frequent child, as long as the running probability
(the product of child count over parent count) stays at or above ``min_prob``, at most
``min(max_tokens, m * factor + offset)`` tokens: a longer match drafts further. The draft
with the highest score (the sum of the running probabilities: how many tokens the target
is expected to accept) wins; on a tie the longer match.

``SuffixCache``: the server's global tree. It learns from every finished request's output,
at once, and holds them under a memory cap, evicting the least recently used output
first (a draft read from an output counts as a use).

Why not ``arctic-inference`` (whose C++ tree this follows): see the README's "Suffix
decoding" section; it has no memory cap (a request count, first in first out), its source
build needs a C++ tool chain and a PyTorch download, and it imports numpy undeclared.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from aurora.runtime.cost import VerifyCost
from aurora.runtime.draft import EagleProposer, EagleSession, Proposal
from aurora.runtime.protocol import Builtin, hybrid_revision

MAX_TOKEN_ID = 2**31 - 1  # tokens are stored as C ints
# A request's drafts start trusted as if this many tokens had been delivered as scored.
CALIBRATION_PRIOR = 2.0
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1

# Upper bounds of the Python memory behind each counted thing (CPython 3.11+, 64-bit),
# checked against tracemalloc by tests/unit/test_suffix.py: a node object with its
# children dict and the dict slot holding it; a leaf (an int in a dict slot, its key an
# int); a stored token (4 bytes in an array); a stored sequence (its array and its entries).
NODE_BYTES = 400
LEAF_BYTES = 160
TOKEN_BYTES = 4
SEQUENCE_BYTES = 300


def checked_tokens(tokens: Sequence[int]) -> array:
    """The tokens as a C int array; ValueError naming the first bad one (not an int, or
    outside 0..2**31-1). Nothing is changed anywhere when this raises."""
    out = array("i")
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
            raise ValueError(
                f"token {i} is {token!r}: token ids must be integers from 0 to {MAX_TOKEN_ID}"
            )
        out.append(token)
    return out


@dataclass
class Draft:
    """Draft tokens with the running probability after each (non-increasing), the match
    length they continue, and the stored sequence they were read from (when one)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    match_len: int = 0
    source: int | None = None

    @property
    def score(self) -> float:
        """Expected accepted tokens: the sum of the running probabilities."""
        return sum(self.probs)


class _Node:
    __slots__ = ("children", "count")

    def __init__(self, count: int) -> None:
        self.count = count
        # token -> child node, or a leaf: (sequence id << 32) | position of that token
        self.children: dict[int, _Node | int] = {}


def _frequency(item: tuple[int, _Node | int]) -> tuple[int, int]:
    """Order of children when drafting: the most frequent, then the smallest token id."""
    token, child = item
    return (1 if type(child) is int else child.count, -token)  # type: ignore[union-attr]


class SuffixTree:
    """Suffix trie of token sequences, nodes up to ``max_depth`` tokens deep."""

    def __init__(self, max_depth: int = 32) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth={max_depth}: use at least 2 (a match and a draft token)")
        self.max_depth = max_depth
        self.root = _Node(0)
        self.sequences: dict[int, array] = {}
        self.nodes = 0  # explicit nodes, the root excluded
        self.leaves = 0
        self.tokens = 0  # stored, in all sequences

    # -- size ------------------------------------------------------------------

    def estimated_bytes(self) -> int:
        """An upper bound of the memory the tree holds (see NODE_BYTES and friends)."""
        return (
            self.nodes * NODE_BYTES
            + self.leaves * LEAF_BYTES
            + self.tokens * TOKEN_BYTES
            + len(self.sequences) * SEQUENCE_BYTES
        )

    # -- updates ---------------------------------------------------------------

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to sequence ``seq_id`` (a new sequence when unknown)."""
        if not 0 <= seq_id < 2**31:
            raise ValueError(f"seq_id={seq_id}: use 0 to 2**31-1")
        new = checked_tokens(tokens)
        seq = self.sequences.get(seq_id)
        self.tokens += len(new)
        if seq is None:  # every suffix at once: each walks until it leaves the repeated part
            self.sequences[seq_id] = seq = new
            for start in range(len(seq)):
                self._count(seq_id, seq, start, start, min(len(seq), start + self.max_depth))
            return
        for token in new:  # the suffixes ending at the new token grow by it, one token at a time
            seq.append(token)
            p = len(seq) - 1
            for start in range(max(0, p - self.max_depth + 1), p + 1):
                node = self._counted(seq, start, p)
                if node is not None:
                    self._count(seq_id, seq, start, p, p + 1, node)

    def _counted(self, seq: array, start: int, end: int) -> _Node | None:
        """The node of seq[start:end], already counted; None when the path enters a leaf
        (that leaf is this very occurrence, and it grows with its sequence)."""
        node = self.root
        for j in range(start, end):
            child = node.children[seq[j]]
            if type(child) is int:
                return None
            node = child  # type: ignore[assignment]
        return node

    def _count(
        self, seq_id: int, seq: array, start: int, j: int, end: int, node: _Node | None = None
    ) -> None:
        """Count one more occurrence of seq[start:end] whose first j - start tokens are
        counted already, ending at ``node`` (the root when j == start)."""
        node = node or self.root
        while j < end:
            token = seq[j]
            child = node.children.get(token)
            if child is None:
                node.children[token] = (seq_id << _POS_BITS) | j
                self.leaves += 1
                return
            if type(child) is int:
                child = self._burst(node, token, child, j - start + 1)
            child.count += 1  # type: ignore[union-attr]
            node = child  # type: ignore[assignment]
            j += 1

    def _burst(self, parent: _Node, token: int, leaf: int, depth: int) -> _Node:
        """Materialise a leaf at ``depth`` as a node counting its one occurrence, whose
        continuation becomes a leaf one level down."""
        seq_id, pos = leaf >> _POS_BITS, leaf & _POS_MASK
        node = _Node(1)
        parent.children[token] = node
        self.nodes += 1
        self.leaves -= 1
        seq = self.sequences[seq_id]
        if depth < self.max_depth and pos + 1 < len(seq):
            node.children[seq[pos + 1]] = leaf + 1
            self.leaves += 1
        return node

    def remove(self, seq_id: int) -> None:
        """Forget a sequence: every occurrence it contributed is uncounted."""
        seq = self.sequences.get(seq_id)
        if seq is None:
            raise KeyError(f"sequence {seq_id} is not in the tree")
        for start in range(len(seq)):
            node, end = self.root, min(len(seq), start + self.max_depth)
            for j in range(start, end):
                token = seq[j]
                child = node.children[token]
                if type(child) is int:
                    if child != (seq_id << _POS_BITS) | j:
                        raise RuntimeError(
                            f"suffix tree corrupt: leaf {child} at sequence {seq_id}"
                        )
                    del node.children[token]
                    self.leaves -= 1
                    break
                child.count -= 1  # type: ignore[union-attr]
                if child.count == 0:  # type: ignore[union-attr]
                    del node.children[token]
                    self._drop(child)  # type: ignore[arg-type]
                    break
                node = child  # type: ignore[assignment]
        del self.sequences[seq_id]
        self.tokens -= len(seq)

    def _drop(self, node: _Node) -> None:
        """Uncount a detached subtree: every node and leaf in it."""
        stack = [node]
        while stack:
            current = stack.pop()
            self.nodes -= 1
            for child in current.children.values():
                if type(child) is int:
                    self.leaves -= 1
                else:
                    stack.append(child)  # type: ignore[arg-type]

    # -- drafting --------------------------------------------------------------

    def speculate(
        self,
        context: Sequence[int],
        max_tokens: int,
        *,
        factor: float = 1.0,
        offset: float = 0.0,
        min_prob: float = 0.1,
        exclude_self: bool = False,
    ) -> Draft:
        """The best draft continuing ``context`` (see the module doc). ``exclude_self``:
        the context is the end of a sequence in this tree (a request's own tree), so
        each matched string's last occurrence is the context itself, which has no
        continuation and is not counted."""
        best = Draft()
        n = len(context)
        for m in range(min(n, self.max_depth - 1), 0, -1):  # match length, longest first
            cap = min(max_tokens, int(m * factor + offset), self.max_depth - m)
            if cap <= best.score:  # a score is at most its token count: cannot win
                continue
            found = self._find(context, n - m)
            if found is None:
                continue
            draft = self._walk(found, cap, min_prob, exclude_self)
            if draft.score > best.score:
                draft.match_len, best = m, draft
        return best

    def _find(self, context: Sequence[int], start: int) -> _Node | tuple[int, int] | None:
        """Where context[start:] ends in the tree: a node, or (sequence, position) inside
        a leaf's path; None when it does not occur."""
        node = self.root
        for j in range(start, len(context)):
            child = node.children.get(context[j])
            if child is None:
                return None
            if type(child) is int:
                seq_id, pos = child >> _POS_BITS, child & _POS_MASK
                seq, rest = self.sequences[seq_id], len(context) - j - 1
                if list(seq[pos + 1 : pos + 1 + rest]) != list(context[j + 1 :]):
                    return None
                return seq_id, pos + rest
            node = child  # type: ignore[assignment]
        return node

    def _walk(
        self, at: _Node | tuple[int, int], cap: int, min_prob: float, exclude_self: bool
    ) -> Draft:
        draft = Draft()
        prob = 1.0
        if isinstance(at, _Node):
            node, own = at, 1 if exclude_self else 0
            at = None  # type: ignore[assignment]
            while len(draft.tokens) < cap and node.children:
                token, child = max(node.children.items(), key=_frequency)
                count = 1 if type(child) is int else child.count  # type: ignore[union-attr]
                total, own = node.count - own, 0
                if total <= 0 or prob * count / total < min_prob:
                    return draft
                prob *= count / total
                draft.tokens.append(token)
                draft.probs.append(prob)
                if type(child) is int:
                    at = (child >> _POS_BITS, child & _POS_MASK)
                    break
                node = child  # type: ignore[assignment]
            if at is None:
                return draft
        seq_id, pos = at  # type: ignore[misc]
        seq = self.sequences[seq_id]  # a single occurrence: every further token has ratio 1
        more = list(seq[pos + 1 : pos + 1 + cap - len(draft.tokens)])
        if more:
            draft.tokens.extend(more)
            draft.probs.extend([prob] * len(more))
            draft.source = seq_id
        return draft

    # -- checks ----------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError unless every count equals a brute-force count over the
        stored sequences and the size counters are right (tests and fuzzing)."""
        expected: dict[tuple[int, ...], int] = {}
        for seq in self.sequences.values():
            for start in range(len(seq)):
                for end in range(start + 1, min(len(seq), start + self.max_depth) + 1):
                    key = tuple(seq[start:end])
                    expected[key] = expected.get(key, 0) + 1
        nodes = leaves = 0
        stack: list[tuple[tuple[int, ...], _Node]] = [((), self.root)]
        seen: set[tuple[int, ...]] = set()
        while stack:
            prefix, node = stack.pop()
            for token, child in node.children.items():
                path = (*prefix, token)
                if type(child) is int:
                    leaves += 1
                    seq_id, pos = child >> _POS_BITS, child & _POS_MASK
                    seq = self.sequences[seq_id]
                    assert seq[pos] == token, f"leaf {path} points at another token"
                    tail = tuple(seq[pos + 1 : pos + 1 + self.max_depth - len(path)])
                    for i in range(len(tail) + 1):
                        full = path + tail[:i]
                        assert expected.get(full) == 1, (
                            f"leaf path {full} occurs {expected.get(full)}x"
                        )
                        seen.add(full)
                else:
                    nodes += 1
                    assert child.count == expected.get(path), (  # type: ignore[union-attr]
                        f"node {path} counts {child.count}, occurs {expected.get(path)}x"  # type: ignore[union-attr]
                    )
                    seen.add(path)
                    stack.append((path, child))  # type: ignore[arg-type]
        assert seen == set(expected), f"{len(set(expected) - seen)} strings missing from the tree"
        assert (nodes, leaves) == (self.nodes, self.leaves), "node or leaf counters are off"
        assert self.tokens == sum(map(len, self.sequences.values())), "token counter is off"


class SuffixCache:
    """The server's global suffix tree over served outputs, least recently used first out,
    under ``max_bytes`` (``SuffixTree.estimated_bytes``) after every update. Thread-safe."""

    def __init__(
        self, max_bytes: int = 64 << 20, *, max_depth: int = 32, max_request_tokens: int = 4096
    ) -> None:
        if max_bytes < 0 or max_request_tokens < 1:
            raise ValueError(
                f"max_bytes={max_bytes}, max_request_tokens={max_request_tokens}: "
                "use max_bytes >= 0 and max_request_tokens >= 1"
            )
        self.max_bytes, self.max_request_tokens = max_bytes, max_request_tokens
        self.tree = SuffixTree(max_depth)
        self._order: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._next_id = 0
        self._lock = threading.Lock()
        self.added = self.evicted = 0

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    @property
    def requests(self) -> int:
        return len(self._order)

    def estimated_bytes(self) -> int:
        with self._lock:
            return self.tree.estimated_bytes()

    def add(self, output_ids: Sequence[int]) -> bool:
        """Learn a finished request's output (its first ``max_request_tokens`` tokens).
        Returns whether it is held; ValueError, before any change, on a token that is
        not an id. Older outputs are evicted to stay under the cap; an output that
        alone exceeds it is not kept."""
        tokens = checked_tokens(output_ids[: self.max_request_tokens])
        if not tokens:
            return False
        with self._lock:
            seq_id = self._next_id
            self._next_id = (self._next_id + 1) % 2**31
            if seq_id in self._order:  # wrapped around onto a held output: drop it first
                self._evict(seq_id)
            self.tree.extend(seq_id, tokens)
            self._order[seq_id] = None
            self.added += 1
            while self.tree.estimated_bytes() > self.max_bytes:
                self._evict(next(iter(self._order)))
            return seq_id in self._order

    def _evict(self, seq_id: int) -> None:
        self.tree.remove(seq_id)
        del self._order[seq_id]
        self.evicted += 1

    def speculate(self, context: Sequence[int], max_tokens: int, **options: float) -> Draft:
        """``SuffixTree.speculate`` over the served outputs; marks the output a draft
        was read from as recently used."""
        with self._lock:
            draft = self.tree.speculate(context, max_tokens, **options)  # type: ignore[arg-type]
            if draft.source is not None and draft.source in self._order:
                self._order.move_to_end(draft.source)
            return draft


# ---------------------------------------------------------------------------- proposers


@dataclass(frozen=True)
class SuffixConfig:
    """How suffix drafts are read (the defaults of vLLM's suffix method, depth aside):
    a match of m tokens drafts at most ``m * factor + offset`` tokens, and a draft stops
    where its running probability falls below ``min_prob``. A request's own tree holds
    its last ``max_prompt_tokens`` prompt tokens and everything it generates."""

    max_depth: int = 32
    factor: float = 1.0
    offset: float = 0.0
    min_prob: float = 0.1
    max_prompt_tokens: int = 8192


@dataclass
class TrustPrior:
    """Tokens a proposer's drafts delivered and promised over every request it served,
    decayed by ``decay`` per scored draft (a memory of about 1 / (1 - decay) drafts). A
    new request's calibration starts from their ratio instead of from trust 1, so on
    traffic where suffix drafts keep being rejected (chat) a request does not pay for
    its first rejected drafts again."""

    delivered: float = 0.0
    promised: float = 0.0
    decay: float = 0.99

    def record(self, delivered: float, promised: float) -> None:
        self.delivered = self.decay * self.delivered + delivered
        self.promised = self.decay * self.promised + promised

    @property
    def trust(self) -> float:
        return min(self.delivered / self.promised, 1.0) if self.promised > 0 else 1.0


class SuffixProposer:
    """Suffix decoding: per verify step, the better-scored draft of the request's own
    tree and the server's global cache. Model-free and deterministic. With ``cost``,
    the draft is cut where the expected rate peaks (``VerifyCost.best_length``).

    ``spec_tokens``: the most tokens it drafts per step in place of the caller's k
    (``engine.draft_length``); suffix decoding drafts further than a head on a long
    match, and the cost model cuts a draft to what pays. None: the caller's k."""

    needs_features = False

    def __init__(
        self,
        cache: SuffixCache | None = None,
        *,
        revision: str = Builtin.SUFFIX,
        cost: VerifyCost | None = None,
        config: SuffixConfig | None = None,
        spec_tokens: int | None = None,
    ) -> None:
        if spec_tokens is not None and spec_tokens < 1:
            raise ValueError(f"spec_tokens={spec_tokens}: use at least 1, or None for k")
        self.cache, self.revision, self.cost = cache, revision, cost
        self.config = config or SuffixConfig(max_depth=cache.max_depth if cache else 32)
        self.spec_tokens = spec_tokens
        self.prior = TrustPrior()  # what its drafts delivered over every request so far

    def start(self, prompt_ids: list[int]) -> SuffixSession:
        return SuffixSession(self, prompt_ids)


class SuffixSession:
    """One request's suffix drafting, calibrated by what its drafts delivered.

    Frequencies in a tree say how often a continuation followed a match, not how often
    the target will agree (on chat traffic a cold tree's drafts are almost all rejected).
    Every draft is therefore scored against the tokens committed after it, whether it
    was proposed or not (the hybrid's head may have been; a draft cut to nothing by the
    cost model is scored too), over the positions those tokens decide: ``trust`` is the
    matched tokens over the drafts' running probabilities at those positions, with a
    prior of ``CALIBRATION_PRIOR`` tokens promised and delivered at the proposer's
    ``TrustPrior`` (what its drafts delivered in earlier requests), capped at 1. Drafts are
    returned with their probabilities times ``trust``, so the cost model (and the
    hybrid's comparison with the head) stops proposing what does not pay here. Every
    decision depends on committed tokens only: lossless at any temperature."""

    def __init__(self, proposer: SuffixProposer, prompt_ids: Sequence[int]) -> None:
        self.proposer, config = proposer, proposer.config
        self.own = SuffixTree(config.max_depth)
        self.own.extend(0, prompt_ids[-config.max_prompt_tokens :])
        self.taken = len(prompt_ids)  # tokens of the request in its own tree
        self.promised = CALIBRATION_PRIOR
        self.delivered = CALIBRATION_PRIOR * proposer.prior.trust
        self.last: tuple[int, Draft] | None = None  # (committed length then, raw draft)

    @property
    def trust(self) -> float:
        return min(self.delivered / self.promised, 1.0)

    def draft(self, tokens: Sequence[int], k: int) -> Draft:
        """The better of the request's own and the global draft for ``tokens`` (the
        whole committed sequence), at most k tokens, its probabilities calibrated."""
        self._learn(tokens)
        if len(tokens) > self.taken:
            self.own.extend(0, tokens[self.taken :])
            self.taken = len(tokens)
        config = self.proposer.config
        options = {"factor": config.factor, "offset": config.offset, "min_prob": config.min_prob}
        context = tokens[-(config.max_depth - 1) :]
        best = self.own.speculate(context, k, exclude_self=True, **options)
        cache = self.proposer.cache
        if cache is not None:
            shared = cache.speculate(context, k, **options)
            if shared.score > best.score:
                best = shared
        self.last = (len(tokens), best) if best.tokens else None
        trust = self.trust
        if trust >= 1.0:
            return best
        return Draft(best.tokens, [p * trust for p in best.probs], best.match_len, best.source)

    def _learn(self, tokens: Sequence[int]) -> None:
        """Score the last draft against the tokens committed since (each committed token
        is the target's, so a draft token differing from it would have been rejected)."""
        if self.last is None or len(tokens) <= self.last[0]:
            return
        base, draft = self.last
        self.last = None
        decided = min(len(draft.tokens), len(tokens) - base)
        matched = 0
        while matched < decided and draft.tokens[matched] == tokens[base + matched]:
            matched += 1
        promised = math.fsum(draft.probs[:decided])
        self.delivered += matched
        self.promised += promised
        self.proposer.prior.record(matched, promised)

    def propose(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
        rows: int = 1,
    ) -> Proposal:
        draft = self.draft(tokens, k)
        cost = self.proposer.cost
        n = len(draft.tokens) if cost is None else cost.best_length(draft.probs, rows)
        return Proposal(draft.tokens[:n], None, draft.probs[:n])


class HybridProposer:
    """Suffix decoding and a learned head (``hybrid:<revision>``): per verify step the
    suffix draft when its score (expected accepted tokens) is at least the head's
    expected accepted tokens, else the head's adaptive draft (EagleSession's rule).
    The suffix draft reaches ``suffix.spec_tokens`` tokens (the caller's k when None),
    the head at most ``head_tokens`` (the caller's k when None)."""

    needs_features = True

    def __init__(
        self, suffix: SuffixProposer, learned: EagleProposer, *, head_tokens: int | None = None
    ) -> None:
        if learned.adaptive is None:
            raise ValueError("a hybrid's head must be adaptive: pass EagleProposer(adaptive=...)")
        self.suffix, self.learned, self.head_tokens = suffix, learned, head_tokens
        self.head = learned.head  # the engine fuses the target's features through it
        self.revision = hybrid_revision(learned.revision)
        self.spec_tokens = suffix.spec_tokens

    @property
    def cost(self) -> VerifyCost | None:
        """The verify cost its drafts decide with (the engine refines it)."""
        return self.suffix.cost if self.suffix.cost is not None else self.learned.cost

    def start(self, prompt_ids: list[int]) -> HybridSession:
        return HybridSession(
            self.suffix.start(prompt_ids), self.learned.start(prompt_ids), self.head_tokens
        )


@dataclass
class HybridSession:
    suffix: SuffixSession
    learned: EagleSession
    head_tokens: int | None = None

    def propose(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
        rows: int = 1,
    ) -> Proposal:
        rival = self.suffix.draft(tokens, k)
        head_k = k if self.head_tokens is None else min(k, self.head_tokens)
        return self.learned.propose(tokens, features, head_k, temperature, generator, rows, rival)
