"""What a verify step costs, so that a proposer drafts only what pays.

``VerifyCost`` holds the seconds of one target forward over ``tokens`` tokens per row at
``rows`` rows, measured on this machine's engine path when a server starts (a prior
until then) and refined by every verify forward the engine times (``observe``). With c_i a proposer's estimate that its first i draft tokens are all
accepted and E_n = c_1 + ... + c_n, proposing n tokens is expected to yield

    rate(n) = (1 + E_n) / (verify(rows, n + 1) + drafting seconds)

tokens per second, and plain decoding rate(0) = 1 / verify(rows, 1). ``best_length``
picks the n with the highest rate (0: propose nothing), ``pays`` says whether one more
token raises it, and ``Throttle`` stops a learned head from drafting at all while the
gain it measured over plain decoding stays below 1.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Before anything is measured: SmolLM2-135M on 2 CPU cores (REFERENCES.md), about 45 ms
# for a 1-token forward and 10 % more per extra token; a draft-head step about 5 %.
PRIOR_VERIFY_S = 0.045
PRIOR_TOKEN_SLOPE = 0.10
PRIOR_DRAFT_STEP_S = 0.0025
MAX_CALIBRATION = 2.0  # a head may be trusted up to twice its own probabilities


class VerifyCost:
    """Seconds of a verify forward by (rows, tokens per row). Rows between measured
    sizes use the nearest measured size below (the smallest above when none is);
    tokens are interpolated linearly and extrapolated with the last slope. Replaced
    whole by ``update`` (one attribute write, safe to read from any thread).

    The table is measured once, at one context length, on an idle engine; the forwards
    that serve traffic run at other context lengths, with other threads and tenants on
    the machine. So ``observe`` takes each verify forward the engine times and keeps, per
    measured point, a moving average of observed over measured seconds (``scale``; a point
    never observed takes its nearest observed neighbour's, 1 before any): the costs the
    proposers decide with follow what verifying actually costs now."""

    OBSERVE_WEIGHT = 0.05  # a moving average over about the last 20 forwards per point
    OBSERVE_CLIP = 2.0  # one forward moves the ratio by at most this factor (a GC pause)

    def __init__(self, table: dict[int, dict[int, float]] | None = None) -> None:
        self.table: dict[int, tuple[tuple[int, float], ...]] = {}
        self.scale: dict[int, dict[int, tuple[float, int]]] = {}  # (ratio, forwards seen)
        self.measured = False
        self.update(table or prior_table())
        self.measured = table is not None

    def update(self, table: dict[int, dict[int, float]]) -> None:
        rows = {}
        for r, by_tokens in table.items():
            points = tuple(sorted((int(t), float(s)) for t, s in by_tokens.items()))
            if r < 1 or not points or points[0][0] != 1 or any(s <= 0 for _, s in points):
                raise ValueError(
                    f"verify cost for {r} rows: {by_tokens!r}; give seconds > 0 for 1 token "
                    "and more, per row count >= 1"
                )
            rows[int(r)] = points
        self.table = rows
        self.scale = {}  # a new measurement starts the observed ratios again
        self.measured = True

    def _size(self, rows: int) -> int:
        sizes = sorted(self.table)
        below = [r for r in sizes if r <= rows]
        return below[-1] if below else sizes[0]

    def measured_seconds(self, rows: int, tokens: int) -> float:
        """The table's seconds, before any observation."""
        points = self.table[self._size(rows)]
        if len(points) == 1:
            return points[0][1] * tokens  # one point: proportional, the pessimistic guess
        for (t0, s0), (t1, s1) in itertools.pairwise(points):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        (t0, s0), (t1, s1) = points[-2], points[-1]
        return s1 + (s1 - s0) * (tokens - t1) / (t1 - t0)

    def verify(self, rows: int, tokens: int) -> float:
        return self.measured_seconds(rows, tokens) * self.ratio(rows, tokens)

    def ratio(self, rows: int, tokens: int) -> float:
        """Observed over measured seconds at this size: interpolated between the observed
        points around ``tokens``, the nearest observed one beyond them, 1 when none is."""
        observed = sorted((t, r) for t, (r, _) in self.scale.get(self._size(rows), {}).items())
        if not observed:
            return 1.0
        below = [(t, r) for t, r in observed if t <= tokens]
        above = [(t, r) for t, r in observed if t > tokens]
        if not above:
            return below[-1][1]
        if not below:
            return above[0][1]
        (t0, r0), (t1, r1) = below[-1], above[0]
        return r0 + (r1 - r0) * (tokens - t0) / (t1 - t0)

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        """One verify forward of ``tokens`` tokens per row at ``rows`` rows took ``seconds``
        (as the engine timed it): the nearest measured point's ratio moves toward it."""
        if tokens < 1 or rows < 1 or not seconds > 0:
            return
        size = self._size(rows)
        point = min((t for t, _ in self.table[size]), key=lambda t: (abs(t - tokens), t))
        ratios = dict(self.scale.get(size, {}))
        old, count = ratios.get(point, (1.0, 0))
        seen = seconds / self.measured_seconds(rows, tokens)
        seen = min(max(seen, old / self.OBSERVE_CLIP), old * self.OBSERVE_CLIP)
        # the mean of the first forwards, then a moving average over the recent ones
        weight = max(self.OBSERVE_WEIGHT, 1.0 / (count + 1))
        ratios[point] = (old + weight * (seen - old), count + 1)
        self.scale = {**self.scale, size: ratios}  # replaced whole: readers see old or new

    def observed(self) -> int:
        """Verify forwards observed since the table was measured."""
        return sum(n for points in self.scale.values() for _, n in points.values())

    def seconds(self) -> dict[int, dict[int, float]]:
        """The costs decided with now, at the measured points (the table times the ratios)."""
        return {r: {t: self.verify(r, t) for t, _ in points} for r, points in self.table.items()}

    def milliseconds(self, *, observed: bool, digits: int = 1) -> dict[int, dict[int, float]]:
        """rows -> tokens per row -> ms at the measured points: as measured (``observed``
        false) or as decided with now (``seconds``)."""
        table = self.seconds() if observed else {r: dict(p) for r, p in self.table.items()}
        return {r: {t: round(s * 1000, digits) for t, s in row.items()} for r, row in table.items()}

    def rate(self, rows: int, expected: float, n: int, spent_s: float = 0.0) -> float:
        """Expected tokens per second of a step proposing n tokens expected to yield
        ``expected`` accepted ones, after ``spent_s`` seconds of drafting."""
        return (1.0 + expected) / (self.verify(rows, n + 1) + spent_s)

    def best_length(self, confidence: Sequence[float], rows: int = 1, spent_s: float = 0.0) -> int:
        """The n in 0..len(confidence) with the highest ``rate``; ties go to the shorter."""
        best_n, best_rate, expected = 0, self.rate(rows, 0.0, 0, spent_s), 0.0
        for n, c in enumerate(confidence, start=1):
            expected += c
            rate = self.rate(rows, expected, n, spent_s)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def pays(self, rows: int, n: int, expected: float, c_next: float, spent_s: float) -> bool:
        """Whether proposing token n + 1 (confidence ``c_next``) after n tokens raises the rate."""
        return self.rate(rows, expected + c_next, n + 1, spent_s) > self.rate(
            rows, expected, n, spent_s
        )

    def forwards(self, rows: int, proposed: int, spent_s: float) -> float:
        """A finished step's verifying and drafting, in 1-token forwards (plain decoding
        spends 1 per token)."""
        return (self.verify(rows, proposed + 1) + max(spent_s, 0.0)) / self.verify(rows, 1)


def prior_table(max_tokens: int = 16) -> dict[int, dict[int, float]]:
    return {
        1: {
            t: PRIOR_VERIFY_S * (1 + PRIOR_TOKEN_SLOPE * (t - 1))
            for t in sorted({1, 2, max_tokens})
        }
    }


@dataclass
class Throttle:
    """What a learned head measured on the verify steps that used its drafts, and whether
    it drafts this step. It does while the gain it measured over plain decoding (an
    average over its last steps, weighting the latest by ``alpha``) is at least 1; below
    1 it proposes nothing (k = 0) for 1, 2, 4, ... ``max_skip`` steps between probe
    steps, and resets once a probe pays again. ``accepted`` averages the draft tokens
    accepted per step (None before the first), ``calibration`` the ratio of accepted
    tokens to the head's own expectation (the sum of its running probabilities)."""

    gain: float = 1.0
    alpha: float = 0.5
    max_skip: int = 16
    skip: int = 0
    backoff: int = 1
    accepted: float | None = None
    calibration: float = 1.0

    def should_draft(self) -> bool:
        if self.gain >= 1.0:
            return True
        if self.skip > 0:
            self.skip -= 1
            return False
        return True  # a probe

    def record(self, gain: float, accepted: int = 0, expected: float = 0.0) -> None:
        a = self.alpha
        self.accepted = (
            accepted if self.accepted is None else a * accepted + (1 - a) * self.accepted
        )
        if expected > 0:
            ratio = min(accepted / expected, MAX_CALIBRATION)
            self.calibration = a * ratio + (1 - a) * self.calibration
        self.gain = a * gain + (1 - a) * self.gain
        if self.gain >= 1.0:
            self.backoff = 1
        else:
            self.skip, self.backoff = self.backoff, min(2 * self.backoff, self.max_skip)


@dataclass
class GainPrior:
    """What a head's drafts measured over every request it served (one per proposer,
    shared by its sessions): tokens committed over 1-token forwards spent, on the steps
    where it proposed something, each the mean over its first ``1 / alpha`` such steps
    and then a moving average weighting the latest by ``alpha``. A new request's
    ``Throttle`` starts from it: once it rests on ``min_steps`` drafts and the head has
    not paid, the request begins with ``max_skip`` steps without drafting instead of
    probing from its first step (a 64-token request would otherwise pay for about six
    failed probes, each a longer verify for nothing). Probes keep it current.

    Steps where the head ran and proposed nothing do not count (they say nothing about
    its drafts), and a few drafts decide nothing: a head whose first draft was
    rejected would otherwise start every later request throttled and, probing once in
    ``max_skip`` steps, take dozens of requests to climb back (seen in `bench adapt`
    after a hot swap to a head that pays)."""

    tokens: float = 1.0
    forwards: float = 1.0
    alpha: float = 0.05
    min_steps: int = 8
    steps: int = 0

    @property
    def gain(self) -> float:
        return self.tokens / self.forwards

    def record(self, tokens: int, forwards: float) -> None:
        weight = max(self.alpha, 1.0 / (self.steps + 1))
        self.tokens += weight * (tokens - self.tokens)
        self.forwards += weight * (forwards - self.forwards)
        self.steps += 1

    def throttle(self) -> Throttle:
        throttle = Throttle(gain=self.gain if self.steps >= self.min_steps else 1.0)
        if throttle.gain < 1.0:
            throttle.skip = throttle.backoff = throttle.max_skip
        return throttle


@dataclass(frozen=True)
class Adaptive:
    """Adaptive speculation length for a learned head: drafting stops when the head's
    probability of its own next token is below ``min_prob`` or one more token would not
    raise the expected rate, and the head proposes nothing while it does not pay
    (``Throttle``). ``draft_step_s`` is one chained head step, measured."""

    cost: VerifyCost
    draft_step_s: float = PRIOR_DRAFT_STEP_S
    min_prob: float = 0.3


# ------------------------------------------------------------------ measuring


def _fastest_seconds(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` runs: noise on a shared machine only ever adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def monotone(row: dict[int, float]) -> dict[int, float]:
    """A verify over more tokens never costs less than one over fewer: a measured point
    above a later one is noise, lowered to it."""
    out, floor = {}, float("inf")
    for tokens in sorted(row, reverse=True):
        floor = min(floor, row[tokens])
        out[tokens] = floor
    return dict(sorted(out.items()))


@torch.inference_mode()
def measure_generate_cost(
    model: Any, max_tokens: int, *, context: int = 64, repeats: int = 3
) -> dict[int, dict[int, float]]:
    """Verify forwards of 1..max_tokens tokens through the model's own forward with a
    KV cache (what ``engine.generate`` runs), after a ``context``-token prefill."""
    from transformers import DynamicCache

    from aurora.runtime.engine import crop_cache

    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    cache = DynamicCache()
    model(torch.arange(context, device=device)[None] % vocab, cache=cache, use_cache=True)

    def forward(tokens: int) -> None:
        model(torch.ones(1, tokens, dtype=torch.long, device=device), cache=cache, use_cache=True)
        crop_cache(cache, context)

    forward(1)  # warm-up
    counts = _token_counts(max_tokens)
    return {
        1: monotone({t: _fastest_seconds(functools.partial(forward, t), repeats) for t in counts})
    }


@torch.inference_mode()
def measure_batch_cost(
    llama: Any, max_tokens: int, *, context: int = 64, repeats: int = 3
) -> dict[int, dict[int, float]]:
    """Verify forwards of the batched Llama forward at 1..llama.rows rows (powers of two
    and the maximum) and 1..max_tokens tokens per row, each row at ``context`` tokens."""
    vocab = int(llama.config.vocab_size)
    rows = sorted({r for r in (1, 2, 4, 8, 16, 32, 64) if r < llama.rows} | {llama.rows})
    slots = torch.arange(llama.rows)
    llama.forward(
        torch.arange(context)[None].repeat(llama.rows, 1) % vocab,
        slots,
        torch.zeros(llama.rows, dtype=torch.long),
    )
    table: dict[int, dict[int, float]] = {}
    for r in rows:

        def forward(tokens: int, r: int = r) -> None:
            llama.forward(
                torch.ones(r, tokens, dtype=torch.long),
                slots[:r],
                torch.full((r,), context, dtype=torch.long),
            )

        forward(1)
        table[r] = monotone(
            {
                t: _fastest_seconds(functools.partial(forward, t), repeats)
                for t in _token_counts(max_tokens)
            }
        )
    return table


def _token_counts(max_tokens: int) -> list[int]:
    """1, 2, 3, 5, 9, 17, ... up to and including ``max_tokens`` (interpolated between)."""
    counts = {1, max(1, max_tokens)} | {2**i + 1 for i in range(7) if 2**i + 1 < max_tokens}
    return sorted(counts | set(range(1, min(max_tokens, 3) + 1)))


@torch.inference_mode()
def measure_draft_step(head: Any, *, context: int = 64, repeats: int = 5) -> float:
    """Seconds of one chained draft step (logits, argmax, the next chain step)."""
    config = head.config
    device = head.d2t.device
    dtype = next(head.parameters()).dtype
    features = torch.zeros(context, 3 * config.hidden_size, device=device, dtype=dtype)
    tokens = torch.zeros(context, dtype=torch.long, device=device)
    positions = torch.arange(context, device=device)
    hidden, keys, values = head.step1(features, tokens, positions)
    anchor = positions[-1:]

    def step() -> None:
        g, ck, cv = hidden[-1:], None, None
        for s in range(1, 3):
            j = int(torch.argmax(head.logits(g)[0]))
            g, ck, cv = head.chain(g, head.d2t[j : j + 1], anchor + s, keys, values, anchor, ck, cv)

    step()
    return _fastest_seconds(step, repeats) / 2
