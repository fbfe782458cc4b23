"""e2e fixtures: a real control plane built from Go modules (tests/e2e/cluster), Aurora
installed into it with `kubectl apply -k manifests/`, a real Redis with the password of
the shipped Secret, the operator as a subprocess under the shipped ServiceAccount, and
the stand-in kubelet (tests/e2e/kubelet.py) running the operator's Deployments.

The binaries are built (or found in the cache) once per session, before the first test,
so the build never counts against a test's timeout. Without Go the e2e tests skip with
a loud message, except under CI=true, where they fail."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.local_cluster import ClusterError, LocalCluster, build
from e2e_harness import ROOT, Installed, Operator
from kubelet import Node, StandInKubelet

from aurora.paths import aurora_home
from aurora.runtime.embedded_redis import EmbeddedRedis

OPERATOR_NAMESPACE = "aurora-system"
OPERATOR_ACCOUNT = "aurora-operator"
# Two stand-in nodes: the e2e Speculator's servers go to one, its trainer to the other.
NODES = [
    Node("node-a", {"kubernetes.io/hostname": "node-a", "pool": "serving"}),
    Node("node-b", {"kubernetes.io/hostname": "node-b", "pool": "training"}),
]
NO_GO = (
    "E2E TESTS NOT RUN: `go` is not on PATH, so no kube-apiserver can be built. Install Go "
    ">= 1.26 (the first run builds k8s.io/kubernetes and etcd from Go modules, cached under "
    "$AURORA_HOME/e2e); under CI=true this is a failure."
)
_BINARIES = pytest.StashKey[Path | str]()  # the binaries' folder, or why there is none
_TOOLS = pytest.StashKey[Path | str]()  # helm and kubeconform's folder, or why there is none
TOOLS_SCRIPT = Path(__file__).resolve().parent / "tools" / "build.sh"
_RUN_ROOT = pytest.StashKey[Path]()  # this run's files: data, logs, pod folders


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the cluster binaries before any e2e test runs (a cold build takes long)."""
    if not any(item.get_closest_marker("e2e") for item in session.items):
        return
    if shutil.which("go") is None:
        session.config.stash[_BINARIES] = NO_GO
        return
    home = aurora_home() / "e2e"
    home.mkdir(parents=True, exist_ok=True)
    log = home / "build.log"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"e2e: building or finding the test cluster binaries (log: {log})")
    started = time.monotonic()
    try:
        folder: Path | str = build(log)
    except ClusterError as error:
        folder = f"building the e2e cluster failed: {error}"
    if reporter is not None:
        reporter.write_line(f"e2e: cluster binaries ready in {time.monotonic() - started:.0f}s")
    session.config.stash[_BINARIES] = folder
    if any(item.get_closest_marker("packaging") for item in session.items):
        session.config.stash[_TOOLS] = _build_tools(home / "tools-build.log", reporter)


def _build_tools(log: Path, reporter: pytest.TerminalReporter | None) -> Path | str:
    """helm and kubeconform from the Go module proxy (tests/e2e/tools/build.sh), cached."""
    if reporter is not None:
        reporter.write_line(f"e2e: building or finding helm and kubeconform (log: {log})")
    with log.open("w") as out:
        done = subprocess.run(["bash", str(TOOLS_SCRIPT)], stdout=subprocess.PIPE, stderr=out,
                              text=True)  # fmt: skip
    if done.returncode != 0:
        return f"building helm and kubeconform failed (exit {done.returncode}); log {log}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tools(request: pytest.FixtureRequest) -> Path:
    """The folder with helm and kubeconform (and crds/ beside it)."""
    folder = request.config.stash.get(_TOOLS, NO_GO if shutil.which("go") is None else "")
    if isinstance(folder, str):
        if folder == NO_GO and not _in_ci():
            pytest.skip(NO_GO)
        pytest.fail(folder or "the packaging tools were not built", pytrace=False)
    return folder


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Keep the run's logs when something failed, else remove them."""
    root = session.config.stash.get(_RUN_ROOT, None)
    if root is None:
        return
    if session.testsfailed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"e2e: logs of this run kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if terminalreporter.config.stash.get(_BINARIES, None) == NO_GO:
        bar = "!" * 88
        terminalreporter.write_line(f"{bar}\n{NO_GO}\n{bar}", red=True, bold=True)


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """etcd, kube-apiserver (RBAC, service-account tokens) and kube-controller-manager
    (garbage collector, namespaces) on loopback; `cluster.kubectl(...)` is the admin."""
    binaries = request.config.stash.get(_BINARIES, NO_GO)
    if isinstance(binaries, str):
        if binaries == NO_GO and not _in_ci():
            pytest.skip(NO_GO)
        pytest.fail(binaries, pytrace=False)
    # Not under pytest's basetemp: other pytest runs on the machine prune that.
    root = Path(tempfile.mkdtemp(prefix="aurora-e2e-"))
    local = LocalCluster(binaries, root / "cluster")
    request.config.stash[_RUN_ROOT] = root
    try:
        yield local.start()
    finally:
        local.stop()


@pytest.fixture(scope="session")
def installed(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installed]:
    """`kubectl apply -k manifests/`; Redis started with the password of the Secret it
    ships; two operator replicas (peered) under the ServiceAccount's token, with the
    managed Redis as the shipped Deployment names it; the stand-in kubelets."""
    cluster.kubectl("apply", "-k", str(ROOT / "manifests"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/speculators.aurora.dev", "--timeout=60s"
    )
    encoded = cluster.kubectl(
        "get", "secret", "aurora-redis", "-n", OPERATOR_NAMESPACE, "-o", "jsonpath={.data.password}"
    ).stdout
    redis = EmbeddedRedis(password=base64.b64decode(encoded).decode()).start()
    work = cluster.root.parent / "aurora"
    work.mkdir()
    kubeconfig = cluster.service_account_kubeconfig(
        OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, work / "operator.kubeconfig"
    )
    # What the shipped Deployment gives the operator: the managed Redis (here on loopback)
    # and its admin password from the aurora-redis Secret; nothing else is allowed.
    managed = {
        "AURORA_MANAGED_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "AURORA_MANAGED_REDIS_PASSWORD": redis.password or "",
        "AURORA_REDIS_ALLOWLIST": "",
    }
    operators = [
        Operator(kubeconfig, work / f"operator-{i}.log", identity=f"aurora-operator-{i}",
                 env=managed).start()
        for i in range(2)
    ]  # fmt: skip
    venv_bin = str(Path(sys.executable).parent)
    kubelet = StandInKubelet(
        cluster.kubeconfig,
        work / "kubelet",
        nodes=NODES,
        image_env={
            # What the runtime image provides: its Python, the baked-in model under
            # AURORA_HOME, and (like a CPU limit of 1) one thread per process.
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "AURORA_HOME": str(aurora_home()),
            "PYTHONSAFEPATH": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        },
    ).start()
    try:
        yield Installed(cluster, redis, operators, kubelet, kubeconfig)
    finally:
        for operator in operators:
            operator.stop()
        kubelet.stop()
        redis.close()
