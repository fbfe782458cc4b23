"""The `Speculator` custom resource as pydantic models: the one definition that the
CRD is generated from (`aurora.operator.crd`) and that the operator validates with.

Field names are camelCase in the API and snake_case in Python. Numbers that are
fractions travel as decimal strings ("1.05"), per the Kubernetes API conventions;
`decimal()` reads them. Rules that span fields are written once, as `Rule`s: each
carries a CEL expression (the API server enforces it through
`x-kubernetes-validations`) and the same check in Python (enforced here, so a
cluster that does not evaluate CEL still gets the error, as InvalidSpec).

This module is pure: no kopf, no kubernetes client, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from aurora.runtime.protocol import Builtin
from aurora.runtime.rollout.policy import RolloutPolicy
from aurora.runtime.schema import FRACTION_PATTERN, Rule
from aurora.runtime.schema import check_rules as _check_rules
from aurora.runtime.schema import rules_schema as _rules_schema

GROUP: Final = "aurora.dev"
VERSION: Final = "v1alpha1"
KIND: Final = "Speculator"
PLURAL = "speculators"
SINGULAR = "speculator"
SHORT_NAMES = ("spx",)
API_VERSION: Final = "aurora.dev/v1alpha1"

# Children are named `<name>-server-canary` etc. and Services must be DNS-1035 labels
# (at most 63 characters), which leaves 49 for the Speculator's own name.
MAX_NAME_LENGTH = 49

# Decimal strings: FRACTION_PATTERN (a share, 0 to 1) comes from aurora.runtime.schema.
POSITIVE_REAL_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
# Kubernetes resource.Quantity, as controller-gen writes it for int-or-string fields.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Condition reasons are CamelCase identifiers (metav1.Condition).
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

Fraction = Annotated[str, StringConstraints(pattern=FRACTION_PATTERN, max_length=16)]
PositiveReal = Annotated[str, StringConstraints(pattern=POSITIVE_REAL_PATTERN, max_length=24)]


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and re.fullmatch(QUANTITY_PATTERN, value) is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
DnsLabel = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length=253,
    ),
]
# Opaque Kubernetes structures we pass through untouched (tolerations, affinity).
OpaqueObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


def decimal(value: str) -> float:
    """The number a decimal-string field holds ("1.05" -> 1.05)."""
    return float(value)


_M = TypeVar("_M", bound=BaseModel)


def _defaults(model: type[_M]) -> Callable[[], _M]:
    """A default factory: the section with every field at its default."""
    return lambda: model.model_validate({})


class ApiModel(BaseModel):
    """camelCase in the API, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        use_enum_values=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The camelCase dictionary the API server stores (unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ----------------------------------------------------------------------------- spec


class EngineKind(StrEnum):
    TORCH = "torch"
    SGLANG = "sglang"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class Resources(ApiModel):
    """Container requests and limits (CPU, memory, ephemeral storage). GPUs are counted
    by `gpus` on the owning section, so they cannot disagree with the command line."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class SecretKeyRef(ApiModel):
    name: DnsSubdomain = Field(description="Secret in the Speculator's namespace.")
    key: str = Field("password", min_length=1, description="Key in the Secret.")


class ConfigMapKeyRef(ApiModel):
    name: DnsSubdomain = Field(description="ConfigMap in the Speculator's namespace.")
    key: str = Field("ca.crt", min_length=1, description="Key in the ConfigMap.")


class LocalObjectReference(ApiModel):
    name: DnsSubdomain


class TargetSpec(ApiModel):
    model: str = Field(
        min_length=1,
        max_length=512,
        description="Target model: a Hugging Face id, a path in the image, or an Aurora "
        "alias such as smollm2-135m.",
    )
    served_name: str | None = Field(
        None, max_length=256, description="Model name clients use; defaults to `model`."
    )


EnvName = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=253)]
# Environment variables the operator sets itself; a user's env may not replace them.
RESERVED_ENV_PREFIX = "AURORA_"


class EnvVar(ApiModel):
    """A container environment variable (corev1 EnvVar): a value, or `valueFrom` a
    Secret, ConfigMap or field reference, e.g. HF_TOKEN from a Secret."""

    name: EnvName
    value: str | None = Field(None, max_length=32768)
    value_from: OpaqueObject | None = None


class VolumeMount(ApiModel):
    """Where one of the section's `volumes` is mounted in the container."""

    name: DnsLabel
    mount_path: Annotated[str, StringConstraints(pattern=r"^/.*", max_length=1024)]
    read_only: bool = False
    sub_path: str | None = Field(None, max_length=1024)


class PodOptions(ApiModel):
    """The pod template's scheduling and customisation, one set per section: the servers
    (spec.engine) and the trainer (spec.training) are scheduled independently."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[OpaqueObject] = Field(default_factory=list, max_length=64)
    affinity: OpaqueObject | None = Field(
        None, description="corev1 Affinity: node affinity, pod (anti-)affinity."
    )
    priority_class_name: str | None = Field(None, max_length=253)
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=128,
        description="Extra environment variables (names starting AURORA_ are reserved), e.g. "
        "HF_TOKEN from a Secret for a gated model.",
    )
    env_from: list[OpaqueObject] = Field(
        default_factory=list, max_length=32, description="corev1 EnvFromSource list."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Added to the pods (Aurora's own labels win)."
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    volumes: list[OpaqueObject] = Field(
        default_factory=list, max_length=32, description="Extra corev1 Volumes."
    )
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=32)
    cache_size: Quantity | None = Field(
        None,
        description="sizeLimit of the /cache emptyDir (model downloads, compiler caches); "
        "defaults to 20Gi for sglang servers and 8Gi otherwise.",
    )


ENGINE_RULES = (
    Rule(
        "self.kind != 'sglang' || self.gpus >= 1",
        "engine.kind sglang runs on GPUs: set engine.gpus to 1 or more",
        lambda e: e.kind != EngineKind.SGLANG or e.gpus >= 1,
    ),
    Rule(
        "self.kind != 'sglang' || self.replicas != 1",
        "engine.kind sglang holds one draft per process, so its canary is a subset of "
        "replicas: set engine.replicas to 2 or more (or 0 to scale to zero)",
        lambda e: e.kind != EngineKind.SGLANG or e.replicas != 1,
    ),
    Rule(
        "self.kind != 'torch' || self.tensorParallel == 1",
        "engine.kind torch does not shard the target: set engine.tensorParallel to 1",
        lambda e: e.kind != EngineKind.TORCH or e.tensor_parallel == 1,
    ),
    Rule(
        "self.gpus == 0 || self.tensorParallel <= self.gpus",
        "engine.tensorParallel cannot exceed engine.gpus (GPUs per replica)",
        lambda e: e.gpus == 0 or e.tensor_parallel <= e.gpus,
    ),
    Rule(
        "!has(self.speculativeNumDraftTokens) || "
        "self.speculativeNumDraftTokens <= self.speculativeSteps * self.speculativeEagleTopk + 1",
        "engine.speculativeNumDraftTokens can be at most "
        "speculativeSteps * speculativeEagleTopk + 1",
        lambda e: (
            e.speculative_num_draft_tokens is None
            or e.speculative_num_draft_tokens <= e.speculative_steps * e.speculative_eagle_topk + 1
        ),
    ),
)


class EngineSpec(PodOptions):
    model_config = ConfigDict(json_schema_extra=_rules_schema(ENGINE_RULES))

    kind: EngineKind = Field(
        EngineKind.TORCH,
        description="torch: Aurora's reference engine (CPU or GPU, one process holds stable "
        "and candidate drafts). sglang: SGLang with EAGLE-3 on GPUs (one draft per process).",
    )
    image: str | None = Field(
        None,
        max_length=512,
        description="Server image; defaults to the operator's image for the engine.",
    )
    replicas: int = Field(1, ge=0, le=256)
    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica (nvidia.com/gpu).")
    tensor_parallel: int = Field(1, ge=1, le=16)
    speculative_steps: int = Field(
        4, ge=1, le=16, description="Draft tokens proposed per verify step along a chain."
    )
    speculative_eagle_topk: int = Field(1, ge=1, le=16, description="Branching of the draft tree.")
    speculative_num_draft_tokens: int | None = Field(
        None,
        ge=2,
        le=256,
        description="Tokens verified per step; defaults to speculativeSteps + 1.",
    )
    resources: Resources = Field(default_factory=Resources)
    extra_args: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Appended to the server command line."
    )
    shm_size: Quantity | None = Field(
        None,
        description="sizeLimit of the in-memory /dev/shm (sglang only; NCCL and SGLang's "
        "workers share tensors through it); defaults to 16Gi.",
    )
    topology_spread_constraints: list[OpaqueObject] = Field(
        default_factory=list,
        max_length=8,
        description="corev1 TopologySpreadConstraints for the servers; by default they "
        "spread over nodes and zones (ScheduleAnyway).",
    )

    @model_validator(mode="after")
    def _rules(self) -> EngineSpec:
        _check_rules(self, ENGINE_RULES)
        return self

    @property
    def num_draft_tokens(self) -> int:
        """Tokens the target verifies per step (SGLang's --speculative-num-draft-tokens)."""
        return self.speculative_num_draft_tokens or self.speculative_steps + 1

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


# Where the init step puts a fetched day-0 draft in every pod that loads it.
DRAFTS_DIR: Final = "/drafts"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class DraftFetch(ApiModel):
    """A day-0 draft downloaded by an init step the operator adds to each pod that
    loads it: the file at `url` (a .tar, .tar.gz or .tgz archive is unpacked), checked
    against `sha256` before anything reads it."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
    sha256: Annotated[str, StringConstraints(pattern=SHA256_PATTERN)] = Field(
        description="sha256 of the file at url (hex); a download that differs is refused."
    )
    size_limit: Quantity = Field("20Gi", description="sizeLimit of the /drafts emptyDir.")


DRAFT_RULES = (
    Rule(
        f"!has(self.fetch) || self.initial.startsWith('{DRAFTS_DIR}/')",
        f"draft.fetch puts the day-0 draft under {DRAFTS_DIR}/: set draft.initial to the "
        f"path inside it, e.g. {DRAFTS_DIR}/eagle3 for an archive holding eagle3/",
        lambda d: d.fetch is None or d.initial.startswith(f"{DRAFTS_DIR}/"),
    ),
)


class DraftSpec(ApiModel):
    model_config = ConfigDict(json_schema_extra=_rules_schema(DRAFT_RULES))

    initial: Annotated[
        str,
        StringConstraints(
            pattern=rf"^({Builtin.SUFFIX}|{Builtin.SCRATCH}|{Builtin.NGRAM}|/.+)$", max_length=512
        ),
    ] = Field(
        Builtin.SUFFIX,
        description="Day-0 draft: suffix (model-free suffix decoding over the prompt and "
        "every output served, so day 0 is already faster than plain decoding and learned "
        "candidates must beat it; engine.kind sglang serves it with SGLang's model-free "
        "NGRAM speculator), scratch (an untrained EAGLE-3 head that learns from traffic; "
        "engine.kind sglang serves without speculation until the rollout promotes a learned "
        "draft), ngram (model-free prompt lookup), or an absolute path to a draft "
        "checkpoint: baked into the image, fetched by draft.fetch (under /drafts/), or on a "
        "shared checkpoint volume (for engine.kind sglang: a directory written by `aurora "
        "export --to sglang`).",
    )
    fetch: DraftFetch | None = Field(
        None, description="Download the day-0 draft in an init step (no volume to fill by hand)."
    )

    @model_validator(mode="after")
    def _rules(self) -> DraftSpec:
        _check_rules(self, DRAFT_RULES)
        return self


class TracesSpec(ApiModel):
    redis_url: Annotated[str, StringConstraints(pattern=r"^rediss?://.+", max_length=512)] = Field(
        "redis://aurora-redis.aurora-system.svc:6379/0",
        description="Redis for traces, statistics and revisions (no password in the URL: "
        "use passwordSecretRef).",
    )
    password_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Only for a Redis the operator's allowlist names but does not manage; "
        'the Secret must carry the label aurora.dev/redis-credentials: "true". On the '
        "operator's managed Redis each Speculator gets its own Redis user instead.",
    )
    ca_config_map_ref: ConfigMapKeyRef | None = Field(
        None,
        description="CA bundle for a rediss:// URL whose server certificate a private CA "
        "signed (a ConfigMap in this namespace).",
    )
    sample_rate: Fraction = Field("1", description="Share of finished requests traced, 0 to 1.")
    max_length: int = Field(
        100_000, ge=100, le=100_000_000, description="Trace stream MAXLEN (retention by count)."
    )
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.DELETE,
        description="Delete: deleting the Speculator removes its Redis keys (traces hold "
        "user prompts). Retain: keep them.",
    )


class TrainingSpec(PodOptions):
    enabled: bool = True
    image: str | None = Field(
        None,
        max_length=512,
        description="Defaults to the operator's runtime image (its CUDA build when gpus > 0).",
    )
    gpus: int = Field(0, ge=0, le=16)
    resources: Resources = Field(default_factory=Resources)
    learning_rate: PositiveReal = "0.0003"
    batch_size: int = Field(8, ge=1, le=4096)
    lambda_discard: PositiveReal = Field(
        "0.5",
        description="Weight of the rejected-proposal loss term; 0 trains on accepted tokens only.",
    )
    sync_every_traces: int = Field(
        200, ge=1, le=10_000_000, description="Publish a candidate every this many traces."
    )
    extra_args: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Appended to the trainer command line."
    )


class RolloutSpec(RolloutPolicy):
    """`spec.rollout`: the rollout policy itself (`aurora.runtime.rollout.RolloutPolicy`,
    whose fields, defaults and rules the CRD carries), plus whether and how often the
    operator runs it."""

    enabled: bool = Field(True, description="false: candidates are recorded but never served.")
    interval_seconds: int = Field(10, ge=1, le=3600, description="How often the policy runs.")


class RevisionSharing(StrEnum):
    FETCH = "Fetch"
    SHARED_VOLUME = "SharedVolume"


STORAGE_RULES = (
    Rule(
        "self.mode != 'SharedVolume' || self.accessMode != 'ReadWriteOncePod'",
        "storage.accessMode ReadWriteOncePod lets a single pod mount the volume, but with "
        "storage.mode SharedVolume the servers and the trainer all mount it: use "
        "ReadWriteMany, or storage.mode Fetch (the default: servers fetch revisions over HTTP)",
        lambda st: st.mode != RevisionSharing.SHARED_VOLUME or st.access_mode != "ReadWriteOncePod",
    ),
)


class StorageSpec(ApiModel):
    """Where revisions live. Fetch (the default): the trainer keeps them on its own volume
    and serves them over HTTP; each server downloads a revision, checks its sha256 and
    loads it, so servers and trainer can run on any nodes. SharedVolume: one volume that
    the trainer writes and every server mounts read-only (ReadWriteMany, or
    ReadWriteOnce with every pod pinned to one node)."""

    model_config = ConfigDict(json_schema_extra=_rules_schema(STORAGE_RULES))

    mode: RevisionSharing = Field(
        RevisionSharing.FETCH,
        description="Fetch: servers download revisions from the trainer (no shared volume). "
        "SharedVolume: servers mount the trainer's volume.",
    )
    size: Quantity = "10Gi"
    storage_class_name: str | None = Field(None, max_length=253)
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        "ReadWriteOnce",
        description="With mode Fetch only the trainer mounts the volume, so ReadWriteOnce "
        "works on any cluster. With mode SharedVolume: ReadWriteMany when servers and trainer "
        "may land on different nodes.",
    )
    existing_claim: DnsSubdomain | None = Field(
        None, description="Use this PVC instead of creating one (never deleted by Aurora)."
    )
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.DELETE,
        description="Delete: the checkpoint PVC is owned by the Speculator and goes with it.",
    )

    @model_validator(mode="after")
    def _rules(self) -> StorageSpec:
        _check_rules(self, STORAGE_RULES)
        return self


class NetworkSpec(ApiModel):
    """The NetworkPolicies the operator creates for this Speculator's pods: servers take
    requests on their port, the trainer's checkpoints reach only this Speculator's
    servers, and pods may reach DNS, Redis and nothing else unless `extraEgress` says so."""

    policies: bool = Field(True, description="false: create no NetworkPolicies (manage your own).")
    ingress_from: list[OpaqueObject] = Field(
        default_factory=list,
        max_length=32,
        description="corev1 NetworkPolicyPeers allowed to reach the servers' port; empty: "
        "any client.",
    )
    extra_egress: list[OpaqueObject] = Field(
        default_factory=list,
        max_length=32,
        description="NetworkPolicyEgressRules added for servers and trainer, e.g. port 443 "
        "to download a model from the Hugging Face hub.",
    )


HOSTNAME_LABEL = "kubernetes.io/hostname"

SPEC_RULES = (
    Rule(
        "self.storage.mode != 'SharedVolume' || self.storage.accessMode != 'ReadWriteOnce' || "
        f"('{HOSTNAME_LABEL}' in self.engine.nodeSelector && "
        f"'{HOSTNAME_LABEL}' in self.training.nodeSelector && "
        f"self.engine.nodeSelector['{HOSTNAME_LABEL}'] == "
        f"self.training.nodeSelector['{HOSTNAME_LABEL}'])",
        "storage.mode SharedVolume with accessMode ReadWriteOnce fails with a Multi-Attach "
        "error once servers and trainer land on different nodes: use storage.mode Fetch (the "
        "default), accessMode ReadWriteMany, or pin engine and training to one node with "
        f"nodeSelector {HOSTNAME_LABEL}",
        lambda s: (
            s.storage.mode != RevisionSharing.SHARED_VOLUME
            or s.storage.access_mode != "ReadWriteOnce"
            or (
                HOSTNAME_LABEL in s.engine.node_selector
                and s.engine.node_selector.get(HOSTNAME_LABEL)
                == s.training.node_selector.get(HOSTNAME_LABEL)
            )
        ),
    ),
)
# (engine.kind sglang with draft.initial scratch is valid: SGLang starts without
# speculation and restarts into the first learned draft, see aurora.runtime.sglang.serve.)


class SpeculatorSpec(ApiModel):
    """What the user asks for. Everything but `target.model` has a default."""

    model_config = ConfigDict(json_schema_extra=_rules_schema(SPEC_RULES))

    target: TargetSpec
    engine: EngineSpec = Field(default_factory=_defaults(EngineSpec))
    draft: DraftSpec = Field(default_factory=_defaults(DraftSpec))
    traces: TracesSpec = Field(default_factory=_defaults(TracesSpec))
    training: TrainingSpec = Field(default_factory=_defaults(TrainingSpec))
    rollout: RolloutSpec = Field(default_factory=_defaults(RolloutSpec))
    storage: StorageSpec = Field(default_factory=_defaults(StorageSpec))
    network: NetworkSpec = Field(default_factory=_defaults(NetworkSpec))
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _rules(self) -> SpeculatorSpec:
        _check_rules(self, SPEC_RULES)
        return self

    def rollout_policy(self) -> RolloutSpec:
        """spec.rollout as the policy runs it for this engine: an SGLang process serves one
        speculative algorithm (EAGLE-3 for a head, its n-gram for suffix), so there a
        candidate is canaried alone even with rollout.hybridCanaries."""
        if self.engine.kind == EngineKind.SGLANG and self.rollout.hybrid_canaries:
            return self.rollout.model_copy(update={"hybrid_canaries": False})
        return self.rollout


# --------------------------------------------------------------------------- status

MAX_REVISION_HISTORY = 10


class Condition(ApiModel):
    type: Annotated[str, StringConstraints(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, StringConstraints(pattern=REASON_PATTERN, max_length=1024)]
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, ge=0)


class MeasurementStatus(ApiModel):
    """Figures measured on live traffic (decimal strings) with the samples behind them,
    all over one comparison window (`windowSince`) for every arm. Throughput is
    time-weighted (total decode tokens over total decode seconds). `speedup` is what
    speculation buys now: the active revision against requests served without
    speculation. `candidateSpeedup` is the canary against the active revision. Bounds are
    one-sided confidence-sequence bounds at `confidence`, valid at every round."""

    accept_length: str | None = Field(
        None, description="Active revision: mean accepted tokens per verify step."
    )
    speedup: str | None = Field(
        None, description="Active revision vs no speculation, time-weighted decode tokens/s."
    )
    speedup_lower: str | None = None
    speedup_upper: str | None = None
    tokens_per_second: str | None = Field(
        None, description="Active revision: decode tokens over decode seconds in the window."
    )
    samples: int | None = Field(
        None, ge=0, description="Requests behind the active revision's figures."
    )
    baseline_tokens_per_second: str | None = None
    baseline_samples: int | None = Field(None, ge=0)
    candidate_accept_length: str | None = None
    candidate_speedup: str | None = Field(None, description="Candidate vs active, decode tokens/s.")
    candidate_speedup_lower: str | None = None
    candidate_speedup_upper: str | None = None
    candidate_tokens_per_second: str | None = None
    candidate_samples: int | None = Field(None, ge=0)
    confidence: str | None = None
    stable_regressed: bool | None = Field(
        None, description="Active revision slower than no speculation."
    )
    window_since: str | None = Field(
        None,
        json_schema_extra={"format": "date-time"},
        description="Requests since then count, for every arm: the last change of what is "
        "served, or the last traffic-mix change after it.",
    )
    window_restarts: int | None = Field(
        None, ge=0, description="Traffic-mix changes that restarted the window."
    )


class RevisionRecord(ApiModel):
    revision: str
    outcome: str = Field(description="Canary, Promoted, RolledBack, Rejected, ...")
    reason: str = ""
    speedup: str | None = None
    samples: int | None = None
    time: str = Field(json_schema_extra={"format": "date-time"})


class ReplicaStatus(ApiModel):
    desired: int = 0
    ready: int = 0
    updated: int = 0


class SpeculatorStatus(ApiModel):
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    active_revision: str | None = Field(None, description="Revision the stable arm serves.")
    candidate_revision: str | None = Field(None, description="Revision under evaluation, if any.")
    phase: str | None = Field(None, description="Rollout phase of the candidate.")
    measurement: MeasurementStatus | None = None
    trace_lag: int | None = Field(
        None, ge=0, description="Traces published but not yet trained on."
    )
    servers: ReplicaStatus | None = None
    replicas: int | None = Field(
        None, ge=0, description="Server pods that exist now (the scale subresource reads it)."
    )
    selector: str | None = Field(
        None, description="Label selector of the server pods (for autoscalers)."
    )
    revision_history: list[RevisionRecord] = Field(
        default_factory=list, max_length=MAX_REVISION_HISTORY
    )
    rollout: OpaqueObject | None = Field(
        None, description="The rollout policy's state (aurora.runtime.rollout.RolloutState)."
    )


def fraction_or_none(value: float | None, digits: int = 3) -> str | None:
    """A measured figure as the decimal string status carries (None stays None)."""
    if value is None or not math.isfinite(value):
        return None
    return f"{value:.{digits}f}"
