"""The Deployments that run a Speculator's pods: the servers (stable and, for SGLang,
canary) and the trainer, with their containers, environment, volumes, probes,
resources, security contexts and scheduling, and the servers' PodDisruptionBudget.
Pure: spec in, Kubernetes object dicts out.

Volumes: /tmp, /cache and /dev/shm are bounded emptyDirs. With storage.mode Fetch only
the trainer mounts the checkpoint volume; each server downloads revisions into its own
bounded /checkpoints emptyDir, so servers and trainer can run on any nodes. With
storage.mode SharedVolume the servers mount the trainer's volume read-only. A
draft.fetch adds an init step that downloads the day-0 draft into /drafts."""

from __future__ import annotations

import math
from typing import Any

from aurora.operator.commands import (
    fetch_draft_command,
    server_command,
    sglang_server_command,
    trainer_command,
)
from aurora.operator.names import (
    CANARY,
    CHECKPOINT_DIR,
    CHECKPOINTS_PORT,
    CONFIG_DIR,
    GPU_RESOURCE,
    REDIS_CA_DIR,
    RUN_AS_USER,
    SERVER_PORT,
    TRAINER_METRICS_PORT,
    ChildNames,
    labels,
    object_metadata,
    selector,
)
from aurora.operator.redis_access import RedisAccess
from aurora.operator.settings import Images
from aurora.operator.spec import (
    DRAFTS_DIR,
    HOSTNAME_LABEL,
    EngineKind,
    PodOptions,
    Resources,
    RevisionSharing,
    SpeculatorSpec,
)

# Used when a section's `resources` is left empty, so no pod runs as BestEffort.
DEFAULT_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "server-torch": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "server-sglang": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
    "trainer": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
}
# sizeLimits of the emptyDirs when a section leaves them unset: a pod that fills one is
# evicted instead of filling the node's disk or memory. An SGLang server downloads its
# target (~16 GB for an 8B model) into /cache.
DEFAULT_CACHE_SIZE = {"server-sglang": "20Gi", "server-torch": "8Gi", "trainer": "8Gi"}
DEFAULT_SHM_SIZE = "16Gi"
TMP_SIZE = "2Gi"
# Volume names and mount paths the operator uses; a section's own volumes must differ.
RESERVED_VOLUMES = frozenset(
    {"checkpoints", "config", "tmp", "cache", "dshm", "drafts", "redis-ca"}
)
RESERVED_PATHS = frozenset({CHECKPOINT_DIR, CONFIG_DIR, "/tmp", "/cache", "/dev/shm", DRAFTS_DIR,
                            REDIS_CA_DIR})  # fmt: skip


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
_INIT_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def _redis_env(spec: SpeculatorSpec, redis: RedisAccess) -> list[dict[str, Any]]:
    """The Redis URL and, from a Secret only (never a value), its password."""
    env: list[dict[str, Any]] = [{"name": "AURORA_REDIS_URL", "value": redis.url}]
    if redis.secret_name is not None:
        ref = {"name": redis.secret_name, "key": redis.secret_key}
        env.append({"name": "AURORA_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}})
    if ca := spec.traces.ca_config_map_ref:
        env.append({"name": "AURORA_REDIS_CA_FILE", "value": f"{REDIS_CA_DIR}/{ca.key}"})
    return env


def _env(
    spec: SpeculatorSpec, namespace: str, name: str, role: str | None, redis: RedisAccess,
    options: PodOptions,
) -> list[dict[str, Any]]:  # fmt: skip
    env: list[dict[str, Any]] = [
        {"name": "AURORA_SPECULATOR", "value": f"{namespace}/{name}"},
        *_redis_env(spec, redis),
    ]
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
    # The section's own variables (validation keeps them off the AURORA_ names).
    return env + [var.to_api() for var in options.env]


def _loads_initial_draft(spec: SpeculatorSpec, component: str) -> bool:
    """Does this pod read the day-0 draft? Servers always; the trainer when it starts
    from it (the torch engine's checkpoint format)."""
    if spec.draft.fetch is None:
        return False
    return component == "server" or spec.engine.kind == EngineKind.TORCH


def _volumes(
    spec: SpeculatorSpec, names: ChildNames, component: str, cache_key: str, shm: bool
) -> list[dict[str, Any]]:
    options: PodOptions = spec.engine if component == "server" else spec.training
    if component == "server" and spec.storage.mode == RevisionSharing.FETCH:
        # The server's own copy of the revisions it fetched from the trainer.
        checkpoints: dict[str, Any] = {"emptyDir": {"sizeLimit": spec.storage.size}}
    else:
        claim = spec.storage.existing_claim or names.checkpoints
        checkpoints = {"persistentVolumeClaim": {"claimName": claim}}
    cache = options.cache_size or DEFAULT_CACHE_SIZE[cache_key]
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", **checkpoints},
        {"name": "config", "configMap": {"name": names.config}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
        {"name": "cache", "emptyDir": {"sizeLimit": cache}},
    ]
    if shm:  # NCCL and SGLang's workers share tensors through /dev/shm
        size = spec.engine.shm_size or DEFAULT_SHM_SIZE
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
    if _loads_initial_draft(spec, component) and spec.draft.fetch is not None:
        volumes.append({"name": "drafts", "emptyDir": {"sizeLimit": spec.draft.fetch.size_limit}})
    if ca := spec.traces.ca_config_map_ref:
        volumes.append({"name": "redis-ca", "configMap": {"name": ca.name}})
    return volumes + [dict(volume) for volume in options.volumes]


def _mounts(
    spec: SpeculatorSpec, component: str, checkpoints_read_only: bool, shm: bool
) -> list[dict[str, Any]]:
    options: PodOptions = spec.engine if component == "server" else spec.training
    mounts: list[dict[str, Any]] = [
        {"name": "checkpoints", "mountPath": CHECKPOINT_DIR, "readOnly": checkpoints_read_only},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if _loads_initial_draft(spec, component):
        mounts.append({"name": "drafts", "mountPath": DRAFTS_DIR, "readOnly": True})
    if spec.traces.ca_config_map_ref:
        mounts.append({"name": "redis-ca", "mountPath": REDIS_CA_DIR, "readOnly": True})
    return mounts + [mount.to_api() for mount in options.volume_mounts]


def _init_containers(spec: SpeculatorSpec, component: str, image: str, pull: str) -> list[Any]:
    """The day-0 draft's download, in the pod's own image (it has `aurora`)."""
    if not _loads_initial_draft(spec, component):
        return []
    return [
        {
            "name": "fetch-draft",
            "image": image,
            "imagePullPolicy": pull,
            "command": fetch_draft_command(spec),
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
            "resources": _INIT_RESOURCES,
            "securityContext": _CONTAINER_SECURITY,
            "volumeMounts": [
                {"name": "drafts", "mountPath": DRAFTS_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    ]


def _http_probe(
    path: str, port: str, period: int, failures: int, timeout: int = 5
) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def default_spread(name: str) -> list[dict[str, Any]]:
    """Servers spread over nodes and zones where they can (never unschedulable for it)."""
    pods = {"matchLabels": selector(name, "server")}
    return [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": pods}
        for key in (HOSTNAME_LABEL, "topology.kubernetes.io/zone")
    ]  # fmt: skip


def _pod_spec(
    spec: SpeculatorSpec, options: PodOptions, containers: list[dict[str, Any]],
    init: list[dict[str, Any]], volumes: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # children never call the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": _POD_SECURITY,
        "terminationGracePeriodSeconds": 60,  # servers drain in-flight requests
        "containers": containers,
        "volumes": volumes,
    }
    if init:
        pod["initContainers"] = init
    if options.node_selector:
        pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod["tolerations"] = [dict(t) for t in options.tolerations]
    if options.affinity:
        pod["affinity"] = dict(options.affinity)
    if options.priority_class_name:
        pod["priorityClassName"] = options.priority_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    return pod


def _template_metadata(options: PodOptions, own: dict[str, str]) -> dict[str, Any]:
    """The pod template's labels (the section's, then Aurora's, which win: selectors,
    Services and NetworkPolicies rely on them) and annotations."""
    metadata: dict[str, Any] = {"labels": {**options.pod_labels, **own}}
    if options.pod_annotations:
        metadata["annotations"] = dict(options.pod_annotations)
    return metadata


def server_deployment(
    spec: SpeculatorSpec, namespace: str, name: str, role: str, replicas: int,
    owner: dict[str, Any], images: Images, redis: RedisAccess,
) -> dict[str, Any]:  # fmt: skip
    names = ChildNames.of(name)
    engine = spec.engine
    sglang = engine.kind == EngineKind.SGLANG
    if sglang:
        command = sglang_server_command(spec)
        image = engine.image or images.sglang
        # Loading a large target and capturing CUDA graphs takes minutes.
        startup = _http_probe("/health", "http", period=10, failures=180)
        readiness = _http_probe("/health", "http", period=5, failures=3)
    else:
        command = server_command(spec, namespace, name)
        image = engine.image or images.torch(engine.gpus)
        startup = _http_probe("/health", "http", period=5, failures=120)
        readiness = _http_probe("/ready", "http", period=5, failures=3, timeout=3)
    kind = "server-sglang" if sglang else "server-torch"
    # Servers only read a shared volume (the trainer is its one writer); with Fetch
    # they write the revisions they download into their own.
    read_only = spec.storage.mode == RevisionSharing.SHARED_VOLUME
    container: dict[str, Any] = {
        "name": "server",
        "image": image,
        "imagePullPolicy": images.pull_policy,
        "command": command,
        "env": _env(spec, namespace, name, role, redis, engine),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "startupProbe": startup,
        "readinessProbe": readiness,
        "livenessProbe": _http_probe("/health", "http", period=10, failures=6),
        "resources": _resources(engine.resources, kind, engine.gpus),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": _mounts(spec, "server", checkpoints_read_only=read_only, shm=sglang),
    }
    if engine.env_from:
        container["envFrom"] = [dict(source) for source in engine.env_from]
    pod = _pod_spec(
        spec, engine, [container],
        _init_containers(spec, "server", image, images.pull_policy),
        _volumes(spec, names, "server", kind, shm=sglang),
    )  # fmt: skip
    pod["topologySpreadConstraints"] = [
        dict(c) for c in engine.topology_spread_constraints
    ] or default_spread(name)
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
                "metadata": _template_metadata(engine, labels(name, "server", role)),
                "spec": pod,
            },
        },
    }


def trainer_deployment(
    spec: SpeculatorSpec, namespace: str, name: str, owner: dict[str, Any], images: Images,
    redis: RedisAccess,
) -> dict[str, Any]:  # fmt: skip
    names = ChildNames.of(name)
    training = spec.training
    image = training.image or images.torch(training.gpus)
    ports = [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"}]
    if spec.storage.mode == RevisionSharing.FETCH:
        ports.append({"name": "checkpoints", "containerPort": CHECKPOINTS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "trainer",
        "image": image,
        "imagePullPolicy": images.pull_policy,
        "command": trainer_command(spec, namespace, name),
        "env": _env(spec, namespace, name, None, redis, training),
        "ports": ports,
        "startupProbe": _http_probe("/metrics", "metrics", period=5, failures=120),
        "livenessProbe": _http_probe("/metrics", "metrics", period=15, failures=4),
        "resources": _resources(training.resources, "trainer", training.gpus),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": _mounts(spec, "trainer", checkpoints_read_only=False, shm=False),
    }
    if training.env_from:
        container["envFrom"] = [dict(source) for source in training.env_from]
    pod = _pod_spec(
        spec, training, [container],
        _init_containers(spec, "trainer", image, images.pull_policy),
        _volumes(spec, names, "trainer", "trainer", shm=False),
    )  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(names.trainer, namespace, labels(name, "trainer"), owner),
        "spec": {
            "replicas": 1 if training.enabled else 0,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(name, "trainer")},
            # One writer on the checkpoint volume, which a ReadWriteOnce claim attaches to
            # one node at a time: the old pod goes before the new one starts.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": _template_metadata(training, labels(name, "trainer")),
                "spec": pod,
            },
        },
    }


def disruption_budget(name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """At most one server down at a time for a voluntary disruption (a node drain),
    over both server Deployments (stable and canary)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_metadata(
            ChildNames.of(name).server, namespace, labels(name, "server"), owner
        ),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name, "server")}},
    }
