"""Test scaffolding for the operator's kopf handlers without a cluster.

`RecordingCluster` stands in for `aurora.operator.kube.Cluster` (the operator's own
edge, not the Kubernetes API): it keeps applied children in memory and answers the
handlers' reads from them. `KopfCall` runs one handler the way kopf would (body,
meta, status, patch, memo) and applies its patch to the object afterwards, as the API
server would, so a test can drive several rounds. The real API server is exercised by
the e2e tests; Redis is always a real redis-server."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from aurora.operator.metrics import OperatorMetrics
from aurora.operator.names import SPECULATOR_LABEL
from aurora.operator.settings import Images


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Apply a JSON merge patch (RFC 7386) to a copy of `target`."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class RecordingCluster:
    """Children kept in memory; every apply and delete recorded. Deployments become
    available at once (as if a controller and kubelets ran) unless `available` is False."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    applied: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)  # names whose apply is refused (422)
    available: bool = True

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name in self.refuse:
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = f'{{"message": "{obj["kind"]} {name} is invalid: spec: Forbidden"}}'
            raise error
        stored = copy.deepcopy(obj)
        previous = self.objects.get((obj["kind"], name))
        generation = (previous or {}).get("metadata", {}).get("generation", 0)
        if previous is None or previous.get("spec") != stored.get("spec"):
            generation += 1
        stored["metadata"]["generation"] = generation
        if obj["kind"] == "Deployment":
            replicas = stored["spec"]["replicas"]
            ready = replicas if self.available else 0
            stored["status"] = {
                "observedGeneration": generation, "replicas": replicas, "readyReplicas": ready,
                "updatedReplicas": replicas, "availableReplicas": ready,
            }  # fmt: skip
        self.objects[(obj["kind"], name)] = stored
        self.applied.append((obj["kind"], name))
        return stored

    def delete(self, namespace: str, kind: str, name: str) -> None:
        self.objects.pop((kind, name), None)
        self.deleted.append((kind, name))

    def _mine(self, name: str) -> list[dict[str, Any]]:
        return [
            o
            for o in self.objects.values()
            if o["metadata"]["labels"].get(SPECULATOR_LABEL) == name
        ]

    def children(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._mine(name))

    def server_deployments(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [
            o for o in self.children(namespace, name)
            if o["kind"] == "Deployment" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
        ]  # fmt: skip

    def server_pods(self, namespace: str, name: str) -> list[str]:
        return []  # no kubelet: every server report counts

    def pods(self, namespace: str, name: str) -> list[str]:
        return []  # no kubelet: no pods outlive their Deployment

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        try:
            return self.secrets[(namespace, name)][key]
        except KeyError:
            raise LookupError(f"Secret {namespace}/{name} has no key {key!r}") from None

    def scale(self, name: str, replicas: int) -> None:
        """Someone ran `kubectl scale` on a child Deployment."""
        self.objects[("Deployment", name)]["spec"]["replicas"] = replicas


@dataclass
class Events:
    """What kopf.event/info/warn would have posted."""

    posted: list[tuple[str, str, str]] = field(default_factory=list)

    def install(self, monkeypatch: Any) -> Events:
        def post(kind: str) -> Callable[..., None]:
            def record(
                objs: Any, *, reason: str, message: str = "", type: str | None = None, **_: Any
            ) -> None:
                self.posted.append((type or kind, reason, message))

            return record

        monkeypatch.setattr(kopf, "event", post("Normal"))
        monkeypatch.setattr(kopf, "info", post("Normal"))
        monkeypatch.setattr(kopf, "warn", post("Warning"))
        return self

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.posted]


def speculator(
    name: str = "chat", namespace: str = "team-a", generation: int = 1, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "aurora.dev/v1alpha1",
        "kind": "Speculator",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": generation,
        },
        "spec": {"target": {"model": "smollm2-135m"}, **spec},
        "status": {},
    }


def operator_memo(cluster: RecordingCluster) -> kopf.Memo:
    """The operator-level memo `aurora operator` builds (a per-object copy in kopf)."""
    return kopf.Memo(cluster=cluster, images=Images(), metrics=OperatorMetrics(), redis_clients={})


def call(
    handler: Callable[..., Any], obj: dict[str, Any], memo: kopf.Memo, **extra: Any
) -> tuple[dict[str, Any], kopf.Patch]:
    """Run a handler as kopf would; returns (the object after its patch, the patch)."""
    body = kopf.Body(copy.deepcopy(obj))
    patch = kopf.Patch()
    handler(
        body=body,
        meta=body.meta,
        spec=body.spec,
        status=body.status,
        patch=patch,
        memo=memo,
        **extra,
    )
    return merge(obj, dict(patch)), patch
