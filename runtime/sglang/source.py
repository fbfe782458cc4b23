"""The supported SGLang releases' source, for contract tests: each wheel is downloaded
once with ``pip download --no-deps`` into ``$AURORA_HOME/sglang/`` and unpacked (never
imported: most of SGLang needs CUDA). Hooks, flags and weight names are checked by
parsing these files with ``ast``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from aurora.paths import aurora_home
from aurora.runtime.sglang import PRIMARY_VERSION

# One wheel for every CI interpreter: both releases ship cp311 manylinux wheels.
_WHEEL_PLATFORM = ("--platform", "manylinux_2_34_x86_64", "--python-version", "3.11")


class SourceUnavailable(RuntimeError):
    """A release's wheel could not be downloaded (no network, no index)."""


def source_root(version: str = PRIMARY_VERSION) -> Path:
    """The unpacked wheel of ``sglang==version`` (the folder holding ``sglang/``),
    downloading it on first use. Raises SourceUnavailable with pip's message when the
    package index is unreachable."""
    home = aurora_home() / "sglang"
    root = home / f"sglang-{version}"
    if (root / "sglang" / "srt").is_dir():
        return root
    home.mkdir(parents=True, exist_ok=True)
    wheels = sorted(home.glob(f"sglang-{version}-*.whl"))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"sglang=={version}", "--no-deps",
             "--only-binary=:all:", *_WHEEL_PLATFORM, "--quiet", "--dest", str(home)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wheels = sorted(home.glob(f"sglang-{version}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise SourceUnavailable(
                f"pip download sglang=={version} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=home))
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(tmp)
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)  # whole or nothing, like checkpoints
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read(relative: str, version: str = PRIMARY_VERSION) -> str:
    """The text of ``sglang/<relative>`` in that release."""
    return (source_root(version) / "sglang" / relative).read_text()
