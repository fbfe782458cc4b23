"""The command lines the operator's pods run: `aurora serve` (torch engine), SGLang's
launcher (sglang engine) and `aurora train`, from a Speculator's spec. Pure."""

from __future__ import annotations

from aurora.operator.names import (
    CHECKPOINT_DIR,
    CHECKPOINTS_PORT,
    SERVER_PORT,
    TRAINER_METRICS_PORT,
    trainer_url,
)
from aurora.operator.spec import DRAFTS_DIR, EngineKind, RevisionSharing, SpeculatorSpec
from aurora.runtime.protocol import Builtin
from aurora.runtime.rollout import server_day_zero
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
        "--draft", server_day_zero(spec.draft.initial, spec.rollout),
        "--spec-tokens", str(spec_tokens(spec)),
        "--trace-sample-rate", spec.traces.sample_rate,
        "--trace-maxlen", str(spec.traces.max_length),
        "--device", spec.engine.device,
        *spec.engine.extra_args,
    ]  # fmt: skip


def sglang_server_command(spec: SpeculatorSpec) -> list[str]:
    """SGLang's command line with speculative decoding (aurora.runtime.sglang.launcher, serve).
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
    command = [
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
    if spec.storage.mode == RevisionSharing.FETCH:
        # Servers share no volume with the trainer: they download each revision from it.
        command += [
            "--serve-checkpoints-port", str(CHECKPOINTS_PORT),
            "--advertise-url", trainer_url(namespace, name),
        ]  # fmt: skip
    return command + list(training.extra_args)


def fetch_draft_command(spec: SpeculatorSpec) -> list[str]:
    """The init step that puts the day-0 draft under /drafts (`aurora draft fetch`):
    download, check the sha256, unpack an archive; nothing half-written stays."""
    fetch = spec.draft.fetch
    if fetch is None:
        raise ValueError("spec.draft.fetch is not set: no init step to run")
    return ["aurora", "draft", "fetch", "--url", fetch.url, "--sha256", fetch.sha256,
            "--into", DRAFTS_DIR]  # fmt: skip
