"""A real Kubernetes control plane on loopback for the e2e tests: etcd (embedded in a
small Go program), kube-apiserver and kube-controller-manager, all built from Go
modules by build.sh and cached by version.

The API server runs with RBAC authorization, service-account token issuing (keys and
certificates made with openssl), the OwnerReferencesPermissionEnforcement admission
plugin, and an admin client certificate (group system:masters). The controller manager
runs only the garbage collector, the namespace controller and PVC protection: owner
references are honoured as in a real cluster, while the Deployment controller's part (and the
kubelet's) is played by the stand-in kubelet (tests/e2e/kubelet.py).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aurora.runtime.embedded_redis import free_port

BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_CIDR = "10.96.0.0/24"  # ClusterIPs are only allocated, never routed
ISSUER = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The test cluster could not be built or started; the message says where to look."""


def build(log: Path) -> Path:
    """Build (or find cached) binaries with build.sh; returns their folder. The build's
    output goes to `log`."""
    with log.open("w") as out:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=out, text=True
        )
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise ClusterError(f"{BUILD_SCRIPT} failed (exit {done.returncode}); log {log}:\n{tail}")
    folder = Path(done.stdout.strip().splitlines()[-1])
    missing = [name for name in BINARIES if not (folder / name).is_file()]
    if missing:
        raise ClusterError(f"{BUILD_SCRIPT} left no {', '.join(missing)} in {folder}")
    return folder


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _sign(pki: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate for `name`, signed by the test CA in `pki`."""
    (pki / f"{name}.ext").write_text(extensions + "\n")
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "7", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=pki,
    )  # fmt: skip


def make_pki(pki: Path) -> None:
    """CA, API server serving certificate (127.0.0.1), admin client certificate
    (system:masters) and the service-account signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "7", "-subj", "/CN=aurora-e2e-ca", cwd=pki,
    )  # fmt: skip
    _sign(
        pki, "apiserver", "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth",
    )  # fmt: skip
    _sign(pki, "admin", "/O=system:masters/CN=aurora-e2e-admin", "extendedKeyUsage=clientAuth")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str]) -> Path:
    """A kubeconfig with one context: `server`, trusted through `ca`, as `user` (a
    kubeconfig user entry: a token or client certificate data)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "e2e", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "user"}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class Process:
    """A control-plane process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = "".join(self.log.read_text(errors="replace").splitlines(True)[-30:])
            raise ClusterError(f"{self.name} exited ({self.popen.returncode}); {self.log}:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


@dataclass
class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager under `root` (data, certificates,
    kubeconfigs, logs). `start()` returns once /readyz answers ok; `stop()` ends them."""

    bin: Path
    root: Path
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (group system:masters)."""
        return self.root / "admin.kubeconfig"

    def _spawn(self, name: str, args: Sequence[str]) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [str(self.bin / name), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 120.0) -> LocalCluster:
        make_pki(self.pki)
        write_kubeconfig(
            self.kubeconfig, self.server, self.pki / "ca.crt",
            {"client-certificate-data": _b64(self.pki / "admin.crt"),
             "client-key-data": _b64(self.pki / "admin.key")},
        )  # fmt: skip
        etcd_url = f"http://127.0.0.1:{free_port()}"
        etcd = self._spawn(
            "etcd",
            [f"--data-dir={self.root / 'etcd'}", f"--listen-client-url={etcd_url}",
             f"--listen-peer-url=http://127.0.0.1:{free_port()}"],
        )  # fmt: skip
        pki = self.pki
        apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.root / 'apiserver'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                # The kubernetes Service endpoint may not be a loopback address; nothing
                # in the tests reaches the API server through it.
                "--endpoint-reconciler-type=none",
            ],
        )  # fmt: skip
        self._wait_ready(timeout, [etcd, apiserver])
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                # Owner references, namespace deletion and the PVC protection finalizer
                # (which the API server adds to every claim) behave as in a real cluster;
                # the Deployment and ReplicaSet controllers would fight the stand-in kubelet.
                "--controllers=garbage-collector-controller,namespace-controller,"
                "persistentvolumeclaim-protection-controller",
                "--leader-elect=false",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
            ],
        )  # fmt: skip
        return self

    def _wait_ready(self, timeout: float, processes: Sequence[Process]) -> None:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for process in processes:
                process.check_alive()
            try:
                with urllib.request.urlopen(
                    f"{self.server}/readyz", context=context, timeout=5
                ) as response:
                    if response.status == 200:
                        return
            except OSError as error:
                last = str(error)
            time.sleep(0.5)
        raise ClusterError(
            f"kube-apiserver not ready after {timeout:.0f}s ({last}); logs in {self.root / 'logs'}"
        )

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        shutil.rmtree(self.root / "etcd", ignore_errors=True)

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as a user would (the admin unless `kubeconfig` says otherwise)."""
        command = [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        done = subprocess.run(
            [*command, *args], input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig holding a token for ServiceAccount `namespace/name`
        (`kubectl create token`), as the pod of that ServiceAccount would hold one."""
        token = self.kubectl(
            "create", "token", name, "-n", namespace, "--duration=2h"
        ).stdout.strip()
        return write_kubeconfig(path, self.server, self.pki / "ca.crt", {"token": token})
