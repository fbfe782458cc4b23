"""What every child of a Speculator is called and labelled: names, labels, pod
selectors, the owner reference, and the ports and paths the pods agree on. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aurora.operator.spec import API_VERSION, KIND

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


def object_metadata(
    name: str, namespace: str, labels_: dict[str, str], owner: dict[str, Any] | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels_}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return metadata
