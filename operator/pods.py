"""The Deployments that run a Speculator's pods: the servers (stable and, for SGLang,
canary) and the trainer, with their containers, environment, volumes, probes,
resources and security contexts. Pure: spec in, Deployment dicts out."""

from __future__ import annotations

import math
from typing import Any

from aurora.operator.commands import server_command, sglang_server_command, trainer_command
from aurora.operator.names import (
    CANARY,
    CHECKPOINT_DIR,
    CONFIG_DIR,
    GPU_RESOURCE,
    RUN_AS_USER,
    SERVER_PORT,
    TRAINER_METRICS_PORT,
    ChildNames,
    labels,
    object_metadata,
    selector,
)
from aurora.operator.settings import Images
from aurora.operator.spec import EngineKind, Resources, SpeculatorSpec

# Used when a section's `resources` is left empty, so no pod runs as BestEffort.
DEFAULT_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "server-torch": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "server-sglang": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
    "trainer": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
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


def server_deployment(
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
        "metadata": object_metadata(
            deployment_name, namespace, labels(name, "server", role), owner
        ),
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


def trainer_deployment(
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
        "metadata": object_metadata(names.trainer, namespace, labels(name, "trainer"), owner),
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
