"""One SGLang tensor-parallel rank reading its weight-update payload, in its own process,
with SGLang's real MultiprocessingSerializer and SafeUnpickler (compiled from a supported
release's wheel: importing sglang needs CUDA). Used by spawned processes in
tests/integration/test_sglang_tp_payloads.py; kept light so they start fast."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import pickle
import types
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch


def serializer(common_py: str | Path) -> Any:
    """SGLang's MultiprocessingSerializer from ``sglang/srt/utils/common.py``."""
    tree = ast.parse(Path(common_py).read_text())
    wanted = {"MultiprocessingSerializer", "SafeUnpickler", "_safe_load_torch_storage"}
    nodes: list[ast.stmt] = [
        n for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef) and n.name in wanted
    ]
    namespace: dict[str, Any] = {
        "io": io,
        "pickle": pickle,
        "torch": torch,
        "ForkingPickler": ForkingPickler,
        # pybase64 is a faster drop-in for base64 with the same calls
        "pybase64": types.SimpleNamespace(b64encode=base64.b64encode, b64decode=base64.b64decode),
    }
    exec(compile(ast.Module(nodes, []), str(common_py), "exec"), namespace)
    return namespace["MultiprocessingSerializer"]


def digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype}{list(tensor.shape)}:{hashlib.sha256(data).hexdigest()}"


def load_rank(common_py: str, payloads: list[str], rank: int) -> dict[str, str] | str:
    """What tensor-parallel rank ``rank`` gets from its entry of serialized_named_tensors,
    as SGLang's scheduler reads it (``serialized_named_tensors[tp_rank]``): name → digest,
    or the error it raised."""
    try:
        named = serializer(common_py).deserialize(payloads[rank])
        return {name: digest(tensor) for name, tensor in named}
    except BaseException as error:  # EOFError when another rank consumed the handle
        return f"{type(error).__name__}: {error}"
