"""The checkpoint format: one directory per draft revision, written atomically.

``<root>/<revision>/`` holds ``draft.safetensors`` (the draft head's weights, exactly
what a server loads), ``meta.json`` (CheckpointMeta) and, when the trainer can resume
from it, ``trainer-state.safetensors`` + ``trainer-state.json`` (optimizer tensors;
scalars and the stream position). Never pickle. A checkpoint is written into
``<root>/.tmp-<revision>-<random>/``, fsynced and renamed into place, so a reader sees a
whole checkpoint or none; ``load_checkpoint`` verifies the sha256, every tensor's name,
shape and dtype, and finiteness, so a corrupt checkpoint never reaches a server.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from aurora.runtime.draft import DraftConfig, EagleDraftHead
from aurora.runtime.protocol import CandidateRecord

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DRAFT_FILE = "draft.safetensors"
META_FILE = "meta.json"
STATE_FILE = "trainer-state.safetensors"
STATE_JSON = "trainer-state.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0  # temp dirs older than this were left by a crashed writer

_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CheckpointError(Exception):
    """A checkpoint cannot be written or is not fit to load; the message says what and where."""


class TensorSpec(TypedDict):
    shape: list[int]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"


class CheckpointMeta(BaseModel):
    """meta.json: what the checkpoint is, where it came from, and what it must contain."""

    model_config = ConfigDict(extra="ignore")

    revision: str
    parent: str | None = None
    step: int = Field(ge=0)
    traces_seen: int = Field(ge=0)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of draft.safetensors
    created: str  # ISO 8601, UTC
    draft_config: dict[str, Any] = Field(default_factory=dict)  # owned by the draft module
    tensors: dict[str, TensorSpec]
    trainer_state_sha256: str | None = None  # of trainer-state.safetensors, when saved
    format_version: int = FORMAT_VERSION

    @field_validator("created")
    @classmethod
    def _iso_utc(cls, value: str) -> str:
        stamp = datetime.fromisoformat(value)
        if stamp.utcoffset() is None or stamp.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
            raise ValueError(f"created {value!r} must be an ISO 8601 time in UTC")
        return value

    def to_candidate(self, path: str | Path) -> CandidateRecord:
        """The candidate record the trainer offers for this checkpoint at ``path``."""
        return CandidateRecord(
            revision=self.revision,
            parent=self.parent,
            path=str(path),
            sha256=self.sha256,
            created=datetime.fromisoformat(self.created).timestamp(),
            step=self.step,
            traces_seen=self.traces_seen,
            evaluation=self.evaluation,
        )


def new_revision_id(step: int) -> str:
    """A fresh revision id, e.g. ``r00000123-1a2b3c``: the step (8 digits, so ids sort by
    step up to 10⁸) and 6 random hex digits (two trainers never collide)."""
    if step < 0:
        raise ValueError(f"step={step}: a training step is ≥ 0")
    return f"r{step:08d}-{secrets.token_hex(3)}"


def _check_revision(revision: str) -> None:
    if not _REVISION.match(revision) or revision.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"revision {revision!r} cannot name a checkpoint directory: use letters, digits, "
            "'.', '_' or '-' (at most 128, not starting with '.'), e.g. new_revision_id(step)"
        )


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            raise ValueError(
                f"{what} tensor {name!r} holds NaN or Inf: refusing to save or load it"
            )


def _serialise(tensors: Mapping[str, Tensor]) -> bytes:
    # Own contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    return save_safetensors(
        {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(error: OSError, revision: str, root: Path) -> CheckpointError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full: free space on the checkpoint volume or lower the number of checkpoints kept"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the directory is not writable: check the volume's mount and permissions"
    else:
        why = str(error)
    return CheckpointError(f"cannot write checkpoint {revision} in {root}: {why} ({error})")


def save_checkpoint(
    root: str | Path,
    revision: str,
    tensors: Mapping[str, Tensor],
    *,
    parent: str | None,
    step: int,
    traces_seen: int,
    evaluation: dict[str, Any],
    draft_config: dict[str, Any],
    trainer_state: Mapping[str, Tensor] | None = None,
    trainer_json: dict[str, Any] | None = None,
) -> Path:
    """Write ``<root>/<revision>/`` atomically and return its path.

    Raises ValueError when a tensor holds NaN/Inf (naming it) and CheckpointError when
    the revision exists already or the root is unwritable or full. On any failure no
    ``<root>/<revision>`` appears, the temp dir is removed, other checkpoints are untouched."""
    root = Path(root)
    _check_revision(revision)
    if not tensors:
        raise ValueError(
            f"checkpoint {revision} has no draft tensors: pass the draft head's state dict"
        )
    _check_finite(tensors, "draft")
    _check_finite(trainer_state or {}, "trainer state")
    final = root / revision
    if final.exists():
        raise CheckpointError(
            f"checkpoint {revision} already exists in {root}: revisions are immutable"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP_PREFIX}{revision}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as error:
        raise _os_error(error, revision, root) from error
    try:
        draft = _serialise(tensors)
        meta = CheckpointMeta(
            revision=revision,
            parent=parent,
            step=step,
            traces_seen=traces_seen,
            evaluation=evaluation,
            sha256=hashlib.sha256(draft).hexdigest(),
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            draft_config=draft_config,
            tensors={
                n: {"shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in tensors.items()
            },
        )
        _write_file(tmp / DRAFT_FILE, draft)
        if trainer_state is not None or trainer_json is not None:
            state = _serialise(trainer_state or {})
            meta.trainer_state_sha256 = hashlib.sha256(state).hexdigest()
            _write_file(tmp / STATE_FILE, state)
            try:
                text = json.dumps(trainer_json or {}, allow_nan=False, indent=2)
            except (TypeError, ValueError) as error:
                raise ValueError(f"trainer_json is not plain JSON: {error}") from None
            _write_file(tmp / STATE_JSON, text.encode())
        # meta.json last: a directory with a meta.json is complete
        _write_file(tmp / META_FILE, meta.model_dump_json(indent=2).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(error, revision, root) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_meta(path: Path) -> CheckpointMeta:
    try:
        meta = CheckpointMeta.model_validate_json((path / META_FILE).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(
            f"no {META_FILE} in {path}: not a checkpoint, or an incomplete one"
        ) from None
    except (OSError, ValidationError) as error:
        raise CheckpointError(f"{META_FILE} does not parse ({error}) in {path}") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {meta.format_version} is not supported (this code reads "
            f"{FORMAT_VERSION}) in {path}"
        )
    return meta


def _read_tensors(path: Path, file: str, sha256: str | None) -> dict[str, Tensor]:
    try:
        data = (path / file).read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {file} ({error.strerror}) in {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise CheckpointError(
            f"{file} has sha256 {digest}, meta.json says {sha256}: corrupt file in {path}"
        )
    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not valid safetensors ({error}) in {path}") from None


def load_checkpoint(
    path: str | Path, *, expect_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Tensor], CheckpointMeta]:
    """Load and verify a checkpoint directory: meta.json parses, draft.safetensors has the
    recorded sha256, every tensor's name/shape/dtype matches meta, nothing is NaN/Inf, and
    ``draft_config`` agrees with ``expect_config`` on the keys given. Raises CheckpointError
    naming what is wrong and the path otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    meta = _read_meta(path)
    tensors = _read_tensors(path, DRAFT_FILE, meta.sha256)
    found = {n: {"shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in tensors.items()}
    if missing := sorted(set(meta.tensors) - set(found)):
        raise CheckpointError(f"{DRAFT_FILE} lacks tensors {missing} listed in meta.json in {path}")
    if extra := sorted(set(found) - set(meta.tensors)):
        raise CheckpointError(f"{DRAFT_FILE} has tensors {extra} not listed in meta.json in {path}")
    for name, spec in meta.tensors.items():
        if dict(spec) != found[name]:
            raise CheckpointError(
                f"tensor {name!r} is {found[name]['dtype']}{found[name]['shape']}, meta.json says "
                f"{spec['dtype']}{spec['shape']} in {path}"
            )
    try:
        _check_finite(tensors, "draft")
    except ValueError as error:
        raise CheckpointError(f"{error} in {path}") from None
    for key, expected in (expect_config or {}).items():
        expected = json.loads(json.dumps(expected))  # tuples compare as the lists JSON stored
        stored = meta.draft_config.get(key, "<missing>")
        if stored != expected:
            raise CheckpointError(
                f"draft_config[{key!r}] is {stored!r} but this server expects {expected!r}: the "
                f"checkpoint was trained for another target or draft architecture in {path}"
            )
    return tensors, meta


def load_draft(
    path: str | Path,
    target: Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trainable: bool = False,
) -> tuple[EagleDraftHead, CheckpointMeta]:
    """The one way to turn a checkpoint into a draft head for ``target`` (a loaded Hugging
    Face causal LM): `load_checkpoint`'s checks, plus that the draft was shaped for this
    target (hidden size, vocabulary, fused layers that exist, a ``d2t`` inside the
    vocabulary); every weight must be present. The head uses the target's embedding and
    sits on ``device`` (default: the target's) in ``dtype`` (default: float32, as
    trained); it is in eval mode without gradients unless ``trainable``. Raises
    CheckpointError naming what is wrong and the path."""
    target_config = target.config
    tensors, meta = load_checkpoint(
        path,
        expect_config={
            "hidden_size": int(target_config.hidden_size),
            "target_vocab_size": int(target_config.vocab_size),
        },
    )
    try:
        config = DraftConfig.from_dict(meta.draft_config)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"draft_config in meta.json is unusable ({error}) in {path}"
        ) from None
    layers = int(target_config.num_hidden_layers)
    if not all(0 <= i < layers for i in config.fuse_layers):
        raise CheckpointError(
            f"draft fuse_layers {config.fuse_layers} do not exist in the target's {layers} "
            f"layers in {path}"
        )
    d2t = tensors.get("d2t")
    vocab = int(target_config.vocab_size)
    if d2t is not None and d2t.numel() and (int(d2t.min()) < 0 or int(d2t.max()) >= vocab):
        # Would pass every other check and then fail inside a verify step.
        raise CheckpointError(
            f"the draft vocabulary map d2t holds ids outside the target's vocabulary "
            f"(0..{vocab - 1}) in {path}"
        )
    head = EagleDraftHead(config, target.get_input_embeddings())
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights do not fit the draft_config ({error}) in {path}"
        ) from None
    head = head.to(device=device or next(target.parameters()).device, dtype=dtype)
    if not trainable:
        head = head.eval().requires_grad_(False)
    return head, meta


class CheckpointStore:
    """The checkpoints under one root: list, find, save with pruning, resume."""

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least the latest checkpoint")
        self.root = Path(root)
        self.keep = keep

    def path(self, revision: str) -> Path:
        _check_revision(revision)
        return self.root / revision

    def list(self) -> list[CheckpointMeta]:
        """Complete checkpoints sorted by step (then creation time); temp dirs are
        ignored, broken directories skipped with a warning. Reads meta only."""
        if not self.root.is_dir():
            return []
        metas = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                meta = _read_meta(entry)
                if meta.revision != entry.name:
                    raise CheckpointError(f"meta.json names revision {meta.revision!r} in {entry}")
                if not (entry / DRAFT_FILE).is_file():
                    raise CheckpointError(f"no {DRAFT_FILE} in {entry}")
            except CheckpointError as error:
                log.warning("ignoring broken checkpoint directory: %s", error)
                continue
            metas.append(meta)
        return sorted(metas, key=lambda m: (m.step, m.created, m.revision))

    def latest(self) -> CheckpointMeta | None:
        metas = self.list()
        return metas[-1] if metas else None

    def load(
        self, revision: str, *, expect_config: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], CheckpointMeta]:
        return load_checkpoint(self.path(revision), expect_config=expect_config)

    def save(
        self,
        revision: str,
        tensors: Mapping[str, Tensor],
        *,
        parent: str | None,
        step: int,
        traces_seen: int,
        evaluation: dict[str, Any],
        draft_config: dict[str, Any],
        trainer_state: Mapping[str, Tensor] | None = None,
        trainer_json: dict[str, Any] | None = None,
        protect: Iterable[str] = (),
    ) -> Path:
        """save_checkpoint, then prune to the last ``keep`` plus the revisions in
        ``protect`` (e.g. those stable or on canary) and the new one."""
        path = save_checkpoint(
            self.root,
            revision,
            tensors,
            parent=parent,
            step=step,
            traces_seen=traces_seen,
            evaluation=evaluation,
            draft_config=draft_config,
            trainer_state=trainer_state,
            trainer_json=trainer_json,
        )
        self.prune(protect={revision, *protect})
        return path

    def prune(self, protect: Iterable[str] = ()) -> builtins.list[str]:
        """Delete all but the last ``keep`` checkpoints and the protected revisions, and
        temp dirs a crashed writer left over an hour ago. Returns the revisions deleted."""
        protected = set(protect)
        metas = self.list()
        doomed = [
            m.revision
            for m in metas[: max(len(metas) - self.keep, 0)]
            if m.revision not in protected
        ]
        for revision in doomed:
            # Rename first, so no reader ever sees a half-deleted checkpoint.
            trash = self.root / f"{TMP_PREFIX}pruned-{revision}-{secrets.token_hex(4)}"
            try:
                os.rename(self.root / revision, trash)
            except OSError as error:
                log.warning("cannot prune checkpoint %s in %s: %s", revision, self.root, error)
                continue
            shutil.rmtree(trash, ignore_errors=True)
        now = time.time()
        for entry in self.root.glob(f"{TMP_PREFIX}*"):
            try:
                if now - entry.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue
        return doomed

    def load_trainer_state(self, revision: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """(optimizer tensors, trainer JSON) saved with ``revision``, or None when it was
        saved without trainer state. Raises CheckpointError when that state is corrupt."""
        path = self.path(revision)
        meta = _read_meta(path)
        if meta.trainer_state_sha256 is None:
            return None
        tensors = _read_tensors(path, STATE_FILE, meta.trainer_state_sha256)
        try:
            state = json.loads((path / STATE_JSON).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{STATE_JSON} cannot be read ({error}) in {path}") from None
        try:
            _check_finite(tensors, "trainer state")
        except ValueError as error:
            raise CheckpointError(f"{error} in {path}") from None
        return tensors, state
