"""The Argo CD health check for aurora.dev/Speculator (manifests/argocd/health.lua), run in
a real Lua 5.1 interpreter (Argo CD embeds gopher-lua, a Lua 5.1) against Speculators
whose status the operator's own `build_status` wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from aurora.operator.status import Observation, build_status

pytestmark = pytest.mark.unit

ARGOCD = Path(__file__).resolve().parents[2] / "manifests" / "argocd"
HEALTH = (ARGOCD / "health.lua").read_text()
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def lua_interpreter() -> str:
    for name in ("lua5.1", "lua"):
        path = shutil.which(name)
        if path:
            version = subprocess.run([path, "-v"], capture_output=True, text=True)
            if "Lua 5.1" in version.stdout + version.stderr:
                return path
    message = (
        "Lua 5.1 is not installed, so the Argo CD health check cannot be run: "
        "apt-get install -y lua5.1"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(f"SKIPPED LOUDLY: {message}")


def lua_literal(value: Any) -> str:
    """A Python value (from JSON) as a Lua table constructor."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    # Argo CD runs the script with `obj` set and takes what it returns.
    script = f"obj = {lua_literal(obj)}\nlocal function check()\n{HEALTH}\nend\n"
    script += 'local hs = check()\nio.write(hs.status, "\\n", hs.message or "")\n'
    result = subprocess.run(
        [lua_interpreter(), "-"], input=script, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.partition("\n")
    return status, message


def speculator(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "aurora.dev/v1alpha1",
        "kind": "Speculator",
        "metadata": {"name": "chat", "namespace": "team-a", "generation": generation},
        "spec": {"target": {"model": "smollm2-135m"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def deployment(ready: int, updated: int = 2, total: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-server", "generation": 1},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 1, "replicas": total, "readyReplicas": ready,
                   "updatedReplicas": updated, "availableReplicas": ready},
    }  # fmt: skip


def observed(generation: int = 2, **fields: Any) -> dict[str, Any]:
    observation = Observation(generation, expected_servers={"chat-server": 2}, **fields)
    return build_status(observation, {}, T0)


def test_the_configmap_patch_carries_exactly_health_lua() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.aurora.dev_Speculator"] == HEALTH


def test_no_status_yet_is_progressing() -> None:
    assert health(speculator(1, None))[0] == "Progressing"


def test_an_unobserved_generation_is_progressing_even_if_the_old_one_was_healthy() -> None:
    status, message = health(speculator(3, observed(generation=2, servers=[deployment(ready=2)])))
    assert status == "Progressing" and "generation 3" in message


def test_serving_and_not_degraded_is_healthy() -> None:
    status, message = health(speculator(2, observed(servers=[deployment(ready=2)])))
    assert (status, message.split(":")[0]) == ("Healthy", "Serving")


def test_servers_starting_is_progressing() -> None:
    status, message = health(speculator(2, observed(servers=[deployment(ready=0, updated=0)])))
    assert status == "Progressing" and message.startswith("ServersNotReady")


def test_pods_still_rolling_is_progressing() -> None:
    status, message = health(
        speculator(2, observed(servers=[deployment(ready=2, updated=1, total=3)]))
    )
    assert status == "Progressing" and message.startswith("RollingOut")


def test_invalid_spec_is_degraded_with_the_reason() -> None:
    errors = ["spec.engine: engine.kind sglang runs on GPUs: set engine.gpus to 1 or more"]
    status, message = health(speculator(2, observed(spec_errors=errors)))
    assert status == "Degraded" and message.startswith("InvalidSpec: spec.engine")


def test_redis_unreachable_is_degraded() -> None:
    status, message = health(
        speculator(
            2,
            observed(
                servers=[deployment(ready=2)], redis_error="Redis at redis:6379/0 unreachable"
            ),
        )
    )
    assert status == "Degraded" and message.startswith("RedisUnavailable")


def test_a_message_with_quotes_and_newlines_survives() -> None:
    status, message = health(
        speculator(2, observed(servers=[deployment(ready=2)], apply_error='PVC "x" is\ninvalid'))
    )
    assert status == "Degraded" and 'PVC "x" is\ninvalid' in message


def held() -> dict[str, Any]:
    from aurora.runtime.rollout import RolloutState

    state = RolloutState.model_validate(
        {"phase": "Hold", "stableRevision": "r1", "candidateRevision": "r2"}
    )
    return observed(servers=[deployment(ready=2)], rollout_state=state)


def test_a_canary_held_for_a_person_is_suspended_not_healthy() -> None:
    # Argo Rollouts shows a rollout paused for a person as Suspended: so does a Speculator
    # whose inconclusive canary waits for `aurora.dev/override`.
    status, message = health(speculator(2, held()))
    assert status == "Suspended"
    assert message.startswith("Held: r2 held") and "aurora.dev/override=Promote" in message


def test_scaled_to_zero_is_suspended() -> None:
    zero = build_status(Observation(2, expected_servers={"chat-server": 0}, servers=[]), {}, T0)
    status, message = health(speculator(2, zero))
    assert (status, message.split(":")[0]) == ("Suspended", "ScaledToZero")


def test_a_redis_the_operator_may_not_use_is_degraded() -> None:
    refused = observed(spec_errors=["spec.traces.redisUrl points at evil:6379"],
                       spec_error_reason="RedisNotAllowed")  # fmt: skip
    status, message = health(speculator(2, refused))
    assert status == "Degraded" and message.startswith("RedisNotAllowed: spec.traces.redisUrl")


def application_health(app: dict[str, Any]) -> str:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    lua = patch["data"]["resource.customizations.health.argoproj.io_Application"]
    script = f"obj = {lua_literal(app)}\nlocal function check()\n{lua}\nend\n"
    script += "io.write(check().status)\n"
    result = subprocess.run([lua_interpreter(), "-"], input=script, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_app_of_apps_orders_install_before_the_speculator_and_protects_the_crd() -> None:
    # Applications' health is known to Argo CD (so waves wait for the install to be Healthy)
    assert application_health({"status": {"health": {"status": "Healthy"}}}) == "Healthy"
    assert application_health({}) == "Progressing"
    root = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    assert root["spec"]["source"]["path"] == "manifests/argocd/apps"
    apps = {
        doc["metadata"]["name"]: doc
        for path in sorted((ARGOCD / "apps").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    }
    waves = {name: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
             for name, app in apps.items()}  # fmt: skip
    assert waves == {"aurora-install": 0, "aurora-smollm2-cpu": 1}
    for app in [root, *apps.values()]:
        assert app["spec"]["syncPolicy"]["retry"]["limit"] >= 5
    example = apps["aurora-smollm2-cpu"]["spec"]
    options = set(example["syncPolicy"]["syncOptions"])
    assert {"CreateNamespace=true", "SkipDryRunOnMissingResource=true"} <= options
    assert example["ignoreDifferences"][0]["jsonPointers"] == ["/spec/engine/replicas"]
    # the example needs no Secret copied into its namespace: nothing refers to one
    speculator_file = Path(__file__).resolve().parents[2] / "manifests" / "examples"
    spx = yaml.safe_load((speculator_file / example["source"]["directory"]["include"]).read_text())
    assert "passwordSecretRef" not in spx["spec"]["traces"]
    install = apps["aurora-install"]["spec"]["source"]["path"]
    assert (Path(__file__).resolve().parents[2] / install / "kustomization.yaml").exists()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_argo_cd_never_prunes_or_deletes_the_crds_or_the_namespace() -> None:
    root = Path(__file__).resolve().parents[2]
    built = subprocess.run(["kubectl", "kustomize", str(root / "manifests/argocd/install")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    protected = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if (d["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-options")
        == "Prune=false,Delete=false"
    }
    crds = {("CustomResourceDefinition", d["metadata"]["name"]) for d in docs
            if d["kind"] == "CustomResourceDefinition"}  # fmt: skip
    assert protected == crds | {("Namespace", "aurora-system")}
    assert ("CustomResourceDefinition", "speculators.aurora.dev") in protected
    # and it is the default install otherwise
    default = subprocess.run(["kubectl", "kustomize", str(root / "manifests")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    names = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(default.stdout) if d}
    assert names == {(d["kind"], d["metadata"]["name"]) for d in docs}
