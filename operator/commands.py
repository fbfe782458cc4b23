"""The command lines the operator's pods run: `aurora serve` (torch engine), SGLang's
launcher (sglang engine) and `aurora train`, from a Speculator's spec. Pure."""

from __future__ import annotations

from aurora.operator.names import CHECKPOINT_DIR, SERVER_PORT, TRAINER_METRICS_PORT
from aurora.operator.spec import EngineKind, SpeculatorSpec
from aurora.runtime.protocol import Builtin
from aurora.runtime.sglang import launcher as sglang_launcher


def spec_tokens(spec: SpeculatorSpec) -> int:
    """Draft tokens per verify step for `aurora serve --spec-tokens`."""
    engine = spec.engine
    if engine.speculative_num_draft_tokens is not None:
        return engine.speculative_num_draft_tokens - 1
    return engine.speculative_steps


def server_command(spec: SpeculatorSpec, namespace: str, name: str) -> list[str]:
    """The torch engine's command line (`aurora serve`)."""
    return [
        "aurora", "serve",
        "--model", spec.target.model,
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--speculator", f"{namespace}/{name}",
        "--redis-url", "$(AURORA_REDIS_URL)",
        "--checkpoint-dir", CHECKPOINT_DIR,
        "--draft", spec.draft.initial,
        "--spec-tokens", str(spec_tokens(spec)),
        "--trace-sample-rate", spec.traces.sample_rate,
        "--trace-maxlen", str(spec.traces.max_length),
        "--device", spec.engine.device,
        *spec.engine.extra_args,
    ]  # fmt: skip


def sglang_server_command(spec: SpeculatorSpec) -> list[str]:
    """SGLang's command line with speculative decoding (aurora.runtime.sglang.launcher).
    Aurora's SGLang plugin (loaded through the `sglang.srt.plugins` entry point) reads
    its settings from the AURORA_* environment: traces, statistics and draft hot swaps."""
    return sglang_launcher.server_command(spec, port=SERVER_PORT)


def trainer_command(spec: SpeculatorSpec, namespace: str, name: str) -> list[str]:
    """`aurora train`. It starts from the torch engine's initial checkpoint when that is
    a path (Aurora's checkpoint format), else from scratch; an SGLang draft path is in
    SGLang's format, so that trainer starts from scratch and publishes only candidates
    that beat the served draft offline."""
    training = spec.training
    initial = spec.draft.initial
    start = (
        initial
        if initial.startswith("/") and spec.engine.kind == EngineKind.TORCH
        else Builtin.SCRATCH
    )
    return [
        "aurora", "train",
        "--model", spec.target.model,
        "--speculator", f"{namespace}/{name}",
        "--redis-url", "$(AURORA_REDIS_URL)",
        "--checkpoint-dir", CHECKPOINT_DIR,
        "--init", start,
        "--spec-tokens", str(spec_tokens(spec)),
        "--lr", training.learning_rate,
        "--batch-size", str(training.batch_size),
        "--lambda-discard", training.lambda_discard,
        "--publish-every", str(training.sync_every_traces),
        "--device", "cuda" if training.gpus > 0 else "cpu",
        "--metrics-port", str(TRAINER_METRICS_PORT),
    ]  # fmt: skip
