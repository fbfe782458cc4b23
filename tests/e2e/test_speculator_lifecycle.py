"""A Speculator's life on a real Kubernetes API server, driven with kubectl as a user
would: install, children, Ready, printer columns, a candidate promoted by measured
speedup, a regressing one rolled back, the leading operator replica killed mid-rollout,
a spec change rolled out, a revision the real trainer trained served, `kubectl scale`
and an autoscaler's choice kept, the other replica taking over within 30 s, invalid
resources refused or flagged, a Redis outside the allowlist refused, tenants' Redis
users isolated, deletion removing the children.

The tests run in file order and share one Speculator (starting its server and trainer
costs most of the run). Its servers and its trainer run on different stand-in nodes
and share no volume: servers download each revision from the trainer over HTTP (through
the trainer's Service) and check its sha256 before loading it. Candidates are real
checkpoints on the trainer's volume that the real servers fetch and load; the request
statistics that decide them are published into the stats stream, as servers would, so
the verdicts do not hang on CPU timing noise."""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from e2e_harness import ROOT, Installed

from aurora.runtime import protocol
from aurora.runtime.checkpoint import load_checkpoint, new_revision_id, save_checkpoint
from aurora.runtime.protocol import Keys, RequestStats

pytestmark = pytest.mark.e2e

NAME, NAMESPACE = "smollm2-cpu", "default"
KEYS = Keys(NAMESPACE, NAME)
EXAMPLE = ROOT / "manifests" / "examples" / "speculator-torch-cpu.yaml"
SERVER, TRAINER = f"{NAME}-server", f"{NAME}-trainer"
CHILDREN = {
    ("Deployment", SERVER), ("Deployment", TRAINER), ("Service", NAME),
    ("Service", TRAINER), ("ConfigMap", f"{NAME}-config"),
    ("PersistentVolumeClaim", f"{NAME}-checkpoints"), ("PodDisruptionBudget", SERVER),
    ("NetworkPolicy", SERVER), ("NetworkPolicy", TRAINER),
}  # fmt: skip
STARTUP = 420.0  # a torch server and trainer loading the model on two shared cores
TRAINER_URL = f"http://{NAME}-trainer.{NAMESPACE}.svc:9200"  # where servers fetch revisions
OFFERED: set[str] = set()  # revisions this test wrote (the trainer's own are the others)


# ------------------------------------------------------------------------ helpers


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def get(env: Installed, name: str = NAME) -> dict[str, Any]:
    return json.loads(env.kubectl("get", "speculator", name, "-n", NAMESPACE, "-o", "json").stdout)


def status(env: Installed, name: str = NAME) -> dict[str, Any]:
    return get(env, name).get("status") or {}


def conditions(env: Installed, name: str = NAME) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status(env, name).get("conditions", [])}


def events(env: Installed, name: str = NAME) -> list[tuple[str, str, str, int]]:
    """(type, reason, message, count) of the Events about Speculator `name`, oldest first."""
    listed = json.loads(
        env.kubectl(
            "get", "events", "-n", NAMESPACE, "-o", "json",
            "--field-selector", f"involvedObject.kind=Speculator,involvedObject.name={name}",
        ).stdout
    )["items"]  # fmt: skip
    listed.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return [(e["type"], e["reason"], e.get("message", ""), e.get("count") or 1) for e in listed]


def reasons(env: Installed, name: str = NAME) -> list[str]:
    return [reason for _, reason, _, _ in events(env, name)]


def children(env: Installed, name: str = NAME) -> list[dict[str, Any]]:
    listed = env.kubectl(
        "get", "deployments,services,configmaps,persistentvolumeclaims,poddisruptionbudgets,"
        "networkpolicies", "-n", NAMESPACE, "-l", f"aurora.dev/speculator={name}", "-o", "json",
    ).stdout  # fmt: skip
    return list(json.loads(listed)["items"])


def redis_secret(env: Installed, name: str = NAME) -> dict[str, Any]:
    """The Secret the operator created with the Speculator's own Redis user (as an admin
    reads it: the operator itself cannot)."""
    listed = env.kubectl(
        "get", "secrets", "-n", NAMESPACE, "-l", f"aurora.dev/speculator={name}", "-o", "json"
    ).stdout
    (secret,) = json.loads(listed)["items"]
    return dict(secret)


def redis_client(env: Installed) -> redis.Redis:
    return redis.Redis.from_url(env.redis.url)


def example(env: Installed) -> dict[str, Any]:
    """The shipped example, pointed at this cluster's managed Redis (reachable on loopback
    from the operator and the pods alike), kept small (one torch thread, a quick policy),
    with its servers on one stand-in node and its trainer on the other."""
    spx = yaml.safe_load(EXAMPLE.read_text())
    spec = spx["spec"]
    spec["traces"]["redisUrl"] = f"redis://127.0.0.1:{env.redis.port}/0"
    spec["engine"]["extraArgs"] = ["--threads", "1", "--max-new-tokens-limit", "32"]
    spec["engine"]["nodeSelector"] = {"pool": "serving"}
    spec["training"]["nodeSelector"] = {"pool": "training"}
    spec["rollout"].update(
        minSamples=20, maxCanarySamples=200, intervalSeconds=1, rollbackBackoffSeconds=5
    )
    return spx


def apply(env: Installed, obj: dict[str, Any], check: bool = True) -> Any:
    return env.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(obj), check=check)


def traffic(env: Installed, revision: str, arm: str, n: int, tokens_per_s: float) -> None:
    """`n` finished requests as servers publish them to the stats stream."""
    client, rng = redis_client(env), random.Random(f"{revision}:{arm}:{tokens_per_s}")
    for _ in range(n):
        protocol.publish_stats(
            client, KEYS,
            RequestStats(revision=revision, arm=arm, server="e2e-traffic",
                         decode_tokens_per_s=rng.gauss(tokens_per_s, 0.5), accept_length=2.5,
                         new_tokens=64, verify_steps=25, latency_s=1.0),
            maxlen=10_000,
        )  # fmt: skip


@pytest.fixture(scope="module")
def draft_heads() -> Callable[[Path, int], str]:
    """Writes a real draft checkpoint for the default model (as the trainer would) and
    returns its revision."""
    import torch

    from aurora.runtime.draft import DraftConfig, EagleDraftHead
    from aurora.runtime.models import load_target

    torch.set_num_threads(1)
    target, _ = load_target("smollm2-135m")
    config = DraftConfig.for_target(target.config, "smollm2-135m")

    def save(volume: Path, seed: int) -> str:
        torch.manual_seed(seed)
        head = EagleDraftHead(config, target.get_input_embeddings())
        revision = new_revision_id(seed)
        save_checkpoint(
            volume, revision, head.state_dict(), parent=None, step=seed, traces_seen=0,
            evaluation={}, draft_config=config.to_dict(),
        )  # fmt: skip
        return revision

    return save


def offer(env: Installed, draft_heads: Callable[[Path, int], str], seed: int) -> str:
    """A checkpoint on the trainer's volume and its candidate record in Redis, as the
    trainer writes them: the path in its pod, the URL it serves it at, its sha256."""
    volume = env.kubelet.claim_folder(NAMESPACE, f"{NAME}-checkpoints")
    revision = draft_heads(volume, seed)
    _, meta = load_checkpoint(volume / revision)
    record = meta.to_candidate(f"/checkpoints/{revision}")
    record = record.model_copy(update={"url": f"{TRAINER_URL}/revisions/{revision}"})
    protocol.offer_candidate(redis_client(env), KEYS, record)
    OFFERED.add(revision)
    return revision


def canary(env: Installed, draft_heads: Callable[[Path, int], str], seed: int) -> str:
    """Offer a new candidate and wait until it is on canary; returns its revision."""
    revision = offer(env, draft_heads, seed)
    wait_for(phase_is(env, "Canary", revision), f"a canary of {revision}", 60)
    return revision


def phase_is(env: Installed, phase: str, candidate: str | None = None) -> Callable[[], bool]:
    def check() -> bool:
        now = status(env)
        return now.get("phase") == phase and (
            candidate is None or now.get("candidateRevision") == candidate
        )

    return check


def servers_load(env: Installed, stable: str | None, candidate: str | None) -> Callable[[], bool]:
    """Every live server reports these revisions loaded."""

    def check() -> bool:
        reports = protocol.get_loaded(redis_client(env), KEYS).values()
        fresh = [r for r in reports if time.time() - r.updated < 30]
        return bool(fresh) and all(
            r.stable == stable and r.candidate == candidate and r.error is None for r in fresh
        )

    return check


# -------------------------------------------------------------------------- tests


def test_install_and_a_speculator_become_ready_with_owned_children(installed: Installed) -> None:
    env = installed
    # given Aurora installed with `kubectl apply -k manifests/`, the operator running under
    # the shipped ServiceAccount (its token, bound by the shipped ClusterRole)
    whoami = env.cluster.kubectl("auth", "whoami", kubeconfig=env.operator_kubeconfig).stdout
    assert "system:serviceaccount:aurora-system:aurora-operator" in whoami
    # when a user applies the torch CPU example (nothing to copy: no Redis password)
    apply(env, example(env))

    # then the operator creates every child, each owned by the Speculator
    uid = get(env)["metadata"]["uid"]
    wait_for(lambda: {(c["kind"], c["metadata"]["name"]) for c in children(env)} == CHILDREN,
             f"children {sorted(CHILDREN)}")  # fmt: skip
    for child in [*children(env), redis_secret(env)]:
        owners = child["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["uid"], o.get("controller")) for o in owners] == [
            ("Speculator", uid, True)
        ], child["metadata"]["name"]
    # and its own Redis user's Secret, which the pods read by reference only
    secret = redis_secret(env)
    assert secret["metadata"]["labels"]["aurora.dev/redis-credentials"] == "true"

    # and once the (stand-in) kubelet runs its server, the Speculator is Ready
    wait_for(lambda: conditions(env).get("Ready", ("",))[0] == "True", "Ready=True", STARTUP)
    assert status(env)["observedGeneration"] == get(env)["metadata"]["generation"]
    assert status(env)["servers"] == {"desired": 1, "ready": 1, "updated": 1}
    # and the server and the trainer run on different (stand-in) nodes
    (server,), (trainer,) = (
        env.kubelet.running(NAMESPACE, SERVER),
        env.kubelet.running(NAMESPACE, TRAINER),
    )
    assert (server.node, trainer.node) == ("node-a", "node-b")
    assert server.claims == () and trainer.claims == ((NAMESPACE, f"{NAME}-checkpoints"),)
    # and the server serves completions, tracing them to Redis as its own Redis user
    url = env.kubelet.url(NAMESPACE, SERVER)
    response = httpx.post(f"{url}/v1/completions", timeout=120,
                          json={"prompt": "def add(a, b):", "max_tokens": 6})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]
    wait_for(lambda: redis_client(env).xlen(KEYS.stats) >= 1, "request stats in Redis", 30)


def test_the_trainer_becomes_available(installed: Installed) -> None:
    # The trainer started with the server, which is Ready by now: its probes had time.
    def available() -> bool:
        trainer = json.loads(installed.kubectl("get", "deployment", TRAINER, "-o", "json").stdout)
        return bool(trainer.get("status", {}).get("availableReplicas") == 1)

    wait_for(available, "the trainer available", 60)


def test_kubectl_get_speculators_shows_the_printer_columns(installed: Installed) -> None:
    table = installed.kubectl("get", "speculators", "-n", NAMESPACE).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "ENGINE", "ACTIVE", "ACCEPT", "SPEEDUP", "AGE"]
    assert table[1].split()[:3] == [NAME, "True", "torch"]
    wide = installed.kubectl("get", "spx", NAME, "-n", NAMESPACE, "-o", "wide").stdout
    assert {"CANDIDATE", "PHASE", "LAG"} <= set(wide.splitlines()[0].split())


def test_a_faster_candidate_is_promoted_by_measured_speedup(
    installed: Installed, draft_heads: Callable[[Path, int], str]
) -> None:
    env = installed
    # given the trainer offers a checkpoint: a canary starts and the servers load it
    revision = canary(env, draft_heads, seed=1)
    # (the initial draft, draft.initial: scratch, is the stable one until a promotion)
    wait_for(
        servers_load(env, "scratch", revision), f"servers loading {revision} as candidate", 120
    )
    # when live traffic measures it 1.5x faster than serving without it
    traffic(env, "", "baseline", 40, 20.0)
    traffic(env, revision, "candidate", 40, 30.0)
    # then it is promoted: the servers swap it in and status names it the active revision
    wait_for(lambda: status(env).get("activeRevision") == revision, f"{revision} active", 120)
    now = status(env)
    assert "candidateRevision" not in now
    outcomes = [(r["revision"], r["outcome"]) for r in now["revisionHistory"]]
    assert outcomes[:3] == [(revision, "Promoted"), (revision, "Promoting"), (revision, "Canary")]
    assert float(now["revisionHistory"][1]["speedup"]) > 1.3
    assert servers_load(env, revision, None)()
    # it reached the server without a shared volume: downloaded from the trainer's node
    # into the server's own, after its sha256 was checked
    (server,) = env.kubelet.running(NAMESPACE, SERVER)
    fetched = env.kubelet.root / "nodes" / server.node / "pods" / NAMESPACE / server.name
    assert (fetched / "volumes" / "checkpoints" / revision / ".fetched").read_text().strip() == (
        json.loads((env.kubelet.claim_folder(NAMESPACE, f"{NAME}-checkpoints") / revision
                    / "meta.json").read_text())["sha256"]
    )  # fmt: skip
    moves = [r for r in reasons(env) if r in ("StartCanary", "Promote", "Promoted")]
    assert sorted(moves) == ["Promote", "Promoted", "StartCanary"]  # one Event each
    active = env.kubectl("get", "spx", NAME, "-n", NAMESPACE).stdout.splitlines()[1].split()
    assert active[3] == revision


def test_a_regressing_candidate_is_rolled_back(
    installed: Installed, draft_heads: Callable[[Path, int], str]
) -> None:
    env = installed
    stable = status(env)["activeRevision"]
    # given a new candidate on canary
    revision = canary(env, draft_heads, seed=2)
    # when it measures at half the stable revision's speed
    traffic(env, stable, "stable", 40, 30.0)
    traffic(env, revision, "candidate", 40, 15.0)
    # then it is rolled back (a Warning Event), the stable revision stays, servers drop it
    wait_for(phase_is(env, "Idle"), "the rollback", 60)
    now = status(env)
    assert now["activeRevision"] == stable and "candidateRevision" not in now
    assert (revision, "RolledBack") == (
        now["revisionHistory"][0]["revision"],
        now["revisionHistory"][0]["outcome"],
    )
    assert revision in now["rollout"]["rejected"]
    assert any(
        t == "Warning" and r == "Rollback" and revision in m and "next canary waits 5 s" in m
        for t, r, m, _ in events(env)
    )  # (the back-off after a rollback, from spec.rollout.rollbackBackoffSeconds)
    wait_for(servers_load(env, stable, None), "servers back on stable alone", 60)


def test_the_operator_killed_mid_rollout_resumes_without_duplicates(
    installed: Installed, draft_heads: Callable[[Path, int], str]
) -> None:
    env = installed
    stable = status(env)["activeRevision"]
    revision = canary(env, draft_heads, seed=3)
    # when the leading operator replica is SIGKILLed mid-canary, the deciding traffic
    # arrives meanwhile, and it comes back (as the newest replica, the other's standby)
    leader = env.leader()
    leader.kill()
    traffic(env, revision, "candidate", 40, 40.0)
    traffic(env, stable, "stable", 40, 30.0)
    leader.start()
    # then the other replica resumes the canary from status and promotes it
    wait_for(lambda: status(env).get("activeRevision") == revision, f"{revision} active", 180)
    history = [(r["revision"], r["outcome"]) for r in status(env)["revisionHistory"]]
    assert history.count((revision, "Canary")) == 1, history
    assert history[:3] == [(revision, "Promoted"), (revision, "Promoting"), (revision, "Canary")]
    started = [count for _, r, m, count in events(env) if r == "StartCanary" and revision in m]
    assert started == [1], events(env)
    # and no child was duplicated or recreated
    assert sorted((c["kind"], c["metadata"]["name"]) for c in children(env)) == sorted(CHILDREN)
    assert len(env.kubelet.running(NAMESPACE, SERVER)) == 1


def test_a_spec_change_rolls_out(installed: Installed) -> None:
    env = installed
    generation = get(env)["metadata"]["generation"]
    # when the user changes the draft length
    env.kubectl("patch", "speculator", NAME, "-n", NAMESPACE, "--type=merge",
                "-p", '{"spec": {"engine": {"speculativeSteps": 3}}}')  # fmt: skip
    assert get(env)["metadata"]["generation"] == generation + 1

    # then the server Deployment gets the new command line, its pod is replaced, and
    # status reports the new generation, rolled out and Ready
    def rolled_out() -> bool:
        now = status(env)
        return (
            now.get("observedGeneration") == generation + 1
            and conditions(env).get("Ready", ("",))[0] == "True"
            and conditions(env).get("Progressing", ("", ""))[1] != "RollingOut"
        )

    wait_for(rolled_out, f"generation {generation + 1} rolled out", STARTUP)
    server = json.loads(env.kubectl("get", "deployment", SERVER, "-o", "json").stdout)
    command = server["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--spec-tokens") + 1] == "3"
    assert server["status"]["observedGeneration"] == server["metadata"]["generation"]
    pods = env.kubelet.running(NAMESPACE, SERVER)
    assert len(pods) == 1 and "--spec-tokens" in pods[0].containers[0].argv
    argv = pods[0].containers[0].argv
    assert argv[argv.index("--spec-tokens") + 1] == "3"


def test_a_revision_the_trainer_trained_is_served_with_no_shared_volume(
    installed: Installed,
) -> None:
    env = installed
    # given the trainer (node-b) told to offer a candidate after a few traces, whatever
    # its offline accept length (the default bar would take far more traffic)
    flags = ["--first-candidate-after", "4", "--publish-every", "4",
             "--min-accept-length", "0", "--publish-margin", "-1", "--threads", "1"]  # fmt: skip
    env.kubectl("patch", "speculator", NAME, "-n", NAMESPACE, "--type=merge",
                "-p", json.dumps({"spec": {"training": {"extraArgs": flags}}}))  # fmt: skip

    def trainer_serves() -> bool:
        pods = env.kubelet.running(NAMESPACE, TRAINER)
        return len(pods) == 1 and pods[0].ready and "--publish-margin" in pods[0].containers[0].argv

    wait_for(trainer_serves, "the trainer restarted with the new flags", STARTUP)
    url = env.kubelet.url(NAMESPACE, SERVER)
    prompts = ["def add(a, b):", "def is_even(n):", "class Stack:", "for i in range(10):"]

    def trained() -> str | None:
        """Live traffic until the trainer publishes a candidate of its own."""
        records = protocol.list_candidates(redis_client(env), KEYS)
        mine = [r.revision for r in records if r.revision not in OFFERED]
        if mine:
            return mine[-1]
        prompt = prompts[int(time.time()) % len(prompts)]
        httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 12})  # fmt: skip
        return None

    revision = wait_for(trained, "a candidate the trainer trained on live traces", 900)
    record = protocol.get_candidate(redis_client(env), KEYS, revision)
    assert record is not None and record.url == f"{TRAINER_URL}/revisions/{revision}"
    # then the servers (node-a) download it from the trainer (node-b), check it, and
    # serve it on canary
    stable = status(env)["activeRevision"]
    wait_for(servers_load(env, stable, revision), f"servers serving {revision}", 300)
    (server,), (trainer,) = (
        env.kubelet.running(NAMESPACE, SERVER),
        env.kubelet.running(NAMESPACE, TRAINER),
    )
    assert server.node != trainer.node and server.claims == ()
    folder = env.kubelet.root / "nodes" / server.node / "pods" / NAMESPACE / server.name
    assert (folder / "volumes" / "checkpoints" / revision / ".fetched").read_text().strip() == (
        record.sha256
    )
    # (roll it back by hand so the later tests start from a known state)
    env.kubectl("annotate", "speculator", NAME, "-n", NAMESPACE, "--overwrite",
                f"aurora.dev/override=Rollback:{revision}")  # fmt: skip
    wait_for(phase_is(env, "Idle"), "the trainer's candidate rolled back", 120)


def deployment_replicas(env: Installed, name: str = SERVER) -> int:
    deployment = json.loads(env.kubectl("get", "deployment", name, "-n", NAMESPACE,
                                        "-o", "json").stdout)  # fmt: skip
    return int(deployment["spec"]["replicas"])


def test_kubectl_scale_works_and_an_autoscalers_choice_is_kept(installed: Installed) -> None:
    env = installed
    # when a user scales the Speculator, as they would a Deployment
    env.kubectl("scale", f"spx/{NAME}", "-n", NAMESPACE, "--replicas", "3")
    # then the servers follow, and the scale subresource reports the pods and selector
    wait_for(lambda: deployment_replicas(env) == 3, "3 server replicas", 60)
    wait_for(lambda: len(env.kubelet.running(NAMESPACE, SERVER)) == 3, "3 server pods", 60)
    wait_for(lambda: status(env).get("replicas") == 3, "status.replicas 3", 60)
    scale = json.loads(env.kubectl("get", "--raw",
        f"/apis/aurora.dev/v1alpha1/namespaces/{NAMESPACE}/speculators/{NAME}/scale").stdout)  # fmt: skip
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == (
        f"aurora.dev/speculator={NAME},app.kubernetes.io/component=server"
    )
    # when an autoscaler writes its choice through the scale subresource (as the HPA does)
    env.kubectl("scale", f"spx/{NAME}", "-n", NAMESPACE, "--replicas", "2")
    wait_for(lambda: deployment_replicas(env) == 2, "2 server replicas", 60)
    # then nothing sets it back, not even the operator's periodic re-apply (60 s)
    time.sleep(70)
    assert deployment_replicas(env) == 2
    assert get(env)["spec"]["engine"]["replicas"] == 2
    env.kubectl("scale", f"spx/{NAME}", "-n", NAMESPACE, "--replicas", "1")
    wait_for(lambda: len(env.kubelet.running(NAMESPACE, SERVER)) == 1, "back to 1 server", 120)


def test_killing_the_leading_operator_hands_reconciliation_over_within_30s(
    installed: Installed,
) -> None:
    env = installed
    # given two peered replicas, one leading
    leader = env.leader()
    standby = next(op for op in env.operators if op is not leader)
    assert standby.alive
    # when the leader is killed and a user changes the spec
    leader.kill()
    killed = time.monotonic()
    env.kubectl("patch", "speculator", NAME, "-n", NAMESPACE, "--type=merge",
                "-p", '{"spec": {"rollout": {"minSamples": 25}}}')  # fmt: skip

    def reconciled() -> bool:
        config = json.loads(env.kubectl("get", "configmap", f"{NAME}-config", "-n", NAMESPACE,
                                        "-o", "json").stdout)  # fmt: skip
        return json.loads(config["data"]["speculator.json"])["spec"]["rollout"]["minSamples"] == 25

    # then the other replica reconciles it within 30 s of the kill
    wait_for(reconciled, "the standby replica reconciling the change", 30)
    assert time.monotonic() - killed <= 30
    assert env.leader() is standby
    leader.start()  # back, as the newer replica: it waits
    wait_for(lambda: leader.identity in env.peers(), "the restarted replica peering", 60)
    assert env.leader() is standby


def test_invalid_speculators_are_refused_by_the_schema(installed: Installed) -> None:
    env = installed
    bad_share = example(env)
    bad_share["metadata"]["name"] = "bad-share"
    bad_share["spec"]["rollout"]["canaryShare"] = "1.5"  # openAPI pattern
    refused = apply(env, bad_share, check=False)
    assert refused.returncode != 0 and "spec.rollout.canaryShare" in refused.stderr

    bad_speedup = example(env)
    bad_speedup["metadata"]["name"] = "bad-speedup"
    bad_speedup["spec"]["rollout"]["minSpeedup"] = "0.9"  # CEL rule
    refused = apply(env, bad_speedup, check=False)
    assert refused.returncode != 0
    assert "rollout.minSpeedup must be at least 1.0" in refused.stderr
    listed = env.kubectl("get", "spx", "-n", NAMESPACE, "-o", "name").stdout.split()
    assert listed == [f"speculator.aurora.dev/{NAME}"]


def test_a_speculator_the_schema_admits_but_the_operator_refuses_is_flagged_invalid(
    installed: Installed,
) -> None:
    env = installed
    # given requests above limits: well-formed for the schema, refused by the operator
    bad = example(env)
    bad["metadata"]["name"] = "bad-resources"
    bad["spec"]["engine"]["resources"] = {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}
    apply(env, bad)
    try:
        wait_for(lambda: conditions(env, "bad-resources").get("Ready") == ("False", "InvalidSpec"),
                 "Ready=False InvalidSpec", 60)  # fmt: skip
        assert conditions(env, "bad-resources")["Degraded"] == ("True", "InvalidSpec")
        invalid = [(t, m) for t, r, m, _ in events(env, "bad-resources") if r == "InvalidSpec"]
        assert invalid and invalid[0][0] == "Warning" and "requests.cpu 4 exceeds" in invalid[0][1]
        assert children(env, "bad-resources") == []
    finally:
        env.kubectl("delete", "spx", "bad-resources", "-n", NAMESPACE, "--wait=true")


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP port that records what anyone sends it: the address a Speculator's author
    would like the operator to send a Redis password to."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    received.append(connection.recv(4096) or b"(connected)")
                except OSError:
                    received.append(b"(connected)")

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], received
    server.close()


def test_a_redis_outside_the_allowlist_is_refused_and_no_secret_is_sent(
    installed: Installed, listener: tuple[int, list[bytes]]
) -> None:
    env = installed
    port, received = listener
    # given a Secret in the namespace and a Speculator that names it, pointed elsewhere
    env.kubectl("create", "secret", "generic", "db-password", "-n", NAMESPACE,
                "--from-literal=password=the-database-password")  # fmt: skip
    evil = example(env)
    evil["metadata"]["name"] = "exfiltrate"
    evil["spec"]["traces"].update(
        redisUrl=f"redis://127.0.0.1:{port}/0", passwordSecretRef={"name": "db-password"}
    )
    apply(env, evil)
    try:
        # then it is refused with a clear condition and an Event, and nothing is created
        wait_for(lambda: conditions(env, "exfiltrate").get("Ready") == ("False", "RedisNotAllowed"),
                 "Ready=False RedisNotAllowed", 60)  # fmt: skip
        message = status(env, "exfiltrate")["conditions"][0]["message"]
        assert f"127.0.0.1:{port}" in message and "AURORA_REDIS_ALLOWLIST" in message
        assert "RedisNotAllowed" in reasons(env, "exfiltrate")
        time.sleep(5)  # several timer rounds
        assert children(env, "exfiltrate") == []
        assert received == []  # no connection at all, so no password either
    finally:
        env.kubectl("delete", "spx", "exfiltrate", "-n", NAMESPACE, "--wait=true")
        env.kubectl("delete", "secret", "db-password", "-n", NAMESPACE)
    assert received == []  # deleting it did not connect either


def test_a_speculators_redis_user_cannot_read_another_speculators_keys(
    installed: Installed,
) -> None:
    env = installed
    # given the Redis user and password the operator gave this Speculator's pods
    data = redis_secret(env)["data"]
    user = base64.b64decode(data["username"]).decode()
    password = base64.b64decode(data["password"]).decode()
    assert user == f"aurora.{NAMESPACE}.{NAME}"
    tenant = redis.Redis(host="127.0.0.1", port=env.redis.port, username=user, password=password)
    # and another tenant's traces in the same Redis
    other = Keys("team-b", "chat")
    redis_client(env).xadd(other.traces, {"prompt": b"someone else's prompt"})
    try:
        # then it reads and writes its own keys, and nothing of the other's
        assert tenant.xlen(KEYS.stats) > 0
        for read in (lambda: tenant.xrange(other.traces), lambda: tenant.xlen(other.traces),
                     lambda: tenant.keys("*"), lambda: tenant.scan(0)):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                read()
        with pytest.raises(redis.exceptions.NoPermissionError):
            tenant.delete(other.traces)
    finally:
        redis_client(env).delete(other.traces)


def test_deleting_the_speculator_removes_its_children_and_redis_keys(installed: Installed) -> None:
    env = installed
    assert redis_client(env).keys(f"{KEYS.prefix}:*")
    # when the user deletes it
    env.kubectl("delete", "speculator", NAME, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    # then the operator's finalizer removed its Redis keys, and the garbage collector
    # (kube-controller-manager) removes every owned child, so its processes stop
    assert not redis_client(env).keys(f"{KEYS.prefix}:*")
    assert "RedisKeysDeleted" in reasons(env)
    # and its Redis user (the managed Redis holds no user for a deleted Speculator)
    assert redis_client(env).acl_getuser(f"aurora.{NAMESPACE}.{NAME}") is None
    left: list[str] = []

    def gone() -> bool:
        left[:] = [f"{c['kind']}/{c['metadata']['name']}" for c in children(env)]
        return not left

    try:
        wait_for(gone, "no children left", 120)
    except AssertionError as error:
        raise AssertionError(f"{error}; left: {left}") from None
    wait_for(
        lambda: not env.kubelet.running(NAMESPACE, SERVER)
        and not env.kubelet.running(NAMESPACE, TRAINER),
        "the server and trainer processes stopped", 60,
    )  # fmt: skip


def test_the_operator_never_lacked_a_permission(installed: Installed) -> None:
    # The shipped ClusterRole sufficed: the API server refused the operator nothing.
    log = installed.operator_logs()
    assert "forbidden" not in log.lower(), log[-4000:]
    assert installed.kubelet.errors == []
