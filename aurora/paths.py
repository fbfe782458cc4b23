"""Where Aurora keeps its files: one home, overridable with AURORA_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def aurora_home() -> Path:
    """The cache root: $AURORA_HOME, else $XDG_CACHE_HOME/aurora, else ~/.cache/aurora."""
    if home := os.environ.get("AURORA_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "aurora"


def models_dir() -> Path:
    return aurora_home() / "models"


def downloads_dir() -> Path:
    return aurora_home() / "downloads"
