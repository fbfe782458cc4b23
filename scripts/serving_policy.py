"""How much a trained head's serving policy leaves on the table: one draft checkpoint
served with a fixed speculation length (k = 1, 2, 3) and adaptive (as `aurora serve`
serves a head by default), against plain decoding, on the never-served evaluation prompts
of `aurora bench adapt`'s post-shift domain (the prompts its traces-to-quality curve
uses). Every policy decodes the same prompts, interleaved, greedy; throughput is total
tokens over total decode seconds per policy, over every repeat.

    python scripts/serving_policy.py --draft DIR [--schedule prose:8,code:64] \
        [--repeats 2] [--threads 2] [--json PATH]

DIR is a draft checkpoint, e.g. an online arm's last candidate under
`<bench adapt workdir>/run/seed0/online-adaptive/` or the static draft under
`<workdir>/static/`. A diagnostic, not a benchmark of record: one head, one machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from aurora.runtime.bench_adapt import AdaptConfig, _load_head, workload
from aurora.runtime.cost import Adaptive, VerifyCost, measure_draft_step, measure_generate_cost
from aurora.runtime.draft import EagleProposer
from aurora.runtime.engine import generate
from aurora.runtime.models import DEFAULT_MODEL, load_target
from aurora.runtime.workloads import Schedule, prompt_ids

POLICIES = ("plain", "k1", "k2", "k3", "adaptive")


def proposer(policy: str, head: Any, revision: str, cost: VerifyCost, step_s: float) -> Any:
    """plain, kN (a fixed N), adaptive (`Adaptive`'s defaults) or adaptive@P (its
    ``min_prob`` set to P)."""
    if policy == "plain":
        return None, 0
    if policy.startswith("adaptive"):
        knobs = {"min_prob": float(policy.split("@")[1])} if "@" in policy else {}
        return EagleProposer(head, revision, Adaptive(cost, draft_step_s=step_s, **knobs)), 3
    return EagleProposer(head, revision), int(policy[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", required=True, type=Path, help="draft checkpoint directory")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--schedule", default="prose:8,code:64", help="bench adapt's schedule")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--min-prob",
        default="",
        help="also serve adaptive with these min_prob values, e.g. 0.1,0.2",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    policies = [*POLICIES, *(f"adaptive@{p}" for p in args.min_prob.split(",") if p)]
    torch.set_num_threads(args.threads)
    config = AdaptConfig(schedule=args.schedule, max_new_tokens=args.max_new_tokens)
    prompts = workload(Schedule.from_string(args.schedule), config, 0).evaluation
    model, tokenizer = load_target(args.model)
    head, revision = _load_head(args.draft, model)
    cost = VerifyCost(measure_generate_cost(model, 4))
    step_s = measure_draft_step(head.head)
    served = {p: proposer(p, head.head, revision, cost, step_s) for p in policies}
    totals = {p: {"tokens": 0, "seconds": 0.0, "steps": 0, "step_tokens": 0} for p in policies}
    eos = [tokenizer.eos_token_id]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for draft, k in served.values():  # warm-up
        generate(model, ids[0], proposer=draft, k=k, max_new_tokens=8)
    started = time.perf_counter()
    for _ in range(args.repeats):
        for prompt in ids:
            for policy, (draft, k) in served.items():
                g = generate(
                    model, prompt, proposer=draft, k=k, max_new_tokens=args.max_new_tokens,
                    eos_ids=eos, cost=getattr(draft, "cost", None),
                )  # fmt: skip
                total = totals[policy]
                total["tokens"] += max(len(g.output_ids) - 1, 0)
                total["seconds"] += g.decode_s
                total["steps"] += len(g.steps)
                total["step_tokens"] += sum(s.accepted + 1 for s in g.steps)
    plain = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    result = {
        "draft": str(args.draft),
        "schedule": args.schedule,
        "prompts": [p.id for p in prompts],
        "repeats": args.repeats,
        "threads": args.threads,
        "verify_ms": cost.milliseconds(observed=False),
        "draft_step_ms": round(step_s * 1000, 2),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "policies": {
            policy: {
                **t,
                "tokens_per_s": t["tokens"] / t["seconds"],
                "vs_plain": t["tokens"] / t["seconds"] / plain,
                "accept_length": t["step_tokens"] / t["steps"] if t["steps"] else None,
            }
            for policy, t in totals.items()
        },
    }
    for policy, figures in result["policies"].items():
        accept = figures["accept_length"]
        print(
            f"{policy:>12}  {figures['vs_plain']:.3f}x plain  {figures['tokens_per_s']:.1f} tok/s"
            + (f"  accept length {accept:.2f}" if accept else "")
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
