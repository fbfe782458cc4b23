"""Tenants on one Redis, against a real redis-server: each Speculator's Redis user (made
by the operator on its managed Redis) reads and writes its own keys through every
protocol call the servers, the trainer and the operator make, and nothing of another
Speculator's (traces hold user prompts); a rollout round and deletion run through the
handlers as that user; rediss:// works with a private CA."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aurora.operator import handlers, redis_access
from aurora.operator.settings import OperatorSettings, RedisSettings
from aurora.runtime import protocol
from aurora.runtime.embedded_redis import EmbeddedRedis
from aurora.runtime.protocol import CandidateRecord, Keys, LoadedReport, RequestStats

pytestmark = pytest.mark.integration

ADMIN = "admin-password-from-the-aurora-redis-secret"
A, B = Keys("team-a", "chat"), Keys("team-b", "search")


@pytest.fixture
def managed() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(password=ADMIN) as server:
        yield server


def tenant(server: EmbeddedRedis, keys: Keys) -> redis.Redis:
    """Provision the Speculator's user as the operator does; connect as its pods do."""
    admin = protocol.connect(f"redis://127.0.0.1:{server.port}/0", ADMIN)
    password = redis_access.tenant_password(ADMIN, keys.namespace, keys.name)
    redis_access.provision(admin, keys.namespace, keys.name, password)
    user = redis_access.tenant_user(keys.namespace, keys.name)
    return protocol.connect(f"redis://{user}@127.0.0.1:{server.port}/0", password)


def stats() -> RequestStats:
    return RequestStats(revision="r1", arm="stable", server="s", decode_tokens_per_s=20.0,
                        accept_length=2.0, new_tokens=8, verify_steps=4, latency_s=0.4)  # fmt: skip


def test_a_tenant_does_all_its_work_on_its_own_keys(managed: EmbeddedRedis) -> None:
    client = tenant(managed, A)
    # what servers do
    protocol.publish_stats(client, A, stats(), maxlen=100)
    protocol.report_loaded(client, A, LoadedReport(server="s-1", stable="r1"))
    # what the trainer does
    record = CandidateRecord(revision="r2", path="/checkpoints/r2", sha256="0" * 64,
                             url="http://chat-trainer.team-a.svc:9200/revisions/r2",
                             step=1, traces_seen=4)  # fmt: skip
    protocol.offer_candidate(client, A, record)
    # what the operator's rounds do
    assert [r.revision for r in protocol.list_candidates(client, A)] == ["r2"]
    assert len(protocol.read_stats(client, A)) == 1
    assert protocol.trace_lag(client, A) == 0
    assert set(protocol.get_loaded(client, A)) == {"s-1"}
    assert protocol.get_candidate(client, A, "r2") == record


def test_a_tenant_cannot_read_write_or_list_another_tenants_keys(managed: EmbeddedRedis) -> None:
    a, b = tenant(managed, A), tenant(managed, B)
    protocol.publish_stats(b, B, stats(), maxlen=100)
    b.xadd(B.traces, {"trace": b"a prompt of team-b"})
    for attempt in (
        lambda: a.xrange(B.traces),
        lambda: a.xlen(B.stats),
        lambda: a.get(B.desired),
        lambda: a.hgetall(B.candidates),
        lambda: a.xadd(B.traces, {"trace": b"forged"}),
        lambda: a.delete(B.traces),
        lambda: a.keys("*"),  # key names of others are not for it either
        lambda: a.scan(0),
        lambda: a.flushall(),
        lambda: a.config_get("requirepass"),
        lambda: a.execute_command("ACL", "LIST"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert b.xlen(B.traces) == 1  # untouched
    # a wrong password, or another tenant's, is refused
    user_b = redis_access.tenant_user(B.namespace, B.name)
    password_a = redis_access.tenant_password(ADMIN, A.namespace, A.name)
    with pytest.raises(redis.AuthenticationError):
        protocol.connect(f"redis://{user_b}@127.0.0.1:{managed.port}/0", password_a).ping()


def test_deprovisioning_removes_the_user(managed: EmbeddedRedis) -> None:
    client = tenant(managed, A)
    assert client.ping()
    admin = protocol.connect(f"redis://127.0.0.1:{managed.port}/0", ADMIN)
    redis_access.deprovision(admin, A.namespace, A.name)
    assert admin.acl_getuser(redis_access.tenant_user(A.namespace, A.name)) is None
    with pytest.raises((redis.AuthenticationError, redis.ConnectionError)):
        client.connection_pool.disconnect()
        client.ping()


def test_the_operator_runs_a_managed_speculator_as_its_own_user(
    managed: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from operator_harness import Events, RecordingCluster, call, operator_memo, speculator

    events = Events().install(monkeypatch)
    url = f"redis://127.0.0.1:{managed.port}/0"
    settings = OperatorSettings(redis=RedisSettings(managed_url=url, admin_password=ADMIN))
    cluster = RecordingCluster()
    memo = operator_memo(cluster, settings)
    body = speculator(traces={"redisUrl": url}, rollout={"intervalSeconds": 1})
    obj, _ = call(handlers.reconcile, body, memo)
    admin = protocol.connect(url, ADMIN)
    assert admin.acl_getuser("aurora.team-a.chat") is not None
    # a rollout round connects as the tenant, not as the admin
    memo.last_round = 0.0
    obj, _ = call(handlers.rollout, obj, memo)
    degraded = {c["type"]: c for c in obj["status"]["conditions"]}["Degraded"]
    assert degraded["status"] == "False", degraded
    users = {entry["user"] for entry in admin.client_list() if entry.get("user")}
    assert "aurora.team-a.chat" in users
    # a Redis restarted without its ACLs gets the user back on the next round
    admin.execute_command("ACL", "DELUSER", "aurora.team-a.chat")
    memo.redis_clients.clear()
    memo.last_round = 0.0
    obj, _ = call(handlers.rollout, obj, memo)
    assert {c["type"]: c for c in obj["status"]["conditions"]}["Degraded"]["status"] == "False"
    # deletion removes the keys (as the admin: a tenant cannot SCAN) and then the user
    protocol.publish_stats(tenant(managed, A), A, stats(), maxlen=10)
    obj["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    call(handlers.cleanup, obj, memo, retry=99)
    assert admin.keys("aurora:team-a:chat:*") == []
    assert admin.acl_getuser("aurora.team-a.chat") is None
    assert "RedisKeysDeleted" in events.reasons()


# ------------------------------------------------------------------------ rediss


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path, managed: EmbeddedRedis) -> Iterator[tuple[int, Path]]:
    """A TLS endpoint in front of the Redis (as a managed Redis service or a TLS-enabled
    redis-server would offer), its certificate signed by a private CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=test-ca", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
             "-subj", "/CN=localhost", cwd=tmp_path)  # fmt: skip
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "ext", "-out", "tls.crt", cwd=tmp_path)  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(source: Any, sink: Any) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.close()

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                secure = context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()
                continue
            backend = socket.create_connection(("127.0.0.1", managed.port))
            threading.Thread(target=pipe, args=(secure, backend), daemon=True).start()
            threading.Thread(target=pipe, args=(backend, secure), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], tmp_path / "ca.crt"
    listener.close()


def test_rediss_with_a_private_ca(
    tls_redis: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, ca = tls_redis
    url = f"rediss://localhost:{port}/0"
    # without the CA the server's certificate is not trusted
    with pytest.raises(redis.ConnectionError):
        protocol.connect(url, ADMIN).ping()
    # with the bundle the pods get (AURORA_REDIS_CA_FILE), it is, and the tenant works
    monkeypatch.setenv("AURORA_REDIS_CA_FILE", str(ca))
    assert protocol.connect(url, ADMIN).ping()
    admin = protocol.connect(url, ADMIN)
    password = redis_access.tenant_password(ADMIN, A.namespace, A.name)
    redis_access.provision(admin, A.namespace, A.name, password)
    client = protocol.connect(f"rediss://aurora.team-a.chat@localhost:{port}/0", password)
    protocol.publish_stats(client, A, stats(), maxlen=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not admin.xlen(A.stats):
        time.sleep(0.1)
    assert admin.xlen(A.stats) == 1
