"""`aurora bench adapt`: does online learning keep up when traffic shifts, on prompts
it has never seen?

One seeded request stream (default: prose, then code) is served by every arm on the
same requests, with the torch engine at temperature 0. The arms are a registry
(`ARMS`); the default ones:
  plain            no draft: plain decoding, the baseline every speedup is measured against;
  static           a draft fitted offline on the first domain (`fit_draft`), never updated;
  online-fkl       starts from the static draft; every served request's trace goes through
                   Redis (a real embedded redis-server) to a real `Trainer`, which publishes
                   candidates; the arm hot-swaps to each one between requests, as a server
                   does (no live canary: the trainer's offline gate on held-out prompts
                   decides alone). Objective: forward KL along the served continuation only;
  online-offpath   the same, plus the off-path KL (`lambda_discard`);
  online-reject    the same as online-fkl, plus the negative term (`lambda_reject`,
                   unlikelihood of the first rejected token of each verify step);
  online-all       all three terms;
  suffix           suffix decoding, model-free; hybrid-online: it and an online head;
  static-adaptive  the static draft with adaptive speculation length (how `aurora serve`
                   serves a head by default: it drafts only what the measured verify cost
                   says pays, nothing while it does not);
  online-adaptive  online with the trainer's default objective (forward KL + off-path KL),
                   served adaptive; its ratio "vs static" is over static-adaptive.
Adding an arm is one `register_arm(Arm(...))`: a name, whether it starts from no draft or
the static one, the trainer's objective when a trainer follows it, and optionally a
``proposer`` hook (build the served proposer from the arm's learned head, e.g. a
suffix-tree or hybrid drafter) and an ``observe`` hook (see every request it served).

Unseen traffic. The first domain's prompts are split in halves: the static draft is
fitted on one, the stream serves the other. By default (`--distinct-prompts 0`) every
domain's prompts are drawn without replacement and the run refuses a stream that would
serve a prompt twice: every request after the shift is a prompt no arm has seen. With
`--distinct-prompts N` each domain cycles through N prompts instead: recurring traffic,
which measures memorisation as much as learning, and the report says so. The trainers hold
out prompts (not traces) for their publish gate, and the traces-to-quality curve evaluates
each online trainer's draft, after every training slice, on `--eval-prompts` prompts of the
post-shift domain that are never served.

Fairness on a small CPU machine. Serving and training share the cores here, while in a
deployment the trainer runs on other devices. So the two never overlap: request i is
served by every arm back to back (in a per-request shuffled order, so machine drift and
cache warmth hit every arm alike), and after each block of requests serving pauses while
each online trainer runs its slice (at most ``steps_per_block`` optimizer steps). Decode
time is measured inside the engine, after prefill, and never includes training or Redis.

Figures, per seed and then as mean and 90 % interval (Student t) over ``--seeds`` seeds:
  - throughput ratio vs plain and vs static: time-weighted decode throughput (total decode
    tokens over total decode seconds) over the last ``window`` requests after the shift,
    same requests for every arm;
  - traces to accept length L (for each of ``levels``): post-shift traces served until the
    trainer's draft reaches an offline accept length of L on the unseen evaluation prompts
    (linear interpolation between evaluations; null when a seed never gets there).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aurora.errors import UsageError
from aurora.runtime.models import model_knob
from aurora.runtime.options import knob
from aurora.runtime.protocol import Builtin
from aurora.runtime.workloads import (
    Prompt,
    Schedule,
    ScheduledRequest,
    load_domain,
    prompt_ids,
    split_prompts,
)

log = logging.getLogger(__name__)

NAMESPACE = "bench"
SPLIT_SEED = 0  # the first domain's fit/serve split, the same for every seed (one static draft)


@dataclass
class AdaptConfig:
    """Everything `aurora bench adapt` takes; each knob's flag is generated from its field."""

    model: str = model_knob()
    schedule: str = ""  # the request stream; "" is prose:REQUESTS_BEFORE,code:REQUESTS_AFTER
    requests_before: int = knob(8, "requests before the shift (default schedule)", metavar="N")
    requests_after: int = knob(48, "requests after the shift (default schedule)", metavar="N")
    seeds: int = knob(3, "independent runs (request streams, trainers); figures are over them")
    seed: int = knob(0, "the first seed; the runs use SEED, SEED+1, ...")
    distinct_prompts: int = knob(
        0,
        "0: unseen traffic, no prompt is served twice; N: recurring traffic, each domain "
        "cycling through N prompts (measures memorisation too; the report says so)",
        metavar="N",
    )
    max_new_tokens: int = knob(32, "tokens generated per request")
    k: int = knob(3, "draft tokens per verify step, every arm", flag="--spec-tokens")
    block: int = knob(4, "requests served between training slices")
    steps_per_block: int = knob(
        32, "optimizer steps each online trainer runs per slice, at most (8 per trace at block 4)"
    )
    fit_prompts: int = knob(16, "prompts the static draft is fitted on")
    fit_epochs: int = knob(6, "epochs of the static draft's fit")
    lambda_discard: float = knob(0.5, "weight of the off-path KL in the arms that use it")
    lambda_reject: float = knob(1.0, "weight of the negative term in the arms that use it")
    lr: float = knob(1e-3, "learning rate of the fit and the trainers")
    publish_margin: float = knob(
        0.05,
        "a candidate is published when its offline accept length on held-out prompts beats "
        "the served revision's by this fraction (the trainer's default: 0.05)",
    )
    trace_topk: int = 8
    window: int = knob(24, "last requests after the shift over which throughput is compared")
    eval_prompts: int = knob(
        16, "never-served prompts of the post-shift domain for the traces-to-quality curve"
    )
    levels: tuple[float, ...] = knob(
        (1.5, 2.0), "accept lengths for the traces-to-quality figure", metavar="L1,L2"
    )
    arms: str = knob("", "comma-separated arms to run (default: every default arm)", metavar="A,B")
    rolling: int = knob(8, "rolling window of the accept-length plot")
    threads: int = knob(1, "torch threads (1 is robust on a shared machine; 0 = all cores)")
    workdir: Path = knob(
        Path("aurora-bench-adapt"), "cached static draft, trainer checkpoints and the plot"
    )

    def __post_init__(self) -> None:
        for name in (
            "max_new_tokens", "k", "block", "steps_per_block", "window", "rolling", "seeds",
            "fit_prompts", "eval_prompts",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if self.distinct_prompts < 0:
            raise UsageError(f"distinct_prompts={self.distinct_prompts}: use 0 (unseen) or N > 0")
        if not self.levels or any(level <= 1.0 for level in self.levels):
            raise UsageError(f"levels={self.levels}: give accept lengths above 1, e.g. 1.5,2.0")
        unknown = [name for name in self.arm_names if name not in ARMS]
        if unknown:
            raise UsageError(f"arms {unknown} are not registered; pick from {', '.join(ARMS)}")

    @property
    def schedule_spec(self) -> str:
        return self.schedule or f"prose:{self.requests_before},code:{self.requests_after}"

    @property
    def arm_names(self) -> list[str]:
        if not self.arms:
            return [name for name, arm in ARMS.items() if arm.default]
        return [name.strip() for name in self.arms.split(",") if name.strip()]

    @property
    def recurring(self) -> bool:
        return self.distinct_prompts > 0


# ---------------------------------------------------------------------------- arms


@dataclass
class ArmState:
    """One arm during one seed's run."""

    arm: Arm
    proposer: Any  # what serves (None: plain decoding)
    revision: str
    head: Any = None  # the learned head's proposer (EagleProposer) or None
    trainer: Any = None
    memory: dict[str, Any] = field(default_factory=dict)  # for hooks, kept across swaps
    served: list[dict[str, Any]] = field(default_factory=list)
    swaps: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # offline accept vs traces
    train_seconds: float = 0.0


@dataclass(frozen=True)
class Arm:
    """A way of serving the benchmark's traffic.

    ``draft``: the learned head it starts from (none, or the static draft). ``objective``:
    TrainerConfig overrides for an online arm (a trainer follows its traffic and it swaps
    to each published candidate); None for an arm nobody trains. ``proposer(state)``: the
    proposer to serve, from ``state.head`` (the learned head's proposer, or None) and
    ``state.memory``; called at the start and after every swap (default: the head's own).
    ``observe(state, generation)``: called after every request the arm served."""

    name: str
    description: str
    draft: Literal[Builtin.NONE, "static"] = "static"
    objective: Mapping[str, Any] | None = None
    proposer: Callable[[ArmState], Any] | None = None
    observe: Callable[[ArmState, Any], None] | None = None
    default: bool = True  # run unless --arms names others
    static: str = "static"  # the arm its throughput_ratio_vs_static is over


ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> Arm:
    """Add an arm to the registry (its name must be a DNS label: it names Redis keys)."""
    if arm.name in ARMS:
        raise ValueError(f"arm {arm.name!r} is registered already")
    ARMS[arm.name] = arm
    return arm


def _weights(config: AdaptConfig, discard: bool, reject: bool) -> dict[str, Any]:
    return {
        "lambda_discard": config.lambda_discard if discard else 0.0,
        "lambda_reject": config.lambda_reject if reject else 0.0,
    }


ONLINE = {  # the objective variants; weights from AdaptConfig
    "online-fkl": ("forward KL along the served continuation only", False, False, "unlikelihood"),
    "online-offpath": ("forward KL + off-path KL", True, False, "unlikelihood"),
    "online-reject": ("forward KL + negative term (unlikelihood)", False, True, "unlikelihood"),
    "online-all": ("forward KL + off-path KL + negative term", True, True, "unlikelihood"),
    "online-pg": ("forward KL + policy-gradient negative term", False, True, "policy_gradient"),
}
register_arm(Arm("plain", "no draft (plain decoding)", draft=Builtin.NONE))
register_arm(Arm("static", "draft fitted offline on the first domain, never updated"))
for _name, (_text, _discard, _reject, _term) in ONLINE.items():
    register_arm(
        Arm(
            _name,
            f"online: {_text}",
            objective={"discard": _discard, "reject": _reject, "reject_term": _term},
            default=_name != "online-pg",
        )
    )


def _suffix_cache(state: ArmState) -> Any:
    """The arm's server-wide suffix cache (kept across swaps)."""
    from aurora.runtime.suffix import SuffixCache

    return state.memory.setdefault("suffix_cache", SuffixCache())


def _suffix(state: ArmState) -> Any:
    from aurora.runtime.suffix import SuffixProposer

    return SuffixProposer(_suffix_cache(state), cost=state.memory["cost"]())


def _adaptive(state: ArmState) -> Any:
    """The arm's current head with adaptive speculation length, as `aurora serve` serves a
    head by default (its draft step timed now, the verify cost measured once per seed)."""
    from aurora.runtime.cost import Adaptive, measure_draft_step
    from aurora.runtime.draft import EagleProposer

    head = state.head.head
    adaptive = Adaptive(state.memory["cost"](), draft_step_s=measure_draft_step(head))
    return EagleProposer(head, state.revision, adaptive)


def _hybrid(state: ArmState) -> Any:
    """Suffix decoding and the arm's current head, adaptive, as `--draft hybrid:` serves it."""
    from aurora.runtime.suffix import HybridProposer

    return HybridProposer(_suffix(state), _adaptive(state))


def _learn_output(state: ArmState, generation: Any) -> None:
    """The suffix tree learns every finished request, as a server's does."""
    _suffix_cache(state).add(generation.output_ids)


register_arm(
    Arm(
        Builtin.SUFFIX,
        "suffix decoding over the prompt and every output served (model-free, no trainer)",
        draft=Builtin.NONE,
        proposer=_suffix,
        observe=_learn_output,
    )
)
register_arm(
    Arm(
        "hybrid-online",
        "hybrid of suffix decoding and the online head (forward KL + off-path KL + negative "
        "term), per verify step the draft expected to deliver more",
        objective={"discard": True, "reject": True, "reject_term": "unlikelihood"},
        proposer=_hybrid,
        observe=_learn_output,
    )
)


register_arm(
    Arm(
        "static-adaptive",
        "the static draft with adaptive speculation length (how `aurora serve` serves a head)",
        proposer=_adaptive,
    )
)
register_arm(
    Arm(
        "online-adaptive",
        "online with the trainer's default objective (forward KL + off-path KL), served with "
        "adaptive speculation length; compared with static-adaptive",
        objective={"discard": True, "reject": False, "reject_term": "unlikelihood"},
        proposer=_adaptive,
        static="static-adaptive",
    )
)


def trainer_overrides(arm: Arm, config: AdaptConfig) -> dict[str, Any]:
    """The TrainerConfig fields an online arm sets."""
    objective = dict(arm.objective or {})
    discard, reject = objective.pop("discard", False), objective.pop("reject", False)
    return {**_weights(config, discard, reject), **objective}


# ---------------------------------------------------------------------------- figures


T95 = (  # Student t 0.95 quantiles for 1..30 degrees of freedom (two-sided 90 % interval)
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
    1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
    1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
)  # fmt: skip


def interval(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and 90 % confidence interval of the mean (Student t) over seeds:
    ``{"mean", "low", "high", "n", "per_seed"}``. A seed with no value (None: never
    reached) makes mean and bounds None; one seed gives no bounds."""
    per_seed = list(values)
    out: dict[str, Any] = {"mean": None, "low": None, "high": None, "n": len(per_seed)}
    out["per_seed"] = per_seed
    if not per_seed or any(v is None for v in per_seed):
        out["reached"] = sum(v is not None for v in per_seed)
        return out
    numbers = [float(v) for v in per_seed if v is not None]
    mean = statistics.fmean(numbers)
    out["mean"] = mean
    if len(numbers) >= 2:
        df = len(numbers) - 1
        t = T95[df - 1] if df <= len(T95) else 1.645 + 2.7 / (4 * df)
        half = t * statistics.stdev(numbers) / math.sqrt(len(numbers))
        out["low"], out["high"] = mean - half, mean + half
    return out


def throughput(served: Sequence[Mapping[str, Any]]) -> float | None:
    """Time-weighted decode throughput: total decode tokens over total decode seconds."""
    tokens = sum(s["decode_tokens"] for s in served)
    seconds = sum(s["decode_seconds"] for s in served)
    return tokens / seconds if seconds > 0 else None


def accept_length(served: Sequence[Mapping[str, Any]]) -> float:
    """Tokens per verify step over the requests (1.0 for plain decoding)."""
    steps = sum(s["verify_steps"] for s in served)
    return sum(s["step_tokens"] for s in served) / steps if steps else 1.0


def traces_to(curve: Sequence[Mapping[str, float]], level: float) -> float | None:
    """Post-shift traces until the offline accept length first reaches ``level``,
    interpolated linearly between two evaluations; None when it never does."""
    previous = None
    for point in curve:
        if point["accept_length"] >= level:
            if previous is None or point["accept_length"] == previous["accept_length"]:
                return point["traces"]
            fraction = (level - previous["accept_length"]) / (
                point["accept_length"] - previous["accept_length"]
            )
            return previous["traces"] + fraction * (point["traces"] - previous["traces"])
        previous = point
    return None


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def seed_figures(
    arms: Mapping[str, ArmState], shift: int, config: AdaptConfig
) -> dict[str, dict[str, Any]]:
    """One seed's figures per arm (see the module docstring)."""
    n = min(len(state.served) for state in arms.values())
    start = max(shift, n - config.window)
    window = {name: state.served[start:n] for name, state in arms.items()}
    tps = {name: throughput(served) for name, served in window.items()}
    accepted = {name: accept_length(served) for name, served in window.items()}
    rows = {}
    for name, state in arms.items():
        row: dict[str, Any] = {
            "decode_tokens_per_s": tps[name],
            "accept_length_before_shift": accept_length(state.served[:shift]),
            "accept_length_after_shift": accept_length(state.served[shift:n]),
            "accept_length_window": accepted[name],
            "swaps": len(state.swaps),
        }
        for key, other in (("plain", "plain"), ("static", state.arm.static)):
            if other in tps and tps[name] is not None and tps[other]:
                row[f"throughput_ratio_vs_{key}"] = tps[name] / tps[other]  # type: ignore[operator]
        if state.arm.static in accepted and name != state.arm.static:
            # What the throughput ratio would be if a verify cost the same at any draft
            # length and drafting cost nothing (the GPU regime's bound); never 0 (plain is 1).
            row["accept_length_ratio_vs_static"] = accepted[name] / accepted[state.arm.static]
        if state.curve:
            row["traces_to_accept_length"] = {
                f"{level:.1f}": traces_to(state.curve, level) for level in config.levels
            }
        rows[name] = row
    return rows


def combine(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every arm's figures as intervals over seeds."""
    arms: dict[str, dict[str, Any]] = {}
    for name in per_seed[0]:
        rows = [seed[name] for seed in per_seed]
        out: dict[str, Any] = {}
        for key in (
            "throughput_ratio_vs_plain", "throughput_ratio_vs_static", "accept_length_ratio_vs_static",
            "decode_tokens_per_s",
            "accept_length_before_shift", "accept_length_after_shift", "accept_length_window",
            "swaps",
        ):  # fmt: skip
            if key in rows[0]:
                out[key] = interval([row.get(key) for row in rows])
        if "traces_to_accept_length" in rows[0]:
            out["traces_to_accept_length"] = {
                level: interval([row["traces_to_accept_length"][level] for row in rows])
                for level in rows[0]["traces_to_accept_length"]
            }
        arms[name] = out
    return arms


def goals(arms: Mapping[str, Mapping[str, Any]], levels: Sequence[float]) -> dict[str, Any]:
    """The issue's goals, checked against the figures (None where an arm is missing)."""
    online = [name for name in arms if name.startswith("online-")]

    def rank(name: str) -> tuple[float, float]:
        """By the ratio to static, then (no static arm, or a tie) by the ratio to plain."""

        def mean(key: str) -> float:
            return arms[name].get(key, {}).get("mean") or 0.0

        return mean("throughput_ratio_vs_static"), mean("throughput_ratio_vs_plain")

    best = max(online, key=rank, default=None)
    out: dict[str, Any] = {"best_online_arm_by_throughput": best}
    if best is not None:
        vs_static = arms[best].get("throughput_ratio_vs_static", {})
        vs_plain = arms[best].get("throughput_ratio_vs_plain", {})
        out["online_vs_static_at_least_1.25_low_above_1"] = (
            None
            if vs_static.get("mean") is None
            else vs_static["mean"] >= 1.25 and (vs_static.get("low") or 0.0) > 1.0
        )
        out["online_vs_plain_at_least_1.0"] = (
            None if vs_plain.get("mean") is None else vs_plain["mean"] >= 1.0
        )
    level = f"{min(levels):.1f}"
    base = arms.get("online-fkl", {}).get("traces_to_accept_length", {}).get(level)
    for name in online:
        mine = arms[name].get("traces_to_accept_length", {}).get(level)
        if name == "online-fkl" or base is None or mine is None:
            continue
        fewer = None
        if base["mean"] and mine["mean"] is not None:
            fewer = 1.0 - mine["mean"] / base["mean"]
        separate = None
        if None not in (mine["high"], base["low"]):
            separate = mine["high"] < base["low"]
        out[f"{name}_vs_online-fkl_traces_to_{level}"] = {
            "fewer_fraction": fewer,
            "intervals_separate": separate,
            "goal_20pct_fewer_and_separate": None
            if fewer is None or separate is None
            else fewer >= 0.2 and separate,
        }
    return out


# ---------------------------------------------------------------------------- workload


def shift_index(schedule: Schedule) -> int:
    """The first request of the second phase: where the traffic shifts."""
    if len(schedule.phases) < 2:
        raise UsageError(
            f"schedule {schedule} has one phase; the benchmark needs a shift: give two phases, "
            "e.g. 'prose:8,code:48'"
        )
    return schedule.phase_boundaries()[1]


@dataclass
class Workload:
    requests: list[ScheduledRequest]
    fit: list[Prompt]  # the static draft's prompts
    evaluation: list[Prompt]  # never served: the traces-to-quality curve's prompts


def workload(schedule: Schedule, config: AdaptConfig, seed: int) -> Workload:
    """The seed's request stream, the static draft's prompts and the evaluation prompts.

    The first phase's domains are split in halves (the same split for every seed): the draft
    is fitted on one, the stream serves the other. ``eval_prompts`` prompts of the last
    phase's new domains are set aside, never served. Unseen traffic (distinct_prompts 0) is
    checked: no prompt is served twice."""
    first = [domain for domain, _ in schedule.phases[0].mix]
    last_new = [d for d, _ in schedule.phases[-1].mix if d not in first] or [
        d for d, _ in schedule.phases[-1].mix
    ]
    pools: dict[str, list[Prompt]] = {}
    fit: list[Prompt] = []
    evaluation: list[Prompt] = []
    per_domain = math.ceil(config.eval_prompts / len(last_new))
    for domain in schedule.domains:
        prompts = load_domain(domain)
        if domain in first:
            train, prompts = split_prompts(prompts, 0.5, SPLIT_SEED)
            fit += train
        if domain in last_new:
            order = random.Random(f"aurora/adapt/eval/{domain}").sample(prompts, len(prompts))
            evaluation += order[:per_domain]
            prompts = order[per_domain:]
        if config.recurring:
            prompts = random.Random(f"aurora/adapt/{domain}/{seed}").sample(
                prompts, min(config.distinct_prompts, len(prompts))
            )
        pools[domain] = prompts
    requests = list(schedule.requests(seed, pools))
    if not config.recurring:
        seen: set[str] = set()
        for request in requests:
            if request.prompt.id in seen:
                domain = request.prompt.domain
                raise UsageError(
                    f"unseen traffic needs {sum(r.prompt.domain == domain for r in requests)} "
                    f"distinct {domain} prompts but {len(pools[domain])} are available: serve "
                    "fewer requests, or pass --distinct-prompts N for recurring traffic"
                )
            seen.add(request.prompt.id)
    return Workload(requests, fit, evaluation[: config.eval_prompts])


# ---------------------------------------------------------------------------- the run


def static_draft(
    config: AdaptConfig, target: tuple[Any, Any], fit: Sequence[Prompt], progress: Any
) -> Path:
    """The static draft: fitted once on the first domain, cached in the workdir under
    a key of everything that shapes it."""
    from aurora.runtime.bench import fit_draft
    from aurora.runtime.checkpoint import CheckpointStore
    from aurora.runtime.trainer.config import FitConfig
    from aurora.runtime.workloads import BUILTIN_DOMAINS

    prompts = list(fit[: config.fit_prompts])
    fit_config = FitConfig(
        model=config.model,
        epochs=config.fit_epochs,
        max_new_tokens=config.max_new_tokens,
        spec_tokens=config.k,
        lambda_discard=config.lambda_discard,
        lr=config.lr,
        out=config.workdir,  # replaced below, once the cache key is known
    )
    fields = {k: v for k, v in asdict(fit_config).items() if k not in ("out", "domain")}
    key = hashlib.sha256(
        json.dumps([fields, [p.id for p in prompts]], default=str).encode()
    ).hexdigest()[:12]
    root = config.workdir / "static" / key
    cached = CheckpointStore(root).latest() if root.is_dir() else None
    if cached is not None:
        return root / cached.revision
    shutil.rmtree(root, ignore_errors=True)
    fit_config.out = root
    _, tokenizer = target
    # The vocabulary rule of the trainer's day 0: the first traces plus the built-in
    # domains' prompts, so the other domains' tokens exist in the draft vocabulary.
    streams = [tokenizer(p.text).input_ids for d in BUILTIN_DOMAINS for p in load_domain(d)[:200]]
    return fit_draft(
        fit_config, prompts, progress=progress, vocabulary_streams=streams, target=target
    )


def _load_head(path: Path, model: Any) -> tuple[Any, str]:
    """A checkpoint as a server loads it (verified, in the target's dtype)."""
    from aurora.runtime.checkpoint import load_draft
    from aurora.runtime.draft import EagleProposer

    head, meta = load_draft(path, model, dtype=model.dtype)
    return EagleProposer(head, meta.revision), meta.revision


def _serve_with(state: ArmState) -> None:
    state.proposer = state.arm.proposer(state) if state.arm.proposer else state.head


def evaluation_examples(
    prompts: Sequence[Prompt], target: tuple[Any, Any], head: Any, config: AdaptConfig
) -> list[Any]:
    """The target's greedy continuations of the evaluation prompts, featurised."""
    from types import SimpleNamespace

    from aurora.runtime.engine import generate
    from aurora.runtime.trainer.objective import build_example

    model, tokenizer = target
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        g = generate(model, ids, max_new_tokens=config.max_new_tokens, eos_ids=eos)
        record = SimpleNamespace(
            trace_id=prompt.id, domain=prompt.domain, prompt_ids=ids, output_ids=g.output_ids,
            steps=[],
        )  # fmt: skip
        examples.append(build_example(model, head, record))
    return examples


def run_adapt(
    config: AdaptConfig,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark over every seed; returns the JSON document (config, figures with
    intervals, per-seed figures, per-request series, swaps, curves). ``progress(event,
    info)`` is called with "fit", "seed", "request" and "train" events; ``partial(doc)``
    with the document of the seeds done so far after each seed but the last (``complete``
    false), so a run stopped part-way keeps its finished seeds."""
    import torch

    from aurora.runtime.embedded_redis import EmbeddedRedis
    from aurora.runtime.models import load_target
    from aurora.runtime.packed import packed_rows

    report = progress or (lambda event, info: None)
    schedule = Schedule.from_string(config.schedule_spec)
    shift = shift_index(schedule)
    loads = [workload(schedule, config, config.seed + i) for i in range(config.seeds)]
    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_target(config.model)
    started = time.perf_counter()
    draft_path = static_draft(
        config,
        (model, tokenizer),
        loads[0].fit,
        lambda stage, i, n, *rest: report("fit", {"stage": stage, "done": i, "total": n}),
    )
    fit_s = time.perf_counter() - started
    static_head, _ = _load_head(draft_path, model)
    evaluation = evaluation_examples(
        loads[0].evaluation, (model, tokenizer), static_head.head, config
    )
    from aurora.runtime.trainer.objective import evaluate

    document = functools.partial(
        _document,
        config,
        schedule,
        shift,
        loads,
        started=started,
        static_path=draft_path,
        static_fit_s=fit_s,
        static_accept=evaluate(evaluation, config.k, static_head.head)["accept_length"],
        packed=packed_rows(model),
    )
    redis_server = EmbeddedRedis().start()
    seeds: list[tuple[int, dict[str, ArmState]]] = []
    try:
        for i, load in enumerate(loads):
            seed = config.seed + i
            report("seed", {"seed": seed, "index": i, "total": config.seeds})
            arms = _run_seed(
                config, seed, load, shift, (model, tokenizer), draft_path, evaluation,
                redis_server.url, report,
            )  # fmt: skip
            seeds.append((seed, arms))
            if partial is not None and len(seeds) < config.seeds:
                partial(document(seeds))
    finally:
        redis_server.close()
    return document(seeds)


def _document(
    config: AdaptConfig,
    schedule: Schedule,
    shift: int,
    loads: Sequence[Workload],
    seeds: Sequence[tuple[int, dict[str, ArmState]]],
    *,
    started: float,
    static_path: Path,
    static_fit_s: float,
    static_accept: float,
    packed: Sequence[int],
) -> dict[str, Any]:
    """The JSON document of the seeds run so far; ``static_accept`` is the static draft's
    offline accept length on the evaluation prompts, ``packed`` the row counts of the
    target's prepacked weights."""
    import torch

    per_seed = [seed_figures(arms, shift, config) for _, arms in seeds]
    combined = combine(per_seed)
    return {
        "benchmark": "adapt",
        "complete": len(seeds) == config.seeds,
        "seeds_planned": config.seeds,
        "traffic": "recurring" if config.recurring else "unseen",
        "traffic_note": (
            f"recurring: each domain cycles through {config.distinct_prompts} prompts, so "
            "post-shift requests revisit prompts the online arms trained on"
            if config.recurring
            else "unseen: no prompt is served twice; the curve's prompts are never served"
        ),
        "config": {**asdict(config), "workdir": str(config.workdir), "arms": config.arm_names},
        "schedule": str(schedule),
        "shift_index": shift,
        "window": {"start": max(shift, len(loads[0].requests) - config.window)},
        "seeds": [seed for seed, _ in seeds],
        "threads": torch.get_num_threads(),
        "packed_weight_rows": list(packed),  # see aurora.runtime.packed
        "static_draft": str(static_path),
        "static_fit_seconds": static_fit_s,
        "static_offline_accept_length_on_eval": static_accept,
        "eval_prompts": [p.id for p in loads[0].evaluation],
        "wall_seconds": time.perf_counter() - started,
        "arms": combined,
        "goals": goals(combined, config.levels),
        "descriptions": {name: ARMS[name].description for name in config.arm_names},
        "static_arms": {name: ARMS[name].static for name in config.arm_names},
        "per_seed": [
            {
                "seed": seed,
                "figures": figures,
                "curves": {name: st.curve for name, st in arms.items() if st.curve},
                "swaps": {name: st.swaps for name, st in arms.items()},
                "train_seconds": {name: st.train_seconds for name, st in arms.items()},
                "requests_served": {name: st.served for name, st in arms.items()},
            }
            for (seed, arms), figures in zip(seeds, per_seed, strict=True)
        ],
    }


MERGE_FREE = ("seed", "seeds", "workdir")  # config keys that may differ between merged runs


def merge_documents(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One document from several runs of one configuration over different seeds (e.g. one
    seed per machine, ``--seed S --seeds 1``): the seeds' figures are pooled and every
    interval and goal recomputed, as if one run had served them all. ``docs`` are (name,
    document) pairs; the name only labels errors and the ``merged_from`` list. A run stopped
    part-way (``complete`` false) contributes the seeds it finished."""
    if len(docs) < 2:
        raise UsageError("--merge: give at least two JSON documents of `aurora bench adapt`")
    first_name, first = docs[0]
    seen: dict[int, str] = {}
    for name, doc in docs:
        if doc.get("benchmark") != "adapt" or "per_seed" not in doc:
            raise UsageError(f"--merge {name}: not a JSON document of `aurora bench adapt --json`")
        differ = sorted(
            key
            for key in set(first["config"]) | set(doc["config"])
            if key not in MERGE_FREE and first["config"].get(key) != doc["config"].get(key)
        )
        if differ:
            raise UsageError(
                f"--merge {name}: its configuration differs from {first_name}'s in "
                f"{', '.join(differ)}; only runs of one configuration (seeds apart) can be pooled"
            )
        if doc["eval_prompts"] != first["eval_prompts"]:
            raise UsageError(f"--merge {name}: its evaluation prompts differ from {first_name}'s")
        for entry in doc["per_seed"]:
            if entry["seed"] in seen:
                raise UsageError(
                    f"--merge {name}: seed {entry['seed']} is also in {seen[entry['seed']]}; "
                    "each seed may be pooled once"
                )
            seen[entry["seed"]] = name
    per_seed = sorted(
        (entry for _, doc in docs for entry in doc["per_seed"]), key=lambda e: e["seed"]
    )
    combined = combine([entry["figures"] for entry in per_seed])
    seeds = [entry["seed"] for entry in per_seed]
    merged = {key: value for key, value in first.items() if key not in ("wall_seconds",)}
    merged.update(
        complete=all(doc.get("complete", True) for _, doc in docs),
        seeds_planned=len(seeds),
        config={**first["config"], "seed": seeds[0], "seeds": len(seeds)},
        seeds=seeds,
        arms=combined,
        goals=goals(combined, first["config"]["levels"]),
        per_seed=per_seed,
        merged_from=[
            {
                "file": name,
                "seeds": [entry["seed"] for entry in doc["per_seed"]],
                "complete": doc.get("complete", True),
                "wall_seconds": doc.get("wall_seconds"),
                "workdir": doc["config"].get("workdir"),
                "static_offline_accept_length_on_eval": doc.get(
                    "static_offline_accept_length_on_eval"
                ),
            }
            for name, doc in docs
        ],
    )
    return merged


def _run_seed(
    config: AdaptConfig,
    seed: int,
    load: Workload,
    shift: int,
    target: tuple[Any, Any],
    draft_path: Path,
    evaluation: Sequence[Any],
    redis_url: str,
    report: Callable[[str, dict[str, Any]], None],
) -> dict[str, ArmState]:
    import redis
    import torch

    from aurora.runtime import protocol
    from aurora.runtime.cost import VerifyCost, measure_generate_cost
    from aurora.runtime.engine import generate
    from aurora.runtime.protocol import build_trace
    from aurora.runtime.trainer.config import TrainerConfig
    from aurora.runtime.trainer.objective import evaluate
    from aurora.runtime.trainer.trainer import Trainer

    model, tokenizer = target
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    torch.manual_seed(seed)
    run_dir = config.workdir / "run" / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # every run starts from the static draft
    client = redis.Redis.from_url(redis_url)
    arms: dict[str, ArmState] = {}
    # The verify cost the suffix and hybrid arms plan with, measured as a server does, once
    # per seed and only when one of them runs.
    cost = functools.cache(lambda: VerifyCost(measure_generate_cost(model, config.k + 1)))
    try:
        for name in config.arm_names:
            arm = ARMS[name]
            # a model-free arm is served under its own name (suffix), plain under none
            revision = arm.name if arm.draft == Builtin.NONE and arm.proposer else Builtin.NONE
            state = ArmState(arm, None, revision, memory={"cost": cost})
            if arm.draft == "static":
                state.head, state.revision = _load_head(draft_path, model)
            if arm.objective is not None:
                trainer_config = TrainerConfig(
                    model=config.model,
                    speculator=f"{NAMESPACE}/s{seed}-{name}",
                    redis_url=redis_url,
                    checkpoint_dir=run_dir / name,
                    consumer=f"bench-{name}",
                    init=str(draft_path),
                    lr=config.lr,
                    spec_tokens=config.k,
                    # A candidate is evaluated after every block's traces.
                    first_candidate_after=max(1, config.block * 5 // 6),
                    publish_every=max(1, config.block * 5 // 6),
                    steps_per_trace=config.steps_per_block / config.block * 1.2,
                    block_ms=0,  # never wait for traffic: the slice ends when its steps are done
                    checkpoint_every=1_000_000,  # each evaluation (every block) checkpoints
                    publish_margin=config.publish_margin,
                    min_accept_length=1.0,  # it starts from a fitted draft: beating stable is the gate
                    keep=3,
                    seed=seed,
                    **trainer_overrides(arm, config),
                )
                state.trainer = Trainer(trainer_config, target=model, tokenizer=tokenizer)
                state.trainer.resume()
                _serve_stable(client, trainer_config.keys, state.revision, str(draft_path), 1)
                state.curve.append(_curve_point(state, 0, evaluation, config.k, evaluate))
            _serve_with(state)
            arms[name] = state
        # Seeded trace ids, the same in every online arm (each has its own stream).
        trace_ids = [
            hashlib.sha256(f"aurora/adapt/{seed}/{r.index}".encode()).hexdigest()[:16]
            for r in load.requests
        ]
        warm = prompt_ids(tokenizer, load.requests[0].prompt)
        for state in arms.values():  # warm-up: first-call allocations hit no arm's figures
            generate(model, warm, proposer=state.proposer, k=config.k, max_new_tokens=8)
        for request in load.requests:
            ids = prompt_ids(tokenizer, request.prompt)
            order = list(arms.values())
            random.Random(f"{seed}/{request.index}").shuffle(order)
            for state in order:
                g = generate(
                    model,
                    ids,
                    proposer=state.proposer,
                    k=config.k if state.proposer is not None else 0,
                    max_new_tokens=config.max_new_tokens,
                    eos_ids=eos,
                    trace_topk=config.trace_topk,  # every arm pays for it, only online ones send it
                    # as a server refines it: the verify cost this arm's drafts decide with
                    cost=getattr(state.proposer, "cost", None),
                )
                state.served.append(
                    {
                        "index": request.index,
                        "domain": request.prompt.domain,
                        "prompt_id": request.prompt.id,
                        "revision": state.revision,
                        "decode_tokens": max(len(g.output_ids) - 1, 0),
                        "decode_seconds": g.decode_s,
                        "verify_steps": len(g.steps),
                        "step_tokens": sum(s.accepted + 1 for s in g.steps),
                    }
                )
                if state.arm.observe is not None:
                    state.arm.observe(state, g)
                if state.trainer is not None:
                    record = build_trace(
                        g,
                        revision=state.revision,
                        server="bench-adapt",
                        domain=request.prompt.domain,
                        temperature=0.0,
                    )
                    record = record.model_copy(update={"trace_id": trace_ids[request.index]})
                    protocol.publish_trace(client, state.trainer.keys, record, 10_000)
            report(
                "request",
                {"index": request.index, "total": len(load.requests), "arms": arms, "shift": shift},
            )
            served = request.index + 1
            if served % config.block == 0 and served < len(load.requests):  # none after the last
                for state in arms.values():
                    if state.trainer is not None:
                        _train_slice(state, config, client, model, served)
                        point = _curve_point(
                            state, max(served - shift, 0), evaluation, config.k, evaluate
                        )
                        if point["traces"] == 0:  # before the shift: keep the latest state only
                            state.curve.pop()
                        state.curve.append(point)
                        report("train", {"arm": state})
        return arms
    finally:
        for state in arms.values():
            if state.trainer is not None:
                state.trainer.redis.close()
        client.close()


def _curve_point(
    state: ArmState, traces: int, evaluation: Sequence[Any], k: int, evaluate: Any
) -> dict[str, float]:
    """The trainer's draft now, on the never-served evaluation prompts."""
    return {
        "traces": traces,  # post-shift traces served to the arm so far
        "trained_traces": state.trainer.traces_seen,
        "accept_length": evaluate(evaluation, k, state.trainer.head)["accept_length"],
    }


def _train_slice(
    state: ArmState, config: AdaptConfig, client: Any, model: Any, next_index: int
) -> None:
    """Serving is paused: the arm's trainer reads the block's traces and runs up to
    ``steps_per_block`` optimizer steps (publishing when a candidate is due); then the
    arm swaps to the newest published candidate, as a server's watcher would."""
    from aurora.runtime import protocol

    trainer = state.trainer
    started = time.perf_counter()
    for _ in range(config.steps_per_block):
        if not trainer.tick():
            break
    trainer.tick()  # reads nothing new; publishes if the last step made a candidate due
    state.train_seconds += time.perf_counter() - started
    candidates = protocol.list_candidates(client, trainer.keys)
    if not candidates or candidates[-1].revision == state.revision:
        return
    newest = candidates[-1]
    state.head, state.revision = _load_head(Path(newest.path), model)
    _serve_with(state)
    state.swaps.append(
        {"index": next_index, "revision": state.revision, "traces_seen": newest.traces_seen,
         "evaluation": newest.evaluation}
    )  # fmt: skip
    # What is served is now stable: the next candidate must beat it.
    _serve_stable(client, trainer.keys, state.revision, newest.path, len(state.swaps) + 1)


def _serve_stable(client: Any, keys: Any, revision: str, path: str, generation: int) -> None:
    """Record ``revision`` as the one served (stable, no canary, no baseline share)."""
    from aurora.runtime import protocol

    stable = protocol.RevisionRef(revision=revision, path=path)
    desired = protocol.DesiredState(
        stable=stable, candidate_share=0.0, baseline_share=0.0, generation=generation
    )
    protocol.set_desired(client, keys, desired)


# ---------------------------------------------------------------------------- plot


COLORS = {
    "plain": "black", "static": "tab:gray", "online-fkl": "tab:blue",
    "online-offpath": "tab:orange", "online-reject": "tab:green", "online-all": "tab:red",
    "online-pg": "tab:purple", "suffix": "tab:brown", "hybrid-online": "tab:olive",
}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> Path:
    """Two panels: the served accept length over requests (rolling mean over seeds, the
    shift dashed), and each online arm's offline accept length on the never-served
    evaluation prompts against post-shift traces (one line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rolling = result["config"]["rolling"]
    fig, (served_ax, curve_ax) = plt.subplots(2, 1, figsize=(10, 8))
    names = list(result["per_seed"][0]["requests_served"])
    for name in names:
        color = COLORS.get(name)
        series = []
        for seed in result["per_seed"]:
            served = seed["requests_served"][name]
            series.append(
                [s["step_tokens"] / s["verify_steps"] if s["verify_steps"] else 1.0 for s in served]
            )
        mean = [statistics.fmean(values) for values in zip(*series, strict=True)]
        served_ax.plot(rolling_mean(mean, rolling), color=color, label=name)
        for i, seed in enumerate(result["per_seed"]):
            curve = seed["curves"].get(name)
            if curve:
                curve_ax.plot(
                    [p["traces"] for p in curve],
                    [p["accept_length"] for p in curve],
                    color=color,
                    alpha=0.8,
                    label=name if i == 0 else None,
                )
    served_ax.axvline(result["shift_index"], color="black", linestyle="--", linewidth=1)
    served_ax.set_xlabel("request")
    served_ax.set_ylabel(f"served accept length (rolling {rolling}, mean of seeds)")
    for level in result["config"]["levels"]:
        curve_ax.axhline(level, color="black", linestyle=":", linewidth=0.8)
    curve_ax.set_xlabel("post-shift traces")
    curve_ax.set_ylabel("offline accept length, never-served prompts")
    for ax in (served_ax, curve_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    served_ax.set_title(
        f"aurora bench adapt: {result['schedule']}, {result['traffic']} traffic, "
        f"{len(result['seeds'])} seeds"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
