"""The pods a Speculator gets: customisable (env, envFrom, affinity, labels and
annotations, extra volumes, the trainer scheduled on its own), bounded (/cache, /dev/shm,
/tmp), spread and protected (topology spread, a PodDisruptionBudget), and placed so that
no shared volume is needed (storage.mode Fetch) unless one is asked for and can work."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from aurora.operator.children import desired_children
from aurora.operator.spec import SpeculatorSpec
from aurora.operator.validation import validate_semantics

pytestmark = pytest.mark.unit


def body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u", "generation": 1},
        "spec": {"target": {"model": "smollm2-135m"}, **spec},
    }


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in desired_children(body(**spec))}


def pod(kids: dict[str, dict[str, Any]], deployment: str) -> dict[str, Any]:
    return dict(kids[f"Deployment/{deployment}"]["spec"]["template"])


def volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"]["volumes"]}


def mounts(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}


GPU_POOL = {"nvidia.com/gpu.present": "true"}
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
HF_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def test_env_envfrom_affinity_labels_and_volumes_reach_the_pods() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}  # fmt: skip
    kids = children(
        engine={
            "env": [HF_TOKEN, {"name": "LOG_FORMAT", "value": "json"}],
            "envFrom": [{"configMapRef": {"name": "proxy-settings"}}],
            "affinity": affinity,
            "priorityClassName": "inference",
            "podLabels": {"team": "search"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
            "volumes": [{"name": "certs", "secret": {"secretName": "ca"}}],
            "volumeMounts": [{"name": "certs", "mountPath": "/etc/certs", "readOnly": True}],
        }
    )
    template = pod(kids, "chat-server")
    container = template["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == HF_TOKEN and env["LOG_FORMAT"]["value"] == "json"
    assert env["AURORA_SPECULATOR"]["value"] == "team-a/chat"  # Aurora's own still there
    assert container["envFrom"] == [{"configMapRef": {"name": "proxy-settings"}}]
    assert template["spec"]["affinity"] == affinity
    assert template["spec"]["priorityClassName"] == "inference"
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"]["aurora.dev/speculator"] == "chat"
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert volumes(template)["certs"] == {"name": "certs", "secret": {"secretName": "ca"}}
    assert mounts(template)["/etc/certs"] == {
        "name": "certs", "mountPath": "/etc/certs", "readOnly": True,
    }  # fmt: skip
    # the trainer is scheduled and customised on its own: none of the servers' settings
    trainer = pod(kids, "chat-trainer")
    assert "affinity" not in trainer["spec"] and "team" not in trainer["metadata"]["labels"]
    assert "HF_TOKEN" not in {e["name"] for e in trainer["spec"]["containers"][0]["env"]}


def test_the_trainer_is_scheduled_on_its_own() -> None:
    kids = children(
        engine={"nodeSelector": GPU_POOL, "tolerations": TOLERATE_GPU},
        training={"nodeSelector": {"pool": "training"}},
    )
    server, trainer = pod(kids, "chat-server")["spec"], pod(kids, "chat-trainer")["spec"]
    assert server["nodeSelector"] == GPU_POOL and server["tolerations"] == TOLERATE_GPU
    assert trainer["nodeSelector"] == {"pool": "training"} and "tolerations" not in trainer


def test_cache_tmp_and_shared_memory_are_bounded() -> None:
    torch = children()
    assert volumes(pod(torch, "chat-server"))["cache"]["emptyDir"] == {"sizeLimit": "8Gi"}
    assert volumes(pod(torch, "chat-server"))["tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    sized = children(engine={"cacheSize": "30Gi"}, training={"cacheSize": "5Gi"})
    assert volumes(pod(sized, "chat-server"))["cache"]["emptyDir"]["sizeLimit"] == "30Gi"
    assert volumes(pod(sized, "chat-trainer"))["cache"]["emptyDir"]["sizeLimit"] == "5Gi"
    sglang = children(
        engine={"kind": "sglang", "gpus": 1, "replicas": 2, "shmSize": "8Gi"},
        draft={"initial": "ngram"},
    )
    server = volumes(pod(sglang, "chat-server"))
    assert server["cache"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert server["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_servers_spread_over_nodes_and_zones_and_keep_one_down_at_most() -> None:
    kids = children(engine={"replicas": 3})
    spread = pod(kids, "chat-server")["spec"]["topologySpreadConstraints"]
    assert [(c["topologyKey"], c["whenUnsatisfiable"]) for c in spread] == [
        ("kubernetes.io/hostname", "ScheduleAnyway"),
        ("topology.kubernetes.io/zone", "ScheduleAnyway"),
    ]
    server_pods = {"aurora.dev/speculator": "chat", "app.kubernetes.io/component": "server"}
    assert all(c["labelSelector"] == {"matchLabels": server_pods} for c in spread)
    budget = kids["PodDisruptionBudget/chat-server"]["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": server_pods}}
    own = [{"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule"}]
    mine = children(engine={"topologySpreadConstraints": own})
    assert pod(mine, "chat-server")["spec"]["topologySpreadConstraints"] == own


def test_by_default_no_volume_is_shared_between_servers_and_trainer() -> None:
    kids = children()
    server, trainer = pod(kids, "chat-server"), pod(kids, "chat-trainer")
    # servers keep fetched revisions in their own bounded emptyDir; only the trainer
    # mounts the claim, so ReadWriteOnce works wherever the pods land
    assert volumes(server)["checkpoints"] == {
        "name": "checkpoints",
        "emptyDir": {"sizeLimit": "10Gi"},
    }
    assert "persistentVolumeClaim" not in repr(server)
    assert volumes(trainer)["checkpoints"]["persistentVolumeClaim"] == {
        "claimName": "chat-checkpoints"
    }
    assert kids["PersistentVolumeClaim/chat-checkpoints"]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    ports = {p["name"]: p["port"] for p in kids["Service/chat-trainer"]["spec"]["ports"]}
    assert ports == {"metrics": 9100, "checkpoints": 9200}


def test_a_shared_volume_is_mounted_read_only_by_the_servers() -> None:
    kids = children(storage={"mode": "SharedVolume", "accessMode": "ReadWriteMany"})
    server = pod(kids, "chat-server")
    assert volumes(server)["checkpoints"]["persistentVolumeClaim"] == {
        "claimName": "chat-checkpoints"
    }
    assert mounts(server)["/checkpoints"]["readOnly"] is True
    command = pod(kids, "chat-trainer")["spec"]["containers"][0]["command"]
    assert "--serve-checkpoints-port" not in command and "--advertise-url" not in command


@pytest.mark.parametrize(
    ("storage", "extra", "expected"),
    [
        ({"mode": "SharedVolume", "accessMode": "ReadWriteOncePod"}, {},
         "ReadWriteOncePod lets a single pod mount the volume"),
        ({"mode": "SharedVolume", "accessMode": "ReadWriteOnce"}, {},
         "fails with a Multi-Attach error once servers and trainer land on different nodes"),
        ({"mode": "SharedVolume", "accessMode": "ReadWriteOnce"},
         {"engine": {"nodeSelector": {"kubernetes.io/hostname": "a"}},
          "training": {"nodeSelector": {"kubernetes.io/hostname": "b"}}},
         "Multi-Attach"),
        ({}, {"draft": {"initial": "/checkpoints/initial/eagle3"}},
         "which servers do not mount with storage.mode Fetch"),
    ],
)  # fmt: skip
def test_storage_that_cannot_work_is_refused_with_the_reason(
    storage: dict[str, Any], extra: dict[str, Any], expected: str
) -> None:
    errors = validate_semantics(body(storage=storage, **extra))
    assert any(expected in error for error in errors), errors


def test_read_write_once_shared_is_fine_when_every_pod_is_pinned_to_one_node() -> None:
    pinned = {"nodeSelector": {"kubernetes.io/hostname": "gpu-7"}}
    shared = {"mode": "SharedVolume", "accessMode": "ReadWriteOnce"}
    assert validate_semantics(body(storage=shared, engine=pinned, training=pinned)) == []
    # and ReadWriteOncePod is fine for the trainer's own volume (storage.mode Fetch)
    assert validate_semantics(body(storage={"accessMode": "ReadWriteOncePod"})) == []


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ({"env": [{"name": "AURORA_REDIS_URL", "value": "redis://x"}]}, "reserved"),
        ({"podLabels": {"aurora.dev/speculator": "other"}}, "Aurora's own label"),
        ({"volumes": [{"name": "cache", "emptyDir": {}}]}, "one of Aurora's volumes"),
        ({"volumes": [{"emptyDir": {}}]}, "a volume needs a name"),
        ({"volumeMounts": [{"name": "nowhere", "mountPath": "/x"}]}, "no volume 'nowhere'"),
        ({"volumes": [{"name": "v", "emptyDir": {}}],
          "volumeMounts": [{"name": "v", "mountPath": "/cache/"}]}, "mount yours elsewhere"),
    ],
)  # fmt: skip
def test_customisations_cannot_replace_what_aurora_relies_on(
    engine: dict[str, Any], expected: str
) -> None:
    errors = validate_semantics(body(engine=engine))
    assert any(expected in error and "spec.engine" in error for error in errors), errors


SHA = "9" * 64


def test_the_day0_draft_is_fetched_by_an_init_step_not_copied_by_hand() -> None:
    draft = {"initial": "/drafts/eagle3", "fetch": {"url": "https://h/eagle3.tgz", "sha256": SHA}}
    kids = children(draft=draft)
    for deployment in ("chat-server", "chat-trainer"):  # the torch trainer starts from it
        template = pod(kids, deployment)
        (init,) = template["spec"]["initContainers"]
        assert init["command"] == [
            "aurora", "draft", "fetch", "--url", "https://h/eagle3.tgz", "--sha256", SHA,
            "--into", "/drafts",
        ]  # fmt: skip
        assert init["image"] == template["spec"]["containers"][0]["image"]
        assert volumes(template)["drafts"]["emptyDir"] == {"sizeLimit": "20Gi"}
        assert mounts(template)["/drafts"]["readOnly"] is True
    server = pod(kids, "chat-server")["spec"]["containers"][0]["command"]
    assert server[server.index("--draft") + 1] == "/drafts/eagle3"
    # the init step is a real `aurora` command line
    from aurora.cli import build_parser

    (init,) = pod(kids, "chat-server")["spec"]["initContainers"]
    parsed = build_parser().parse_args(init["command"][1:])
    assert (parsed.url, parsed.sha256, str(parsed.into)) == ("https://h/eagle3.tgz", SHA, "/drafts")
    outside = copy.deepcopy(draft)
    outside["initial"] = "/models/eagle3"
    with pytest.raises(ValueError, match=r"draft\.fetch puts the day-0 draft under /drafts/"):
        SpeculatorSpec.model_validate({"target": {"model": "m"}, "draft": outside})
    # an SGLang trainer starts from scratch: only its servers fetch the draft
    sglang = children(engine={"kind": "sglang", "gpus": 1, "replicas": 2}, draft=draft)
    assert "initContainers" in pod(sglang, "chat-server")["spec"]
    assert "initContainers" not in pod(sglang, "chat-trainer")["spec"]


@pytest.mark.parametrize(
    ("rollout", "served"),
    [({}, "none"), ({"gateInitialDraft": False}, "suffix"), ({"enabled": False}, "suffix")],
)
def test_a_gated_day0_suffix_draft_starts_the_servers_without_a_draft(
    rollout: dict[str, Any], served: str
) -> None:
    # Given the default day-0 draft (suffix): gated by default, the servers start on plain
    # decoding and the rollout canaries suffix against it; ungated, or with no rollout
    # running to ever promote it, they serve it from the start
    kids = children(draft={"initial": "suffix"}, rollout=rollout)
    server = pod(kids, "chat-server")["spec"]["containers"][0]["command"]
    assert server[server.index("--draft") + 1] == served


def test_a_rediss_ca_bundle_is_mounted_and_named_to_the_runtime() -> None:
    traces = {"redisUrl": "rediss://redis.shared.svc:6380/0",
              "caConfigMapRef": {"name": "redis-ca"}}  # fmt: skip
    template = pod(children(traces=traces), "chat-server")
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["AURORA_REDIS_URL"] == "rediss://redis.shared.svc:6380/0"
    assert env["AURORA_REDIS_CA_FILE"] == "/etc/aurora-redis-ca/ca.crt"
    assert volumes(template)["redis-ca"]["configMap"] == {"name": "redis-ca"}
