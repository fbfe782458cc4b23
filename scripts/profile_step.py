"""Where a speculative step's time goes on this machine: the target's verify forward
(1, 5 and 17 tokens after a 64-token context, through the model forward `generate`
uses) and one chained draft-head step (logits, argmax, the next chain step), each
under torch.profiler, grouped by operator kind. Python and dispatch overhead is the
step's wall time less the time the operators themselves ran.

    python scripts/profile_step.py --draft DIR [--threads 1] [--json PATH]

DIR is a draft checkpoint (e.g. the head `aurora bench decode --unseen` fits in its
workdir); without --draft a head with the target's shapes and random weights is used
(the cost of a step does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from aurora.runtime.checkpoint import load_draft
from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.engine import crop_cache
from aurora.runtime.models import DEFAULT_MODEL, load_target

KINDS = (  # (kind, operator name fragments), first match wins
    ("matmul", ("addmm", "::mm", "matmul", "linear", "bmm", "einsum")),
    ("attention", ("scaled_dot_product", "softmax", "masked_fill")),
    ("norm and activation", ("rsqrt", "pow", "mean", "silu", "mul", "add", "div", "neg")),
    ("copies and shapes", ("cat", "copy", "clone", "contiguous", "to", "index", "slice", "view")),
)


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "other"


def measure(step: Callable[[], Any], repeats: int) -> dict[str, Any]:
    step()  # warm-up
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    by_kind: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / repeats
            ops[event.key] += event.self_cpu_time_total / 1e3 / repeats
    wall_ms = statistics.median(walls) * 1e3
    in_ops = sum(by_kind.values())
    return {
        "wall_ms": round(wall_ms, 3),
        "operators_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
        "python_and_dispatch_ms": round(max(wall_ms - in_ops, 0.0), 3),
        "top_operators_ms": {
            k: round(v, 3) for k, v in sorted(ops.items(), key=lambda x: -x[1])[:8]
        },
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--draft", type=Path, help="a draft checkpoint directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_target(args.model)
    if args.draft:
        head, _ = load_draft(args.draft, model, dtype=model.dtype)
    else:
        config = DraftConfig.for_target(model.config, args.model)
        head = EagleDraftHead(config, model.get_input_embeddings()).eval()
    from transformers import DynamicCache

    context, vocab = 64, int(model.config.vocab_size)
    cache = DynamicCache()
    model(torch.arange(context)[None] % vocab, cache=cache, use_cache=True)

    def verify(tokens: int) -> Callable[[], None]:
        def run() -> None:
            model(torch.ones(1, tokens, dtype=torch.long), cache=cache, use_cache=True)
            crop_cache(cache, context)

        return run

    hidden_size = head.config.hidden_size
    features = torch.zeros(context, 3 * hidden_size)
    positions = torch.arange(context)
    hidden, keys, values = head.step1(features, torch.zeros(context, dtype=torch.long), positions)
    anchor = positions[-1:]

    def draft_step() -> None:
        j = int(torch.argmax(head.logits(hidden[-1:])[0]))
        head.chain(hidden[-1:], head.d2t[j : j + 1], anchor + 1, keys, values, anchor, None, None)

    result = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "context": context,
        "draft_vocab": int(head.d2t.shape[0]),
        "verify": {str(t): measure(verify(t), args.repeats) for t in (1, 5, 17)},
        "draft_step": measure(draft_step, args.repeats * 5),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
