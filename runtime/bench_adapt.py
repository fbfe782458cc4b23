"""`aurora bench adapt`: does the draft keep up when traffic shifts domain?

One seeded request stream (default: prose, then code) is served by three arms on
the same requests, with the torch engine at temperature 0:
  - static: a draft fitted offline on the first domain only (`fit_draft`, cached
    under the workdir), never updated;
  - online: starts from that same draft; every served request's trace goes through
    Redis (a real embedded redis-server) to a real `Trainer`, which trains with the
    Aurora objective and publishes candidates; the arm hot-swaps to each newly
    published candidate between requests, as a server does (the live canary is
    skipped: the trainer's offline gate on held-out traces decides alone);
  - lambda0: the same with lambda_discard = 0 (no rejected-proposal term).

Fairness on a small CPU machine. Serving and training share the cores here, while in a
deployment the trainer runs on other devices. So the two never overlap: request i is
served by the three arms back to back (in a per-request shuffled order, so machine
drift and cache warmth hit every arm alike), and after each block of B requests
serving pauses while each online trainer runs its slice (at most S optimizer steps).
Decode tokens/s are measured inside the engine, after prefill, and never include
training or Redis time.

Figures (see `summarize`): per arm the accept length and decode tokens/s per request;
the throughput ratio online/static and lambda0/static over the last window after the
shift; the requests needed to recover after the shift; and the traces needed to reach
a target accept length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aurora.errors import UsageError
from aurora.runtime.options import knob
from aurora.runtime.workloads import Prompt, Schedule, ScheduledRequest, load_domain, split_prompts

log = logging.getLogger(__name__)

ARMS = ("static", "online", "lambda0")
LADDER = (1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.5)  # accept lengths for traces_to_accept_length
NAMESPACE = "bench"


@dataclass
class AdaptConfig:
    """Everything `aurora bench adapt` takes; each knob's flag is generated from its field."""

    model: str = knob("smollm2-135m", "target model: alias, path or Hugging Face id")
    schedule: str = ""  # the request stream; "" is prose:REQUESTS_BEFORE,code:REQUESTS_AFTER
    requests_before: int = knob(8, "requests before the shift (default schedule)", metavar="N")
    requests_after: int = knob(40, "requests after the shift (default schedule)", metavar="N")
    seed: int = knob(0, "seed of the request stream and the trainers")
    distinct_prompts: int = knob(
        16,
        "recurring traffic: each domain draws from this many distinct prompts, as in "
        "`aurora local` (0 = all prompts)",
        metavar="N",
    )
    max_new_tokens: int = knob(32, "tokens generated per request")
    k: int = knob(3, "k for every arm", flag="--spec-tokens")
    block: int = knob(8, "requests served between training slices")
    steps_per_block: int = knob(
        16, "optimizer steps each online trainer runs per slice, at most (2 per trace at block 8)"
    )
    fit_prompts: int = knob(16, "prompts the static draft is fitted on")
    fit_epochs: int = knob(6, "epochs of the static draft's fit")
    lambda_discard: float = knob(0.5, "for the online arm")
    lr: float = knob(1e-3, "learning rate of the fit and the trainers")
    publish_margin: float = knob(
        0.05,
        "a candidate is published when its offline accept length beats the served "
        "revision's by this fraction (the trainer's default: 0.05)",
    )
    trace_topk: int = 8
    window: int = knob(16, "last requests after the shift over which throughput is compared")
    rolling: int = knob(8, "rolling window for accept length")
    recover_fraction: float = knob(
        0.9,
        "recovered: rolling accept length stays at or above this fraction of the static "
        "draft's pre-shift level",
    )
    target_accept_length: float = knob(1.5, "accept length for the traces-needed figure")
    threads: int = knob(1, "torch threads (1 is robust on a shared machine; 0 = all cores)")
    workdir: Path = knob(
        Path("aurora-bench-adapt"), "cached static draft, trainer checkpoints and the plot"
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "k", "block", "steps_per_block", "window", "rolling"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 < self.recover_fraction <= 1:
            raise UsageError(
                f"recover_fraction={self.recover_fraction} must be in (0, 1], e.g. 0.9"
            )


@dataclass
class Served:
    """One request as one arm served it."""

    index: int
    domain: str
    prompt_id: str
    revision: str
    accept_length: float
    decode_tokens_per_s: float
    new_tokens: int
    trained_traces: int  # traces the served revision's trainer had incorporated


@dataclass
class Swap:
    index: int  # the first request served with the new revision
    revision: str
    traces_seen: int
    evaluation: dict[str, Any]


@dataclass
class ArmRun:
    name: str
    proposer: Any
    revision: str
    trainer: Any = None
    trained_traces: int = 0
    served: list[Served] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def accept_lengths(self) -> list[float]:
        return [s.accept_length for s in self.served]

    @property
    def tokens_per_s(self) -> list[float]:
        return [s.decode_tokens_per_s for s in self.served]


# ---------------------------------------------------------------------------- figures


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def recovery_requests(after_shift: Sequence[float], level: float, window: int) -> int | None:
    """Requests after the shift until the rolling accept length (trailing ``window``,
    over post-shift requests only) reaches ``level`` and stays there to the end:
    the 1-based count of the first such request, None when it never does."""
    rolled = rolling_mean(after_shift, window)
    recovered: int | None = None
    for i, value in enumerate(rolled):
        if value < level:
            recovered = None
        elif recovered is None:
            recovered = i + 1
    return recovered


def first_reaching(after_shift: Sequence[float], level: float, window: int) -> int | None:
    """Requests after the shift until the rolling accept length first reaches ``level``
    (1-based), None when it never does."""
    for i, value in enumerate(rolling_mean(after_shift, window)):
        if value >= level:
            return i + 1
    return None


def window_ratio(arm: Sequence[float], base: Sequence[float], start: int) -> float | None:
    """mean(arm[start:]) / mean(base[start:]): same requests, so the ratio of means."""
    a, b = arm[start:], base[start:]
    if not a or not b or statistics.fmean(b) == 0:
        return None
    return statistics.fmean(a) / statistics.fmean(b)


def summarize(arms: dict[str, dict[str, Any]], shift: int, config: AdaptConfig) -> dict[str, Any]:
    """The benchmark's figures from per-arm series ``{"accept_length": [...],
    "tokens_per_s": [...], "trained_traces": [...]}`` indexed by request, with the
    shift at request index ``shift``.

    - throughput ratio: mean decode tokens/s over the last ``window`` requests after
      the shift, arm over static (the same requests for every arm);
    - recovery (requests): post-shift requests until the arm's rolling accept length
      reaches ``recover_fraction`` x the static draft's pre-shift accept length and
      stays there (a common yardstick for all arms; see `recovery_requests`);
    - traces to the target accept length: post-shift traces served (one per request)
      until the rolling accept length first reaches it, and how many traces the
      trainer of the revision then serving had incorporated; the same count of
      post-shift traces for a ladder of accept lengths (`traces_to_accept_length`)."""
    static = arms["static"]
    n = len(static["accept_length"])
    if not 0 < shift < n:
        raise UsageError(
            f"the shift is at request {shift} of {n}: the schedule needs requests before and "
            "after it, e.g. 'prose:8,code:40'"
        )
    start = max(shift, n - config.window)
    pre_level = statistics.fmean(static["accept_length"][:shift])
    level = config.recover_fraction * pre_level
    target = config.target_accept_length
    rows: dict[str, dict[str, Any]] = {}
    for name, series in arms.items():
        accept, tps = series["accept_length"], series["tokens_per_s"]
        reached = first_reaching(accept[shift:], target, config.rolling)
        rows[name] = {
            "accept_length_before_shift": statistics.fmean(accept[:shift]),
            "accept_length_after_shift": statistics.fmean(accept[shift:]),
            "accept_length_last_window": statistics.fmean(accept[start:]),
            "tokens_per_s_before_shift": statistics.fmean(tps[:shift]),
            "tokens_per_s_last_window": statistics.fmean(tps[start:]),
            "throughput_ratio_vs_static": window_ratio(tps, static["tokens_per_s"], start),
            "recovery_requests": recovery_requests(accept[shift:], level, config.rolling),
            "traces_to_target": None
            if reached is None
            else {
                "post_shift_traces": reached,
                "trained_traces": series["trained_traces"][shift + reached - 1],
            },
        }
    return {
        "shift_index": shift,
        "requests": n,
        "post_shift_requests": n - shift,
        "last_window": {"start": start, "requests": n - start},
        "static_pre_shift_accept_length": pre_level,
        "recovery_level": level,
        "recovery_definition": (
            f"post-shift requests until the arm's rolling accept length (trailing "
            f"{config.rolling} requests after the shift) reaches {config.recover_fraction:g} x "
            "the static draft's pre-shift accept length and stays there to the end; null: never"
        ),
        "target_accept_length": target,
        "throughput_ratio_online_vs_static": rows["online"]["throughput_ratio_vs_static"],
        "throughput_ratio_lambda0_vs_static": rows["lambda0"]["throughput_ratio_vs_static"],
        "recovery_requests": {name: row["recovery_requests"] for name, row in rows.items()},
        "traces_to_target": {
            name: rows[name]["traces_to_target"] for name in ("online", "lambda0")
        },
        "traces_to_accept_length": {
            f"{level:.1f}": {
                name: first_reaching(arms[name]["accept_length"][shift:], level, config.rolling)
                for name in ("online", "lambda0")
            }
            for level in LADDER
        },
        "arms": rows,
    }


# ---------------------------------------------------------------------------- workload


def shift_index(schedule: Schedule) -> int:
    """The first request of the second phase: where the traffic shifts."""
    if len(schedule.phases) < 2:
        raise UsageError(
            f"schedule {schedule} has one phase; the benchmark needs a shift: give two phases, "
            "e.g. 'prose:8,code:40'"
        )
    return schedule.phase_boundaries()[1]


def stream(
    schedule: Schedule, seed: int, distinct: int
) -> tuple[list[ScheduledRequest], list[Prompt]]:
    """(requests served, prompts the static draft is fitted on). The first phase's
    domains are split in halves: the draft is fitted on one and the stream serves the
    other, so no arm is served a prompt the static draft was trained on. ``distinct``
    caps each domain's pool (recurring traffic)."""
    first = [domain for domain, _ in schedule.phases[0].mix]
    pools: dict[str, list[Prompt]] = {}
    fit: list[Prompt] = []
    for domain in schedule.domains:
        prompts = load_domain(domain)
        if domain in first:
            train, prompts = split_prompts(prompts, 0.5, seed)
            fit += train
        if distinct:
            prompts = random.Random(f"aurora/adapt/{domain}/{seed}").sample(
                prompts, min(distinct, len(prompts))
            )
        pools[domain] = prompts
    return list(schedule.requests(seed, pools)), fit


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
    key = hashlib.sha256(
        json.dumps(
            [
                config.model,
                [p.id for p in prompts],
                config.fit_epochs,
                config.max_new_tokens,
                config.k,
                config.lambda_discard,
                config.lr,
                config.seed,
            ]
        ).encode()
    ).hexdigest()[:12]
    root = config.workdir / "static" / key
    cached = CheckpointStore(root).latest() if root.is_dir() else None
    if cached is not None:
        return root / cached.revision
    shutil.rmtree(root, ignore_errors=True)
    _, tokenizer = target
    # The vocabulary rule of the trainer's day 0: the first traces plus the built-in
    # domains' prompts, so the other domains' tokens exist in the draft vocabulary.
    streams = [tokenizer(p.text).input_ids for d in BUILTIN_DOMAINS for p in load_domain(d)[:200]]
    fit_config = FitConfig(
        model=config.model,
        epochs=config.fit_epochs,
        max_new_tokens=config.max_new_tokens,
        spec_tokens=config.k,
        lambda_discard=config.lambda_discard,
        lr=config.lr,
        out=root,
    )
    return fit_draft(
        fit_config,
        prompts,
        progress=progress,
        vocabulary_streams=streams,
        target=target,
    )


def _proposer(path: Path, model: Any) -> tuple[Any, str, int]:
    """Load a checkpoint as a server does (verified, in the target's dtype)."""
    from aurora.runtime.checkpoint import load_draft
    from aurora.runtime.draft import EagleProposer

    head, meta = load_draft(path, model, dtype=model.dtype)
    return EagleProposer(head, meta.revision), meta.revision, meta.traces_seen


def run_adapt(
    config: AdaptConfig, progress: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document (config, figures, per-request series,
    swaps). ``progress(event, info)`` is called with "fit", "request" and "train" events."""
    import redis
    import torch

    from aurora.runtime import protocol
    from aurora.runtime.embedded_redis import EmbeddedRedis
    from aurora.runtime.engine import generate
    from aurora.runtime.models import load_target
    from aurora.runtime.protocol import build_trace
    from aurora.runtime.trainer.config import TrainerConfig
    from aurora.runtime.trainer.trainer import Trainer

    report = progress or (lambda event, info: None)
    schedule = Schedule.from_string(
        config.schedule or f"prose:{config.requests_before},code:{config.requests_after}"
    )
    shift = shift_index(schedule)
    requests, fit = stream(schedule, config.seed, config.distinct_prompts)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model, tokenizer = load_target(config.model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    started = time.perf_counter()
    draft_path = static_draft(
        config,
        (model, tokenizer),
        fit,
        lambda stage, i, n, *rest: report("fit", {"stage": stage, "done": i, "total": n}),
    )
    fit_s = time.perf_counter() - started
    run_dir = config.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # every run starts from the static draft
    redis_server = EmbeddedRedis().start()
    client = redis.Redis.from_url(redis_server.url)
    arms: dict[str, ArmRun] = {}
    try:
        for name in ARMS:
            proposer, revision, traces = _proposer(draft_path, model)
            arm = ArmRun(name, proposer, revision, trained_traces=traces)
            if name != "static":
                trainer_config = TrainerConfig(
                    model=config.model,
                    speculator=f"{NAMESPACE}/adapt-{name}",
                    redis_url=redis_server.url,
                    checkpoint_dir=run_dir / name,
                    consumer=f"bench-{name}",
                    init=str(draft_path),
                    lr=config.lr,
                    lambda_discard=0.0 if name == "lambda0" else config.lambda_discard,
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
                    seed=config.seed,
                )
                arm.trainer = Trainer(trainer_config, target=model, tokenizer=tokenizer)
                arm.trainer.resume()
                _serve_stable(client, trainer_config.keys, revision, str(draft_path), 1)
            arms[name] = arm
        # Seeded trace ids, the same in both online arms (each has its own stream): the
        # trainers hold out the same requests for evaluation, run after run.
        trace_ids = [
            hashlib.sha256(f"aurora/adapt/{config.seed}/{r.index}".encode()).hexdigest()[:16]
            for r in requests
        ]
        warm = tokenizer(requests[0].prompt.text).input_ids
        for arm in arms.values():  # warm-up: first-call allocations hit no arm's figures
            generate(model, warm, proposer=arm.proposer, k=config.k, max_new_tokens=8)
        for request in requests:
            ids = tokenizer(request.prompt.text).input_ids
            order = list(arms.values())
            random.Random(f"{config.seed}/{request.index}").shuffle(order)
            for arm in order:
                g = generate(
                    model,
                    ids,
                    proposer=arm.proposer,
                    k=config.k,
                    max_new_tokens=config.max_new_tokens,
                    eos_ids=eos,
                    trace_topk=config.trace_topk,  # every arm pays for it, only online ones send it
                )
                arm.served.append(
                    Served(
                        request.index,
                        request.prompt.domain,
                        request.prompt.id,
                        arm.revision,
                        g.accept_length,
                        g.decode_tokens_per_s,
                        len(g.output_ids),
                        arm.trained_traces,
                    )
                )
                if arm.trainer is not None:
                    record = build_trace(
                        g,
                        revision=arm.revision,
                        server="bench-adapt",
                        domain=request.prompt.domain,
                        temperature=0.0,
                    )
                    record = record.model_copy(update={"trace_id": trace_ids[request.index]})
                    protocol.publish_trace(client, arm.trainer.keys, record, 10_000)
            report(
                "request",
                {"index": request.index, "total": len(requests), "arms": arms, "shift": shift},
            )
            served = request.index + 1
            if served % config.block == 0 and served < len(requests):  # none after the last
                for arm in arms.values():
                    if arm.trainer is not None:
                        _train_slice(arm, config, client, model, served)
                        report("train", {"arm": arm})
        series = {
            name: {
                "accept_length": arm.accept_lengths,
                "tokens_per_s": arm.tokens_per_s,
                "trained_traces": [s.trained_traces for s in arm.served],
            }
            for name, arm in arms.items()
        }
        figures = summarize(series, shift, config)
        return {
            "benchmark": "adapt",
            "config": {**asdict(config), "workdir": str(config.workdir)},
            "schedule": str(schedule),
            "threads": torch.get_num_threads(),
            "static_draft": str(draft_path),
            "static_fit_seconds": fit_s,
            "wall_seconds": time.perf_counter() - started,
            **figures,
            "swaps": {name: [asdict(s) for s in arm.swaps] for name, arm in arms.items()},
            "train_seconds": {name: arm.train_seconds for name, arm in arms.items()},
            "requests_served": {
                name: [asdict(s) for s in arm.served] for name, arm in arms.items()
            },
        }
    finally:
        for arm in arms.values():
            if arm.trainer is not None:
                arm.trainer.redis.close()
        client.close()
        redis_server.close()


def _train_slice(
    arm: ArmRun, config: AdaptConfig, client: Any, model: Any, next_index: int
) -> None:
    """Serving is paused: the arm's trainer reads the block's traces and runs up to
    ``steps_per_block`` optimizer steps (publishing when a candidate is due); then the
    arm swaps to the newest published candidate, as a server's watcher would."""
    from aurora.runtime import protocol

    trainer = arm.trainer
    started = time.perf_counter()
    for _ in range(config.steps_per_block):
        if not trainer.tick():
            break
    trainer.tick()  # reads nothing new; publishes if the last step made a candidate due
    arm.train_seconds += time.perf_counter() - started
    candidates = protocol.list_candidates(client, trainer.keys)
    if not candidates or candidates[-1].revision == arm.revision:
        return
    newest = candidates[-1]
    proposer, revision, traces = _proposer(Path(newest.path), model)
    arm.proposer, arm.revision, arm.trained_traces = proposer, revision, traces
    arm.swaps.append(Swap(next_index, revision, traces, newest.evaluation))
    # What is served is now stable: the next candidate must beat it.
    _serve_stable(client, trainer.keys, revision, newest.path, len(arm.swaps) + 1)


def _serve_stable(client: Any, keys: Any, revision: str, path: str, generation: int) -> None:
    """Record ``revision`` as the one served (stable, no canary, no baseline share)."""
    from aurora.runtime import protocol

    stable = protocol.RevisionRef(revision=revision, path=path)
    desired = protocol.DesiredState(
        stable=stable, candidate_share=0.0, baseline_share=0.0, generation=generation
    )
    protocol.set_desired(client, keys, desired)


# ---------------------------------------------------------------------------- plot


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accept length and decode tokens/s over requests (rolling means, raw points
    faint), one line per arm, the shift and the online arms' swaps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rolling = result["config"]["rolling"]
    colors = {"static": "tab:gray", "online": "tab:blue", "lambda0": "tab:orange"}
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, served in result["requests_served"].items():
        x = [s["index"] for s in served]
        for ax, key in zip(axes, ("accept_length", "decode_tokens_per_s"), strict=True):
            y = [s[key] for s in served]
            ax.plot(x, y, ".", color=colors.get(name), alpha=0.2, markersize=4)
            ax.plot(x, rolling_mean(y, rolling), color=colors.get(name), label=name)
        for swap in result["swaps"][name]:
            axes[0].axvline(swap["index"], color=colors.get(name), alpha=0.25, linewidth=0.8)
    for ax in axes:
        ax.axvline(result["shift_index"], color="black", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"accept length (rolling {rolling})")
    axes[1].set_ylabel("decode tokens/s")
    axes[1].set_xlabel("request")
    axes[0].legend(loc="upper right")
    ratio = result["throughput_ratio_online_vs_static"]
    axes[0].set_title(
        f"aurora bench adapt: {result['schedule']} (shift at request {result['shift_index']}, "
        f"dashed); online/static {ratio:.2f}x over the last {result['last_window']['requests']}"
        if ratio is not None
        else f"aurora bench adapt: {result['schedule']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
