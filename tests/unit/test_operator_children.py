"""The children a Speculator wants: Deployments, Services, ConfigMap, PVC, their pods and
command lines (pure, no cluster)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from aurora.operator import commands, pods, validation
from aurora.operator.children import desired_children, stale_children
from aurora.operator.settings import Images, OperatorSettings, RedisSettings
from aurora.operator.spec import SpeculatorSpec
from aurora.operator.validation import validate_semantics

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _body(example: str, **spec_changes: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body["metadata"].update(namespace="team-a", uid="0b7a-uid", generation=3)
    for section, fields in spec_changes.items():
        body["spec"].setdefault(section, {}).update(fields)
    return body


def _by_name(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _deployments(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in children if c["kind"] == "Deployment"]


TORCH = _body("speculator-torch-cpu.yaml")
SGLANG = _body("speculator-sglang-gpu.yaml")
# The shipped install: the examples' Redis is the operator's managed one.
MANAGED = OperatorSettings(
    redis=RedisSettings(
        managed_url="redis://aurora-redis.aurora-system.svc:6379/0", admin_password="admin"
    )
)


def test_examples_are_valid() -> None:
    assert validate_semantics(TORCH) == []
    assert validate_semantics(SGLANG) == []


def test_torch_cpu_plan_is_one_server_a_trainer_a_service_a_configmap_and_a_volume() -> None:
    children = _by_name(desired_children(TORCH, MANAGED))
    secret = next(name for name in children if name.startswith("Secret/"))
    assert sorted(children) == sorted([
        "ConfigMap/smollm2-cpu-config",
        "Deployment/smollm2-cpu-server",
        "Deployment/smollm2-cpu-trainer",
        "NetworkPolicy/smollm2-cpu-server",
        "NetworkPolicy/smollm2-cpu-trainer",
        "PersistentVolumeClaim/smollm2-cpu-checkpoints",
        "PodDisruptionBudget/smollm2-cpu-server",
        "Service/smollm2-cpu",
        "Service/smollm2-cpu-trainer",
        secret,
    ])  # fmt: skip
    assert secret.startswith("Secret/smollm2-cpu-redis-")
    server = children["Deployment/smollm2-cpu-server"]
    assert server["spec"]["replicas"] == 1
    assert _container(server)["command"] == [
        "aurora", "serve", "--model", "smollm2-135m", "--host", "0.0.0.0", "--port", "8000",
        "--speculator", "team-a/smollm2-cpu", "--redis-url", "$(AURORA_REDIS_URL)",
        "--checkpoint-dir", "/checkpoints", "--draft", "scratch", "--spec-tokens", "4",
        "--trace-sample-rate", "1", "--trace-maxlen", "50000", "--device", "cpu",
    ]  # fmt: skip
    trainer = _container(children["Deployment/smollm2-cpu-trainer"])
    assert trainer["command"] == [
        "aurora", "train", "--model", "smollm2-135m", "--speculator", "team-a/smollm2-cpu",
        "--redis-url", "$(AURORA_REDIS_URL)", "--checkpoint-dir", "/checkpoints", "--init", "scratch",
        "--spec-tokens", "4", "--lr", "0.0003",
        "--batch-size", "8", "--lambda-discard", "0.5", "--publish-every", "200", "--device", "cpu",
        "--metrics-port", "9100",
        # No shared volume (storage.mode Fetch): servers download revisions from here.
        "--serve-checkpoints-port", "9200",
        "--advertise-url", "http://smollm2-cpu-trainer.team-a.svc:9200",
    ]  # fmt: skip
    assert "nvidia.com/gpu" not in json.dumps(children)
    # The Speculator's own Redis user, its password only through the Secret made for it.
    env = {e["name"]: e for e in _container(server)["env"]}
    assert (
        env["AURORA_REDIS_URL"]["value"]
        == "redis://aurora.team-a.smollm2-cpu@aurora-redis.aurora-system.svc:6379/0"
    )
    assert env["AURORA_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": secret.removeprefix("Secret/"), "key": "password"}
    }
    assert _container(server)["resources"] == {
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"memory": "4Gi"},
    }


def test_sglang_gpu_plan_puts_the_canary_on_a_subset_of_replicas() -> None:
    children = _by_name(desired_children(SGLANG))
    stable = children["Deployment/llama31-8b-server"]
    canary = children["Deployment/llama31-8b-server-canary"]
    # canaryShare 0.25 of 4 replicas: one canary pod, three stable ones.
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (3, 1)
    roles = {
        d["spec"]["template"]["metadata"]["labels"]["aurora.dev/role"] for d in (stable, canary)
    }
    assert roles == {"stable", "canary"}
    env = {e["name"]: e.get("value") for e in _container(canary)["env"]}
    assert env["AURORA_SERVER_ROLE"] == "canary"
    # The one Service spans both roles, and neither Deployment's selector overlaps the other.
    service = children["Service/llama31-8b"]["spec"]["selector"]
    for deployment in (stable, canary):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service.items() <= labels.items()
    assert stable["spec"]["selector"]["matchLabels"] != canary["spec"]["selector"]["matchLabels"]
    for deployment in (stable, canary):
        container = _container(deployment)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert deployment["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    trainer = _container(children["Deployment/llama31-8b-trainer"])
    device = trainer["command"].index("--device")
    assert trainer["command"][device : device + 2] == ["--device", "cuda"]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_sglang_command_runs_aurora_s_launcher_with_the_spec_s_draft_and_flags() -> None:
    # serve.py picks the revision to serve (aurora.runtime.sglang) and execs
    # sglang.launch_server with the arguments after "--".
    command = commands.sglang_server_command(SpeculatorSpec.model_validate(SGLANG["spec"]))
    assert command[:3] == ["python3", "-m", "aurora.runtime.sglang.serve"]
    split = command.index("--")
    flags = {
        flag: command[i + 1] for i, flag in enumerate(command[:split]) if flag.startswith("--")
    }
    assert flags["--initial"] == "/drafts/eagle3-llama3.1-8b"
    assert (flags["--speculative-num-steps"], flags["--speculative-eagle-topk"]) == ("3", "4")
    assert flags["--speculative-num-draft-tokens"] == "8"
    sglang = command[split + 1 :]
    args = {flag: sglang[i + 1] for i, flag in enumerate(sglang[:-1]) if flag.startswith("--")}
    assert args["--model-path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args["--served-model-name"] == "llama-3.1-8b"
    assert args["--tp-size"] == "1" and args["--port"] == "8000"
    assert "--enable-metrics" in sglang
    assert sglang[-2:] == ["--mem-fraction-static", "0.85"]  # extraArgs last


@pytest.mark.parametrize(
    ("initial", "gate", "launched"),
    [("ngram", False, "ngram"), ("ngram", True, "none"), ("scratch", True, "scratch")],
)
def test_sglang_day_0_drafts_go_to_the_launcher(initial: str, gate: bool, launched: str) -> None:
    # (a gated model-free day-0 draft starts as none; the canary replicas load it)
    body = _body("speculator-sglang-gpu.yaml")
    body["spec"]["draft"] = {"initial": initial}
    body["spec"].setdefault("rollout", {})["gateInitialDraft"] = gate
    command = commands.sglang_server_command(SpeculatorSpec.model_validate(body["spec"]))
    assert command[command.index("--initial") + 1] == launched
    assert "--speculative-draft-model-path" not in command


@pytest.mark.parametrize("body", [TORCH, SGLANG], ids=["torch", "sglang"])
def test_every_pod_runs_locked_down(body: dict[str, Any]) -> None:
    for deployment in _deployments(desired_children(body)):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["privileged"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            for writable in ("/tmp", "/cache"):  # bounded: a full one evicts the pod
                assert volumes[mounts[writable]]["emptyDir"]["sizeLimit"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
        for container in pod.get("initContainers", []):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("body", [TORCH, SGLANG], ids=["torch", "sglang"])
def test_servers_roll_without_losing_capacity_and_are_probed(body: dict[str, Any]) -> None:
    for deployment in _deployments(desired_children(body)):
        container = _container(deployment)
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "server":
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
            assert container["livenessProbe"]["httpGet"]["path"] == "/health"
            assert container["readinessProbe"]["httpGet"]["port"] == "http"
            assert container["startupProbe"]["failureThreshold"] >= 60
        else:  # the trainer: one writer on the checkpoint volume
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_torch_server_readiness_is_the_ready_endpoint() -> None:
    server = _by_name(desired_children(TORCH))["Deployment/smollm2-cpu-server"]
    assert _container(server)["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_same_spec_same_objects_whatever_else_changed() -> None:
    # Idempotency: status, annotations and resourceVersion do not change the plan.
    first = desired_children(TORCH)
    noisy = copy.deepcopy(TORCH)
    noisy["status"] = {"observedGeneration": 2, "phase": "Canary"}
    noisy["metadata"].update(
        resourceVersion="999", annotations={"aurora.dev/override": "Promote:r1"}
    )
    assert json.dumps(desired_children(noisy), sort_keys=True) == json.dumps(first, sort_keys=True)


def test_every_child_is_owned_labelled_and_selected_by_immutable_labels() -> None:
    for child in desired_children(SGLANG, MANAGED):
        metadata = child["metadata"]
        assert metadata["namespace"] == "team-a"
        assert metadata["labels"]["aurora.dev/speculator"] == "llama31-8b"
        assert metadata["labels"]["app.kubernetes.io/part-of"] == "aurora"
        (owner,) = metadata["ownerReferences"]
        assert owner == {
            "apiVersion": "aurora.dev/v1alpha1", "kind": "Speculator", "name": "llama31-8b",
            "uid": "0b7a-uid", "controller": True, "blockOwnerDeletion": True,
        }  # fmt: skip
    # Deployment selectors are immutable: a spec change must not change them.
    changed = _body(
        "speculator-sglang-gpu.yaml", engine={"replicas": 8}, target={"model": "other/model"}
    )
    before = {
        d["metadata"]["name"]: d["spec"]["selector"] for d in _deployments(desired_children(SGLANG))
    }
    after = {
        d["metadata"]["name"]: d["spec"]["selector"]
        for d in _deployments(desired_children(changed))
    }
    assert before == after


def test_retained_volume_is_not_owned_and_an_existing_claim_is_used_as_is() -> None:
    retained = _by_name(
        desired_children(_body("speculator-torch-cpu.yaml", storage={"deletionPolicy": "Retain"}))
    )
    assert (
        "ownerReferences"
        not in retained["PersistentVolumeClaim/smollm2-cpu-checkpoints"]["metadata"]
    )
    existing = _by_name(
        desired_children(_body("speculator-torch-cpu.yaml", storage={"existingClaim": "models"}))
    )
    assert not [c for c in existing if c.startswith("PersistentVolumeClaim/")]
    trainer = existing["Deployment/smollm2-cpu-trainer"]
    volumes = {v["name"]: v for v in trainer["spec"]["template"]["spec"]["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "models"}


@pytest.mark.parametrize(
    ("replicas", "share", "enabled", "canary"),
    [(2, "0.1", True, 1), (4, "0.25", True, 1), (4, "0.5", True, 2), (10, "0.9", True, 9),
     (3, "0.99", True, 2), (0, "0.5", True, 0), (4, "0.5", False, 0)],
)  # fmt: skip
def test_canary_replicas_keep_both_arms_serving(
    replicas: int, share: str, enabled: bool, canary: int
) -> None:
    body = _body(
        "speculator-sglang-gpu.yaml",
        engine={"replicas": replicas},
        rollout={"canaryShare": share, "baselineShare": "0.0", "enabled": enabled},
    )
    spec = SpeculatorSpec.model_validate(body["spec"])
    assert pods.canary_replicas(spec) == canary
    deployments = _by_name(desired_children(body))
    assert deployments["Deployment/llama31-8b-server"]["spec"]["replicas"] == replicas - canary
    assert deployments["Deployment/llama31-8b-server-canary"]["spec"]["replicas"] == canary


def test_disabled_training_scales_the_trainer_to_zero() -> None:
    children = _by_name(
        desired_children(_body("speculator-torch-cpu.yaml", training={"enabled": False}))
    )
    assert children["Deployment/smollm2-cpu-trainer"]["spec"]["replicas"] == 0


def test_empty_resources_get_defaults_so_no_pod_is_best_effort() -> None:
    body = _body("speculator-torch-cpu.yaml", engine={"resources": {}}, training={"resources": {}})
    children = _by_name(desired_children(body))
    server = _container(children["Deployment/smollm2-cpu-server"])
    assert server["resources"] == pods.DEFAULT_RESOURCES["server-torch"]


def test_spec_tokens_follow_num_draft_tokens_or_steps() -> None:
    spec = SpeculatorSpec.model_validate(
        {"target": {"model": "m"}, "engine": {"speculativeSteps": 6}}
    )
    assert commands.spec_tokens(spec) == 6
    spec = SpeculatorSpec.model_validate(
        {
            "target": {"model": "m"},
            "engine": {"speculativeSteps": 6, "speculativeNumDraftTokens": 5},
        }
    )
    assert commands.spec_tokens(spec) == 4


def test_images_come_from_the_operator_environment() -> None:
    images = Images.from_env({"AURORA_RUNTIME_IMAGE": "registry.local/aurora:dev"})
    server = _by_name(desired_children(TORCH, OperatorSettings(images=images)))[
        "Deployment/smollm2-cpu-server"
    ]
    assert _container(server)["image"] == "registry.local/aurora:dev"
    custom = _body("speculator-torch-cpu.yaml", engine={"image": "mine:1"})
    assert (
        _container(
            _by_name(desired_children(custom, OperatorSettings(images=images)))[
                "Deployment/smollm2-cpu-server"
            ]
        )["image"]
        == "mine:1"
    )


def test_switching_engine_leaves_the_canary_deployment_stale() -> None:
    observed = desired_children(SGLANG)
    torch_body = _body(
        "speculator-sglang-gpu.yaml", engine={"kind": "torch", "gpus": 1, "replicas": 2}
    )
    torch_body["spec"]["draft"] = {"initial": "ngram"}
    foreign = {"kind": "ConfigMap", "metadata": {"name": "llama31-8b-notes", "ownerReferences": []}}
    assert stale_children([*observed, foreign], desired_children(torch_body)) == [
        ("Deployment", "llama31-8b-server-canary")
    ]
    # The managed Redis user's Secret is never listed, so never judged stale.
    secret = next(c for c in desired_children(SGLANG, MANAGED) if c["kind"] == "Secret")
    assert stale_children([secret], desired_children(torch_body)) == []


def test_effective_config_is_the_defaulted_spec() -> None:
    config = _by_name(desired_children(TORCH))["ConfigMap/smollm2-cpu-config"]
    document = json.loads(config["data"]["speculator.json"])
    assert document["name"] == "smollm2-cpu"
    assert document["spec"]["rollout"]["regressionThreshold"] == "0.97"  # a default, filled in


# ------------------------------------------------------------- semantic validation


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"engine": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}, "set spec.engine.gpus"),
        ({"engine": {"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "4Gi"}}}},
         "requests.memory 8Gi exceeds limits.memory 4Gi"),
        ({"training": {"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": 1}}}},
         "spec.training.resources: requests.cpu 1500m exceeds"),
        ({"traces": {"redisUrl": "redis://:hunter2@redis:6379/0"}}, "spec.traces.passwordSecretRef"),
        ({"engine": {"kind": "sglang"}}, "spec.engine: engine.kind sglang runs on GPUs"),
        ({"engine": {"replicas": "many"}}, "spec.engine.replicas:"),
        ({"rollout": {"canaryShare": "0.95"}}, "rollout.canaryShare + rollout.baselineShare"),
    ],
)  # fmt: skip
def test_semantic_errors_name_the_field_and_the_fix(change: dict[str, Any], expected: str) -> None:
    body = copy.deepcopy(TORCH)
    for section, fields in change.items():
        body["spec"][section] = {**body["spec"].get(section, {}), **fields}
    errors = validate_semantics(body)
    assert any(expected in error for error in errors), errors


def test_a_name_too_long_for_the_children_is_an_error() -> None:
    body = copy.deepcopy(TORCH)
    body["metadata"]["name"] = "a" * 50
    assert any(
        "metadata.name" in error and "at most 49" in error for error in validate_semantics(body)
    )


@pytest.mark.parametrize(
    ("quantity", "value"),
    [(2, 2), ("500m", 0.5), ("2Gi", 2 * 2**30), ("1.5G", 1.5e9), ("1e3", 1000), ("100Ki", 102400)],
)
def test_parse_quantity(quantity: int | str, value: float) -> None:
    assert float(validation.parse_quantity(quantity)) == value


def test_parse_quantity_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        validation.parse_quantity("lots")


@pytest.mark.parametrize(
    "body", [TORCH, _body("speculator-torch-cpu.yaml", engine={"speculativeNumDraftTokens": 3})]
)
def test_server_and_trainer_command_lines_parse_with_the_real_cli(body: dict[str, Any]) -> None:
    # The pods run `aurora serve` and `aurora train`: the flags the operator writes must be
    # the flags those commands take (argparse exits on an unknown flag).
    from aurora.cli import build_parser

    parser = build_parser()
    children = _by_name(desired_children(body))
    served = parser.parse_args(_container(children["Deployment/smollm2-cpu-server"])["command"][1:])
    spec_tokens = commands.spec_tokens(SpeculatorSpec.model_validate(body["spec"]))
    assert (served.command, served.spec_tokens, served.device) == ("serve", spec_tokens, "cpu")
    trained = parser.parse_args(
        _container(children["Deployment/smollm2-cpu-trainer"])["command"][1:]
    )
    assert trained.command == "train" and trained.publish_every == 200
    assert (trained.init, trained.spec_tokens) == ("scratch", spec_tokens)
    assert (trained.serve_checkpoints_port, trained.advertise_url) == (
        9200,
        "http://smollm2-cpu-trainer.team-a.svc:9200",
    )


def test_the_trainer_starts_from_the_torch_engines_initial_checkpoint() -> None:
    body = _body(
        "speculator-torch-cpu.yaml",
        draft={"initial": "/checkpoints/r0012"},
        storage={"mode": "SharedVolume", "accessMode": "ReadWriteMany"},
    )
    trainer = _container(_by_name(desired_children(body))["Deployment/smollm2-cpu-trainer"])
    assert trainer["command"][trainer["command"].index("--init") + 1] == "/checkpoints/r0012"
    sglang = _container(_by_name(desired_children(SGLANG))["Deployment/llama31-8b-trainer"])
    assert sglang["command"][sglang["command"].index("--init") + 1] == "scratch"


def test_torch_pods_with_gpus_get_the_cuda_runtime_image() -> None:
    images = Images(runtime="r:cpu", runtime_cuda="r:cuda", sglang="s:1")
    sglang = _by_name(desired_children(SGLANG, OperatorSettings(images=images)))
    assert (
        _container(sglang["Deployment/llama31-8b-trainer"])["image"] == "r:cuda"
    )  # training.gpus 1
    assert _container(sglang["Deployment/llama31-8b-server"])["image"] == "s:1"
    torch = _by_name(desired_children(TORCH, OperatorSettings(images=images)))
    assert _container(torch["Deployment/smollm2-cpu-server"])["image"] == "r:cpu"
