"""The install as packaged: the Helm chart (charts/aurora) and the kustomize manifests
render, and every object passes kubeconform (strict) against the schemas of the API
server these tests run (its /openapi/v2, with the Speculator, kopf peering and
ServiceMonitor CRDs installed), and the API server itself accepts the chart (server-side
dry run). helm and kubeconform are built from Go modules (tests/e2e/tools/build.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_harness import ROOT, Installed
from schemas import SCHEMA_LOCATION, write_schemas

from aurora.operator import handlers, kube

pytestmark = [pytest.mark.e2e, pytest.mark.packaging]

CHART = ROOT / "charts" / "aurora"
RELEASE, NAMESPACE = "aurora", "aurora-system"
# helm template renders for this Kubernetes version (the one the e2e API server runs)
KUBE_VERSION = os.environ.get("AURORA_E2E_K8S_VERSION", "v1.37.2")
CHART_VARIANTS = {
    "default": [],
    "namespaced": ["--set", "scope=namespace"],
    "everything": ["--set", "serviceMonitors.enabled=true", "--set", "externalRedisSecrets=true",
                   "--set", "redisAllowlist={redis.shared.svc:6379}"],
    "no-redis": ["--set", "redis.enabled=false", "--set", "networkPolicies.enabled=false"],
}  # fmt: skip
KUSTOMIZATIONS = ["manifests", "manifests/namespaced", "manifests/monitoring"]


@pytest.fixture(scope="session")
def schemas(installed: Installed, tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubeconform schemas generated from the API server, which publishes the built-in
    kinds and every CRD installed: Aurora's and kopf's (installed by manifests/) and the
    Prometheus Operator's ServiceMonitor (from its Go module)."""
    servicemonitors = tools.parent / "crds" / "monitoring.coreos.com_servicemonitors.yaml"
    installed.kubectl("apply", "--server-side", "-f", str(servicemonitors))
    for _ in range(60):  # (kubectl wait fails on a CRD that has no conditions yet)
        crd = json.loads(installed.kubectl(
            "get", "crd", "servicemonitors.monitoring.coreos.com", "-o", "json").stdout)  # fmt: skip
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            break
        time.sleep(1)
    dest = tmp_path_factory.mktemp("schemas")
    for _ in range(30):  # the CRD reaches the published OpenAPI shortly after it is served
        openapi = json.loads(installed.kubectl("get", "--raw", "/openapi/v2").stdout)
        written = write_schemas(openapi, dest)
        if "monitoring.coreos.com/v1/ServiceMonitor" in written:
            break
        time.sleep(2)
    assert {"aurora.dev/v1alpha1/Speculator", "apps/v1/Deployment", "kopf.dev/v1/ClusterKopfPeering",
            "monitoring.coreos.com/v1/ServiceMonitor"} <= set(written)  # fmt: skip
    return dest


def helm_template(tools: Path, *args: str) -> str:
    done = subprocess.run(
        [str(tools / "helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
         "--include-crds", "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def kubeconform(tools: Path, schemas: Path, manifests: str) -> dict[str, Any]:
    """kubeconform -strict on `manifests`; every object must have a schema."""
    done = subprocess.run(
        [str(tools / "kubeconform"), "-strict", "-summary", "-output", "json",
         "-schema-location", f"{schemas}/{SCHEMA_LOCATION}", "-"],
        input=manifests, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(done.stdout)
    problems = [r for r in report.get("resources", []) if r.get("status") != "statusValid"]
    assert done.returncode == 0 and not problems, json.dumps(problems, indent=1)[:4000]
    summary = report["summary"]
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary
    return dict(summary)


def kinds(manifests: str) -> set[str]:
    return {doc["kind"] for doc in yaml.safe_load_all(manifests) if doc}


def test_kubeconform_catches_what_it_should(tools: Path, schemas: Path) -> None:
    # The schemas are strict: an unknown field or a wrong type is an error (so a pass
    # below means something).
    bad = yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
         "spec": {"ports": [{"port": "eighty"}]}},
        {"apiVersion": "aurora.dev/v1alpha1", "kind": "Speculator", "metadata": {"name": "x"},
         "spec": {"target": {"model": "m"}, "engine": {"replicas": "two", "gpuz": 1}}},
    ])  # fmt: skip
    done = subprocess.run(
        [str(tools / "kubeconform"), "-strict", "-output", "json",
         "-schema-location", f"{schemas}/{SCHEMA_LOCATION}", "-"],
        input=bad, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    statuses = [r["status"] for r in json.loads(done.stdout)["resources"]]
    assert done.returncode != 0 and statuses == ["statusInvalid", "statusInvalid"]


@pytest.mark.parametrize("variant", sorted(CHART_VARIANTS))
def test_helm_template_passes_kubeconform(tools: Path, schemas: Path, variant: str) -> None:
    rendered = helm_template(tools, *CHART_VARIANTS[variant])
    summary = kubeconform(tools, schemas, rendered)
    assert summary["valid"] >= 10
    assert {"CustomResourceDefinition", "Deployment", "PodDisruptionBudget"} <= kinds(rendered)
    if variant == "everything":
        assert "ServiceMonitor" in kinds(rendered)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_output_passes_kubeconform(
    installed: Installed, tools: Path, schemas: Path, directory: str
) -> None:
    rendered = installed.kubectl("kustomize", str(ROOT / directory)).stdout
    kubeconform(tools, schemas, rendered)


def test_the_examples_and_components_pass_kubeconform(tools: Path, schemas: Path) -> None:
    examples = [p.read_text() for p in sorted((ROOT / "manifests" / "examples").glob("*.yaml"))]
    examples.append((ROOT / "manifests/components/external-redis/secret-reader.yaml").read_text())
    summary = kubeconform(tools, schemas, "\n---\n".join(examples))
    assert summary["valid"] == sum(len([d for d in yaml.safe_load_all(e) if d]) for e in examples)


def test_the_api_server_accepts_the_chart(installed: Installed, tools: Path) -> None:
    rendered = helm_template(tools, "--set", "redis.password=dry-run")
    done = installed.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered, check=False)
    assert done.returncode == 0, done.stderr


def _rules(manifests: str, kind: str, name: str) -> set[tuple[str, str, str]]:
    (role,) = [d for d in yaml.safe_load_all(manifests)
               if d and d["kind"] == kind and d["metadata"]["name"] == name]  # fmt: skip
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip


def _operator(manifests: str) -> dict[str, Any]:
    (deployment,) = [d for d in yaml.safe_load_all(manifests)
                     if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "aurora-operator"]  # fmt: skip
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def test_the_chart_and_kustomize_install_the_same_operator(
    installed: Installed, tools: Path
) -> None:
    chart = helm_template(tools)
    kustomized = installed.kubectl("kustomize", str(ROOT / "manifests")).stdout
    needed = set(kube.PERMISSIONS | handlers.KOPF_PERMISSIONS)
    assert _rules(chart, "ClusterRole", "aurora-operator") == needed
    assert _rules(kustomized, "ClusterRole", "aurora-operator") == needed
    namespaced = helm_template(tools, "--set", "scope=namespace")
    assert ("kopf.dev", "kopfpeerings", "patch") in _rules(namespaced, "Role", "aurora-operator")
    chart_op, kustomize_op = _operator(chart), _operator(kustomized)
    assert chart_op["command"] == kustomize_op["command"]
    assert {e["name"] for e in chart_op["env"]} == {e["name"] for e in kustomize_op["env"]} | {
        "AURORA_IMAGE_PULL_POLICY"
    }
