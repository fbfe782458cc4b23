"""The e2e tests' handles on what runs: the operator process and the installed system."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local_cluster import ClusterError, LocalCluster
from kubelet import StandInKubelet

from aurora.runtime.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Operator:
    """`aurora operator` as a subprocess, with the kubeconfig of the shipped ServiceAccount."""

    kubeconfig: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    health_port: int = field(default_factory=free_port)

    def start(self) -> Operator:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONSAFEPATH": "1"}
        aurora = str(Path(sys.executable).parent / "aurora")
        command = [aurora, "operator", "--all-namespaces",
                   "--liveness-port", str(self.health_port), "--metrics-port", "0"]  # fmt: skip
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
    """Aurora installed with `kubectl apply -k manifests/` and running."""

    cluster: LocalCluster
    redis: EmbeddedRedis
    operator: Operator
    kubelet: StandInKubelet
    operator_kubeconfig: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, stdin=stdin, check=check)
