"""`aurora export --to sglang`: an Aurora revision in SGLang's EAGLE-3 layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sglang_support import CONFIG, VOCAB, head, save_revision

from aurora.cli import main
from aurora.runtime.checkpoint import save_checkpoint
from aurora.runtime.sglang.export import (
    ARCHITECTURE,
    ExportError,
    expected_shapes,
    export_revision,
    load_export,
)

pytestmark = pytest.mark.unit


def test_export_writes_sglang_names_shapes_and_vocabulary_maps(tmp_path: Path) -> None:
    # given a real Aurora checkpoint of an EAGLE-3 head
    revision = save_revision(tmp_path / "ckpt", "r00000001-abcdef", seed=1)
    # when it is exported
    draft = export_revision(revision, tmp_path / "out")
    # then config.json describes an SGLang EAGLE-3 draft of that shape
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["draft_vocab_size"] == CONFIG.draft_vocab_size
    assert config["vocab_size"] == CONFIG.target_vocab_size
    assert config["target_hidden_size"] == config["hidden_size"] == CONFIG.hidden_size
    assert config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    assert config["aurora"]["revision"] == "r00000001-abcdef"
    # and model.safetensors holds exactly SGLang's names, shapes and dtypes
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected_shapes(CONFIG)
    assert tensors["fc.weight"].dtype == torch.bfloat16
    # d2t holds offsets (target id - draft index), t2d marks the draft's target ids
    assert torch.equal(tensors["d2t"] + torch.arange(len(VOCAB)), VOCAB)
    assert tensors["t2d"].dtype == torch.bool and torch.equal(tensors["t2d"].nonzero()[:, 0], VOCAB)
    assert torch.equal(draft.target_ids(), VOCAB)
    # and the weights are the head's, renamed
    source = head(seed=1).state_dict()
    assert torch.equal(
        tensors["midlayer.self_attn.q_proj.weight"], source["q_proj.weight"].to(torch.bfloat16)
    )
    assert torch.equal(tensors["norm.weight"], source["final_norm.weight"].to(torch.bfloat16))


def test_export_refuses_a_non_empty_output_and_a_non_eagle_checkpoint(tmp_path: Path) -> None:
    revision = save_revision(tmp_path / "ckpt", "r1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_revision(revision, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    other = save_checkpoint(
        tmp_path / "ckpt",
        "r2",
        {"weight": torch.ones(2)},
        parent=None,
        step=0,
        traces_seen=0,
        evaluation={},
        draft_config={"kind": "ngram"},
    )
    with pytest.raises(ExportError, match="not an Aurora draft head's config"):
        export_revision(other, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda t: t.pop("lm_head.weight"), "missing tensors \\['lm_head.weight'\\]"),
        (lambda t: t.update({"embed_tokens.weight": torch.zeros(2)}), "unexpected tensors"),
        (
            lambda t: t.update({"fc.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}),
            "'fc.weight' has shape",
        ),
        (
            lambda t: t.update({"norm.weight": t["norm.weight"].float()}),
            "'norm.weight' is torch.float32",
        ),
        (lambda t: t["d2t"].add_(1000), "outside the target vocabulary"),
        (lambda t: t["t2d"].fill_(True), "t2d does not mark"),
    ],
)
def test_validation_refuses_an_export_that_sglang_would_misload(
    tmp_path: Path, tamper, message
) -> None:
    export_revision(save_revision(tmp_path / "ckpt", "r1"), tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(weights))
    tamper(tensors)
    save_file(tensors, str(weights))
    with pytest.raises(ExportError, match=message):
        load_export(tmp_path / "out")


def test_cli_exports_and_reports_a_bad_revision_as_one_line(tmp_path: Path, capsys) -> None:
    revision = save_revision(tmp_path / "ckpt", "r00000007-000000")
    assert (
        main(
            ["export", "--to", "sglang", str(revision), str(tmp_path / "out"), "--dtype", "float16"]
        )
        == 0
    )
    assert "exported revision r00000007-000000" in capsys.readouterr().out
    assert load_export(tmp_path / "out").tensors["fc.weight"].dtype == torch.float16
    (revision / "draft.safetensors").write_bytes(b"corrupt")
    assert main(["export", "--to", "sglang", str(revision), str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "sha256" in error
