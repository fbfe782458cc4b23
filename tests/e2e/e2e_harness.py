"""The e2e tests' handles on what runs: the operator replicas (processes, peered as the
shipped Deployment runs them) and the installed system."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cluster.local_cluster import ClusterError, LocalCluster
from kubelet import StandInKubelet

from aurora.runtime.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
PEERING = "aurora"  # the peering name the shipped Deployment uses
PEERING_LIFETIME = 10  # seconds (the shipped Deployment says 15)


@dataclass
class Operator:
    """`aurora operator` as a subprocess, with the kubeconfig of the shipped ServiceAccount,
    peered with the other replicas as the shipped Deployment runs it (POD_ID is its
    peering identity, as the Deployment sets it from the pod's name)."""

    kubeconfig: Path
    log: Path
    identity: str = "aurora-operator-0"
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    health_port: int = field(default_factory=free_port)

    def start(self) -> Operator:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig),
               "PYTHONSAFEPATH": "1", "POD_ID": self.identity}  # fmt: skip
        aurora = str(Path(sys.executable).parent / "aurora")
        command = [aurora, "operator", "--all-namespaces",
                   "--liveness-port", str(self.health_port), "--metrics-port", "0",
                   "--peering", PEERING, "--peering-lifetime", str(PEERING_LIFETIME)]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClusterError(f"the operator exited: {self.log.read_text()[-3000:]}")
            try:
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                with urllib.request.urlopen(url, timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise ClusterError(f"the operator's /healthz never answered; log {self.log}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Installed:
    """Aurora installed with `kubectl apply -k manifests/` and running: two operator
    replicas peered, the managed Redis, the stand-in kubelets."""

    cluster: LocalCluster
    redis: EmbeddedRedis
    operators: list[Operator]
    kubelet: StandInKubelet
    operator_kubeconfig: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, stdin=stdin, check=check)

    def peers(self) -> dict[str, dict[str, object]]:
        """The live entries of the ClusterKopfPeering: identity -> priority, lastseen."""
        found = self.kubectl("get", "clusterkopfpeering", PEERING, "-o", "json", check=False)
        if found.returncode != 0:
            return {}
        now = datetime.now(UTC)
        live = {}
        for identity, peer in (json.loads(found.stdout).get("status") or {}).items():
            seen = datetime.fromisoformat(str(peer["lastseen"]))
            seen = seen if seen.tzinfo else seen.replace(tzinfo=UTC)
            if (now - seen).total_seconds() < float(peer.get("lifetime", 60)):
                live[identity] = peer
        return live

    def leader(self) -> Operator:
        """The replica that reconciles: the live peer with the highest priority."""
        peers = self.peers()
        running = [op for op in self.operators if op.alive and op.identity in peers]
        if not running:
            raise LookupError(f"no live operator replica in the peering object: {peers}")
        return max(running, key=lambda op: int(peers[op.identity]["priority"]))  # type: ignore[call-overload]

    def operator_logs(self) -> str:
        return "".join(op.log.read_text(errors="replace") for op in self.operators)
