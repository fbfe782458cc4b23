"""What `aurora bench decode` and `aurora bench batch` take, as plain data: each knob's
default is declared here once and the command line is generated from it. Torch-free, so
building the command line loads no model library."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aurora.errors import UsageError
from aurora.runtime.models import model_knob
from aurora.runtime.options import knob


@dataclass
class BenchConfig:
    """The knobs every decode benchmark shares: the model, the prompts, threads, output."""

    model: str = model_knob()
    domain: str = knob("code", "built-in workload domain or file:PATH")
    prompts: int = knob(8, "number of prompts, one request each")
    seed: int = knob(0, "seed of the split into train and held-out prompts")
    threads: int = knob(0, "torch threads (0: torch's default, all cores)")
    json: Path | None = knob(None, "also write the results as JSON", metavar="PATH")

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise UsageError(f"--prompts {self.prompts}: use at least 1")


@dataclass
class DecodeBenchConfig(BenchConfig):
    """`aurora bench decode`: our engine against transformers, one request at a time."""

    draft: tuple[str, ...] = knob(
        (),
        "a draft checkpoint directory (repeatable); n-gram is always included",
        metavar="PATH",
        repeat=True,
    )
    heldout: bool = knob(
        False, "use the held-out half of the domain (the half `aurora draft fit` does not train on)"
    )
    max_new_tokens: int = knob(96, "tokens generated per prompt")
    spec_tokens: int = knob(4, "k for every speculative method (the hybrid's head included)")
    suffix_tokens: int = knob(
        16,
        "with --unseen: the most tokens a suffix draft (suffix, hybrid) proposes per step, "
        "cut by the verify-cost model, as `aurora serve --suffix-tokens` (0: --spec-tokens)",
        metavar="N",
    )
    unseen: bool = knob(
        False,
        "every proposer (plain, n-gram, suffix, the head with a fixed k and adaptive, the "
        "hybrid, transformers' generate and prompt lookup) in each of --domains, on held-out "
        "prompts neither the head was fitted on nor the suffix tree saw; at most one --draft "
        "(without one, a head is fitted on the code domain's training half, cached in --workdir)",
    )
    domains: tuple[str, ...] = knob(
        ("code", "prose", "math", "chat"), "with --unseen: the built-in domains to measure"
    )
    warmup: int = knob(
        0,
        "with --unseen: the suffix tree first learns this many requests of the domain's other "
        "prompts (cycled when the domain has fewer)",
        metavar="N",
    )
    recurring: bool = knob(
        False,
        "with --unseen: the suffix tree has also learned the measured prompts' own outputs "
        "first (a server that served them before): RECURRING traffic, labelled so in the JSON",
    )
    fit_prompts: int = knob(48, "with --unseen and no --draft: prompts the head is fitted on")
    fit_epochs: int = knob(10, "with --unseen and no --draft: epochs of that fit")
    workdir: Path = knob(
        Path("aurora-bench-unseen"), "with --unseen: the fitted head and cached warm-up outputs"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.suffix_tokens <= 64:
            raise UsageError(
                f"--suffix-tokens {self.suffix_tokens}: use 0 to 64 (0: --spec-tokens)"
            )
        if self.unseen and (len(self.draft) > 1 or self.warmup < 0 or not self.domains):
            raise UsageError(
                f"--unseen takes at most one --draft (got {len(self.draft)}), --warmup >= 0 "
                f"(got {self.warmup}) and at least one of --domains"
            )


@dataclass
class BatchBenchConfig(BenchConfig):
    """`aurora bench batch`: the same requests through the batched decoder at each size."""

    batch: tuple[int, ...] = knob(
        (1, 2, 4), "a max batch size to measure (repeatable)", metavar="N", repeat=True
    )
    max_new_tokens: int = knob(64, "tokens generated per request")
    spec_tokens: int = knob(4, "k for the n-gram draft")
    repeats: int = knob(1, "runs of every configuration")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batch = tuple(sorted(set(self.batch)))
        if not self.batch or self.batch[0] < 1 or self.repeats < 1:
            raise UsageError(
                f"--batch {list(self.batch)}, --repeats {self.repeats}: each must be at least 1"
            )
