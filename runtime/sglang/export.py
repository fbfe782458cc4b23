"""A draft revision in SGLang's EAGLE-3 layout (`LlamaForCausalLMEagle3`).

Aurora's ``EagleDraftHead`` and SGLang's EAGLE-3 draft compute the same function: fc
over the three fused target layers; one decoder layer whose attention takes
``[input_layernorm(embedding), hidden_norm(fused)]`` (2H wide) with the fused feature
as residual; a final norm and an LM head over the draft vocabulary. Only the names
differ, and ``d2t``: Aurora stores the target id of each draft token, SGLang (like
EAGLE-3 and SpecForge) the offset ``target_id - draft_index``. SGLang's
``load_weights`` (models/llama_eagle3.py) maps ``midlayer.`` to ``layers.0.``, fuses
q/k/v and gate/up itself, and skips ``t2d``; we still write ``t2d`` (bool, target
vocabulary) because SpecForge and EAGLE tooling expect it. The token embedding is not
exported: SGLang shares the target's with an EAGLE-3 draft, as Aurora does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from aurora.runtime.checkpoint import CheckpointMeta, load_checkpoint
from aurora.runtime.draft import DraftConfig

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Aurora EagleDraftHead parameter → SGLang EAGLE-3 checkpoint name.
PARAM_NAMES: dict[str, str] = {
    "fc.weight": "fc.weight",
    "embed_norm.weight": "midlayer.input_layernorm.weight",
    "feature_norm.weight": "midlayer.hidden_norm.weight",
    "q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "post_norm.weight": "midlayer.post_attention_layernorm.weight",
    "gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "up_proj.weight": "midlayer.mlp.up_proj.weight",
    "down_proj.weight": "midlayer.mlp.down_proj.weight",
    "final_norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
VOCAB_MAPS = ("d2t", "t2d")
SGLANG_NAMES = frozenset(PARAM_NAMES.values()) | set(VOCAB_MAPS)


class ExportError(ValueError):
    """A revision cannot be exported, or an export directory is not a valid SGLang
    EAGLE-3 draft; the message names the tensor or field, the value and the fix."""


@dataclass(frozen=True)
class SGLangDraft:
    """A validated SGLang EAGLE-3 draft: its config.json and tensors (SGLang names)."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def revision(self) -> str | None:
        return (self.config.get("aurora") or {}).get("revision")

    def target_ids(self) -> Tensor:
        """Aurora's d2t: the target id of every draft token."""
        d2t = self.tensors["d2t"]
        return d2t + torch.arange(d2t.numel(), dtype=d2t.dtype)


def expected_shapes(config: DraftConfig) -> dict[str, tuple[int, ...]]:
    """SGLang name → shape, for a draft of this architecture."""
    h, nh, nkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    inter, vd, v = config.intermediate_size, config.draft_vocab_size, config.target_vocab_size
    return {
        "fc.weight": (h, 3 * h),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (nh * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (nkv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, nh * hd),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
        "lm_head.weight": (vd, h),
        "d2t": (vd,),
        "t2d": (v,),
    }


def draft_config_of(meta: CheckpointMeta) -> DraftConfig:
    """The EAGLE-3 DraftConfig a checkpoint was trained with; ExportError otherwise."""
    try:
        config = DraftConfig.from_dict(dict(meta.draft_config))
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f"revision {meta.revision}: draft_config {meta.draft_config!r} is not an Aurora "
            f"draft head's config ({error}): only EAGLE-3 head checkpoints can be exported"
        ) from None
    if config.kind != "eagle3":
        raise ExportError(
            f"revision {meta.revision}: draft_config kind={config.kind!r}, SGLang's "
            f"{ARCHITECTURE} needs kind='eagle3'"
        )
    return config


def to_sglang(
    tensors: Mapping[str, Tensor], config: DraftConfig, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Tensor]:
    """Aurora draft-head tensors → SGLang EAGLE-3 tensors (weights cast to ``dtype``,
    d2t as int64 offsets, t2d as a bool mask over the target vocabulary)."""
    expected = set(PARAM_NAMES) | {"d2t"}
    if missing := sorted(expected - set(tensors)):
        raise ExportError(f"draft tensors lack {missing}: not an EAGLE-3 draft head checkpoint")
    if extra := sorted(set(tensors) - expected):
        raise ExportError(
            f"draft tensors {extra} have no SGLang EAGLE-3 counterpart: export knows "
            f"{sorted(expected)}"
        )
    out = {PARAM_NAMES[n]: tensors[n].detach().to("cpu", dtype).contiguous() for n in PARAM_NAMES}
    target_ids = tensors["d2t"].detach().to("cpu", torch.int64)
    vd, v = config.draft_vocab_size, config.target_vocab_size
    if target_ids.shape != (vd,):
        raise ExportError(f"d2t has shape {list(target_ids.shape)}, the config says [{vd}]")
    if vd and (int(target_ids.min()) < 0 or int(target_ids.max()) >= v):
        raise ExportError(f"d2t holds target ids outside [0, {v}): a corrupt vocabulary map")
    if torch.unique(target_ids).numel() != vd:
        raise ExportError("d2t maps two draft tokens to one target token: a corrupt vocabulary map")
    out["d2t"] = (target_ids - torch.arange(vd, dtype=torch.int64)).contiguous()
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[target_ids] = True
    out["t2d"] = t2d
    check_tensors(out, config, dtype)
    return out


def sglang_config(
    config: DraftConfig,
    *,
    dtype: torch.dtype,
    revision: str,
    sha256: str,
    max_position_embeddings: int = 131072,
) -> dict[str, Any]:
    """SGLang's config.json for a ``LlamaForCausalLMEagle3`` draft of this shape.
    ``eagle_aux_hidden_state_layer_ids`` are Aurora's ``fuse_layers``: both index the
    target layer whose output is fused (SGLang captures at ``layer_id + 1``)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "target_hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": config.target_vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "tie_word_embeddings": False,
        "bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(config.fuse_layers),
            "use_aux_hidden_state": True,
        },
        # Provenance; Hugging Face configs ignore keys they do not know.
        "aurora": {
            "revision": revision,
            "sha256": sha256,
            "target": config.target,
            "draft_config": config.to_dict(),
        },
    }


def check_tensors(tensors: Mapping[str, Tensor], config: DraftConfig, dtype: torch.dtype) -> None:
    """Raise ExportError unless ``tensors`` are exactly SGLang's EAGLE-3 names with the
    shapes of ``config``, weights in ``dtype`` and finite, d2t/t2d consistent."""
    shapes = expected_shapes(config)
    if missing := sorted(set(shapes) - set(tensors)):
        raise ExportError(f"missing tensors {missing}: SGLang's {ARCHITECTURE} needs them")
    if extra := sorted(set(tensors) - set(shapes)):
        raise ExportError(
            f"unexpected tensors {extra}: SGLang's {ARCHITECTURE} has no such weights"
        )
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(
                f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, dtype)
        if tensor.dtype != want:
            raise ExportError(f"tensor {name!r} is {tensor.dtype}, expected {want}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"tensor {name!r} holds NaN or Inf: refusing to export it")
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    target_ids = d2t + torch.arange(d2t.numel(), dtype=d2t.dtype)
    v = config.target_vocab_size
    if d2t.numel() and (int(target_ids.min()) < 0 or int(target_ids.max()) >= v):
        raise ExportError(f"d2t offsets point outside the target vocabulary [0, {v})")
    if int(t2d.sum()) != d2t.numel() or not bool(t2d[target_ids].all()):
        raise ExportError("t2d does not mark exactly the target ids d2t maps to")


def export_revision(
    revision_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    max_position_embeddings: int = 131072,
    overwrite: bool = False,
) -> SGLangDraft:
    """Write the checkpoint at ``revision_dir`` (verified by load_checkpoint: sha256,
    names, shapes, finiteness) as an SGLang EAGLE-3 draft directory ``out_dir``
    (config.json + model.safetensors), then validate what was written. The directory
    appears whole or not at all. Raises ExportError (or CheckpointError) naming the
    problem; refuses a non-empty ``out_dir`` unless ``overwrite``."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tensors, meta = load_checkpoint(revision_dir)
    config = draft_config_of(meta)
    converted = to_sglang(tensors, config, DTYPES[dtype])
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(
            f"{out} exists and is not an empty directory: choose a new OUT_DIR or pass --overwrite"
        )
    document = sglang_config(
        config,
        dtype=DTYPES[dtype],
        revision=meta.revision,
        sha256=meta.sha256,
        max_position_embeddings=max_position_embeddings,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(converted, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        written = load_export(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def load_export(path: str | Path) -> SGLangDraft:
    """Read and validate an SGLang EAGLE-3 draft directory (ours or SpecForge's, if it
    carries Aurora's provenance block): architecture, every tensor's name, shape and
    dtype against config.json, finiteness, d2t/t2d consistency."""
    path = Path(path)
    try:
        document = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ExportError(f"no {CONFIG_FILE} in {path}: not an SGLang draft directory") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path / CONFIG_FILE} does not parse: {error}") from None
    if document.get("architectures") != [ARCHITECTURE]:
        raise ExportError(
            f"{path / CONFIG_FILE}: architectures is {document.get('architectures')!r}, "
            f"expected [{ARCHITECTURE!r}]"
        )
    draft_config = (document.get("aurora") or {}).get("draft_config")
    if not isinstance(draft_config, dict):
        raise ExportError(
            f"{path / CONFIG_FILE} has no aurora.draft_config: export it with `aurora export`"
        )
    try:
        config = DraftConfig.from_dict(draft_config)
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f"{path / CONFIG_FILE}: aurora.draft_config is invalid ({error})"
        ) from None
    dtype = DTYPES.get(str(document.get("torch_dtype")))
    if dtype is None:
        raise ExportError(
            f"{path / CONFIG_FILE}: torch_dtype {document.get('torch_dtype')!r} is not one "
            f"of {sorted(DTYPES)}"
        )
    declared = {
        "hidden_size": config.hidden_size,
        "draft_vocab_size": config.draft_vocab_size,
        "vocab_size": config.target_vocab_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
    }
    for key, value in declared.items():
        if document.get(key) != value:
            raise ExportError(
                f"{path / CONFIG_FILE}: {key} is {document.get(key)!r} but the draft has {value}"
            )
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise ExportError(f"no {WEIGHTS_FILE} in {path}") from None
    except (OSError, SafetensorError) as error:
        raise ExportError(f"{path / WEIGHTS_FILE} is not valid safetensors: {error}") from None
    check_tensors(tensors, config, dtype)
    return SGLangDraft(document, tensors)
