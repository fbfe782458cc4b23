"""A Speculator's spec to every child object it wants, and which observed children it
no longer wants. Pure: no kopf, no kubernetes client, no I/O; the handlers apply
what this returns.

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
from collections.abc import Iterable, Mapping
from typing import Any

from aurora.operator.names import (
    CANARY,
    SERVER_PORT,
    STABLE,
    TRAINER_METRICS_PORT,
    ChildNames,
    labels,
    object_metadata,
    owner_reference,
    selector,
)
from aurora.operator.pods import canary_replicas, server_deployment, trainer_deployment
from aurora.operator.settings import Images
from aurora.operator.spec import KIND, DeletionPolicy, EngineKind, SpeculatorSpec


def _service(
    name: str, namespace: str, service_name: str, component: str, port_name: str, port: int,
    owner: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(service_name, namespace, labels(name, component), owner),
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
                "metadata": object_metadata(
                    names.checkpoints, namespace, labels(name, "checkpoints"), pvc_owner
                ),
                "spec": claim,
            }
        )
    children.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": object_metadata(names.config, namespace, labels(name, "config"), owner),
            "data": {"speculator.json": effective_config(spec, namespace, name)},
        }
    )
    canary = canary_replicas(spec)
    children.append(
        server_deployment(
            spec, namespace, name, STABLE, spec.engine.replicas - canary, owner, images
        )
    )
    if spec.engine.kind == EngineKind.SGLANG:
        children.append(server_deployment(spec, namespace, name, CANARY, canary, owner, images))
    children.append(trainer_deployment(spec, namespace, name, owner, images))
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
