"""The NetworkPolicies the operator creates for a Speculator's pods (ingress and egress).
Pure: spec in, NetworkPolicy dicts out.

- servers: requests on their port from `network.ingressFrom` (any client when empty);
  out to DNS, Redis and the trainer's checkpoint port (nothing else);
- trainer: its checkpoints (which are learned from user prompts) only to this
  Speculator's servers; its metrics to anyone (Prometheus); out to DNS and Redis;
- both: `network.extraEgress` (e.g. port 443 for a model on the Hugging Face hub), and
  the port of `draft.fetch.url` for the init step that downloads the day-0 draft.
NetworkPolicies match pods, not host names, so Redis and downloads are allowed by port.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aurora.operator.names import (
    CHECKPOINTS_PORT,
    SERVER_PORT,
    TRAINER_METRICS_PORT,
    ChildNames,
    labels,
    object_metadata,
    selector,
)
from aurora.operator.redis_access import endpoint
from aurora.operator.spec import RevisionSharing, SpeculatorSpec

_DNS = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def _port(number: int) -> dict[str, Any]:
    return {"port": number, "protocol": "TCP"}


def _egress(spec: SpeculatorSpec) -> list[dict[str, Any]]:
    redis_port = int(endpoint(spec.traces.redis_url).rpartition(":")[2])
    rules: list[dict[str, Any]] = [_DNS, {"ports": [_port(redis_port)]}]
    if spec.draft.fetch is not None:
        url = urlsplit(spec.draft.fetch.url)
        rules.append({"ports": [_port(url.port or (443 if url.scheme == "https" else 80))]})
    return rules + [dict(rule) for rule in spec.network.extra_egress]


def _policy(
    name: str, namespace: str, policy_name: str, pods: dict[str, str],
    ingress: list[dict[str, Any]], egress: list[dict[str, Any]], owner: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_metadata(policy_name, namespace, labels(name, "network"), owner),
        "spec": {
            "podSelector": {"matchLabels": pods},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def network_policies(
    spec: SpeculatorSpec, namespace: str, name: str, owner: dict[str, Any]
) -> list[dict[str, Any]]:
    """The servers' and the trainer's NetworkPolicies (none with network.policies false)."""
    if not spec.network.policies:
        return []
    names = ChildNames.of(name)
    servers, trainer = selector(name, "server"), selector(name, "trainer")
    fetch = spec.storage.mode == RevisionSharing.FETCH
    client_rule: dict[str, Any] = {"ports": [_port(SERVER_PORT)]}
    if spec.network.ingress_from:
        client_rule["from"] = [dict(peer) for peer in spec.network.ingress_from]
    server_egress = _egress(spec)
    trainer_ingress: list[dict[str, Any]] = [{"ports": [_port(TRAINER_METRICS_PORT)]}]
    if fetch:
        to_trainer = [{"podSelector": {"matchLabels": trainer}}]
        server_egress.append({"to": to_trainer, "ports": [_port(CHECKPOINTS_PORT)]})
        from_servers = [{"podSelector": {"matchLabels": servers}}]
        trainer_ingress.append({"from": from_servers, "ports": [_port(CHECKPOINTS_PORT)]})
    return [
        _policy(name, namespace, names.server, servers, [client_rule], server_egress, owner),
        _policy(name, namespace, names.trainer, trainer, trainer_ingress, _egress(spec), owner),
    ]
