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
