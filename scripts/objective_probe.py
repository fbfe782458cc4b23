"""Choose the objective's weights on traffic `aurora bench adapt` does not report on.

The static draft of `aurora bench adapt` (fitted on prose; fitted here when its workdir has
none) serves ``--traces`` requests of another domain (default: math) and records their
traces. Each objective variant then learns from those traces in arrival order, as the
online trainer does: blocks of ``--block`` traces, ``--steps-per-block`` optimizer steps
each (`aurora.runtime.trainer.step.optimizer_step`, the trainer's step), half of every batch
replayed from earlier traces. After every block the draft's offline accept length on
``--eval-prompts`` never-served prompts of the domain is recorded. Over ``--seeds`` seeds
(trace order, replay draws and served prompts) it writes the curves and the traces each
variant needs to reach each level, as mean and 90 % interval.

Unlike the benchmark, the traces come from the static draft only (the proposals, and so
the rejections, are not the learning draft's own): a cheap proxy for choosing weights, not
a result.

    .venv/bin/python scripts/objective_probe.py --json benchmarks/results/objective-probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from aurora.runtime.bench_adapt import AdaptConfig, interval, static_draft, traces_to, workload
from aurora.runtime.checkpoint import load_draft
from aurora.runtime.draft import EagleProposer
from aurora.runtime.engine import generate
from aurora.runtime.models import load_target
from aurora.runtime.trainer.objective import Objective, build_example, evaluate
from aurora.runtime.trainer.step import make_optimizer, optimizer_step
from aurora.runtime.workloads import Schedule, load_domain

VARIANTS = {  # name: (lambda_discard, lambda_reject, reject_term)
    "fkl": (0.0, 0.0, "unlikelihood"),
    "offpath": (0.5, 0.0, "unlikelihood"),
    "reject1": (0.0, 1.0, "unlikelihood"),
    "reject4": (0.0, 4.0, "unlikelihood"),
    "reject16": (0.0, 16.0, "unlikelihood"),
    "pg1": (0.0, 1.0, "policy_gradient"),
    "pg4": (0.0, 4.0, "policy_gradient"),
    "all4": (0.5, 4.0, "unlikelihood"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="math")
    parser.add_argument("--traces", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--levels", default="1.3,1.5")
    parser.add_argument("--workdir", type=Path, default=Path("aurora-bench-adapt"))
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = AdaptConfig(workdir=args.workdir)  # the benchmark's static draft and sizes
    target = load_target(config.model)
    model, tokenizer = target
    schedule = Schedule.from_string(config.schedule_spec)
    draft = static_draft(config, target, workload(schedule, config, 0).fit, None)
    levels = [float(x) for x in args.levels.split(",")]
    prompts = random.Random(f"probe/{args.domain}").sample(
        load_domain(args.domain), args.traces * args.seeds + args.eval_prompts
    )
    evaluation_prompts, served = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
    head, _ = load_draft(draft, model)
    evaluation = [_example(model, tokenizer, head, p, None, config) for p in evaluation_prompts]
    static_accept = evaluate(evaluation, config.k, head)["accept_length"]
    started = time.perf_counter()
    curves: dict[str, list[list[dict[str, float]]]] = {
        name: [] for name in args.variants.split(",")
    }
    for seed in range(args.seeds):
        mine = served[seed * args.traces : (seed + 1) * args.traces]
        proposer = EagleProposer(head, "static")
        traces = [_example(model, tokenizer, head, p, proposer, config) for p in mine]
        for name in curves:
            discard, reject, term = VARIANTS[name]
            objective = Objective(lambda_discard=discard, lambda_reject=reject, reject_term=term)  # type: ignore[arg-type]
            curves[name].append(_learn(draft, model, traces, evaluation, objective, seed, args))
            print(name, seed, curves[name][-1][-1], f"{time.perf_counter() - started:.0f}s")
    result = {
        "probe": "objective",
        "domain": args.domain,
        "static_draft": str(draft),
        "static_offline_accept_length": static_accept,
        "args": {k: str(v) for k, v in vars(args).items()},
        "variants": {name: VARIANTS[name] for name in curves},
        "traces_to_accept_length": {
            name: {
                f"{level:.1f}": interval([traces_to(c, level) for c in runs]) for level in levels
            }
            for name, runs in curves.items()
        },
        "final_accept_length": {
            name: interval([c[-1]["accept_length"] for c in runs]) for name, runs in curves.items()
        },
        "curves": curves,
        "seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    for name in curves:
        print(name, result["traces_to_accept_length"][name], result["final_accept_length"][name])


def _example(model: Any, tokenizer: Any, head: Any, prompt: Any, proposer: Any, config: Any) -> Any:
    # Chat and math prompts are questions: the target answers them through its chat
    # template (as /v1/chat/completions serves them); as raw text it stops at once.
    chat = tokenizer.apply_chat_template(prompt.as_chat(), add_generation_prompt=True)
    ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    g = generate(
        model, ids, proposer=proposer, k=config.k if proposer else 0,
        max_new_tokens=config.max_new_tokens, eos_ids=[tokenizer.eos_token_id], trace_topk=8,
    )  # fmt: skip
    record = SimpleNamespace(
        trace_id=prompt.id, domain=prompt.domain, prompt_ids=ids, output_ids=g.output_ids,
        steps=g.steps,
    )  # fmt: skip
    return build_example(model, head, record)


def _learn(
    draft: Path,
    model: Any,
    traces: list[Any],
    evaluation: list[Any],
    objective: Objective,
    seed: int,
    args: argparse.Namespace,
) -> list[dict[str, float]]:
    """The trainer's schedule over ``traces``: per block, ``steps_per_block`` steps of two
    fresh traces (while any are left) and replayed ones up to a batch of 4."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head, _ = load_draft(draft, model, trainable=True)
    optimizer = make_optimizer(head, 1e-3, 0.0)
    t2d = head.target_to_draft()
    curve = [{"traces": 0, "accept_length": evaluate(evaluation, 3, head)["accept_length"]}]
    seen: list[Any] = []
    step = 0
    for start in range(0, len(traces), args.block):
        fresh = list(traces[start : start + args.block])
        for _ in range(args.steps_per_block):
            batch, fresh = fresh[:2], fresh[2:]
            replay = rng.sample(seen, min(4 - len(batch), len(seen)))
            seen += batch
            lr = 1e-3 * min(1.0, (step + 1) / 10)
            optimizer_step(head, optimizer, [*batch, *replay], objective, lr=lr, clip=1.0, t2d=t2d)
            step += 1
        accept = evaluate(evaluation, 3, head)["accept_length"]
        curve.append({"traces": start + args.block, "accept_length": accept})
    return curve


if __name__ == "__main__":
    main()
