"""What prepacked weights (``aurora.runtime.packed``) buy on this machine: the target's
weight products and its whole verify forward, with and without packing, per row count.

    python scripts/linear_kernels.py [--threads 2] [--repeats 15] [--json PATH]

1. Products: every ``nn.Linear`` of the target (LM head included) applied to ``n`` rows,
   ``F.linear`` against MKL's packed GEMM, for n = 1..16; median seconds.
2. Verify forwards: the model forward ``generate`` uses, ``T`` tokens after a 64-token
   context, unpacked against packed for the row counts ``pack_linears`` chose on this run.
The two sides alternate within each repeat, taking turns to go first, so that a noisy
neighbour or a warm cache favours neither.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from aurora.runtime import packed
from aurora.runtime.models import DEFAULT_MODEL, load_target

ROWS = tuple(range(1, 17))
TOKENS = (1, 2, 3, 4, 5, 8)


def products(model: nn.Module, repeats: int) -> dict[str, dict[str, float]]:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    plain, fast = packed.measure(weights, ROWS, repeats=repeats)
    return {
        str(n): {
            "plain_ms": plain[n] * 1e3,
            "packed_ms": fast[n] * 1e3,
            "ratio": fast[n] / plain[n],
        }
        for n in ROWS
    }


def forward_ms(model: nn.Module, context: torch.Tensor, tokens: int) -> float:
    cache = DynamicCache()
    with torch.inference_mode():
        model(context, past_key_values=cache, use_cache=True)
        step = torch.randint(0, 1000, (1, tokens))
        started = time.perf_counter()
        model(step, past_key_values=cache, use_cache=True)
        return (time.perf_counter() - started) * 1e3


def forwards(model: nn.Module, rows: list[int], repeats: int) -> dict[str, dict[str, float]]:
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    packed.pack_linears(model, rows=rows)
    context = torch.randint(0, 1000, (1, 64))
    times: dict[tuple[str, int], list[float]] = {}
    for repeat in range(repeats):
        for side in ("plain", "packed") if repeat % 2 else ("packed", "plain"):  # take turns first
            for m in linears:  # switch the class back and forth: the packed copies stay
                m.__class__ = packed.PackedLinear if side == "packed" else nn.Linear
            for t in TOKENS:
                times.setdefault((side, t), []).append(forward_ms(model, context, t))
    out = {}
    for t in TOKENS:
        a, b = statistics.median(times[("plain", t)]), statistics.median(times[("packed", t)])
        out[str(t)] = {"plain_ms": a, "packed_ms": b, "ratio": b / a}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not packed.available():
        raise SystemExit("this PyTorch build has no MKL packed GEMM: nothing to compare")
    torch.set_num_threads(args.threads)
    os.environ[packed.ENV] = "0"  # load unpacked; this script packs itself
    model, _ = load_target(args.model)
    result: dict[str, Any] = {"model": args.model, "threads": args.threads, "repeats": args.repeats}
    result["products"] = products(model, args.repeats)
    result["chosen_rows"] = rows = packed.calibrate(model)
    result["verify_forward"] = forwards(model, rows, args.repeats)
    for name in ("products", "verify_forward"):
        print(name, {n: round(v["ratio"], 2) for n, v in result[name].items()})
    print("chosen rows:", rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
