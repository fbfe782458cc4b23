"""`aurora bench gate`: how often the rollout gate promotes, by scenario, replayed through
the very decision code the operator and `aurora local` run (`rollout.decision.decide`).

Each trial is one canary. Simulated servers route every request to the stable
revision, the candidate or the no-speculation baseline with the shares the decision
publishes; each request decodes its prompt's tokens at a rate set by the prompt, the
arm, the machine and a per-request noise (log-normal, 25%), and is handed to `decide`
as the `RequestStats` a server would write. The decision runs every round (a few
requests) until it promotes, rolls back or gives up (inconclusive at maxCanarySamples).

A scenario's `true_speedup` is the candidate's time-weighted speedup over stable on the
scenario's traffic: total tokens over total decode seconds, candidate over stable, on
the same requests without noise. CPU-only simulation: its figures are rates of decisions,
not timings, and do not depend on the machine.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from aurora.runtime.protocol import (
    CandidateRecord,
    DesiredState,
    LoadedReport,
    RequestStats,
)
from aurora.runtime.rollout.decision import RolloutState, decide
from aurora.runtime.rollout.policy import RolloutPolicy

STABLE, CANDIDATE = "r1", "r2"
ROUND = 12  # requests between two decisions (the loop's interval at a few requests/s)
NOISE = 0.25  # per-request log-normal spread of decode time
STABLE_OVER_PLAIN = 1.3  # the stable draft's speedup over no speculation
BASE_TOKENS_PER_S = 25.0


@dataclass(frozen=True)
class Prompt:
    domain: str
    prompt_tokens: int
    new_tokens: int
    speed: float  # how fast this prompt decodes, relative to the domain's average
    candidate: float  # the candidate's speedup over stable on this prompt


@dataclass(frozen=True)
class Scenario:
    """Traffic and a candidate. `prompts` builds each domain's prompt pool; `domain_at`
    says which domain request i comes from; `machine` slows everything as the canary
    goes on (fraction of the trial's requests -> factor); `cohort` routes that many
    consecutive requests together, sharing a batch's slowdown (a server that batches)."""

    name: str
    description: str
    prompts: Callable[[random.Random], dict[str, list[Prompt]]]
    domain_at: Callable[[int, int], str] = lambda i, horizon: "code"
    machine: Callable[[float], float] = lambda progress: 1.0
    recurring: bool = False  # prompts cycle in a fixed order (a service's regulars)
    cohort: int = 1


def _pool(
    rng: random.Random,
    domain: str,
    n: int,
    candidate: Callable[[int], float],
    *,
    prompt_tokens: tuple[int, int] = (60, 240),
    speed_spread: float = 0.2,
    speed: float = 1.0,
) -> list[Prompt]:
    return [
        Prompt(
            domain=domain,
            prompt_tokens=rng.randint(*prompt_tokens),
            new_tokens=rng.randint(16, 96),
            speed=speed * math.exp(rng.gauss(0.0, speed_spread)),
            candidate=candidate(i),
        )
        for i in range(n)
    ]


def _uniform(factor: float) -> Callable[[random.Random], dict[str, list[Prompt]]]:
    return lambda rng: {"code": _pool(rng, "code", 200, lambda i: factor)}


def _bimodal(rng: random.Random) -> dict[str, list[Prompt]]:
    return {"code": _pool(rng, "code", 200, lambda i: 1.6 if i % 2 == 0 else 0.7)}


def _two_domains(rng: random.Random) -> dict[str, list[Prompt]]:
    # Prose: shorter prompts, slower decoding for every arm; the candidate is the stable
    # draft's equal on both. Read across the shift, the mix would look like an effect.
    return {
        "code": _pool(rng, "code", 200, lambda i: 1.0),
        "prose": _pool(rng, "prose", 200, lambda i: 1.0, prompt_tokens=(8, 40), speed=0.6),
    }


def _recurring(rng: random.Random) -> dict[str, list[Prompt]]:
    return {"code": _pool(rng, "code", 8, lambda i: 1.0, speed_spread=0.6)}


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("aa", "A/A: the candidate is the stable draft", _uniform(1.0)),
    Scenario("known_0_9x", "candidate 0.9x stable on every prompt", _uniform(0.9)),
    Scenario("known_1_04x", "candidate 1.04x: just below minSpeedup 1.05", _uniform(1.04)),
    Scenario("known_1_1x", "candidate 1.1x stable on every prompt", _uniform(1.1)),
    Scenario("known_1_2x", "candidate 1.2x stable on every prompt", _uniform(1.2)),
    Scenario("known_1_5x", "candidate 1.5x stable on every prompt", _uniform(1.5)),
    Scenario(
        "bimodal_1_6x_0_7x",
        "candidate 1.6x on half the prompts, 0.7x on the other half (time-weighted below 1)",
        _bimodal,
    ),
    Scenario(
        "machine_slows_20pct",
        "A/A; the machine slows by 20% a third of the way into the canary",
        _uniform(1.0),
        machine=lambda progress: 1.0 if progress < 1 / 3 else 0.8,
    ),
    Scenario(
        "traffic_shift",
        "A/A; traffic shifts from code to prose (shorter prompts, 40% slower decoding) "
        "a third of the way in",
        _two_domains,
        domain_at=lambda i, horizon: "code" if i < horizon / 3 else "prose",
    ),
    Scenario(
        "recurring_prompts",
        "A/A on 8 recurring prompts whose speeds differ widely (60% spread), in a fixed cycle",
        _recurring,
        recurring=True,
    ),
    Scenario(
        "aa_batched",
        "A/A, servers batching: cohorts of 4 requests routed together, sharing a batch slowdown",
        _uniform(1.0),
        cohort=4,
    ),
)


def _rate(prompt: Prompt, arm: str) -> float:
    """Noise-free decode tokens/s of a prompt on an arm (the machine at full speed)."""
    factor = 1.0 if arm == "baseline" else STABLE_OVER_PLAIN
    if arm == "candidate":
        factor *= prompt.candidate
    return BASE_TOKENS_PER_S * prompt.speed * factor


def _traffic(
    scenario: Scenario, pools: dict[str, list[Prompt]], rng: random.Random, i: int, horizon: int
) -> Prompt:
    pool = pools[scenario.domain_at(i, horizon)]
    return pool[i % len(pool)] if scenario.recurring else rng.choice(pool)


def true_speedup(scenario: Scenario, policy: RolloutPolicy, seed: int = 0) -> float:
    """Time-weighted candidate/stable on the scenario's traffic, without noise."""
    rng = random.Random(f"{seed}:{scenario.name}:truth")
    pools = scenario.prompts(rng)
    horizon = _horizon(policy)
    tokens, seconds = {"stable": 0.0, "candidate": 0.0}, {"stable": 0.0, "candidate": 0.0}
    for i in range(horizon):
        prompt = _traffic(scenario, pools, rng, i, horizon)
        machine = scenario.machine(i / horizon)
        for arm in tokens:
            tokens[arm] += prompt.new_tokens - 1
            seconds[arm] += (prompt.new_tokens - 1) / (_rate(prompt, arm) * machine)
    return (tokens["candidate"] / seconds["candidate"]) / (tokens["stable"] / seconds["stable"])


def _horizon(policy: RolloutPolicy) -> int:
    """Requests a canary can last: enough for maxCanarySamples on the candidate arm, also
    after a window restart a third of the way in."""
    return math.ceil(policy.max_canary_samples / float(policy.canary_share) * 1.8) + 4 * ROUND


@dataclass
class Outcome:
    action: str  # "Promote", "Rollback", "Inconclusive"
    candidate_requests: int  # requests the candidate served until the decision


def run_trial(scenario: Scenario, policy: RolloutPolicy, seed: int) -> Outcome:
    """One canary of `scenario` decided by `decide`, round after round."""
    rng = random.Random(f"{seed}:{scenario.name}")
    pools = scenario.prompts(random.Random(f"{seed}:{scenario.name}:truth"))
    horizon = _horizon(policy)
    records = [
        CandidateRecord(
            revision=revision,
            parent=parent,
            path=f"/sim/{revision}",
            sha256="0" * 64,
            created=created,
            step=1,
            traces_seen=1,
        )
        for revision, parent, created in ((STABLE, None, 0.0), (CANDIDATE, STABLE, 1.0))
    ]
    loads = [
        LoadedReport.model_validate({"server": "sim", "stable": STABLE, "candidate": CANDIDATE})
    ]
    clock = 1000.0
    state = RolloutState(stable_revision=STABLE)
    started = decide(policy, state, records, [], loads, clock)
    state, published = started.new_state, started.desired
    samples: list[RequestStats] = []
    cohort = _Cohort()
    for i in range(horizon):
        prompt = _traffic(scenario, pools, rng, i, horizon)
        if cohort.left == 0:  # a new cohort: routed (and batched) together
            rows = rng.randint(1, 4) if scenario.cohort > 1 else 1
            cohort = _Cohort(
                scenario.cohort, _route(published, rng), 1 + 0.3 * (rows - 1), cohort.id + 1
            )
        cohort.left -= 1
        rate = _rate(prompt, cohort.arm) * scenario.machine(i / horizon) / cohort.slowdown
        decode_s = (prompt.new_tokens - 1) / rate * math.exp(rng.gauss(0.0, NOISE))
        clock += decode_s / 2  # two requests in flight
        samples.append(
            RequestStats(
                revision={"candidate": CANDIDATE, "stable": STABLE}.get(cohort.arm, ""),
                arm=cohort.arm,  # type: ignore[arg-type]
                server="sim",
                decode_tokens_per_s=(prompt.new_tokens - 1) / decode_s,
                accept_length=1.0,
                new_tokens=prompt.new_tokens,
                verify_steps=prompt.new_tokens,
                latency_s=decode_s,
                domain=prompt.domain,
                created=clock,
                decode_s=decode_s,
                prompt_tokens=prompt.prompt_tokens,
                cohort=f"c{cohort.id}" if scenario.cohort > 1 else "",
            )
        )
        if (i + 1) % ROUND:
            continue
        decision = decide(policy, state, records, samples, loads, clock, published=published)
        state, published = decision.new_state, decision.desired
        served = sum(s.arm == "candidate" for s in samples)
        if decision.action in ("Promote", "Rollback"):
            return Outcome(decision.action, served)
        if decision.action == "Hold" or state.phase == "Idle":
            return Outcome("Inconclusive", served)
    return Outcome("Inconclusive", sum(s.arm == "candidate" for s in samples))


@dataclass
class _Cohort:
    """Requests a simulated batching server routes to one arm together."""

    left: int = 0
    arm: str = "stable"
    slowdown: float = 1.0  # a batch of more rows decodes each of them slower
    id: int = 0


def _route(desired: DesiredState | None, rng: random.Random) -> str:
    share = desired.candidate_share if desired is not None else 0.0
    baseline = desired.baseline_share if desired is not None else 0.0
    draw = rng.random()
    return "candidate" if draw < share else "baseline" if draw < share + baseline else "stable"


@dataclass
class ScenarioResult:
    description: str
    true_speedup: float
    trials: int
    outcomes: list[Outcome] = field(default_factory=list)

    def rate(self, action: str) -> float:
        return sum(o.action == action for o in self.outcomes) / len(self.outcomes)

    def as_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "true_speedup": round(self.true_speedup, 4),
            "trials": len(self.outcomes),
            "promotion_rate": self.rate("Promote"),
            "rollback_rate": self.rate("Rollback"),
            "inconclusive_rate": self.rate("Inconclusive"),
            "median_requests_to_decision": statistics.median(
                o.candidate_requests for o in self.outcomes
            ),
        }


def _trials(name: str, policy: RolloutPolicy, seeds: range) -> list[Outcome]:
    scenario = next(s for s in SCENARIOS if s.name == name)
    return [run_trial(scenario, policy, seed) for seed in seeds]


def run_gate_bench(
    policy: RolloutPolicy,
    trials: int,
    seed: int = 0,
    scenarios: Sequence[Scenario] = SCENARIOS,
    progress: Callable[[str, int], None] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Every scenario `trials` times (in `workers` processes; the same results either
    way); the JSON `aurora bench gate` writes."""
    results: dict[str, ScenarioResult] = {}
    chunk = 25
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for scenario in scenarios:
            truth = true_speedup(scenario, policy, seed)
            result = ScenarioResult(scenario.description, truth, trials)
            first = seed * 1_000_003
            seeds = [range(i, min(i + chunk, trials)) for i in range(0, trials, chunk)]
            seeds = [range(first + r.start, first + r.stop) for r in seeds]
            batches: Iterable[list[Outcome]]
            if pool is None:
                batches = (_trials(scenario.name, policy, r) for r in seeds)
            else:
                batches = pool.map(_trials, repeat(scenario.name), repeat(policy), seeds)
            for outcomes in batches:
                result.outcomes.extend(outcomes)
                if progress is not None:
                    progress(scenario.name, len(outcomes))
            results[scenario.name] = result
    threshold = float(policy.min_speedup)
    below = [r.rate("Promote") for r in results.values() if r.true_speedup < threshold]
    power = results["known_1_2x"].rate("Promote") if "known_1_2x" in results else None
    return {
        "benchmark": "gate",
        "trials_per_scenario": trials,
        "seed": seed,
        "policy": policy.model_dump(mode="json"),
        "round_requests": ROUND,
        "scenario_order": [s.name for s in scenarios],
        "noise": NOISE,
        "false_promotion_rate": max(below) if below else None,
        "power_at_1_2x": power,
        "scenarios": {name: r.as_json() for name, r in results.items()},
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


__all__ = ["SCENARIOS", "Scenario", "run_gate_bench", "run_trial", "true_speedup", "write_json"]
