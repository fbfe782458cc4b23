"""The SGLang revision watcher follows `desired` in a real Redis, pushes the revision its
role serves into (a stand-in for) SGLang's HTTP API, and reports what is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import torch
from sglang_support import VOCAB, FakeSGLang, save_revision, serialize

from aurora.runtime.protocol import DesiredState, Keys, RevisionRef, get_loaded, set_desired
from aurora.runtime.sglang.weights import DraftPusher, LoadedRevision, SGLangRevisionWatcher

pytestmark = pytest.mark.integration

KEYS = Keys("prod", "llama")


def watcher(
    client: redis.Redis, sglang: FakeSGLang, role: str, root: Path
) -> SGLangRevisionWatcher:
    pusher = DraftPusher(sglang.client, serialize=serialize, served_d2t=VOCAB)
    return SGLangRevisionWatcher(
        pusher, client, KEYS, f"pod-{role}", role, loaded="r0", checkpoint_dir=str(root)
    )


def test_stable_and_canary_servers_load_their_revision_and_report_it(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    save_revision(tmp_path, "r1", seed=1)
    save_revision(tmp_path, "r2", seed=2)
    set_desired(
        redis_client,
        KEYS,
        DesiredState(
            stable=RevisionRef(revision="r1", path=str(tmp_path / "r1")),
            candidate=RevisionRef(
                revision="r2", path="/not/mounted/here"
            ),  # resolved in checkpoint_dir
            candidate_share=0.5,
        ),
    )
    stable_server, canary_server = FakeSGLang(), FakeSGLang()
    stable = watcher(redis_client, stable_server, "stable", tmp_path)
    canary = watcher(redis_client, canary_server, "canary", tmp_path)
    stable.poll()
    canary.poll()
    loaded = get_loaded(redis_client, KEYS)
    assert (loaded["pod-stable"].stable, loaded["pod-stable"].error) == ("r1", None)
    assert (loaded["pod-canary"].candidate, loaded["pod-canary"].error) == ("r2", None)
    assert loaded["pod-stable"].pause_ms is not None
    assert loaded["pod-stable"].swapped is not None  # when, for rollout timings
    # the plugin labels this server's traces with what it reported
    assert LoadedRevision(redis_client, KEYS, "pod-canary", "canary").get() == "r2"
    # polling again changes nothing: no second push
    calls = len(stable_server.calls)
    stable.poll()
    assert len(stable_server.calls) == calls


def test_a_revision_that_cannot_be_swapped_is_reported_once_and_the_old_draft_stays(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    save_revision(tmp_path, "r3", vocab=torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 40, 50, 60, 63]))
    set_desired(
        redis_client,
        KEYS,
        DesiredState(stable=RevisionRef(revision="r3", path=str(tmp_path / "r3"))),
    )
    sglang = FakeSGLang()
    server = watcher(redis_client, sglang, "stable", tmp_path)
    server.poll()
    server.poll()
    report = get_loaded(redis_client, KEYS)["pod-stable"]
    assert report.stable == "r0"
    assert (
        report.error is not None
        and "another draft vocabulary" in report.error
        and "restart" in report.error
    )
    assert sglang.calls == []  # refused before SGLang was paused, and not retried
