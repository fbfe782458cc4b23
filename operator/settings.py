"""The operator's own settings, from its environment (the Deployment's env and the
`aurora-operator-config` ConfigMap), never from a Speculator: the children's default
images and which Redis endpoints Speculators may use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class RedisSettings:
    """Which Redis endpoints (host:port) a Speculator may name in spec.traces.redisUrl.

    - The managed Redis (`managed_url`, with its admin password): every Speculator on
      it gets its own Redis ACL user, limited to its keys `aurora:{ns}:{name}:*`; the
      operator creates that user and a Secret holding its password for the pods, and
      reads no Secret at all.
    - `allowlist` (fnmatch patterns of host:port): Redis endpoints the operator does not
      manage; a Speculator brings `traces.passwordSecretRef`, a Secret the operator reads
      only when it carries the label aurora.dev/redis-credentials: "true".
    Any other endpoint is refused before a connection is made or a Secret is read: the
    author of a Speculator never picks where the operator sends a password.
    """

    managed_url: str | None = None
    admin_password: str | None = field(default=None, repr=False)
    allowlist: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedisSettings:
        """AURORA_MANAGED_REDIS_URL, AURORA_MANAGED_REDIS_PASSWORD (from a Secret),
        AURORA_REDIS_ALLOWLIST (comma-separated host:port patterns). A rediss:// endpoint
        signed by a private CA needs AURORA_REDIS_CA_FILE (read by protocol.connect)."""
        allow = environ.get("AURORA_REDIS_ALLOWLIST", "")
        return cls(
            managed_url=environ.get("AURORA_MANAGED_REDIS_URL") or None,
            admin_password=environ.get("AURORA_MANAGED_REDIS_PASSWORD") or None,
            allowlist=tuple(entry.strip() for entry in allow.split(",") if entry.strip()),
        )


@dataclass(frozen=True)
class OperatorSettings:
    images: Images = field(default_factory=Images)
    redis: RedisSettings = field(default_factory=RedisSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        return cls(images=Images.from_env(environ), redis=RedisSettings.from_env(environ))
