"""Fixtures of the reliability suite: the real default model (loaded once), real traces
served by the real engine, and a small real file system that faults on demand."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import FaultyVolume

from aurora.runtime.draft import NgramProposer
from aurora.runtime.engine import generate
from aurora.runtime.models import load_target
from aurora.runtime.protocol import TraceRecord, build_trace
from aurora.runtime.workloads import code_prompts


@pytest.fixture(scope="session")
def model() -> tuple[Any, Any]:
    import torch

    torch.set_num_threads(1)  # two shared cores: more threads run slower
    return load_target("smollm2-135m")


@pytest.fixture(scope="session")
def served_traces(model: tuple[Any, Any]) -> list[TraceRecord]:
    """Eight traces as a server publishes them: n-gram drafts, greedy, top-k recorded."""
    target, tokenizer = model
    records = []
    for prompt in code_prompts()[:8]:
        ids = tokenizer(prompt.text).input_ids
        generation = generate(
            target, ids, proposer=NgramProposer(), k=4, max_new_tokens=16, trace_topk=8
        )
        records.append(
            build_trace(generation, revision="ngram", server="s1", domain="code", temperature=0.0)
        )
    return records


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[FaultyVolume]:
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("unshare/nsenter (util-linux) not installed: no private tmpfs")
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    faulty = FaultyVolume(mountpoint, "256m")
    yield faulty
    faulty.close()
