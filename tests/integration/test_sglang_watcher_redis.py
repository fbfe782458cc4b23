"""The SGLang revision watcher and launcher against a real Redis: a server follows
`desired` for its role, hot-swaps what it can into (a stand-in for) SGLang's HTTP API,
restarts into what it cannot (day 0 without a draft → a learned EAGLE-3 draft, a new
vocabulary, a fallback to no draft), one server at a time, and reports what is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from sglang_support import VOCAB, FakeSGLang, save_revision, serialize

from aurora.runtime.protocol import (
    Builtin,
    DesiredState,
    Keys,
    RevisionRef,
    get_loaded,
    set_desired,
)
from aurora.runtime.retry import FailedLoads
from aurora.runtime.sglang.export import load_export
from aurora.runtime.sglang.launcher import Launch, initial_launch
from aurora.runtime.sglang.plugin import PluginSettings
from aurora.runtime.sglang.serve import (
    MAX_START_ATTEMPTS,
    Drafts,
    Restarter,
    launch_at_start,
    main,
)
from aurora.runtime.sglang.weights import DraftPusher, LoadedRevision, SGLangRevisionWatcher

pytestmark = pytest.mark.integration

KEYS = Keys("prod", "llama")
OTHER_VOCAB = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 40, 50, 60, 63])


def settings(redis_url: str, server: str, role: str, tmp_path: Path, **env: str) -> PluginSettings:
    found = PluginSettings.from_env(
        {"AURORA_REDIS_URL": redis_url, "AURORA_SPECULATOR": "prod/llama",
         "AURORA_SERVER_ID": server, "AURORA_SERVER_ROLE": role,
         "AURORA_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
         "AURORA_SGLANG_DRAFTS": str(tmp_path / f"drafts-{server}"), **env}
    )  # fmt: skip
    assert found is not None
    return found


class Exits:
    """Stands in for terminate(): records the restarts a watcher asked for."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


def watcher(
    client: redis.Redis,
    sglang: FakeSGLang,
    config: PluginSettings,
    *,
    running: Launch,
    initial: str | None = None,
    exits: Exits | None = None,
) -> SGLangRevisionWatcher:
    restarter = None
    if exits is not None:
        assert initial is not None
        restarter = Restarter(config, client, initial=initial_launch(initial), exit=exits)
    pusher = DraftPusher(sglang.client, serialize=serialize, served_d2t=VOCAB)
    return SGLangRevisionWatcher(
        pusher, client, KEYS, config.server, config.role,
        running=running, initial=initial_launch(initial) if initial else None,
        restarter=restarter, checkpoint_dir=config.checkpoint_dir,
    )  # fmt: skip


def desire(
    client: redis.Redis, root: Path, stable: str | None, candidate: str | None = None
) -> None:
    def ref(name: str | None) -> RevisionRef | None:
        if name is None:
            return None
        if name in tuple(Builtin):
            return RevisionRef(revision=name, path="")
        return RevisionRef(revision=name, path=str(root / "ckpt" / name))

    set_desired(
        client,
        KEYS,
        DesiredState(
            stable=ref(stable), candidate=ref(candidate), candidate_share=0.25 if candidate else 0.0
        ),
    )


EAGLE_R0 = Launch("r0", "EAGLE3", "/drafts/r0")


def test_stable_and_canary_servers_hot_swap_their_revision_and_report_it(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    save_revision(tmp_path / "ckpt", "r1", seed=1)
    save_revision(tmp_path / "ckpt", "r2", seed=2)
    set_desired(
        redis_client,
        KEYS,
        DesiredState(
            stable=RevisionRef(revision="r1", path=str(tmp_path / "ckpt" / "r1")),
            candidate=RevisionRef(revision="r2", path="/not/mounted/here"),  # in checkpoint_dir
            candidate_share=0.5,
        ),
    )
    stable_server, canary_server = FakeSGLang(), FakeSGLang()
    stable = watcher(
        redis_client,
        stable_server,
        settings(redis_url, "pod-stable", "stable", tmp_path),
        running=EAGLE_R0,
    )
    canary = watcher(redis_client, canary_server, settings(redis_url, "pod-canary", "canary", tmp_path), running=EAGLE_R0)  # fmt: skip
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


def test_without_restarts_a_new_vocabulary_is_reported_once_and_the_old_draft_stays(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    save_revision(tmp_path / "ckpt", "r3", vocab=OTHER_VOCAB)
    desire(redis_client, tmp_path, "r3")
    sglang = FakeSGLang()
    server = watcher(redis_client, sglang, settings(redis_url, "pod-stable", "stable", tmp_path), running=EAGLE_R0)  # fmt: skip
    server.poll()
    server.poll()
    report = get_loaded(redis_client, KEYS)["pod-stable"]
    assert report.stable == "r0"
    assert report.error is not None and "another draft vocabulary" in report.error
    assert "aurora.runtime.sglang.serve" in report.error  # the way to serve it
    assert sglang.calls == []  # refused before SGLang was paused, and not retried


def test_day_0_without_a_draft_the_canary_restarts_into_the_first_learned_draft(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # given two replicas launched from draft.initial scratch: SGLang without speculation
    save_revision(tmp_path / "ckpt", "r00000100-aaaaaa", seed=1)
    stable_config = settings(redis_url, "pod-stable", "stable", tmp_path)
    canary_config = settings(redis_url, "pod-canary", "canary", tmp_path)
    exits = Exits()
    plain = Launch(Builtin.NONE)
    stable = watcher(redis_client, FakeSGLang(), stable_config, running=plain, initial="scratch", exits=exits)  # fmt: skip
    canary = watcher(redis_client, FakeSGLang(), canary_config, running=plain, initial="scratch", exits=exits)  # fmt: skip
    stable.poll()
    canary.poll()
    assert exits.reasons == []  # nothing desired yet: both serve the initial launch
    assert get_loaded(redis_client, KEYS)["pod-stable"].stable == Builtin.NONE
    # when the rollout puts the trainer's first candidate on canary
    desire(redis_client, tmp_path, None, candidate="r00000100-aaaaaa")
    stable.poll()
    canary.poll()
    # then the canary exports it and restarts; the stable replica keeps serving
    assert len(exits.reasons) == 1 and "r00000100-aaaaaa needs a restart" in exits.reasons[0]
    assert load_export(tmp_path / "drafts-pod-canary" / "r00000100-aaaaaa").revision == (
        "r00000100-aaaaaa"
    )
    assert redis_client.get(KEYS.restart_slot(0)) == b"pod-canary"
    assert get_loaded(redis_client, KEYS)["pod-canary"].error is None
    # and the launcher, started again in the same pod, runs SGLang with that draft
    launch = launch_at_start(canary_config, initial_launch("scratch"))
    assert (launch.algorithm, launch.revision) == ("EAGLE3", "r00000100-aaaaaa")
    assert launch.draft_path == str(tmp_path / "drafts-pod-canary" / "r00000100-aaaaaa")
    # once healthy, the new server frees the slot and reports the draft loaded
    restarted = watcher(redis_client, FakeSGLang(), canary_config, running=launch, initial="scratch", exits=exits)  # fmt: skip
    assert restarted.restarter is not None
    restarted.restarter.started(launch)
    restarted.poll()
    assert redis_client.get(KEYS.restart_slot(0)) is None
    assert get_loaded(redis_client, KEYS)["pod-canary"].candidate == "r00000100-aaaaaa"
    assert Drafts.of(canary_config).attempts("r00000100-aaaaaa") == 0


def test_promotion_restarts_the_stable_replicas_one_at_a_time(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    save_revision(tmp_path / "ckpt", "r1", seed=1)
    desire(redis_client, tmp_path, "r1")  # promoted from no draft
    exits = Exits()
    plain = Launch(Builtin.NONE)
    first, second = (
        watcher(redis_client, FakeSGLang(), settings(redis_url, name, "stable", tmp_path),
                running=plain, initial="scratch", exits=exits)
        for name in ("pod-a", "pod-b")
    )  # fmt: skip
    first.poll()
    second.poll()
    # one slot: the second waits, without reporting an error the rollout would act on
    assert len(exits.reasons) == 1
    assert second.waiting == "r1" and get_loaded(redis_client, KEYS)["pod-b"].error is None
    second.poll()
    assert len(exits.reasons) == 1
    # the first serves again: its slot is free and the second restarts
    assert first.restarter is not None
    first.restarter.started(Launch("r1", "EAGLE3", "/d/r1"))
    second.poll()
    assert len(exits.reasons) == 2 and redis_client.get(KEYS.restart_slot(0)) == b"pod-b"


@pytest.mark.parametrize(
    ("stable", "candidate", "running", "expected"),
    [
        (Builtin.NONE, None, EAGLE_R0, Launch(Builtin.NONE)),  # fallback to no draft
        (None, None, Launch("r1", "EAGLE3", "/d/r1"), Launch(Builtin.NONE)),  # day-0 rollback
        ("r2", None, EAGLE_R0, None),  # another vocabulary: restart with the new draft
    ],
    ids=["fallback", "rollback-to-initial", "new-vocabulary"],
)
def test_what_cannot_be_swapped_in_place_is_served_by_a_restart(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path,
    stable: str | None, candidate: str | None, running: Launch, expected: Launch | None,
) -> None:  # fmt: skip
    save_revision(tmp_path / "ckpt", "r2", vocab=OTHER_VOCAB)
    desire(redis_client, tmp_path, stable, candidate)
    config = settings(redis_url, "pod-canary", "canary", tmp_path)
    exits = Exits()
    sglang = FakeSGLang()
    server = watcher(redis_client, sglang, config, running=running, initial="scratch", exits=exits)
    server.poll()
    assert len(exits.reasons) == 1 and sglang.calls == []
    launch = launch_at_start(config, initial_launch("scratch"))
    if expected is not None:
        assert launch == expected
    else:
        assert (launch.algorithm, launch.revision) == ("EAGLE3", "r2")


def test_a_revision_sglang_never_came_up_with_is_reported_and_the_initial_draft_served(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    save_revision(tmp_path / "ckpt", "r4", seed=4)
    desire(redis_client, tmp_path, "r4")
    config = settings(redis_url, "pod-stable", "stable", tmp_path)
    drafts = Drafts.of(config)
    # SGLang was started with r4 and crashed before it was healthy, MAX_START_ATTEMPTS times
    for _ in range(MAX_START_ATTEMPTS):
        assert launch_at_start(config, initial_launch("ngram")).revision == "r4"
    assert drafts.failed("r4")
    assert launch_at_start(config, initial_launch("ngram")) == Launch(Builtin.NGRAM, "NGRAM")
    exits = Exits()
    server = watcher(redis_client, FakeSGLang(), config, running=Launch(Builtin.NGRAM, "NGRAM"),
                     initial="ngram", exits=exits)  # fmt: skip
    server.poll()
    report = get_loaded(redis_client, KEYS)["pod-stable"]
    assert exits.reasons == [] and report.stable == Builtin.NGRAM
    assert report.error is not None and "did not come up with draft r4" in report.error


def test_a_revision_that_failed_to_swap_in_is_tried_again_later_and_then_served(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Given a stable server told to serve r5 before its checkpoint exists anywhere (the
    # trainer that holds it restarting), with a clock the test moves
    desire(redis_client, tmp_path, "r5")
    sglang = FakeSGLang()
    config = settings(redis_url, "pod-stable", "stable", tmp_path)
    server = watcher(redis_client, sglang, config, running=EAGLE_R0)
    now = [0.0]
    server.failed = FailedLoads(first_s=10, max_s=300, clock=lambda: now[0])
    server.poll()
    report = get_loaded(redis_client, KEYS)["pod-stable"]
    assert report.stable == "r0" and report.error is not None and "r5" in report.error
    # When the checkpoint appears: within the delay nothing is tried, the error stays
    save_revision(tmp_path / "ckpt", "r5", seed=5)
    now[0] = 9.0
    server.poll()
    assert sglang.calls == [] and get_loaded(redis_client, KEYS)["pod-stable"].error
    # Then after it the swap is tried again and r5 is served, the error gone
    now[0] = 10.0
    server.poll()
    report = get_loaded(redis_client, KEYS)["pod-stable"]
    assert (report.stable, report.error) == ("r5", None) and sglang.calls


def test_without_redis_the_launcher_starts_the_initial_draft(tmp_path: Path) -> None:
    config = settings("redis://127.0.0.1:1/0", "pod-x", "stable", tmp_path)
    assert launch_at_start(config, initial_launch("ngram")) == Launch(Builtin.NGRAM, "NGRAM")


def test_the_launcher_execs_sglang_with_the_desired_draft(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_revision(tmp_path / "ckpt", "r5", seed=5)
    desire(redis_client, tmp_path, "r5")
    config = settings(redis_url, "pod-stable", "stable", tmp_path)
    for name, value in {"AURORA_REDIS_URL": redis_url, "AURORA_SPECULATOR": "prod/llama",
                        "AURORA_SERVER_ID": "pod-stable", "AURORA_CHECKPOINT_DIR": config.checkpoint_dir,
                        "AURORA_SGLANG_DRAFTS": config.drafts_dir}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("aurora.runtime.sglang.installed_version", lambda: "0.5.23")
    executed: list[Any] = []
    argv = ["--initial", "scratch", "--speculative-num-steps", "3", "--speculative-eagle-topk",
            "1", "--speculative-num-draft-tokens", "4", "--", "--model-path", "m", "--port", "8000"]  # fmt: skip
    assert main(argv, execute=lambda *a: executed.append(a)) == 0
    ((program, command, env),) = executed
    assert command[1:3] == ["-m", "sglang.launch_server"] and program == command[0]
    flags = {f: command[i + 1] for i, f in enumerate(command[:-1]) if f.startswith("--")}
    assert flags["--speculative-algorithm"] == "EAGLE3"
    assert flags["--speculative-draft-model-path"] == str(Path(config.drafts_dir) / "r5")
    assert command[-4:] == ["--model-path", "m", "--port", "8000"]  # the user's args last
    assert env["AURORA_SGLANG_RESTART"] == "1" and env["AURORA_SGLANG_INITIAL"] == "scratch"
    # an SGLang release Aurora was not tested against is refused before anything starts
    monkeypatch.setattr("aurora.runtime.sglang.installed_version", lambda: "0.5.14")
    assert main(argv, execute=lambda *a: executed.append(a)) == 2
    assert len(executed) == 1
