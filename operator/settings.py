"""The operator's own settings, from its environment (not from any Speculator):
the children's default images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aurora import __version__


@dataclass(frozen=True)
class Images:
    """Default images for children whose spec names none (the operator's settings)."""

    runtime: str = f"ghcr.io/aurora-dev/aurora-runtime:{__version__}"
    runtime_cuda: str = f"ghcr.io/aurora-dev/aurora-runtime:{__version__}-cu126"
    sglang: str = f"ghcr.io/aurora-dev/aurora-runtime-sglang:{__version__}"
    pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Images:
        """AURORA_RUNTIME_IMAGE, AURORA_RUNTIME_CUDA_IMAGE, AURORA_SGLANG_IMAGE and
        AURORA_IMAGE_PULL_POLICY override the defaults."""
        default = cls()
        return cls(
            runtime=environ.get("AURORA_RUNTIME_IMAGE") or default.runtime,
            runtime_cuda=environ.get("AURORA_RUNTIME_CUDA_IMAGE") or default.runtime_cuda,
            sglang=environ.get("AURORA_SGLANG_IMAGE") or default.sglang,
            pull_policy=environ.get("AURORA_IMAGE_PULL_POLICY") or default.pull_policy,
        )

    def torch(self, gpus: int) -> str:
        """The torch runtime image: with CUDA when the pod gets GPUs."""
        return self.runtime_cuda if gpus > 0 else self.runtime
