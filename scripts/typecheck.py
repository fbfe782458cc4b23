"""Type-check the `aurora` namespace as Python imports it.

operator/ and runtime/ are mapped into `aurora` by pyproject.toml, which mypy
cannot follow; this builds a tree of symlinks with the installed layout in
.typecheck/ and runs mypy on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".typecheck"


def main() -> int:
    shutil.rmtree(TREE, ignore_errors=True)
    package = TREE / "aurora"
    package.mkdir(parents=True)
    for entry in (ROOT / "aurora").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "operator").symlink_to(ROOT / "operator")
    (package / "runtime").symlink_to(ROOT / "runtime")
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "-p",
        "aurora",
    ]
    return subprocess.call(cmd, cwd=TREE)


if __name__ == "__main__":
    raise SystemExit(main())
