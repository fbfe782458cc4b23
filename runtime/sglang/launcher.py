"""How SGLang is launched for a Speculator: the operator's command, the speculative flags
of each launch, which launch a revision needs. Standard library and the protocol only:
the operator image (no torch) builds the command, and tests/unit/test_architecture.py
keeps it that way.

The command runs ``python3 -m aurora.runtime.sglang.serve`` (serve.py), which picks the
revision this server's role should serve and execs ``python3 -m sglang.launch_server``
with that launch's flags:

- ``none`` (and ``scratch``: an untrained head is not worth serving): no speculation;
- ``ngram``, and ``suffix`` (Aurora's suffix decoding, whose model-free counterpart in
  SGLang is NGRAM: an n-gram cache over prompts and outputs): SGLang's NGRAM speculation
  (no draft model), reported as revision ``ngram``;
- a checkpoint or an SGLang EAGLE-3 draft directory: EAGLE3 with Aurora's draft-only
  weight loader, so later revisions with the same draft vocabulary are hot-swapped.

Every SGLang flag used here is checked against each supported release's source by a
contract test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aurora.runtime.protocol import Builtin
from aurora.runtime.rollout import server_day_zero

log = logging.getLogger("aurora.sglang")

# Registered with --custom-weight-loader so the weight pusher can name it as
# load_format: it loads only into the EAGLE-3 draft (0.5.12 hands pushed tensors to the
# target too), refuses another draft vocabulary, and orders the copy after in-flight
# forwards (weights.load_draft_only).
DRAFT_LOADER = "aurora.runtime.sglang.weights.load_draft_only"
DEFAULT_PORT = 8000
EAGLE3, NGRAM = "EAGLE3", "NGRAM"


# ------------------------------------------------------------------ the command


@dataclass(frozen=True)
class Speculation:
    """The engine spec's speculative settings (SGLang's flags of the same names)."""

    num_steps: int
    eagle_topk: int
    num_draft_tokens: int


@dataclass(frozen=True)
class Launch:
    """How SGLang runs: ``revision`` is what the server reports loaded (``none``,
    ``ngram``, or the draft's revision; "" for a draft that is not an Aurora export)."""

    revision: str
    algorithm: str | None = None  # None: no speculation
    draft_path: str | None = None

    def flags(self, speculation: Speculation) -> list[str]:
        """SGLang's speculative flags for this launch."""
        if self.algorithm is None:
            return []
        if self.algorithm == NGRAM:
            return [
                "--speculative-algorithm", NGRAM,
                "--speculative-num-draft-tokens", str(speculation.num_draft_tokens),
            ]  # fmt: skip
        assert self.draft_path, "an EAGLE3 launch needs a draft directory"
        return [
            "--speculative-algorithm", EAGLE3,
            "--speculative-draft-model-path", self.draft_path,
            "--speculative-num-steps", str(speculation.num_steps),
            "--speculative-eagle-topk", str(speculation.eagle_topk),
            "--speculative-num-draft-tokens", str(speculation.num_draft_tokens),
            "--custom-weight-loader", DRAFT_LOADER,
        ]  # fmt: skip


def server_command(
    spec: Any,
    *,
    port: int = DEFAULT_PORT,
    host: str = "0.0.0.0",
    python: str = "python3",
) -> list[str]:
    """The command line of an SGLang server for a SpeculatorSpec (operator/spec.py).

    ``spec.draft.initial`` is what SGLang serves until the rollout names a revision:
    scratch (no speculation; the trainer learns from the plain traffic), ngram, or the
    absolute path of an EAGLE-3 draft (``aurora export --to sglang``); a model-free one
    gated by ``rollout.gateInitialDraft`` starts as none, and the canary replicas load it
    (NGRAM) while it is canaried against them. Steps, top-k and
    draft tokens come from ``spec.engine``; after ``--`` come SGLang's own arguments,
    ``spec.engine.extra_args`` last so a user can override any flag, the speculative
    ones included (argparse keeps the last value)."""
    engine = spec.engine
    return [
        python, "-m", "aurora.runtime.sglang.serve",
        "--initial", server_day_zero(spec.draft.initial, spec.rollout),
        "--speculative-num-steps", str(engine.speculative_steps),
        "--speculative-eagle-topk", str(engine.speculative_eagle_topk),
        "--speculative-num-draft-tokens", str(engine.num_draft_tokens),
        "--",
        "--model-path", spec.target.model,
        "--served-model-name", spec.target.served_name or spec.target.model,
        "--host", host,
        "--port", str(port),
        "--tp-size", str(engine.tensor_parallel),
        "--enable-metrics",
        *engine.extra_args,
    ]  # fmt: skip


def sglang_command(
    launch: Launch, speculation: Speculation, sglang_args: Sequence[str], python: str = "python3"
) -> list[str]:
    """``python3 -m sglang.launch_server`` with the launch's flags first, so the
    arguments given after ``--`` (the user's extra args last) override them."""
    return [python, "-m", "sglang.launch_server", *launch.flags(speculation), *sglang_args]


def initial_launch(initial: str) -> Launch:
    """The launch for the spec's ``draft.initial`` (no Redis state needed)."""
    if initial in (Builtin.SCRATCH, Builtin.NONE):
        return Launch(Builtin.NONE)
    if initial in (Builtin.NGRAM, Builtin.SUFFIX):
        return Launch(Builtin.NGRAM, NGRAM)
    if initial.startswith("/"):
        return Launch(revision_of_draft(Path(initial)), EAGLE3, initial)
    raise ValueError(
        f"draft.initial {initial!r}: use suffix, ngram, scratch or the absolute path of a draft "
        "exported with `aurora export --to sglang`"
    )


def running_launch(server_args: Any) -> Launch:
    """What an SGLang server was started with, from its ServerArgs."""
    algorithm = (getattr(server_args, "speculative_algorithm", None) or "").upper() or None
    if algorithm is None:
        return Launch(Builtin.NONE)
    if algorithm == NGRAM:
        return Launch(Builtin.NGRAM, NGRAM)
    path = getattr(server_args, "speculative_draft_model_path", None) or ""
    return Launch(revision_of_draft(Path(path)) if path else "", algorithm, path or None)


def revision_of_draft(path: Path) -> str:
    """The Aurora revision recorded in an SGLang draft directory's config.json, or ""
    (e.g. a SpecForge draft, or a directory not mounted here)."""
    try:
        document = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    revision = (document.get("aurora") or {}).get("revision") if isinstance(document, dict) else ""
    return revision if isinstance(revision, str) else ""


def is_checkpoint(ref: Any) -> bool:
    """Whether a RevisionRef names a checkpoint (not a built-in revision)."""
    return bool(ref.path) or ref.revision not in tuple(Builtin)


def launch_for(ref: Any, initial: Launch, draft_dir: Callable[[Any], Path]) -> Launch:
    """The launch that serves RevisionRef ``ref`` (None: ``initial``); ``draft_dir``
    gives an EAGLE-3 draft directory for a checkpoint revision (exporting it)."""
    if ref is None:
        return initial
    if not is_checkpoint(ref):
        if ref.revision in (Builtin.NGRAM, Builtin.SUFFIX):
            return Launch(Builtin.NGRAM, NGRAM)
        return Launch(Builtin.NONE)  # none, and scratch: an untrained head is not served
    return Launch(ref.revision, EAGLE3, str(draft_dir(ref)))
