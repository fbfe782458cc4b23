"""SGLang's command line for a Speculator: EAGLE-3 (or n-gram) speculation, metrics on,
tensor parallelism, Aurora's draft-only weight loader, then the user's extra args.

Standard library only: the operator image (no torch) builds this command. Every flag
is checked against the pinned release's server_args.py by a contract test.
"""

from __future__ import annotations

from typing import Any

from aurora.runtime.protocol import Builtin

# Registered with --custom-weight-loader so the weight pusher can name it as
# load_format: in SGLang 0.5.12 update_weights_from_tensor hands the same tensors to
# the draft AND the target model; this loader loads only into the draft.
DRAFT_LOADER = "aurora.runtime.sglang.weights.load_draft_only"
DEFAULT_PORT = 8000


def server_command(
    spec: Any,
    *,
    draft_path: str | None = None,
    port: int = DEFAULT_PORT,
    host: str = "0.0.0.0",
    python: str = "python3",
) -> list[str]:
    """``python3 -m sglang.launch_server …`` for a SpeculatorSpec (operator/spec.py).

    ``spec.draft.initial`` 'ngram' selects SGLang's NGRAM speculation (no draft model, so
    no hot swaps); a path selects EAGLE3 with that draft, which must be in SGLang's
    layout (``aurora export --to sglang``); ``draft_path`` overrides it. Steps, top-k and
    draft tokens come from ``spec.engine``; ``spec.engine.extra_args`` go last so a user
    can override any flag (argparse keeps the last value)."""
    engine = spec.engine
    command = [
        python, "-m", "sglang.launch_server",
        "--model-path", spec.target.model,
        "--served-model-name", spec.target.served_name or spec.target.model,
        "--host", host,
        "--port", str(port),
        "--tp-size", str(engine.tensor_parallel),
        "--enable-metrics",
    ]  # fmt: skip
    draft = draft_path or spec.draft.initial
    if draft == Builtin.NGRAM:
        command += [
            "--speculative-algorithm", "NGRAM",
            "--speculative-num-draft-tokens", str(engine.num_draft_tokens),
        ]  # fmt: skip
    elif draft.startswith("/"):
        command += [
            "--speculative-algorithm", "EAGLE3",
            "--speculative-draft-model-path", draft,
            "--speculative-num-steps", str(engine.speculative_steps),
            "--speculative-eagle-topk", str(engine.speculative_eagle_topk),
            "--speculative-num-draft-tokens", str(engine.num_draft_tokens),
            "--custom-weight-loader", DRAFT_LOADER,
        ]  # fmt: skip
    else:
        raise ValueError(
            f"draft {draft!r}: SGLang needs a draft to load at start; use '{Builtin.NGRAM}' or the "
            "absolute path of a draft exported with `aurora export --to sglang`"
        )
    return command + list(engine.extra_args)
