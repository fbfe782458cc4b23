"""The Kubernetes edge of the operator: server-side apply of children, listing what
exists, reading a Secret. Objects travel as plain dicts, exactly as the API server
sends them (no client models), so the planning modules stay pure dict-in, dict-out.

Every write is a server-side apply with one field manager and `force`: applying the
same desired object twice changes nothing, and a field someone edited by hand
(`kubectl scale`, `kubectl edit`) is taken back, which is how drift is corrected.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from aurora.operator.names import FIELD_MANAGER, SPECULATOR_LABEL

APPLY = "application/apply-patch+yaml"

_CHILD_VERBS = ("list", "create", "patch", "delete")  # server-side apply creates too
# Every (apiGroup, resource, verb) the calls below need. manifests/base's ClusterRole
# grants exactly these and kopf's own (handlers.KOPF_PERMISSIONS); a test checks both ways.
PERMISSIONS = frozenset(
    {
        *(("apps", "deployments", verb) for verb in _CHILD_VERBS),
        *(
            ("", resource, verb)
            for resource in ("services", "configmaps", "persistentvolumeclaims")
            for verb in _CHILD_VERBS
        ),
        ("", "pods", "list"),
        ("", "secrets", "get"),
    }
)


def load_config() -> None:
    """In a pod: the ServiceAccount's token; elsewhere: the current kubeconfig context."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _json(response: Any) -> dict[str, Any]:
    data = response.data
    return json.loads(data) if data else {}


def transient(error: ApiException) -> bool:
    """Worth retrying: the API server is busy or away, not refusing the object."""
    return error.status in (None, 0, 408, 409, 425, 429) or (error.status or 0) >= 500


def api_message(error: ApiException) -> str:
    """The API server's own message (e.g. which field is invalid), else the reason."""
    try:
        return str(json.loads(error.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


@dataclass
class Cluster:
    """The calls the operator makes, over one API client."""

    core: client.CoreV1Api
    apps: client.AppsV1Api

    @classmethod
    def connect(cls) -> Cluster:
        load_config()
        api = client.ApiClient()
        return cls(core=client.CoreV1Api(api), apps=client.AppsV1Api(api))

    def _patchers(self) -> dict[str, Callable[..., Any]]:
        return {
            "Deployment": self.apps.patch_namespaced_deployment,
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
            "PersistentVolumeClaim": self.core.patch_namespaced_persistent_volume_claim,
        }

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply one child; returns the object as stored."""
        patch = self._patchers()[obj["kind"]]
        metadata = obj["metadata"]
        response = patch(
            metadata["name"],
            metadata["namespace"],
            dict(obj),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
            _preload_content=False,
        )
        return _json(response)

    def delete(self, namespace: str, kind: str, name: str) -> None:
        deleters: dict[str, Callable[..., Any]] = {
            "Deployment": self.apps.delete_namespaced_deployment,
            "Service": self.core.delete_namespaced_service,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "PersistentVolumeClaim": self.core.delete_namespaced_persistent_volume_claim,
        }
        try:
            deleters[kind](name, namespace, propagation_policy="Background", _preload_content=False)
        except ApiException as error:
            if error.status != 404:
                raise

    def _list(
        self, lister: Callable[..., Any], kind: str, namespace: str, selector: str
    ) -> list[dict[str, Any]]:
        items = _json(lister(namespace, label_selector=selector, _preload_content=False))["items"]
        for item in items:  # list items come without their kind
            item["kind"] = kind
        return items

    def server_deployments(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = f"{SPECULATOR_LABEL}={name},app.kubernetes.io/component=server"
        return self._list(self.apps.list_namespaced_deployment, "Deployment", namespace, selector)

    def children(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every object labelled as this Speculator's child, of the kinds it creates."""
        selector = f"{SPECULATOR_LABEL}={name}"
        return [
            *self._list(self.apps.list_namespaced_deployment, "Deployment", namespace, selector),
            *self._list(self.core.list_namespaced_service, "Service", namespace, selector),
            *self._list(self.core.list_namespaced_config_map, "ConfigMap", namespace, selector),
            *self._list(
                self.core.list_namespaced_persistent_volume_claim,
                "PersistentVolumeClaim",
                namespace,
                selector,
            ),
        ]

    def pods(self, namespace: str, name: str) -> list[str]:
        """Names of every pod of this Speculator (any component), terminating ones too."""
        selector = f"{SPECULATOR_LABEL}={name}"
        pods = self._list(self.core.list_namespaced_pod, "Pod", namespace, selector)
        return sorted(pod["metadata"]["name"] for pod in pods)

    def server_pods(self, namespace: str, name: str) -> list[str]:
        """Names of this Speculator's server pods that are not terminating."""
        selector = f"{SPECULATOR_LABEL}={name},app.kubernetes.io/component=server"
        pods = self._list(self.core.list_namespaced_pod, "Pod", namespace, selector)
        return sorted(
            pod["metadata"]["name"] for pod in pods if not pod["metadata"].get("deletionTimestamp")
        )

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded. Raises LookupError naming what is missing."""
        try:
            secret = _json(
                self.core.read_namespaced_secret(name, namespace, _preload_content=False)
            )
        except ApiException as error:
            if error.status == 404:
                raise LookupError(f"Secret {namespace}/{name} does not exist") from None
            raise
        data = secret.get("data") or {}
        if key not in data:
            raise LookupError(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()
