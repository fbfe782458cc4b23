"""Pure planning: a Speculator's spec to the child objects it wants, and what the
operator observed to the status it reports. No kopf, no kubernetes client, no I/O:
the handlers call these and do the API and Redis calls at the edges.

Children of a Speculator `NAME` (all labelled `aurora.dev/speculator: NAME`, owned by it):

- `NAME-server` Deployment: the servers (engine torch or sglang), role `stable`.
- `NAME-server-canary` Deployment (engine sglang only): SGLang holds one draft per
  process, so the canary is a *subset of replicas*: ceil(canaryShare x replicas)
  replicas (at least 1, at most replicas - 1) run with role `canary` and load the
  candidate revision while one is on canary, the stable revision otherwise. Its size
  is fixed by the spec, not by the rollout phase, so a canary never waits for GPU pods
  to start: the rollout only changes which revision the canary pods load (through
  Redis), and both Deployments sit behind the one Service. The torch engine holds the
  stable and the candidate draft in one process and splits requests itself, so it
  needs no second Deployment.
- `NAME-trainer` Deployment (one replica, Recreate: one writer on the checkpoint volume;
  zero replicas when training is disabled).
- `NAME` Service (port 8000, both server roles) and `NAME-trainer` Service (metrics).
- `NAME-config` ConfigMap: the effective spec, mounted read-only at /etc/aurora.
- `NAME-checkpoints` PersistentVolumeClaim (unless storage.existingClaim), owned by the
  Speculator only with storage.deletionPolicy Delete.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from aurora import __version__
from aurora.operator.spec import (
    API_VERSION,
    KIND,
    MAX_NAME_LENGTH,
    MAX_REVISION_HISTORY,
    DeletionPolicy,
    EngineKind,
    Resources,
    SpeculatorSpec,
    fraction_or_none,
)
from aurora.runtime.rollout import (
    NO_DRAFT,
    Decision,
    Measurement,
    Override,
    RolloutEvent,
    RolloutState,
)
from aurora.runtime.sglang import launcher as sglang_launcher

SERVER_PORT = 8000
TRAINER_METRICS_PORT = 9100
CHECKPOINT_DIR = "/checkpoints"
CONFIG_DIR = "/etc/aurora"
RUN_AS_USER = 10001
FIELD_MANAGER = "aurora-operator"
SPECULATOR_LABEL = "aurora.dev/speculator"
ROLE_LABEL = "aurora.dev/role"
GPU_RESOURCE = "nvidia.com/gpu"
STABLE, CANARY = "stable", "canary"

# Used when a section's `resources` is left empty, so no pod runs as BestEffort.
DEFAULT_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "server-torch": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "server-sglang": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
    "trainer": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
}


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
class ChildNames:
    server: str
    canary: str
    trainer: str
    service: str
    trainer_service: str
    config: str
    checkpoints: str

    @classmethod
    def of(cls, name: str) -> ChildNames:
        return cls(
            server=f"{name}-server",
            canary=f"{name}-server-canary",
            trainer=f"{name}-trainer",
            service=name,
            trainer_service=f"{name}-trainer",
            config=f"{name}-config",
            checkpoints=f"{name}-checkpoints",
        )


# ----------------------------------------------------------------------- commands


def spec_tokens(spec: SpeculatorSpec) -> int:
    """Draft tokens per verify step for `aurora serve --spec-tokens`."""
    engine = spec.engine
    if engine.speculative_num_draft_tokens is not None:
        return engine.speculative_num_draft_tokens - 1
    return engine.speculative_steps


def server_command(spec: SpeculatorSpec, namespace: str, name: str) -> list[str]:
    """The torch engine's command line (`aurora serve`)."""
    return [
        "aurora", "serve",
        "--model", spec.target.model,
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--speculator", f"{namespace}/{name}",
        "--redis-url", "$(AURORA_REDIS_URL)",
        "--checkpoint-dir", CHECKPOINT_DIR,
        "--draft", spec.draft.initial,
        "--spec-tokens", str(spec_tokens(spec)),
        "--trace-sample-rate", spec.traces.sample_rate,
        "--trace-maxlen", str(spec.traces.max_length),
        "--device", spec.engine.device,
        *spec.engine.extra_args,
    ]  # fmt: skip


def sglang_server_command(spec: SpeculatorSpec) -> list[str]:
    """SGLang's command line with speculative decoding (aurora.runtime.sglang.launcher).
    Aurora's SGLang plugin (loaded through the `sglang.srt.plugins` entry point) reads
    its settings from the AURORA_* environment: traces, statistics and draft hot swaps."""
    return sglang_launcher.server_command(spec, port=SERVER_PORT)


def trainer_command(spec: SpeculatorSpec, namespace: str, name: str) -> list[str]:
    """`aurora train`. It starts from the torch engine's initial checkpoint when that is
    a path (Aurora's checkpoint format), else from scratch; an SGLang draft path is in
    SGLang's format, so that trainer starts from scratch and publishes only candidates
    that beat the served draft offline."""
    training = spec.training
    initial = spec.draft.initial
    start = (
        initial if initial.startswith("/") and spec.engine.kind == EngineKind.TORCH else "scratch"
    )
    return [
        "aurora", "train",
        "--model", spec.target.model,
        "--speculator", f"{namespace}/{name}",
        "--redis-url", "$(AURORA_REDIS_URL)",
        "--checkpoint-dir", CHECKPOINT_DIR,
        "--init", start,
        "--spec-tokens", str(spec_tokens(spec)),
        "--lr", training.learning_rate,
        "--batch-size", str(training.batch_size),
        "--lambda-discard", training.lambda_discard,
        "--publish-every", str(training.sync_every_traces),
        "--device", "cuda" if training.gpus > 0 else "cpu",
        "--metrics-port", str(TRAINER_METRICS_PORT),
    ]  # fmt: skip


# ------------------------------------------------------------------------ objects


def labels(name: str, component: str, role: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "aurora",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "aurora",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        SPECULATOR_LABEL: name,
    }
    if role:
        out[ROLE_LABEL] = role
    return out


def selector(name: str, component: str, role: str | None = None) -> dict[str, str]:
    """Pod selector; immutable in a Deployment, so it depends on nothing in the spec."""
    out = {SPECULATOR_LABEL: name, "app.kubernetes.io/component": component}
    if role:
        out[ROLE_LABEL] = role
    return out


def owner_reference(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The controller owner reference to the Speculator (what `kopf.adopt` would set):
    the garbage collector deletes owned children with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def canary_replicas(spec: SpeculatorSpec) -> int:
    """Replicas of the sglang canary Deployment: ceil(canaryShare x replicas), kept
    within 1..replicas-1 so both arms always serve (0 when scaled to zero)."""
    replicas = spec.engine.replicas
    if spec.engine.kind != EngineKind.SGLANG or replicas < 2 or not spec.rollout.enabled:
        return 0
    share = float(spec.rollout.canary_share)
    return min(replicas - 1, max(1, math.ceil(share * replicas)))


def _resources(section: Resources, default_key: str, gpus: int) -> dict[str, Any]:
    requests, limits = dict(section.requests), dict(section.limits)
    if not requests and not limits:
        requests = dict(DEFAULT_RESOURCES[default_key]["requests"])
        limits = dict(DEFAULT_RESOURCES[default_key]["limits"])
    if gpus:
        requests[GPU_RESOURCE] = gpus
        limits[GPU_RESOURCE] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _env(spec: SpeculatorSpec, namespace: str, name: str, role: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "AURORA_SPECULATOR", "value": f"{namespace}/{name}"},
        {"name": "AURORA_REDIS_URL", "value": spec.traces.redis_url},
    ]
    if ref := spec.traces.password_secret_ref:
        env.append(
            {
                "name": "AURORA_REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    if role:
        env.append({"name": "AURORA_SERVER_ROLE", "value": role})
    env += [
        {"name": "AURORA_CHECKPOINT_DIR", "value": CHECKPOINT_DIR},
        {"name": "AURORA_TRACE_SAMPLE_RATE", "value": spec.traces.sample_rate},
        {"name": "AURORA_TRACE_MAXLEN", "value": str(spec.traces.max_length)},
        # The root file system is read-only: every cache goes to the emptyDir volumes.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    return env


def _volumes(spec: SpeculatorSpec, names: ChildNames, shm: bool) -> list[dict[str, Any]]:
    claim = spec.storage.existing_claim or names.checkpoints
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "config", "configMap": {"name": names.config}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    if shm:  # NCCL and SGLang's workers share tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    return volumes


def _mounts(checkpoints_read_only: bool, shm: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "checkpoints", "mountPath": CHECKPOINT_DIR, "readOnly": checkpoints_read_only},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def _http_probe(
    path: str, port: str, period: int, failures: int, timeout: int = 5
) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _pod_spec(
    spec: SpeculatorSpec, containers: list[dict[str, Any]], volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # children never call the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": _POD_SECURITY,
        "terminationGracePeriodSeconds": 60,  # servers drain in-flight requests
        "containers": containers,
        "volumes": volumes,
    }
    if spec.engine.node_selector:
        pod["nodeSelector"] = dict(spec.engine.node_selector)
    if spec.engine.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.engine.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    return pod


def _metadata(
    name: str, namespace: str, labels_: dict[str, str], owner: dict[str, Any] | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels_}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return metadata


def _server_deployment(
    spec: SpeculatorSpec, namespace: str, name: str, role: str, replicas: int,
    owner: dict[str, Any], images: Images,
) -> dict[str, Any]:  # fmt: skip
    names = ChildNames.of(name)
    sglang = spec.engine.kind == EngineKind.SGLANG
    if sglang:
        command = sglang_server_command(spec)
        image = spec.engine.image or images.sglang
        # Loading a large target and capturing CUDA graphs takes minutes.
        startup = _http_probe("/health", "http", period=10, failures=180)
        readiness = _http_probe("/health", "http", period=5, failures=3)
    else:
        command = server_command(spec, namespace, name)
        image = spec.engine.image or images.torch(spec.engine.gpus)
        startup = _http_probe("/health", "http", period=5, failures=120)
        readiness = _http_probe("/ready", "http", period=5, failures=3, timeout=3)
    container = {
        "name": "server",
        "image": image,
        "imagePullPolicy": images.pull_policy,
        "command": command,
        "env": _env(spec, namespace, name, role),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "startupProbe": startup,
        "readinessProbe": readiness,
        "livenessProbe": _http_probe("/health", "http", period=10, failures=6),
        "resources": _resources(
            spec.engine.resources, "server-sglang" if sglang else "server-torch", spec.engine.gpus
        ),
        "securityContext": _CONTAINER_SECURITY,
        # Servers only read checkpoints; the trainer is the one writer.
        "volumeMounts": _mounts(checkpoints_read_only=True, shm=sglang),
    }
    deployment_name = names.canary if role == CANARY else names.server
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(deployment_name, namespace, labels(name, "server", role), owner),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 3600 if sglang else 900,
            "selector": {"matchLabels": selector(name, "server", role)},
            # Never below the serving capacity while pods roll: surge one at a time.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": labels(name, "server", role)},
                "spec": _pod_spec(spec, [container], _volumes(spec, names, shm=sglang)),
            },
        },
    }


def _trainer_deployment(
    spec: SpeculatorSpec, namespace: str, name: str, owner: dict[str, Any], images: Images
) -> dict[str, Any]:
    names = ChildNames.of(name)
    container = {
        "name": "trainer",
        "image": spec.training.image or images.torch(spec.training.gpus),
        "imagePullPolicy": images.pull_policy,
        "command": trainer_command(spec, namespace, name),
        "env": _env(spec, namespace, name, None),
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": _http_probe("/metrics", "metrics", period=5, failures=120),
        "livenessProbe": _http_probe("/metrics", "metrics", period=15, failures=4),
        "resources": _resources(spec.training.resources, "trainer", spec.training.gpus),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": _mounts(checkpoints_read_only=False, shm=False),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(names.trainer, namespace, labels(name, "trainer"), owner),
        "spec": {
            "replicas": 1 if spec.training.enabled else 0,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(name, "trainer")},
            # One writer on the checkpoint volume (ReadWriteOnce may pin it to one node).
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels(name, "trainer")},
                "spec": _pod_spec(spec, [container], _volumes(spec, names, shm=False)),
            },
        },
    }


def _service(
    name: str, namespace: str, service_name: str, component: str, port_name: str, port: int,
    owner: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name, namespace, labels(name, component), owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name, component),
            "ports": [
                {"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
            ],
        },
    }


def effective_config(spec: SpeculatorSpec, namespace: str, name: str) -> str:
    """The ConfigMap's speculator.json: the spec with every default filled in."""
    document = {"namespace": namespace, "name": name, "spec": spec.to_api()}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def desired_children(body: Mapping[str, Any], images: Images | None = None) -> list[dict[str, Any]]:
    """Every child object the Speculator `body` wants, complete and in apply order
    (storage and configuration before the pods that mount them). Same body, same
    objects: safe to server-side apply on every reconcile. Raises pydantic's
    ValidationError for an invalid spec (call `validate_semantics` first)."""
    images = images or Images()
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    spec = SpeculatorSpec.model_validate(body.get("spec") or {})
    names = ChildNames.of(name)
    owner = owner_reference(metadata)
    children: list[dict[str, Any]] = []
    if not spec.storage.existing_claim:
        claim: dict[str, Any] = {
            "accessModes": [spec.storage.access_mode],
            "resources": {"requests": {"storage": spec.storage.size}},
        }
        if spec.storage.storage_class_name:
            claim["storageClassName"] = spec.storage.storage_class_name
        pvc_owner = owner if spec.storage.deletion_policy == DeletionPolicy.DELETE else None
        children.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": _metadata(
                    names.checkpoints, namespace, labels(name, "checkpoints"), pvc_owner
                ),
                "spec": claim,
            }
        )
    children.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(names.config, namespace, labels(name, "config"), owner),
            "data": {"speculator.json": effective_config(spec, namespace, name)},
        }
    )
    canary = canary_replicas(spec)
    children.append(
        _server_deployment(
            spec, namespace, name, STABLE, spec.engine.replicas - canary, owner, images
        )
    )
    if spec.engine.kind == EngineKind.SGLANG:
        children.append(_server_deployment(spec, namespace, name, CANARY, canary, owner, images))
    children.append(_trainer_deployment(spec, namespace, name, owner, images))
    children.append(_service(name, namespace, names.service, "server", "http", SERVER_PORT, owner))
    children.append(
        _service(
            name,
            namespace,
            names.trainer_service,
            "trainer",
            "metrics",
            TRAINER_METRICS_PORT,
            owner,
        )
    )
    return children


def stale_children(
    observed: Iterable[Mapping[str, Any]], desired: Iterable[Mapping[str, Any]]
) -> list[tuple[str, str]]:
    """(kind, name) of observed children the spec no longer wants (e.g. the canary
    Deployment after switching engine.kind from sglang to torch). Only objects this
    Speculator controls count; a PVC released by deletionPolicy Retain never does."""
    wanted = {(child["kind"], child["metadata"]["name"]) for child in desired}
    stale = []
    for child in observed:
        refs = child.get("metadata", {}).get("ownerReferences") or []
        controlled = any(ref.get("kind") == KIND and ref.get("controller") for ref in refs)
        key = (child.get("kind", ""), child.get("metadata", {}).get("name", ""))
        if controlled and key not in wanted:
            stale.append(key)
    return sorted(stale)


# ------------------------------------------------------------ semantic validation

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10), "Mi": Decimal(2**20),
    "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def parse_quantity(value: int | str) -> Decimal:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "2Gi" -> 2147483648)."""
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX[suffix]
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None


def _location(loc: Sequence[int | str]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _resource_errors(section: str, resources: Resources) -> list[str]:
    errors = []
    for kind in ("requests", "limits"):
        if GPU_RESOURCE in getattr(resources, kind):
            errors.append(
                f"spec.{section}.resources.{kind}: do not set {GPU_RESOURCE} here; set "
                f"spec.{section}.gpus, which also picks the device the command line uses"
            )
    for resource, request in resources.requests.items():
        limit = resources.limits.get(resource)
        if limit is not None and parse_quantity(request) > parse_quantity(limit):
            errors.append(
                f"spec.{section}.resources: requests.{resource} {request} exceeds "
                f"limits.{resource} {limit}; raise the limit or lower the request"
            )
    return errors


def validate_semantics(body: Mapping[str, Any]) -> list[str]:
    """Every error in a Speculator that the API server's schema did not (or could not)
    refuse, each naming the field, the value and the fix; empty when the spec is good.
    Runs the pydantic models too, so CEL rules hold even where no API server ran them."""
    return checked_spec(body)[1]


def checked_spec(body: Mapping[str, Any]) -> tuple[SpeculatorSpec | None, list[str]]:
    """The parsed spec (None when the models refuse it) and `validate_semantics`' errors."""
    name = str(body.get("metadata", {}).get("name", ""))
    errors = []
    if len(name) > MAX_NAME_LENGTH:
        errors.append(
            f"metadata.name {name!r} has {len(name)} characters; at most {MAX_NAME_LENGTH} fit "
            "the child names (<name>-server-canary): choose a shorter name"
        )
    try:
        spec = SpeculatorSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        for item in error.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            errors.append(f"{_location(item['loc'])}: {message}")
        return None, errors
    errors += _resource_errors("engine", spec.engine.resources)
    errors += _resource_errors("training", spec.training.resources)
    url = spec.traces.redis_url
    if re.match(r"^rediss?://[^/@]*:[^/@]+@", url):
        errors.append(
            "spec.traces.redisUrl carries a password, which would show in every pod spec: "
            "remove it from the URL and reference a Secret with spec.traces.passwordSecretRef"
        )
    return spec, errors


# ------------------------------------------------------------------------ override

OVERRIDE_ANNOTATION = "aurora.dev/override"


def parse_override(annotations: Mapping[str, str]) -> tuple[Override | None, str | None]:
    """A person's decision on the current canary, from the annotation
    `aurora.dev/override: Promote:<revision>` (or `Rollback:<revision>`), like
    `kubectl argo rollouts promote`. Returns (override, None), (None, error) or (None, None)."""
    value = annotations.get(OVERRIDE_ANNOTATION)
    if value is None:
        return None, None
    action, _, revision = value.strip().partition(":")
    if action not in ("Promote", "Rollback") or not revision.strip():
        return None, (
            f"annotation {OVERRIDE_ANNOTATION}={value!r} is not understood: write "
            "'Promote:<revision>' or 'Rollback:<revision>'"
        )
    return Override.model_validate({"action": action, "revision": revision.strip()}), None


# ------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ConditionState:
    """One condition's verdict this round: status True, False or None (Unknown)."""

    status: bool | None
    reason: str
    message: str = ""


def _status_text(status: bool | None) -> str:
    return "Unknown" if status is None else str(status)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    kind: str, state: ConditionState, previous: Sequence[Mapping[str, Any]], generation: int,
    now: datetime,
) -> dict[str, Any]:  # fmt: skip
    """A metav1.Condition; lastTransitionTime moves only when the status flips."""
    status = _status_text(state.status)
    before = next((c for c in previous if c.get("type") == kind), None)
    changed = before is None or before.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": state.reason,
        "message": state.message,
        "lastTransitionTime": (
            rfc3339(now)
            if changed or before is None
            else before.get("lastTransitionTime", rfc3339(now))
        ),
        "observedGeneration": generation,
    }


@dataclass(frozen=True)
class ServerSummary:
    """The server Deployments as observed, against what the spec wants."""

    desired: int
    ready: int
    updated: int
    rolled_out: bool
    message: str
    stuck: str | None = None


def summarize_servers(
    expected: Mapping[str, int], observed: Sequence[Mapping[str, Any]]
) -> ServerSummary:
    """Rolled out only when every wanted server Deployment exists, its controller has
    seen its latest spec, every replica runs the new template and is available, and no
    old replica is left (old pods still serving is not done)."""
    by_name = {d.get("metadata", {}).get("name"): d for d in observed}
    desired = sum(expected.values())
    ready = updated = 0
    problems: list[str] = []
    stuck = None
    for deployment_name, replicas in sorted(expected.items()):
        deployment = by_name.get(deployment_name)
        if deployment is None:
            problems.append(f"Deployment {deployment_name} not created yet")
            continue
        status = deployment.get("status") or {}
        generation = deployment.get("metadata", {}).get("generation", 0)
        wanted = (deployment.get("spec") or {}).get("replicas", replicas)
        d_ready = int(status.get("readyReplicas") or 0)
        d_updated = int(status.get("updatedReplicas") or 0)
        d_available = int(status.get("availableReplicas") or 0)
        d_total = int(status.get("replicas") or 0)
        ready += min(d_ready, replicas)
        updated += min(d_updated, replicas)
        if wanted != replicas:
            problems.append(f"{deployment_name} has {wanted} replicas, the spec wants {replicas}")
        elif int(status.get("observedGeneration") or 0) < generation:
            problems.append(f"{deployment_name}: controller has not seen the latest spec")
        elif d_updated < replicas or d_available < replicas or d_total > replicas:
            problems.append(
                f"{deployment_name}: {d_updated}/{replicas} updated, {d_available} available, "
                f"{max(0, d_total - d_updated)} old"
            )
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "Progressing"
                and cond.get("reason") == "ProgressDeadlineExceeded"
            ):
                stuck = f"{deployment_name}: {cond.get('message', 'progress deadline exceeded')}"
    message = "; ".join(problems) or f"{ready}/{desired} server replicas ready"
    return ServerSummary(desired, ready, updated, not problems, message, stuck)


def measurement_status(m: Measurement) -> dict[str, Any]:
    """The policy's Measurement as status.measurement (decimal strings, sample counts)."""
    out: dict[str, Any] = {
        "acceptLength": fraction_or_none(m.stable.accept_length, 2),
        "tokensPerSecond": fraction_or_none(m.stable.decode_tokens_per_s, 1),
        "samples": m.stable.samples,
        "baselineTokensPerSecond": fraction_or_none(m.baseline.decode_tokens_per_s, 1),
        "baselineSamples": m.baseline.samples,
        "confidence": fraction_or_none(m.confidence, 2),
        "stableRegressed": m.stable_regressed,
    }
    if m.stable_speedup_vs_baseline is not None:
        out["speedup"] = fraction_or_none(m.stable_speedup_vs_baseline.estimate)
    if m.candidate.revision is not None:
        out["candidateAcceptLength"] = fraction_or_none(m.candidate.accept_length, 2)
        out["candidateTokensPerSecond"] = fraction_or_none(m.candidate.decode_tokens_per_s, 1)
        out["candidateSamples"] = m.candidate.samples
        if (vs := m.speedup_vs_stable) is not None:
            out["candidateSpeedup"] = fraction_or_none(vs.estimate)
            out["candidateSpeedupLower"] = fraction_or_none(vs.lower)
            out["candidateSpeedupUpper"] = fraction_or_none(vs.upper)
    return {key: value for key, value in out.items() if value is not None}


_OUTCOMES = {
    "StartCanary": "Canary",
    "Promote": "Promoting",
    "Promoted": "Promoted",
    "Rollback": "RolledBack",
    "Reject": "Rejected",
    "Hold": "Held",
    "Superseded": "Superseded",
    "Fallback": "FellBack",
}


def revision_history(
    previous: Sequence[Mapping[str, Any]], events: Sequence[RolloutEvent],
    measurement: Measurement | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """status.revisionHistory: the newest MAX_REVISION_HISTORY rollout events, newest
    first, with the measured speedup behind this round's events."""
    speedup = None
    if measurement is not None and measurement.speedup_vs_stable is not None:
        speedup = fraction_or_none(measurement.speedup_vs_stable.estimate)
    fresh = []
    for event in events:
        record: dict[str, Any] = {
            "revision": event.revision or "none",
            "outcome": _OUTCOMES.get(event.action, event.action),
            "reason": event.reason[:1024],
            "time": rfc3339(datetime.fromtimestamp(event.time, UTC)),
        }
        if speedup is not None and event.action != "StartCanary":
            record["speedup"] = speedup
            record["samples"] = measurement.candidate.samples if measurement else None
        fresh.append({k: v for k, v in record.items() if v is not None})
    return [*reversed(fresh), *(dict(r) for r in previous)][:MAX_REVISION_HISTORY]


@dataclass(frozen=True)
class Observation:
    """What the operator saw in one round. Fields left at None were not looked at this
    round (e.g. Redis in a spec-change reconcile) and keep their previous status."""

    generation: int
    spec_errors: Sequence[str] = ()
    expected_servers: Mapping[str, int] = field(default_factory=dict)
    servers: Sequence[Mapping[str, Any]] | None = None
    apply_error: str | None = None
    redis_error: str | None = None
    rollout_enabled: bool = True
    rollout_state: RolloutState | None = None
    decision: Decision | None = None
    measurement: Measurement | None = None  # when the policy did not run (rollout disabled)
    rollout_error: str | None = None
    trace_lag: int | None = None


def _rollout_condition(
    state: RolloutState | None, decision: Decision | None, enabled: bool
) -> ConditionState:
    if not enabled:
        return ConditionState(
            False, "RolloutDisabled", "spec.rollout.enabled is false: the stable revision serves"
        )
    reason = decision.reason if decision else ""
    if state is None:
        return ConditionState(None, "Unknown", "the rollout policy has not run yet")
    if state.phase == "Canary":
        return ConditionState(True, "Canary", reason or f"canary {state.candidate_revision}")
    if state.phase == "Promoting":
        return ConditionState(True, "Promoting", reason or f"promoting {state.candidate_revision}")
    if state.phase == "Hold":
        return ConditionState(
            False, "Held", reason or f"{state.candidate_revision} held: a person decides"
        )
    return ConditionState(False, "Stable", reason or f"serving {_serving(state.stable_revision)}")


def _serving(stable: str | None) -> str:
    if stable is None:
        return "the initial draft"
    return "no draft (plain decoding)" if stable == NO_DRAFT else stable


def build_status(
    observation: Observation, previous: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """The whole status for this round, from what was observed and the previous status
    (conditions keep their lastTransitionTime unless they flip; what was not observed
    this round is carried over). Ready: the servers serve. Progressing: pods rolling or
    a candidate under evaluation. Degraded: something needs a person (invalid spec,
    Redis unreachable, a stuck rollout, a stable revision slower than no speculation)."""
    o = observation
    previous_conditions = list(previous.get("conditions") or [])
    status: dict[str, Any] = {
        key: value
        for key, value in previous.items()
        if key not in ("conditions", "observedGeneration")
    }
    status["observedGeneration"] = o.generation

    rollout_state = o.rollout_state
    if rollout_state is None and previous.get("rollout"):
        try:
            rollout_state = RolloutState.model_validate(previous["rollout"])
        except ValidationError:
            rollout_state = None
    if o.rollout_state is not None:
        status["rollout"] = o.rollout_state.model_dump(mode="json", by_alias=True)
        status["activeRevision"] = o.rollout_state.stable_revision
        status["candidateRevision"] = o.rollout_state.candidate_revision
        status["phase"] = o.rollout_state.phase
    measurement = o.decision.measurement if o.decision is not None else o.measurement
    if measurement is not None:
        status["measurement"] = measurement_status(measurement)
    if o.decision is not None:
        status["revisionHistory"] = revision_history(
            previous.get("revisionHistory") or [], o.decision.events, o.decision.measurement
        )
    if o.trace_lag is not None:
        status["traceLag"] = o.trace_lag

    summary = None
    if o.servers is not None:
        summary = summarize_servers(o.expected_servers, o.servers)
        status["servers"] = {
            "desired": summary.desired,
            "ready": summary.ready,
            "updated": summary.updated,
        }

    if o.spec_errors:
        message = "; ".join(o.spec_errors)
        ready = progressing = ConditionState(False, "InvalidSpec", message)
        degraded = ConditionState(True, "InvalidSpec", message)
    else:
        if summary is None:
            ready = ConditionState(None, "Reconciling", "server Deployments not observed yet")
        elif summary.desired == 0:
            ready = ConditionState(
                True, "ScaledToZero", "spec.engine.replicas is 0: nothing serves"
            )
        elif summary.ready == 0:
            ready = ConditionState(False, "ServersNotReady", summary.message)
        else:
            # Serving, possibly with fewer replicas than wanted while they roll.
            active = status.get("activeRevision") or "the initial draft"
            ready = ConditionState(True, "Serving", f"{summary.message}; serving {active}")
        if summary is not None and not summary.rolled_out:
            progressing = ConditionState(True, "RollingOut", summary.message)
        else:
            progressing = _rollout_condition(rollout_state, o.decision, o.rollout_enabled)
        degraded = ConditionState(False, "AsExpected", "")
        # A regressed stable needs a person only when the policy did not fall back itself.
        stable_regressed = (
            o.decision is not None
            and o.decision.stable_regressed
            and o.decision.action != "Fallback"
        )
        if o.apply_error:
            degraded = ConditionState(True, "ApplyFailed", o.apply_error)
        elif o.redis_error:
            degraded = ConditionState(
                True, "RedisUnavailable",
                f"{o.redis_error}; serving continues unchanged and the rollout is paused",
            )  # fmt: skip
        elif o.rollout_error:
            degraded = ConditionState(True, "RolloutBlocked", o.rollout_error)
        elif summary is not None and summary.stuck:
            degraded = ConditionState(True, "ProgressDeadlineExceeded", summary.stuck)
        elif stable_regressed and o.decision is not None:
            degraded = ConditionState(True, "StableRegressed", o.decision.reason)
    status["conditions"] = [
        condition(kind, state, previous_conditions, o.generation, now)
        for kind, state in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))
    ]
    return {key: value for key, value in status.items() if value is not None}


def merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `before` into `after`: changed keys,
    None for keys to remove (e.g. the candidate's figures once its canary ends)."""
    patch: dict[str, Any] = {}
    for key in before.keys() - after.keys():
        patch[key] = None
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif value != old or key not in before:
            patch[key] = value
    return patch
