"""Downloads that are checked before anything reads them: a draft revision a server
fetches from the trainer that published it, and the day-0 draft an init step fetches.

Both are content-verified: the bytes must hash to the sha256 the publisher recorded
(the candidate record in Redis, or `spec.draft.fetch.sha256`), and they land in their
final place only after the check (a temporary folder renamed into place), so a corrupt
or truncated download never reaches an engine. Standard library only (plain HTTP GET;
proxies from the environment as urllib reads them): no torch, no Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tarfile
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DRAFT_FILE = "draft.safetensors"  # what checkpoint.py writes and servers load
META_FILE = "meta.json"
FETCHED_MARKER = ".fetched"  # in every revision folder this module wrote
TMP_PREFIX = ".tmp-"  # never a revision name (checkpoint.py refuses it)
CHUNK = 1 << 20
TIMEOUT_S = 60.0


class FetchError(Exception):
    """A download failed or did not match its digest; the message says which and why."""


def download(url: str, dest: Path, sha256: str | None = None) -> str:
    """GET `url` into `dest` (streamed), returning the sha256 of what arrived. With
    `sha256`, a different digest removes `dest` and raises FetchError."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, dest.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as error:  # URLError and HTTPError are OSErrors
        dest.unlink(missing_ok=True)
        raise FetchError(f"cannot download {url}: {error}") from None
    got = digest.hexdigest()
    if sha256 is not None and got != sha256:
        dest.unlink(missing_ok=True)
        raise FetchError(
            f"{url} has sha256 {got}, expected {sha256}: refusing it (corrupt download, or "
            "the file changed after it was published)"
        )
    return got


def _scratch(parent: Path, label: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f"{TMP_PREFIX}{label}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def fetch_revision(url: str, revision: str, sha256: str, dest: Path) -> Path:
    """A checkpoint folder (draft.safetensors and meta.json) from `url` into `dest`,
    unless it is there already. The weights must hash to `sha256` and meta.json must
    name that digest and `revision`; the folder appears whole or not at all (the
    loader then checks every tensor against meta.json)."""
    if (dest / FETCHED_MARKER).exists():
        return dest
    scratch = _scratch(dest.parent, revision)
    try:
        download(f"{url.rstrip('/')}/{DRAFT_FILE}", scratch / DRAFT_FILE, sha256)
        download(f"{url.rstrip('/')}/{META_FILE}", scratch / META_FILE)
        try:
            meta = json.loads((scratch / META_FILE).read_text())
        except ValueError as error:
            raise FetchError(f"{url}/{META_FILE} is not JSON: {error}") from None
        if meta.get("sha256") != sha256 or meta.get("revision") != revision:
            raise FetchError(
                f"{url}/{META_FILE} describes revision {meta.get('revision')!r} with sha256 "
                f"{meta.get('sha256')!r}, not {revision!r} with {sha256}: refusing it"
            )
        (scratch / FETCHED_MARKER).write_text(sha256 + "\n")
        if dest.exists():  # a partial copy from an older, unmarked attempt
            shutil.rmtree(dest)
        os.replace(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("fetched revision %s from %s (sha256 %s)", revision, url, sha256[:12])
    return dest


def prune_fetched(root: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the `keep` most recently fetched revision folders under `root`
    (never those in `protect`), so a server's bounded volume never fills up."""
    fetched = sorted(
        (p for p in root.iterdir() if (p / FETCHED_MARKER).exists()),
        key=lambda p: (p / FETCHED_MARKER).stat().st_mtime,
    )
    removed = []
    for folder in fetched[: max(len(fetched) - keep, 0)]:
        if folder.name not in protect:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def fetch_draft(url: str, sha256: str, into: Path) -> Path:
    """The day-0 draft: the file at `url`, checked against `sha256`, into `into`; a
    .tar, .tar.gz or .tgz archive is unpacked there (no absolute paths, no `..`, no
    links out: tarfile's data filter). Idempotent: a second run with the same digest
    does nothing."""
    marker = into / f"{FETCHED_MARKER}-{sha256}"
    if marker.exists():
        return into
    scratch = _scratch(into, "draft")
    try:
        name = Path(urlsplit(url).path).name or "draft"
        archive = scratch / name
        download(url, archive, sha256)
        if tarfile.is_tarfile(archive):
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(scratch / "unpacked", filter="data")
            except tarfile.TarError as error:
                raise FetchError(f"cannot unpack {url}: {error}") from None
            archive.unlink()
            for item in (scratch / "unpacked").iterdir():
                target = into / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        else:
            os.replace(archive, into / name)
        marker.write_text(url + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("fetched the day-0 draft %s (sha256 %s) into %s", url, sha256[:12], into)
    return into
