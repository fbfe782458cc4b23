"""Security properties, checked against what is deployed and what runs: every container
locked down in every plan, RBAC without wildcards, the Redis password only ever from a
Secret, prompt text never in logs or in Redis outside the trace stream, and trace
retention bounded as configured. Extends tests/unit/test_operator_manifests.py and
tests/unit/test_operator_children.py (which check the base manifests and the two
examples) to every manifest and every engine variant."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from live_server import LiveServer, wait_for
from reliability_support import server_config

from aurora.operator.children import desired_children
from aurora.operator.validation import validate_semantics
from aurora.runtime import protocol
from aurora.runtime.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"


def manifest_objects() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(MANIFESTS.rglob("*.yaml"))
        if "kustomization" not in path.name
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "kind" in doc
    ]


def variants() -> dict[str, dict[str, Any]]:
    """Every engine, draft and hardware combination the operator plans."""
    out = {}
    for example in ("speculator-torch-cpu.yaml", "speculator-sglang-gpu.yaml"):
        body = yaml.safe_load((EXAMPLES / example).read_text())
        body["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
        kind = body["spec"]["engine"]["kind"]
        out[kind] = body
        ngram = copy.deepcopy(body)
        ngram["spec"]["draft"] = {"initial": "ngram"}
        out[f"{kind}-ngram"] = ngram
        untrained = copy.deepcopy(body)
        untrained["spec"]["training"]["enabled"] = False
        out[f"{kind}-no-training"] = untrained
    gpu = copy.deepcopy(out["torch"])
    gpu["spec"]["engine"]["gpus"] = 1
    gpu["spec"]["training"]["gpus"] = 1
    out["torch-gpu"] = gpu
    return out


VARIANTS = variants()


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, body in VARIANTS.items():
        assert validate_semantics(body) == [], name
        for child in desired_children(body):
            if child["kind"] == "Deployment":
                yield f"{name}/{child['metadata']['name']}", child["spec"]["template"]["spec"]
    for obj in manifest_objects():
        if obj["kind"] == "Deployment":
            yield f"manifests/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


@pytest.mark.unit
def test_every_container_planned_or_shipped_is_non_root_read_only_and_unprivileged() -> None:
    seen = 0
    for where, pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"].get("runAsUser", 1) != 0, where
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is not False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            seen += 1
    assert seen >= 2 * len(VARIANTS) + 2  # server and trainer per plan, operator, Redis


@pytest.mark.unit
def test_no_role_in_the_manifests_grants_a_wildcard() -> None:
    roles = [o for o in manifest_objects() if o["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)


@pytest.mark.unit
def test_servers_and_trainers_read_the_redis_password_from_a_secret_only() -> None:
    for name, body in VARIANTS.items():
        ref = body["spec"]["traces"]["passwordSecretRef"]
        for child in desired_children(body):
            if child["kind"] != "Deployment":
                continue
            for container in child["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                assert env["AURORA_REDIS_PASSWORD"] == {
                    "name": "AURORA_REDIS_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
                }, name
                assert "@" not in env["AURORA_REDIS_URL"]["value"], name
    # and a password written into the URL is refused, naming the fix
    leaky = copy.deepcopy(VARIANTS["torch"])
    leaky["spec"]["traces"]["redisUrl"] = "redis://:hunter2@aurora-redis:6379/0"
    assert any("passwordSecretRef" in e for e in validate_semantics(leaky))


@pytest.mark.integration
def test_redis_with_a_password_refuses_clients_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedRedis(password="s3cret-from-a-secret") as server:
        anonymous = f"redis://127.0.0.1:{server.port}/0"
        with pytest.raises(redis.AuthenticationError):
            protocol.connect(anonymous).ping()
        monkeypatch.setenv("AURORA_REDIS_PASSWORD", "s3cret-from-a-secret")  # the Secret's env
        assert protocol.connect(anonymous).ping()


# ------------------------------------------------------------------ retention


@pytest.mark.integration
def test_trace_and_stats_streams_stay_within_their_maxlen(
    model: tuple[Any, Any], redis_client: redis.Redis, redis_url: str
) -> None:
    # Given Redis trimming in nodes of 4 entries, and a server keeping 8 traces and 12 stats
    redis_client.config_set("stream-node-max-entries", 4)
    keys = protocol.Keys("default", "local")
    try:
        options = dict(redis_url=redis_url, trace_maxlen=8, stats_maxlen=12, draft="ngram")
        with LiveServer(server_config(**options), model) as server:
            # When 30 requests are served and traced
            for _ in range(30):
                body = {"text": "retention", "sampling_params": {"max_new_tokens": 1}}
                assert server.post("/generate", body).status_code == 200
            assert server.runtime.publisher.flush(30)
            published = server.metric('aurora_traces_published_total{kind="trace"}')
        # Then every trace was published, and the streams hold no more than their bound
        # (MAXLEN ~ trims whole nodes: at most one node above the bound)
        assert published == 30
        assert 8 <= redis_client.xlen(keys.traces) <= 8 + 4
        assert 12 <= redis_client.xlen(keys.stats) <= 12 + 4
        # and the dead-letter stream has its own bound
        for i in range(40):
            protocol.dead_letter(redis_client, keys, f"{i}-1", {"x": b"1"}, "bad", maxlen=8)
        assert redis_client.xlen(keys.dead_letter) <= 8 + 4
    finally:
        redis_client.config_set("stream-node-max-entries", 100)


# ------------------------------------------------------------- prompt privacy

SENTINEL = "Zyqxvorpal-Sentinel-7731"


def aurora(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as sink:
        command = [sys.executable, "-P", "-m", "aurora", "--log-level", "DEBUG", *args]
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)


def redis_text(client: redis.Redis, keys: protocol.Keys) -> str:
    """Everything in the Speculator's Redis keys except the trace stream (token ids by
    design), as text."""
    parts = []
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        if key.decode() == keys.traces:
            continue
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key))
        elif kind == "hash":
            parts += [b"%s=%s" % item for item in client.hgetall(key).items()]
        elif kind == "stream":
            parts += [repr(fields).encode() for _, fields in client.xrange(key)]
    return b"\n".join(p for p in parts if p).decode(errors="replace")


@pytest.mark.integration
@pytest.mark.slow
def test_prompt_text_never_appears_in_logs_or_redis_outside_the_trace_stream(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str
) -> None:
    # Given a server and a trainer logging at DEBUG
    keys = protocol.Keys("default", "privacy")
    port, speculator = free_port(), f"{keys.namespace}/{keys.name}"
    server_log, trainer_log = tmp_path / "serve.log", tmp_path / "train.log"
    server = aurora(
        "serve", "--port", str(port), "--threads", "1", "--redis-url", redis_url,
        "--speculator", speculator, "--draft", "ngram", log=server_log,
    )  # fmt: skip
    trainer = aurora(
        "train", "--speculator", speculator, "--redis-url", redis_url, "--checkpoint-dir",
        str(tmp_path / "checkpoints"), "--draft-vocab", "512", "--threads", "1",
        "--checkpoint-every", "1", "--max-steps", "3", log=trainer_log,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:

            def ready() -> bool:
                assert server.poll() is None, server_log.read_text()[-2000:]
                try:
                    return http.get("/ready").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, "the server", timeout=300)
            # When requests carry the sentinel in prompts, messages, stop strings and
            # in fields the server refuses
            prompt = f"Summarise the memo {SENTINEL} for the board:"
            for i in range(4):
                body = {"text": prompt, "sampling_params": {"max_new_tokens": 3 + i}}
                assert http.post("/generate", json=body).status_code == 200
                body = {"prompt": prompt, "max_tokens": 3, "stop": [SENTINEL], "seed": i}
                assert http.post("/v1/completions", json=body).status_code == 200
                chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
                assert http.post("/v1/chat/completions", json=chat).status_code == 200
            for refused in (
                {"prompt": prompt, "temperature": SENTINEL},
                {"prompt": [SENTINEL]},
                {"prompt": prompt, "max_tokens": 10**6},
                {"prompt": prompt, "logit_bias": {SENTINEL: 1}},
            ):
                assert http.post("/v1/completions", json=refused).status_code == 400
            # and the trainer learns from their traces until it stops
            assert trainer.wait(600) == 0, trainer_log.read_text()[-2000:]
    finally:
        for process in (server, trainer):
            if process.poll() is None:
                process.terminate()
                process.wait(60)
    # Then no log line and no Redis key outside the trace stream holds the prompt text
    logs = server_log.read_text() + trainer_log.read_text()
    assert " DEBUG " in logs  # the most verbose level really was on
    assert redis_client.xlen(keys.traces) >= 12 and redis_client.exists(keys.stats)
    for where, text in (("logs", logs), ("redis", redis_text(redis_client, keys))):
        assert SENTINEL.lower() not in text.lower(), where
        assert "zyqxvorpal" not in text.lower(), where
