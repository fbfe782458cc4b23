"""The rollout gate's statistics: a time-weighted speedup with bounds that stay valid
when the decision looks at them every round.

**Statistic.** An arm's throughput is a ratio of totals over its requests in the window:
decode tokens / decode seconds (time-weighted; a mean of per-request rates would
over-weight fast requests). The effect is the log of candidate over comparator,
theta = log(T_c / D_c) - log(T_s / D_s); its per-token latency (ms per decode token,
D / T) is reported beside it.

**Variance.** By the delta method, log(T/D) moves with the cluster sums
u_c = T_c / T - D_c / D; its variance is G / (G - 1) * sum u_c^2 over the arm's G
clusters (cluster-robust, CR1). A cluster is the unit that was randomized to an arm:
one request, or one cohort of requests decoded in the same batch (servers that batch
assign arms per cohort, `RequestStats.cohort`), so requests that shared a batch, and
their correlated timings, count as one. Arms are disjoint sets of clusters, so the
variances add. Recurring prompts and machine drift need no extra term: every request
(or cohort) is routed at random and independently of its prompt and its time, so both
arms draw from the same prompts and the same moments, and the randomization variance
covers them.

**Sequential validity.** The bounds form an asymptotic confidence sequence (Robbins'
normal mixture; Howard, Ramdas, McAuliffe & Sekhon 2021; Waudby-Smith et al. 2024,
"Time-uniform central limit theory and asymptotic confidence sequences"). With
s = the standard error of theta-hat and t = 1 / (1/G_c + 1/G_s) the effective
number of clusters, the one-sided bound is theta-hat -/+ s * x(t) * sqrt(1 + rho / t),
where x solves 2 sqrt(rho / (t + rho)) exp(x^2 / 2) Phi(x) = 1 / alpha (a half-normal
mixture over the effect, so each side holds at level alpha). Under the assumptions
below, P(the lower bound ever exceeds the true theta, over every look) <= alpha: the
rule may be checked every round, however long the canary runs, and the error rate
stays `falsePromotionRate`. `rho` sets where the sequence is tightest: around t = 8 rho
(the decision uses rho = minSamples / 2, so about 8 x minSamples requests per arm).

**Windows.** Comparisons use only requests from the same period for every arm: since
the canary started (or, for stable against no speculation, since the last change of
what is served: promotion, rollback, fallback). A traffic-mix change inside the window
(`mix_change`: the request's domain label and prompt-length band, pooled over arms)
restarts the window at the change. The change is found from covariates alone, which
routing makes independent of the arm, so restarting cannot pick a favourable moment;
the j-th restart within one comparison runs at alpha * (1 - r) * r^j (r = `RESTART_SPLIT`),
so the error rate over all windows still sums to at most alpha.

**Assumptions.** Requests (or batch cohorts) are routed to arms at random, independently
of their content and time (the servers do; pinned requests are the caller's choice);
the CLT holds for the cluster sums (hence `MIN_CLUSTERS` per arm before any bound);
the window restart is decided from covariates only; clocks of servers and decider agree
to within a round.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist

from aurora.runtime.protocol import RequestStats

# Below this many clusters per arm the plug-in variance is too unreliable for any bound
# (the policy refuses a smaller minSamples).
MIN_CLUSTERS = 10
# Share of the error rate left for each further window after a traffic-mix change.
RESTART_SPLIT = 0.1
# A traffic-mix change: segments of at least this many requests, distributions at least
# this far apart (total variation), and a chi-square p-value below MIX_P.
MIX_MIN_SEGMENT = 16
MIX_MIN_DISTANCE = 0.25
MIX_P = 1e-6

_NORMAL = NormalDist()


@dataclass(frozen=True)
class ArmTotals:
    """An arm's requests in a window, reduced to what the statistic needs."""

    requests: int
    tokens: float  # decode tokens (the new tokens after the first)
    seconds: float  # decode seconds
    clusters: tuple[tuple[float, float], ...]  # (tokens, seconds) per randomized unit

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens > 0 else None

    @property
    def ms_per_token(self) -> float | None:
        return 1000.0 * self.seconds / self.tokens if self.seconds > 0 and self.tokens > 0 else None

    @cached_property
    def log_variance(self) -> float | None:
        """Variance of log(tokens / seconds), cluster-robust (None: too few clusters)."""
        g = len(self.clusters)
        if g < 2 or self.tokens <= 0 or self.seconds <= 0:
            return None
        a, b = 1 / self.tokens, 1 / self.seconds
        return g / (g - 1) * math.fsum((t * a - d * b) ** 2 for t, d in self.clusters)


def totals(samples: Iterable[RequestStats]) -> ArmTotals:
    """The arm's totals (exact sums, so the order of `samples` does not matter); a
    request with a cohort id joins its cohort's cluster."""
    alone: list[tuple[float, float]] = []
    cohorts: dict[str, tuple[list[float], list[float]]] = {}
    for s in samples:
        t, d = float(s.decode_tokens), s.decode_seconds
        if s.cohort:
            cluster = cohorts.setdefault(s.cohort, ([], []))
            cluster[0].append(t)
            cluster[1].append(d)
        else:
            alone.append((t, d))
    clusters = alone + [(math.fsum(t), math.fsum(d)) for t, d in cohorts.values()]
    return ArmTotals(
        len(alone) + sum(len(t) for t, _ in cohorts.values()),
        math.fsum(t for t, _ in clusters),
        math.fsum(d for _, d in clusters),
        tuple(clusters),
    )


def mixture_multiplier(t: float, alpha: float, rho: float) -> float:
    """How many standard errors the one-sided bound lies from the estimate at effective
    sample size t, so that it holds at level alpha uniformly over all t."""
    # Solve log Phi(x) + x^2 / 2 = log(sqrt((t + rho) / rho) / (2 alpha)) by bisection.
    target = 0.5 * math.log((t + rho) / rho) - math.log(2 * alpha)
    low, high = 0.0, 40.0
    for _ in range(60):
        mid = (low + high) / 2
        if math.log(_NORMAL.cdf(mid)) + mid * mid / 2 < target:
            low = mid
        else:
            high = mid
    return high * math.sqrt(1 + rho / t)


@dataclass(frozen=True)
class Bounds:
    estimate: float  # ratio of time-weighted throughputs
    lower: float
    upper: float


def speedup_bounds(
    numerator: ArmTotals, denominator: ArmTotals, alpha: float, rho: float
) -> Bounds | None:
    """Numerator's throughput over the denominator's, with confidence-sequence bounds at
    level alpha on each side; None without throughput on both arms. Bounds are (0, inf)
    until both arms hold MIN_CLUSTERS clusters."""
    a, b = numerator.tokens_per_s, denominator.tokens_per_s
    if a is None or b is None:
        return None
    theta = math.log(a / b)
    va, vb = numerator.log_variance, denominator.log_variance
    ga, gb = len(numerator.clusters), len(denominator.clusters)
    if va is None or vb is None or min(ga, gb) < MIN_CLUSTERS:
        return Bounds(math.exp(theta), 0.0, math.inf)
    t = 1.0 / (1.0 / ga + 1.0 / gb)
    half = math.sqrt(va + vb) * mixture_multiplier(t, alpha, rho)
    return Bounds(math.exp(theta), math.exp(theta - half), math.exp(theta + half))


def restart_alpha(alpha: float, restarts: int) -> float:
    """The error rate of the window after `restarts` traffic-mix restarts."""
    return alpha * (1 - RESTART_SPLIT) * RESTART_SPLIT**restarts


def _band(prompt_tokens: int) -> int:
    """Prompt-length band: 0 unknown, else the power of two it reaches."""
    return prompt_tokens.bit_length() if prompt_tokens > 0 else 0


def _chi_square_p(statistic: float, df: int) -> float:
    """Upper tail of chi-square(df) (Wilson-Hilferty)."""
    if df <= 0:
        return 1.0
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 1 - _NORMAL.cdf(z)


def mix_change(samples: Sequence[RequestStats]) -> int | None:
    """Where the traffic mix (domain and prompt-length band, over all arms) changed most
    significantly: the index of the first request after the change, or None when it did
    not change. `samples` must be ordered by `created`."""
    n = len(samples)
    if n < 2 * MIX_MIN_SEGMENT:
        return None
    keys = [(s.domain, _band(s.prompt_tokens)) for s in samples]
    total = Counter(keys)
    if len(total) < 2:
        return None
    stride = max(1, n // 64)

    def statistic(i: int, before: Counter[tuple[str, int]]) -> float | None:
        """Chi-square of the split before request i, when it is a material change."""
        m = n - i
        distance = 0.5 * sum(abs(before[k] / i - (total[k] - before[k]) / m) for k in total)
        if distance < MIX_MIN_DISTANCE:
            return None
        value = 0.0
        for k, count in total.items():
            for observed, size in ((before[k], i), (count - before[k], m)):
                expected = count * size / n
                value += (observed - expected) ** 2 / expected
        return value if _chi_square_p(value, len(total) - 1) < MIX_P else None

    before: Counter[tuple[str, int]] = Counter()
    best: tuple[float, int] | None = None
    for i, key in enumerate(keys[: n - MIX_MIN_SEGMENT], start=1):
        before[key] += 1
        if i >= MIX_MIN_SEGMENT and i % stride == 0:
            value = statistic(i, before)
            if value is not None and (best is None or value > best[0]):
                best = (value, i)
    if best is not None and stride > 1:  # refine to the request, around the best stride
        low = max(MIX_MIN_SEGMENT, best[1] - stride)
        high = min(n - MIX_MIN_SEGMENT, best[1] + stride)
        before = Counter(keys[:low])
        for i in range(low, high + 1):
            if i > low:
                before[keys[i - 1]] += 1
            value = statistic(i, before)
            if value is not None and value > best[0]:
                best = (value, i)
    return best[1] if best is not None else None
