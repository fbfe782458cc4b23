"""Revisions without a shared volume: the trainer serves its checkpoints over HTTP and a
server fetches one only after its bytes hash to the digest the candidate record carries;
a corrupt download never lands where the loader looks. The day-0 draft's init step
(`aurora draft fetch`) checks its digest and unpacks archives safely. Loopback HTTP, no
Redis, no torch."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from aurora.runtime.fetch import (
    FETCHED_MARKER,
    FetchError,
    fetch_draft,
    fetch_revision,
    prune_fetched,
)
from aurora.runtime.trainer.serve_checkpoints import revision_url, serve_checkpoints

pytestmark = pytest.mark.unit

WEIGHTS = b"\x00weights of a draft head\xff" * 100


def publish(root: Path, revision: str, weights: bytes = WEIGHTS) -> str:
    """A checkpoint folder as checkpoint.py writes it; returns the weights' sha256."""
    digest = hashlib.sha256(weights).hexdigest()
    folder = root / revision
    folder.mkdir(parents=True)
    (folder / "draft.safetensors").write_bytes(weights)
    (folder / "meta.json").write_text(json.dumps({"revision": revision, "sha256": digest}))
    (folder / "trainer-state.safetensors").write_bytes(b"optimizer state")
    return digest


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The trainer's checkpoint root and the base URL it serves it at."""
    root = tmp_path / "trainer-volume"
    root.mkdir()
    server: ThreadingHTTPServer = serve_checkpoints(root, 0, host="127.0.0.1")
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_fetches_a_published_revision_and_checks_its_digest(
    trainer: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = trainer
    digest = publish(root, "r00000010-abcdef")
    dest = tmp_path / "server-volume" / "r00000010-abcdef"
    fetch_revision(revision_url(base, "r00000010-abcdef"), "r00000010-abcdef", digest, dest)
    assert (dest / "draft.safetensors").read_bytes() == WEIGHTS
    assert json.loads((dest / "meta.json").read_text())["sha256"] == digest
    assert not (dest / "trainer-state.safetensors").exists()  # never served
    assert sorted(p.name for p in dest.parent.iterdir()) == ["r00000010-abcdef"]  # no temp left


def test_a_corrupt_download_never_reaches_the_loader(
    trainer: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = trainer
    digest = publish(root, "r1")
    (root / "r1" / "draft.safetensors").write_bytes(WEIGHTS[:-1] + b"!")  # bit rot, truncation
    dest = tmp_path / "server-volume" / "r1"
    with pytest.raises(FetchError, match=f"expected {digest}"):
        fetch_revision(revision_url(base, "r1"), "r1", digest, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_a_meta_json_for_another_revision_or_digest_is_refused(
    trainer: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = trainer
    digest = publish(root, "r2")
    (root / "r2" / "meta.json").write_text(json.dumps({"revision": "r9", "sha256": digest}))
    with pytest.raises(FetchError, match="refusing it"):
        fetch_revision(revision_url(base, "r2"), "r2", digest, tmp_path / "s" / "r2")
    assert not (tmp_path / "s" / "r2").exists()


def test_the_trainer_serves_only_checkpoint_files(trainer: tuple[Path, str]) -> None:
    import urllib.error
    import urllib.request

    root, base = trainer
    publish(root, "r3")
    (root / ".tmp-r4-1234").mkdir()
    (root / ".tmp-r4-1234" / "draft.safetensors").write_bytes(b"half written")
    for path in ("/revisions/r3/trainer-state.safetensors", "/revisions/.tmp-r4-1234/draft.safetensors",
                 "/revisions/../r3/meta.json", "/revisions/r3/", "/revisions/missing/meta.json",
                 "/etc/passwd"):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=5)
        assert refused.value.code == 404, path
    with urllib.request.urlopen(base + "/revisions/r3/draft.safetensors", timeout=5) as ok:
        assert ok.read() == WEIGHTS


def test_fetched_revisions_are_pruned_to_keep_the_servers_volume_bounded(tmp_path: Path) -> None:
    import os

    for i, name in enumerate(["r1", "r2", "r3", "r4", "initial"]):
        folder = tmp_path / name
        folder.mkdir()
        if name != "initial":  # not fetched (e.g. baked in): never pruned
            (folder / FETCHED_MARKER).write_text("x")
            os.utime(folder / FETCHED_MARKER, (1000 + i, 1000 + i))
    removed = prune_fetched(tmp_path, keep=2, protect={"r1"})
    assert sorted(removed) == ["r2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["initial", "r1", "r3", "r4"]


def _archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP, as any file server would."""
    import functools
    from http.server import SimpleHTTPRequestHandler
    from threading import Thread

    folder = tmp_path / "files"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_day0_draft_archive_is_checked_and_unpacked(
    files: tuple[Path, str], tmp_path: Path
) -> None:
    folder, base = files
    data = _archive({"eagle3/config.json": b"{}", "eagle3/model.safetensors": b"w" * 64})
    (folder / "eagle3.tar.gz").write_bytes(data)
    into = tmp_path / "drafts"
    fetch_draft(f"{base}/eagle3.tar.gz", hashlib.sha256(data).hexdigest(), into)
    assert (into / "eagle3" / "model.safetensors").read_bytes() == b"w" * 64
    # a second run (the pod's init step again) does nothing; a wrong digest is refused
    (folder / "eagle3.tar.gz").unlink()
    fetch_draft(f"{base}/eagle3.tar.gz", hashlib.sha256(data).hexdigest(), into)
    (folder / "other.bin").write_bytes(b"tampered")
    with pytest.raises(FetchError, match="refusing it"):
        fetch_draft(f"{base}/other.bin", "0" * 64, tmp_path / "elsewhere")
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == []


def test_an_archive_cannot_write_outside_the_drafts_folder(
    files: tuple[Path, str], tmp_path: Path
) -> None:
    folder, base = files
    data = _archive({"../escaped.txt": b"owned"})
    (folder / "evil.tgz").write_bytes(data)
    with pytest.raises(FetchError, match="cannot unpack"):
        fetch_draft(f"{base}/evil.tgz", hashlib.sha256(data).hexdigest(), tmp_path / "drafts")
    assert not (tmp_path / "escaped.txt").exists()


def test_a_server_prefers_its_own_copy_then_the_publishers_url_then_a_shared_path(
    tmp_path: Path,
) -> None:
    from aurora.runtime.protocol import RevisionRef
    from aurora.runtime.server.revisions import Revision, RevisionLoader

    shared = tmp_path / "trainer-volume" / "r5"  # a path the record names
    shared.mkdir(parents=True)
    fetched: list[str] = []

    def fetch(ref: RevisionRef, dest: Path) -> Path | None:
        fetched.append(ref.revision)
        if ref.revision == "r-no-url":
            return None  # published without a URL: the shared volume it is
        dest.mkdir(parents=True)
        return dest

    def never(_: object) -> Revision:
        raise AssertionError("not used")

    mine = tmp_path / "server-volume"
    loader = RevisionLoader(never, never, str(mine), fetch)
    # a record with a URL is downloaded even when its path happens to be readable here
    assert loader.resolve(RevisionRef(revision="r5", path=str(shared))) == mine / "r5"
    assert loader.resolve(RevisionRef(revision="r5", path=str(shared))) == mine / "r5"
    assert fetched == ["r5"]  # the second time, its own copy
    no_url = RevisionRef(revision="r-no-url", path=str(shared))
    assert loader.resolve(no_url) == shared
