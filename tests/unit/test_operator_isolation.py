"""No confused deputy, isolated tenants: which Redis a Speculator may use is the
operator's decision (its allowlist and its managed Redis), each Speculator on the
managed Redis gets its own Redis user, and its pods get NetworkPolicies (ingress and
egress). Pure functions and the handlers with the cluster edge in memory; real Redis
ACLs are in tests/integration/test_redis_tenants.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from operator_harness import Events, RecordingCluster, call, operator_memo, speculator

from aurora.operator import handlers, redis_access
from aurora.operator.children import desired_children
from aurora.operator.network import network_policies
from aurora.operator.settings import OperatorSettings, RedisSettings
from aurora.operator.spec import SpeculatorSpec
from aurora.runtime.protocol import Keys
from aurora.runtime.rollout import loop

pytestmark = pytest.mark.unit

MANAGED_URL = "redis://aurora-redis.aurora-system.svc:6379/0"
SETTINGS = RedisSettings(
    managed_url=MANAGED_URL, admin_password="admin-secret", allowlist=("redis.shared.svc:6380",)
)


def spec(**traces: Any) -> SpeculatorSpec:
    return SpeculatorSpec.model_validate({"target": {"model": "m"}, "traces": traces})


# ------------------------------------------------------------------ the allowlist


@pytest.mark.parametrize(
    "traces",
    [
        {"redisUrl": MANAGED_URL},
        {"redisUrl": "redis://AURORA-REDIS.aurora-system.svc/3"},  # default port, any DB
        {"redisUrl": "rediss://redis.shared.svc:6380/0",
         "passwordSecretRef": {"name": "shared-redis"}},
    ],
)  # fmt: skip
def test_the_managed_redis_and_allowlisted_endpoints_are_allowed(traces: dict[str, Any]) -> None:
    assert redis_access.refusal(spec(**traces), SETTINGS) is None


def test_an_endpoint_the_author_picked_is_refused_naming_what_is_allowed() -> None:
    # given a Speculator that would send its namespace's Secret to a host its author runs
    evil = spec(redisUrl="redis://collector.evil.example:6379/0", passwordSecretRef={"name": "db"})
    # then the operator refuses it, saying where it may point and who can change that
    message = redis_access.refusal(evil, SETTINGS)
    assert message is not None
    assert "collector.evil.example:6379" in message
    assert "aurora-redis.aurora-system.svc:6379, redis.shared.svc:6380" in message
    assert "AURORA_REDIS_ALLOWLIST" in message
    # a glob in the allowlist matches whole host:port strings, not prefixes
    globbed = RedisSettings(allowlist=("*.redis.example.com:6380",))
    assert redis_access.refusal(spec(redisUrl="redis://a.redis.example.com:6380"), globbed) is None
    assert redis_access.refusal(spec(redisUrl="redis://a.redis.example.com:6379"), globbed)
    assert "none configured" in (redis_access.refusal(evil, RedisSettings()) or "")


def test_on_the_managed_redis_a_password_secret_or_a_user_is_refused() -> None:
    with_secret = spec(redisUrl=MANAGED_URL, passwordSecretRef={"name": "aurora-redis"})
    assert "passwordSecretRef is not used" in (redis_access.refusal(with_secret, SETTINGS) or "")
    with_user = spec(redisUrl="redis://admin@aurora-redis.aurora-system.svc:6379/0")
    assert "names a user" in (redis_access.refusal(with_user, SETTINGS) or "")


def test_each_speculator_gets_its_own_redis_user_with_a_derived_password() -> None:
    a = redis_access.plan(spec(), "team-a", "chat", SETTINGS)
    b = redis_access.plan(spec(), "team-b", "chat", SETTINGS)
    again = redis_access.plan(spec(), "team-a", "chat", SETTINGS)
    assert a.managed and a.user == "aurora.team-a.chat"
    assert a.url == "redis://aurora.team-a.chat@aurora-redis.aurora-system.svc:6379/0"
    assert a.password == again.password and a.password != b.password  # stable, per tenant
    assert a.password and len(a.password) == 64 and "admin-secret" not in a.password
    rotated = redis_access.plan(
        spec(), "team-a", "chat", RedisSettings(managed_url=MANAGED_URL, admin_password="new")
    )
    # A new admin password gives a new Secret (created, never overwritten): pods roll.
    assert rotated.secret_name != a.secret_name and a.secret_name.startswith("chat-redis-")


def test_the_acl_allows_only_the_speculators_keys_and_never_carries_the_password() -> None:
    rules = redis_access.acl_rules(Keys("team-a", "chat"), "pw-123")
    assert "~aurora:team-a:chat:*" in rules
    assert not [r for r in rules if r.startswith("~") and r != "~aurora:team-a:chat:*"]
    assert rules[:2] == ["reset", "on"] and "resetchannels" in rules
    assert not any("pw-123" in rule for rule in rules)
    assert {"-scan", "-keys", "-@admin", "-@dangerous"} <= set(rules)


def test_the_managed_users_secret_reaches_pods_only_by_reference() -> None:
    body = speculator(traces={"redisUrl": MANAGED_URL})
    children = desired_children(body, OperatorSettings(redis=SETTINGS))
    (secret,) = [c for c in children if c["kind"] == "Secret"]
    access = redis_access.plan(spec(), "team-a", "chat", SETTINGS)
    assert secret["stringData"] == {"username": "aurora.team-a.chat", "password": access.password}
    assert secret["metadata"]["labels"][redis_access.CREDENTIALS_LABEL] == "true"
    for deployment in [c for c in children if c["kind"] == "Deployment"]:
        pod = deployment["spec"]["template"]["spec"]
        text = repr(pod)
        assert access.password not in text  # only the Secret holds it
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["AURORA_REDIS_PASSWORD"] == {
            "name": "AURORA_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "password"}},
        }


# ---------------------------------------------------------------- network policies


def policies(**spec_fields: Any) -> dict[str, dict[str, Any]]:
    model = SpeculatorSpec.model_validate({"target": {"model": "m"}, **spec_fields})
    owner = {"kind": "Speculator", "name": "chat", "uid": "u"}
    return {p["metadata"]["name"]: p["spec"] for p in network_policies(model, "ns", "chat", owner)}


def test_servers_take_requests_and_reach_only_dns_redis_and_their_trainer() -> None:
    server = policies()["chat-server"]
    assert server["policyTypes"] == ["Ingress", "Egress"]
    assert server["podSelector"]["matchLabels"] == {
        "aurora.dev/speculator": "chat", "app.kubernetes.io/component": "server",
    }  # fmt: skip
    assert server["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert server["egress"] == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        {"ports": [{"port": 6379, "protocol": "TCP"}]},
        {"to": [{"podSelector": {"matchLabels": {
            "aurora.dev/speculator": "chat", "app.kubernetes.io/component": "trainer"}}}],
         "ports": [{"port": 9200, "protocol": "TCP"}]},
    ]  # fmt: skip


def test_the_trainers_checkpoints_reach_only_this_speculators_servers() -> None:
    trainer = policies()["chat-trainer"]
    assert trainer["ingress"] == [
        {"ports": [{"port": 9100, "protocol": "TCP"}]},  # metrics, for Prometheus
        {"from": [{"podSelector": {"matchLabels": {
            "aurora.dev/speculator": "chat", "app.kubernetes.io/component": "server"}}}],
         "ports": [{"port": 9200, "protocol": "TCP"}]},
    ]  # fmt: skip
    assert trainer["egress"][:2] == policies()["chat-server"]["egress"][:2]  # DNS, Redis only


def test_network_settings_add_clients_and_egress_and_can_turn_policies_off() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    hub = {"ports": [{"port": 443, "protocol": "TCP"}]}
    shaped = policies(
        network={"ingressFrom": peers, "extraEgress": [hub]},
        traces={"redisUrl": "rediss://redis.shared.svc:6380/0"},
        draft={"initial": "/drafts/d", "fetch": {"url": "http://files.local:8081/d.tgz",
                                                 "sha256": "a" * 64}},
    )  # fmt: skip
    server = shaped["chat-server"]
    assert server["ingress"][0]["from"] == peers
    ports = [rule["ports"][0]["port"] for rule in server["egress"] if "to" not in rule]
    assert ports == [53, 6380, 8081, 443]  # DNS, Redis, the day-0 draft's host, extra
    assert policies(network={"policies": False}) == {}
    shared = policies(storage={"mode": "SharedVolume", "accessMode": "ReadWriteMany"})
    assert not [rule for rule in shared["chat-server"]["egress"] if "to" in rule]


# ------------------------------------------------------ the handlers: refused early


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    return Events().install(monkeypatch)


def test_a_redis_outside_the_allowlist_is_refused_before_any_secret_or_connection(
    events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the operator's settings: a managed Redis, nothing else allowed
    cluster = RecordingCluster(secrets={("team-a", "db"): {"password": "the-db-password"}})
    memo = operator_memo(cluster, OperatorSettings(redis=SETTINGS))
    reads: list[tuple[str, str]] = []
    monkeypatch.setattr(cluster, "secret_value", lambda ns, n, k: reads.append((ns, n)) or "x")

    def no_connection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the operator connected to {args}")

    monkeypatch.setattr(loop, "connect", no_connection)
    # when a Speculator points at a host its author picked, with a Secret of the namespace
    evil = speculator(traces={"redisUrl": "redis://collector.evil.example:6379/0",
                              "passwordSecretRef": {"name": "db"}})  # fmt: skip
    after, _ = call(handlers.reconcile, evil, memo)
    ticked, _ = call(handlers.rollout, after, memo)
    # then it is refused with a clear condition, once, and nothing was applied, read or sent
    conditions = {c["type"]: (c["status"], c["reason"]) for c in ticked["status"]["conditions"]}
    assert conditions["Ready"] == ("False", "RedisNotAllowed")
    assert conditions["Degraded"] == ("True", "RedisNotAllowed")
    assert "collector.evil.example:6379" in ticked["status"]["conditions"][0]["message"]
    assert events.reasons() == ["RedisNotAllowed"]
    assert cluster.applied == [] and reads == []
    # and deleting it never connects either
    ticked["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    call(handlers.cleanup, ticked, memo, retry=0)
    assert events.reasons() == ["RedisNotAllowed", "RedisKeysLeft"]
    failed = memo.metrics.registry.get_sample_value(
        "aurora_operator_reconcile_errors_total",
        {"handler": "reconcile", "reason": "RedisNotAllowed"},
    )
    assert failed == 1  # counted as a failed reconcile, by reason


def test_a_managed_speculator_gets_its_secret_created_once_and_never_read(
    events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = RecordingCluster()
    memo = operator_memo(cluster, OperatorSettings(redis=SETTINGS))
    provisioned: list[tuple[str, str]] = []
    monkeypatch.setattr(
        redis_access, "provision", lambda admin, ns, name, pw: provisioned.append((ns, name))
    )
    monkeypatch.setattr(loop, "connect", lambda url, password: object())
    body = speculator(traces={"redisUrl": MANAGED_URL})
    after, _ = call(handlers.reconcile, body, memo)
    again, _ = call(handlers.reconcile, copy.deepcopy(after), memo)
    secrets = [key for key in cluster.applied if key[0] == "Secret"]
    assert len(secrets) == 2 and len(set(secrets)) == 1  # created, then left as it is
    assert provisioned == [("team-a", "chat"), ("team-a", "chat")]
    assert {c["type"]: c["reason"] for c in again["status"]["conditions"]}["Ready"] == "Serving"
    assert again["status"]["selector"] == (
        "aurora.dev/speculator=chat,app.kubernetes.io/component=server"
    )
