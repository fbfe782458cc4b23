"""The online trainer against a real redis-server and the real default model.

Traces are produced by the real engine (n-gram drafts, greedy) on HumanEval
prompts; the trainer recomputes features with the real target."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from aurora.runtime import protocol
from aurora.runtime.checkpoint import CheckpointStore, load_checkpoint
from aurora.runtime.draft import NgramProposer
from aurora.runtime.engine import generate
from aurora.runtime.models import load_target
from aurora.runtime.trainer.config import TrainerConfig
from aurora.runtime.trainer.delivery import GROUP
from aurora.runtime.trainer.publish import Publisher
from aurora.runtime.trainer.trainer import Trainer
from aurora.runtime.workloads import code_prompts

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def target() -> tuple[Any, Any]:
    return load_target("smollm2-135m")


@pytest.fixture(scope="module")
def generations(target: tuple[Any, Any]) -> list[tuple[list[int], Any]]:
    model, tokenizer = target
    out = []
    for prompt in code_prompts()[:4]:
        ids = tokenizer(prompt.text).input_ids
        out.append(
            (
                ids,
                generate(
                    model, ids, proposer=NgramProposer(), k=4, max_new_tokens=24, trace_topk=8
                ),
            )
        )
    return out


def _records(generations: list[tuple[list[int], Any]], copies: int) -> list[protocol.TraceRecord]:
    records = []
    for _ in range(copies):
        for ids, g in generations:
            records.append(
                protocol.TraceRecord(
                    trace_id=uuid.uuid4().hex,
                    revision="ngram",
                    server="test",
                    domain="code",
                    prompt_ids=ids,
                    output_ids=g.output_ids,
                    temperature=0.0,
                    steps=[
                        protocol.VerifyStep(
                            proposed=s.proposed,
                            accepted=s.accepted,
                            topk_ids=s.topk_ids,
                            topk_logprobs=s.topk_logprobs,
                        )
                        for s in g.steps
                    ],
                )
            )
    return records


def _publish(client: redis.Redis, keys: protocol.Keys, records: list[protocol.TraceRecord]) -> None:
    for record in records:
        protocol.publish_trace(client, keys, record, maxlen=10_000)


def test_day0_trainer_learns_publishes_and_acks_everything(
    target: tuple[Any, Any],
    generations: list[tuple[list[int], Any]],
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Given: traces from live traffic (prompts repeat, as recurring requests do) and one poison entry
    keys = protocol.Keys("default", "day0")
    _publish(redis_client, keys, _records(generations, copies=5))
    redis_client.xadd(keys.traces, {"schema": b"1", "trace_id": b"broken"})
    config = TrainerConfig(
        speculator="default/day0",
        redis_url=redis_url,
        checkpoint_dir=tmp_path,
        first_candidate_after=8,
        publish_every=8,
        holdout_every=3,  # the first of the 4 prompts is held out, never trained on
        checkpoint_every=5,
        draft_vocab=1024,
        steps_per_trace=8,
        min_accept_length=1.1,
        lr=3e-3,
    )
    trainer = Trainer(config, *target)
    started = time.monotonic()
    # When: the trainer runs from a random head until it publishes (bounded)
    trainer.run(stop=lambda: trainer.published is not None or time.monotonic() - started > 900)
    # Then: a candidate beat the stable (no draft) offline and is offered with a loadable checkpoint
    candidates = protocol.list_candidates(redis_client, keys)
    assert [c.revision for c in candidates] == [trainer.published]
    evaluation = candidates[0].evaluation
    assert evaluation["candidate"] >= max(1.1, evaluation["stable"] * 1.05)
    tensors, meta = load_checkpoint(candidates[0].path)
    assert meta.revision == trainer.published and "fc.weight" in tensors
    # the poison entry is dead-lettered with its reason, and nothing is left pending
    dead = redis_client.xrange(keys.dead_letter)
    assert len(dead) == 1 and b"reason" in dead[0][1]
    assert redis_client.xpending(keys.traces, GROUP)["pending"] == 0


def _trainer_command(redis_url: str, checkpoints: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-P",
        "-m",
        "aurora",
        "--log-level",
        "WARNING",
        "train",
        "--speculator",
        f"default/{name}",
        "--redis-url",
        redis_url,
        "--checkpoint-dir",
        str(checkpoints),
        "--draft-vocab",
        "512",
        "--checkpoint-every",
        "2",
        "--keep",
        "1000",
        "--threads",
        "1",
        "--first-candidate-after",
        "1000",
    ]


def _incorporated(checkpoints: Path) -> set[str]:
    ids: set[str] = set()
    for meta in CheckpointStore(checkpoints, keep=1000).list():
        state = json.loads((checkpoints / meta.revision / "trainer-state.json").read_text())
        ids.update(state["incorporated_ids"])
    return ids


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_no_trace_is_lost_when_the_trainer_is_killed(
    generations: list[tuple[list[int], Any]],
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    # Given: 24 traces in the stream
    keys = protocol.Keys("default", "kill")
    records = _records(generations, copies=6)
    _publish(redis_client, keys, records)
    rng = random.Random(7)
    # When: the trainer is killed with SIGKILL at random moments, three times, and restarted
    for _ in range(3):
        p = subprocess.Popen(_trainer_command(redis_url, tmp_path, "kill"))
        processes.append(p)
        time.sleep(rng.uniform(8, 25))
        p.kill()
        p.wait()
    # and a last run is allowed to finish the stream
    p = subprocess.Popen(_trainer_command(redis_url, tmp_path, "kill"))
    processes.append(p)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        groups = redis_client.xinfo_groups(keys.traces)
        if not groups:  # no trainer got as far as consuming yet (a slow, loaded machine)
            time.sleep(2)
            continue
        pending = redis_client.xpending(keys.traces, GROUP)["pending"]
        delivered = groups[0]["last-delivered-id"]
        undelivered = redis_client.xrange(keys.traces, b"(" + delivered, "+")
        if pending == 0 and not undelivered:
            break
        time.sleep(2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    # Then: every trace is in a checkpoint's incorporated set, nothing is pending
    assert redis_client.xpending(keys.traces, GROUP)["pending"] == 0
    assert {r.trace_id for r in records} <= _incorporated(tmp_path)


def test_two_ranks_share_the_stream_and_keep_one_model(
    generations: list[tuple[list[int], Any]],
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Given: 16 traces and a two-process gloo job reading them through one consumer group
    keys = protocol.Keys("default", "ddp")
    _publish(redis_client, keys, _records(generations, copies=4))
    command = [
        sys.executable,
        "-P",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "aurora",
        "--log-level",
        "WARNING",
        "train",
        "--speculator",
        "default/ddp",
        "--redis-url",
        redis_url,
        "--checkpoint-dir",
        str(tmp_path),
        "--draft-vocab",
        "512",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "3",
        "--threads",
        "1",
        "--max-steps",
        "8",
        "--first-candidate-after",
        "1000",
    ]
    # When: it runs 8 synchronised optimizer steps
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # torchrun's workers: no cwd on sys.path
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Then: both ranks consumed part of the stream and ended with identical weights
    consumers = redis_client.xinfo_consumers(keys.traces, GROUP)
    assert len(consumers) == 2
    status = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.trainer).items()}
    assert status["weights_rank0"] == status["weights_rank1"]
    assert CheckpointStore(tmp_path).latest() is not None
    assert torch.distributed.is_available()


def test_pruning_keeps_the_heads_of_hybrid_revisions_being_served(
    redis_client: redis.Redis,
) -> None:
    # Given servers told to serve hybrid:r2 as stable and hybrid:r3 on canary (the rollout's
    # hybrid canaries over suffix decoding), each from its head's checkpoint
    keys = protocol.Keys("default", f"hybrid-{uuid.uuid4().hex[:6]}")
    protocol.set_desired(
        redis_client,
        keys,
        protocol.DesiredState(
            stable=protocol.RevisionRef(revision="hybrid:r2", path="/ckpt/r2"),
            candidate=protocol.RevisionRef(revision="hybrid:r3", path="/ckpt/r3"),
            candidate_share=0.5,
        ),
    )
    publisher = Publisher(
        redis_client, keys, None, spec_tokens=3, publish_margin=0.05, min_accept_length=1.0
    )
    # Then the checkpoints r2 and r3 are kept, with the last one offered
    assert publisher.protected("r4") == {"hybrid:r2", "hybrid:r3", "r2", "r3", "r4"}
