"""The extras a user combines resolve together against the package index, and the one
known conflict stays where the images put it.

``uv pip compile`` (the dev extra installs uv) resolves pyproject.toml's requirements
with those extras for Linux x86_64 in seconds, where ``pip install --dry-run`` takes
minutes for SGLang's ~200 dependencies; a conflict fails the test with the resolver's
explanation. With no reachable index the test skips, saying so.

[runtime] and [sglang] cannot share one environment: the torch engine calls models
with transformers >= 5.24's ``cache=`` keyword (5.19 names it ``past_key_values`` and
silently ignores ``cache``, so decoding would run without its KV cache), and SGLang
0.5.23 pins transformers==5.19.0. They live in separate images (Dockerfile targets
``runtime`` and ``runtime-sglang``; the SGLang image needs nothing from [runtime]).
The offline test below fails the day SGLang's pins admit our ranges, so the images
and docs/sglang.md can be merged again."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from sglang_support import sglang_source

from aurora.runtime.sglang import PRIMARY_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

# What users install: each image's extras, the developers' sets.
COMBINATIONS = ["operator", "runtime", "runtime,operator,dev", "sglang", "sglang,dev"]
_OFFLINE = re.compile(r"(?i)failed to fetch|connect|dns|network|timed out|offline")


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(found).exists():
        pytest.skip("uv is not installed (pip install -e '.[dev]' installs it)")
    return found


def _compile(extras: str, python: str = "3.11") -> subprocess.CompletedProcess[str]:
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in extras.split(","):
        requirements += EXTRAS[extra]
    command = [_uv(), "pip", "compile", "-", "--quiet", "--no-header",
               "--python-version", python, "--python-platform", "x86_64-manylinux_2_34"]  # fmt: skip
    result = subprocess.run(
        command, input="\n".join(requirements), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    if (
        result.returncode != 0
        and _OFFLINE.search(result.stderr)
        and "No solution" not in result.stderr
    ):
        pytest.skip(f"the package index is unreachable, nothing resolved: {result.stderr[-300:]}")
    return result


@pytest.mark.parametrize(
    ("extras", "python"),
    [(extras, "3.11") for extras in COMBINATIONS] + [("sglang", "3.13")],
)
def test_the_extras_users_combine_resolve_on_linux(extras: str, python: str) -> None:
    result = _compile(extras, python)
    assert result.returncode == 0, f"[{extras}] does not resolve:\n{result.stderr}"
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", result.stdout, re.MULTILINE))
    if "sglang" in extras.split(","):
        assert pins["sglang"] == PRIMARY_VERSION
    if extras == "operator":
        assert "torch" not in pins  # the operator image has no torch


def test_runtime_and_sglang_conflict_only_on_transformers() -> None:
    result = _compile("runtime,sglang")
    assert result.returncode != 0
    assert re.search(
        r"sglang\S* depends on transformers==5\.19\.0", " ".join(result.stderr.split())
    )


def test_sglang_pins_exclude_only_the_runtime_s_transformers_range() -> None:
    # offline: SGLang pins torch, transformers and more exactly; the base dependencies
    # (in every image) must admit all of them, [runtime] all but transformers
    metadata = next(sglang_source(PRIMARY_VERSION).glob("sglang-*.dist-info/METADATA")).read_text()
    pins = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.removeprefix("Requires-Dist:").strip())
            exact = [s.version for s in requirement.specifier if s.operator == "=="]
            if exact and requirement.marker is None:
                pins[requirement.name.lower()] = exact[0]
    assert pins["transformers"] == "5.19.0" and pins["torch"]
    ours = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + EXTRAS["runtime"]]
    clashes = sorted(
        r.name for r in ours if r.name.lower() in pins and pins[r.name.lower()] not in r.specifier
    )
    assert clashes == ["transformers"]
