"""The checkpoint format: atomic writes, verified loads, pruning, trainer state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors

from aurora.runtime import checkpoint
from aurora.runtime.checkpoint import (
    DRAFT_FILE,
    META_FILE,
    CheckpointError,
    CheckpointMeta,
    CheckpointStore,
    load_checkpoint,
    new_revision_id,
    save_checkpoint,
)

pytestmark = pytest.mark.unit

CONFIG = {
    "hidden_size": 64,
    "vocab_size": 128,
    "feature_layers": [1, 4, 7],
    "target": "smollm2-135m",
}


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(64, 192, generator=gen),
        "layer.norm.weight": torch.ones(64, dtype=torch.bfloat16),
        "vocab_map": torch.arange(128, dtype=torch.int64),
    }


def save(root: Path, revision: str, step: int = 1, **extra: Any) -> Path:
    args: dict[str, Any] = dict(
        parent=None,
        step=step,
        traces_seen=10 * step,
        evaluation={"candidate": 2.0},
        draft_config=CONFIG,
    )
    return save_checkpoint(root, revision, weights(step), **(args | extra))


def rewrite_meta(path: Path, **changes: Any) -> None:
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps(meta | changes))


# ----------------------------------------------------------------- round trip


def test_saved_checkpoint_loads_back_with_its_metadata(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path,
        "r00000007-abcdef",
        weights(7),
        parent="r00000003-123456",
        step=7,
        traces_seen=4096,
        evaluation={"candidate": 2.4, "stable": 2.1, "per_domain": {"code": 2.9}},
        draft_config=CONFIG,
    )
    assert path == tmp_path / "r00000007-abcdef"
    assert sorted(p.name for p in path.iterdir()) == [DRAFT_FILE, META_FILE]
    tensors, meta = load_checkpoint(
        path, expect_config={"hidden_size": 64, "feature_layers": (1, 4, 7)}
    )
    assert tensors.keys() == weights().keys()
    assert all(torch.equal(tensors[n], t) for n, t in weights(7).items())
    assert (meta.revision, meta.parent, meta.step, meta.traces_seen) == (
        "r00000007-abcdef",
        "r00000003-123456",
        7,
        4096,
    )
    assert meta.evaluation["per_domain"] == {"code": 2.9} and meta.draft_config == CONFIG
    assert meta.sha256 == hashlib.sha256((path / DRAFT_FILE).read_bytes()).hexdigest()
    assert meta.tensors["layer.norm.weight"] == {"shape": [64], "dtype": "bfloat16"}
    assert meta.created.endswith("+00:00") and meta.format_version == 1


def test_meta_becomes_the_candidate_record(tmp_path: Path) -> None:
    path = save(tmp_path, "r1", step=3)
    _, meta = load_checkpoint(path)
    candidate = meta.to_candidate(path)
    assert (candidate.revision, candidate.path, candidate.sha256, candidate.step) == (
        "r1",
        str(path),
        meta.sha256,
        3,
    )


def test_revision_ids_sort_by_step_and_do_not_collide() -> None:
    ids = [new_revision_id(step) for step in (9, 10, 123, 99_999_999)]
    assert ids == sorted(ids)
    assert re.fullmatch(r"r00000123-[0-9a-f]{6}", ids[2])
    assert len({new_revision_id(5) for _ in range(50)}) == 50


# ------------------------------------------------------ refused before loading


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: rewrite_meta(p, sha256="0" * 64), "sha256"),
        (lambda p: flip_byte(p / DRAFT_FILE), "sha256"),
        (lambda p: (p / DRAFT_FILE).unlink(), "cannot read draft.safetensors"),
        (lambda p: (p / META_FILE).unlink(), "no meta.json"),
        (lambda p: (p / META_FILE).write_text("{"), "meta.json does not parse"),
        (lambda p: rewrite_meta(p, format_version=2), "format 2 is not supported"),
        (
            lambda p: retensor(p, {"fc.weight": torch.zeros(64, 191)}),
            "tensor 'fc.weight' is float32[64, 191]",
        ),
        (
            lambda p: retensor(p, {"fc.weight": torch.zeros(64, 192, dtype=torch.float16)}),
            "float16[64, 192]",
        ),
        (lambda p: retensor(p, {"extra": torch.zeros(1)}), "not listed in meta.json"),
        (lambda p: retensor(p, {"vocab_map": None}), "lacks tensors ['vocab_map']"),
        (
            lambda p: retensor(p, {"fc.weight": torch.full((64, 192), float("nan"))}),
            "'fc.weight' holds NaN",
        ),
        (lambda p: resha(p, b"garbage"), "not valid safetensors"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_problem_and_path(
    tmp_path: Path, damage: Any, message: str
) -> None:
    path = save(tmp_path, "r1")
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def resha(path: Path, draft: bytes | None = None) -> None:
    """Replace draft.safetensors (when given) and make meta.json's sha256 agree with it."""
    if draft is not None:
        (path / DRAFT_FILE).write_bytes(draft)
    rewrite_meta(path, sha256=hashlib.sha256((path / DRAFT_FILE).read_bytes()).hexdigest())


def retensor(path: Path, changes: dict[str, torch.Tensor | None]) -> None:
    """Replace tensors in draft.safetensors behind meta.json's back (sha updated, so
    only the tensor checks can catch it)."""
    tensors = {**weights(1), **changes}
    (path / DRAFT_FILE).write_bytes(
        save_safetensors({n: t for n, t in tensors.items() if t is not None})
    )
    resha(path)


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, "r1")
    with pytest.raises(
        CheckpointError, match=r"draft_config\['hidden_size'\] is 64 but this server expects 576"
    ):
        load_checkpoint(path, expect_config={"hidden_size": 576})
    with pytest.raises(CheckpointError, match="'<missing>'"):
        load_checkpoint(path, expect_config={"draft_vocab": 32000})


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


# --------------------------------------------------------------- safe writing


def test_non_finite_tensors_are_not_saved(tmp_path: Path) -> None:
    bad = weights() | {"fc.weight": torch.tensor([1.0, float("inf")])}
    with pytest.raises(ValueError, match=re.escape("'fc.weight' holds NaN or Inf")):
        save_checkpoint(
            tmp_path, "r1", bad, parent=None, step=1, traces_seen=1, evaluation={}, draft_config={}
        )
    with pytest.raises(ValueError, match="trainer state tensor 'exp_avg'"):
        save(tmp_path, "r1", trainer_state={"exp_avg": torch.tensor([float("nan")])})
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_write_leaves_no_checkpoint_and_old_ones_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an existing checkpoint
    old = save(tmp_path, "r1")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    # When the next save dies after its first file is written
    real_write = checkpoint._write_file
    calls = []

    def dying_write(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            raise RuntimeError("killed mid-write")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", dying_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save(tmp_path, "r2", step=2, trainer_json={"stream_id": "1-0"})
    # Then there is no r2, no temp dir, and r1 is byte for byte what it was
    assert [p.name for p in tmp_path.iterdir()] == ["r1"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(CheckpointError, match="disk is full") as error:
        save(tmp_path, "r1")
    assert "r1" in str(error.value) and str(tmp_path) in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_root_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        with pytest.raises(CheckpointError, match="not writable"):
            save(root, "r1")
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


def test_a_read_only_volume_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs as root too, where permission bits cannot make a directory unwritable
    def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointError, match="not writable: check the volume"):
        save(tmp_path, "r1")
    assert list(tmp_path.iterdir()) == []


def test_a_root_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint r1 in {root}"):
        save(root, "r1")


def test_an_existing_revision_is_never_overwritten(tmp_path: Path) -> None:
    path = save(tmp_path, "r1", step=1)
    before = (path / DRAFT_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save(tmp_path, "r1", step=2)
    assert (path / DRAFT_FILE).read_bytes() == before


@pytest.mark.parametrize("revision", ["", "../escape", "a/b", ".tmp-r1", ".hidden"])
def test_revisions_that_are_not_plain_directory_names_are_refused(
    tmp_path: Path, revision: str
) -> None:
    with pytest.raises(CheckpointError, match="cannot name a checkpoint directory"):
        save(tmp_path, revision)


# ------------------------------------------------------------------- the store


def test_store_lists_complete_checkpoints_by_step_and_ignores_the_rest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step, revision in [(30, "c"), (10, "a"), (20, "b")]:
        save(tmp_path, revision, step=step)
    (tmp_path / ".tmp-d-1234").mkdir()  # a write in progress
    (tmp_path / "broken").mkdir()  # a directory without meta.json
    (tmp_path / "b" / DRAFT_FILE).rename(tmp_path / "b" / "moved")  # meta without weights
    assert [m.revision for m in store.list()] == ["a", "c"]
    latest = store.latest()
    assert latest is not None and latest.step == 30
    assert (
        CheckpointStore(tmp_path / "empty").list() == []
        and CheckpointStore(tmp_path / "empty").latest() is None
    )


def test_store_prunes_to_the_last_n_plus_protected(tmp_path: Path) -> None:
    # Given a store keeping 2, with r1 stable and r2 on canary
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 7):
        store.save(
            f"r{step}",
            weights(step),
            parent=None,
            step=step,
            traces_seen=step,
            evaluation={},
            draft_config=CONFIG,
            protect={"r1", "r2"},
        )
    # Then the last two and the protected ones remain, loadable
    assert [m.revision for m in store.list()] == ["r1", "r2", "r5", "r6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1", "r2", "r5", "r6"]
    tensors, _ = store.load("r1")
    assert torch.equal(tensors["fc.weight"], weights(1)["fc.weight"])
    # And an explicit prune without protection keeps only the last two
    assert store.prune() == ["r1", "r2"]
    assert [m.revision for m in store.list()] == ["r5", "r6"]


def test_prune_removes_temp_dirs_left_by_crashed_writers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    stale, fresh = tmp_path / ".tmp-r1-dead", tmp_path / ".tmp-r2-live"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    store.prune()
    assert not stale.exists() and fresh.exists()


def test_trainer_state_round_trips(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = {"exp_avg.fc.weight": torch.randn(64, 192), "step": torch.tensor(12.0)}
    position = {"stream_id": "1767225600000-3", "lr": 3e-4, "consumer": "trainer-0"}
    store.save(
        "r1",
        weights(),
        parent=None,
        step=12,
        traces_seen=96,
        evaluation={},
        draft_config=CONFIG,
        trainer_state=state,
        trainer_json=position,
    )
    store.save(
        "r2", weights(), parent="r1", step=13, traces_seen=99, evaluation={}, draft_config=CONFIG
    )
    loaded = store.load_trainer_state("r1")
    assert loaded is not None
    tensors, scalars = loaded
    assert scalars == position and all(torch.equal(tensors[n], t) for n, t in state.items())
    assert store.load_trainer_state("r2") is None
    # A corrupt trainer state is refused, not resumed from
    flip_byte(tmp_path / "r1" / checkpoint.STATE_FILE)
    with pytest.raises(CheckpointError, match=re.escape("trainer-state.safetensors has sha256")):
        store.load_trainer_state("r1")


def test_meta_json_is_plain_json(tmp_path: Path) -> None:
    path = save(tmp_path, "r1")
    meta = json.loads((path / META_FILE).read_text())
    assert CheckpointMeta.model_validate(meta).revision == "r1"
    assert meta["tensors"]["fc.weight"] == {"shape": [64, 192], "dtype": "float32"}
