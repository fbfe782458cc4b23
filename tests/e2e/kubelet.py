"""TEST SCAFFOLDING: a stand-in for the kubelets of a few nodes (and for the Deployment
controller, the scheduler and kube-proxy) in the e2e tests, where no node, container
runtime or scheduler exists.

For every Deployment the operator created (label app.kubernetes.io/managed-by:
aurora-operator) it runs `spec.replicas` "pods": each container's command as a local
process, with what a kubelet would give it:

- a node: the stand-in nodes (`nodes`, each with labels and its own folder) are picked
  by the pod's nodeSelector, then by fewest pods (spreading), as a scheduler would;
- init containers run one after the other to completion before the containers start;

- the environment: the "image" environment first (`image_env`: where the cached model
  is, the way the runtime image sets AURORA_HOME), then the container's `env` (values,
  secretKeyRef and configMapKeyRef read from the API), and `$(VAR)` references in the
  command expanded from it, as the kubelet does;
- volumes as local folders: one per PersistentVolumeClaim; a ReadWriteOnce(-Pod) claim
  attaches to the node of the first pod that mounts it, and a pod on another node that
  mounts it waits with a Multi-Attach error, as on a real cluster (ReadWriteMany: any
  node). An emptyDir is a fresh folder per pod under its node's folder; a ConfigMap's
  keys are written as files. A process has no mount namespace, so arguments and
  environment values under a mountPath are rewritten to the folder;
- ports: every containerPort gets a free loopback port. A process has no network
  namespace, so the argument after `--port`/`--*-port` naming the containerPort, and
  `--host 0.0.0.0`, are rewritten to it and to 127.0.0.1;
- Services: `http_proxy` points every pod at a stand-in kube-proxy that sends a request
  for http://NAME.NAMESPACE.svc:PORT/... to a ready pod the Service selects, at the
  port its targetPort names (plain HTTP; Redis and probes are reached directly);
- probes: startupProbe and readinessProbe (httpGet) against those ports, once a second;
  a container is ready when its process runs, its startup probe passed and its
  readiness probe (if any) last answered 2xx/3xx. A process that exits is restarted
  (restartPolicy Always).

A template change rolls out like maxSurge 1 / maxUnavailable 0 (new pods start; old ones
stop once the new are ready). Deployment status (replicas, updatedReplicas,
readyReplicas, availableReplicas, observedGeneration, conditions) is written through the
status subresource, as the Deployment controller would.

What it does NOT prove: images, the read-only root file system, security contexts,
resource limits and GPUs, liveness probes, Pod objects, affinity and taints, emptyDir
size limits and network isolation (NetworkPolicies) are not exercised; processes share
the host's loopback and (apart from the folders above) file system. Those need a real
cluster with real nodes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client, config

from aurora.runtime.embedded_redis import free_port

MANAGED_BY = "app.kubernetes.io/managed-by=aurora-operator"
PERIOD = 1.0  # seconds between observations and probes (a kubelet follows periodSeconds)
GRACE = 15.0  # seconds from SIGTERM to SIGKILL (terminationGracePeriodSeconds, capped)
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

log = logging.getLogger(__name__)


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables replaced, unknown left as written,
    $$ escapes a $."""

    def one(match: re.Match[str]) -> str:
        return env.get(match.group(1), match.group(0))

    parts = value.split("$$")
    return "$".join(_VAR.sub(one, part) for part in parts)


def rewrite_path(value: str, mounts: Sequence[tuple[str, Path]]) -> str:
    """`value` with a leading mountPath replaced by its local folder (longest first)."""
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path.rstrip("/")) :]
    return value


def rewrite_args(args: Sequence[str], ports: Mapping[int, int]) -> list[str]:
    """Arguments naming a containerPort after a --*port flag, and a --host of 0.0.0.0,
    pointed at the pod's loopback port and 127.0.0.1."""
    out = list(args)
    for i in range(1, len(out)):
        flag = out[i - 1]
        if flag.startswith("--") and flag.endswith("port") and out[i].isdigit():
            out[i] = str(ports.get(int(out[i]), out[i]))
        elif flag == "--host" and out[i] == "0.0.0.0":
            out[i] = "127.0.0.1"
    return out


def _json(response: Any) -> dict[str, Any]:
    """The body of a call made with _preload_content=False (plain dicts, as sent)."""
    return dict(json.loads(response.data))


def template_hash(template: Mapping[str, Any]) -> str:
    """What identifies a pod template revision (the pod-template-hash's role)."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # port name or number -> loopback port
    startup: dict[str, Any] | None
    readiness: dict[str, Any] | None
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started: bool = False  # the startup probe passed
    ready: bool = False
    restarts: int = 0

    def run(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started = self.startup is None
        self.ready = False

    def _probe(self, probe: Mapping[str, Any]) -> bool:
        get = probe.get("httpGet")
        if get is None:  # exec and tcpSocket probes are not used by the operator
            return True
        port = self.ports.get(str(get["port"]))
        if port is None:
            return False
        url = f"http://127.0.0.1:{port}{get.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))) as r:
                return 200 <= r.status < 400
        except (OSError, urllib.error.HTTPError):
            return False

    def observe(self) -> None:
        """One kubelet sync: restart an exited process, run the probes."""
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                self.restarts += 1
                log.warning(
                    "container %s exited (%s), restarting", self.name, self.process.returncode
                )
            self.run()
            return
        if not self.started:
            self.started = self._probe(self.startup or {})
        if self.started:
            self.ready = self.readiness is None or self._probe(self.readiness)

    def stop(self, grace: float = GRACE) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass(frozen=True)
class Node:
    """A stand-in node: its name and labels (what nodeSelectors match)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Pod:
    name: str
    template: str  # template hash
    containers: list[Container]
    node: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    init: list[Container] = field(default_factory=list)  # init containers not yet done
    claims: tuple[tuple[str, str], ...] = ()  # (namespace, claim) it mounts
    waiting: str | None = None  # why it cannot start (unschedulable, Multi-Attach)

    @property
    def ready(self) -> bool:
        return self.waiting is None and not self.init and all(c.ready for c in self.containers)

    def observe(self) -> None:
        if self.waiting is not None:
            return
        while self.init:  # one at a time, each to completion, restarted when it fails
            container = self.init[0]
            code = None if container.process is None else container.process.poll()
            if container.process is None or (code is not None and code != 0):
                if container.process is not None:
                    container.restarts += 1
                    log.warning("init container %s exited %s, restarting", container.name, code)
                container.run()
                return
            if code is None:
                return
            self.init.pop(0)
        for container in self.containers:
            container.observe()

    def stop(self) -> None:
        for container in [*self.init, *self.containers]:
            container.stop()


@dataclass
class StandInKubelet:
    """Runs the operator's Deployments as local processes; see the module docstring.
    `start()` runs it in a thread, `stop()` ends every process."""

    kubeconfig: Path
    root: Path
    image_env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=lambda: [Node("node-a")])
    pods: dict[tuple[str, str], list[Pod]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    attached: dict[tuple[str, str], str] = field(default_factory=dict)  # RWO claim -> node
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _proxy: ThreadingHTTPServer | None = None
    _serial: int = 0

    def __post_init__(self) -> None:
        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StandInKubelet:
        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self._proxy.daemon_threads = True
        threading.Thread(
            target=self._proxy.serve_forever, name="stand-in-proxy", daemon=True
        ).start()
        proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        self.image_env.update(
            http_proxy=proxy, HTTP_PROXY=proxy, no_proxy="127.0.0.1,localhost",
            NO_PROXY="127.0.0.1,localhost",
        )  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="stand-in-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for pods in self.pods.values():
            for pod in pods:
                pod.stop()
        self.pods.clear()
        if self._proxy is not None:
            self._proxy.shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as error:  # the loop must outlive a failed API call
                self.errors.append(f"{type(error).__name__}: {error}")
                log.exception("stand-in kubelet sync failed")
            self._stop.wait(PERIOD)

    # ----------------------------------------------------------------------- sync

    def sync(self) -> None:
        """One pass: every managed Deployment's pods started, stopped, probed; status written."""
        listed = self.apps.list_deployment_for_all_namespaces(
            label_selector=MANAGED_BY, _preload_content=False
        )
        deployments = _json(listed)["items"]
        seen = set()
        for deployment in deployments:
            key = (deployment["metadata"]["namespace"], deployment["metadata"]["name"])
            seen.add(key)
            if deployment["metadata"].get("deletionTimestamp"):
                continue
            self._sync_deployment(key, deployment)
        for key in list(self.pods):
            if key not in seen:  # deleted (by the operator or the garbage collector)
                for pod in self.pods.pop(key):
                    pod.stop()
        self._detach_unused()

    def _detach_unused(self) -> None:
        """A ReadWriteOnce claim no pod on its node mounts any more is detached."""
        in_use = {
            (claim, pod.node)
            for pods in self.pods.values()
            for pod in pods
            if pod.waiting is None
            for claim in pod.claims
        }
        for claim, node in list(self.attached.items()):
            if (claim, node) not in in_use:
                del self.attached[claim]

    def _sync_deployment(self, key: tuple[str, str], deployment: Mapping[str, Any]) -> None:
        spec = deployment["spec"]
        wanted = int(spec.get("replicas", 1))
        current = template_hash(spec["template"])
        pods = self.pods.setdefault(key, [])
        for pod in pods:
            pod.observe()
        new = [p for p in pods if p.template == current]
        old = [p for p in pods if p.template != current]
        while len(new) > wanted:
            surplus = new.pop()
            surplus.stop()
            pods.remove(surplus)
        for pod in [p for p in new if p.waiting is not None]:  # retry: a volume may be free
            pod.stop()
            pods.remove(pod)
            new.remove(pod)
            self._detach_unused()
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        if recreate and old:  # Recreate: every old pod gone before a new one starts
            for pod in old:
                pod.stop()
                pods.remove(pod)
            old = []
            self._detach_unused()
        while len(new) < wanted:
            pod = self._start_pod(key, deployment, current)
            pods.append(pod)
            new.append(pod)
        if old and sum(p.ready for p in new) >= wanted:  # the new ones serve: old ones go
            for pod in old:
                pod.stop()
                pods.remove(pod)
            old = []
        self._write_status(deployment, new, old)

    def _write_status(self, deployment: Mapping[str, Any], new: list[Pod], old: list[Pod]) -> None:
        wanted = int(deployment["spec"].get("replicas", 1))
        ready = sum(p.ready for p in [*new, *old])
        available = ready >= wanted
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": len(new) + len(old),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, len(new) + len(old) - ready),
            "conditions": [
                {
                    "type": "Available",
                    "status": "True" if available else "False",
                    "reason": "MinimumReplicasAvailable"
                    if available
                    else "MinimumReplicasUnavailable",
                    "message": f"{ready}/{wanted} replicas ready (stand-in kubelet)",
                }
            ],
        }
        before = deployment.get("status") or {}
        was_available = ((before.get("conditions") or [{}])[0]).get("status")
        # The API server leaves zero counts out.
        unchanged = all((before.get(k) or 0) == v for k, v in status.items() if k != "conditions")
        if unchanged and was_available == status["conditions"][0]["status"]:
            return
        metadata = deployment["metadata"]
        self.apps.patch_namespaced_deployment_status(
            metadata["name"], metadata["namespace"], {"status": status},
            _content_type="application/merge-patch+json",
        )  # fmt: skip

    # ----------------------------------------------------------------------- pods

    def _schedule(self, template: Mapping[str, Any]) -> Node | None:
        """The node for a new pod: its nodeSelector matched, then the fewest pods."""
        wanted = (template.get("nodeSelector") or {}).items()
        fits = [node for node in self.nodes if wanted <= node.labels.items()]
        load = {node.name: 0 for node in self.nodes}
        for pods in self.pods.values():
            for pod in pods:
                load[pod.node] = load.get(pod.node, 0) + 1
        return min(fits, key=lambda node: load[node.name], default=None)

    def _attach(self, namespace: str, claim_name: str, node: Node) -> str | None:
        """Attach a claim to `node`; the Multi-Attach error when a ReadWriteOnce(-Pod)
        claim is attached to another node (None: attached)."""
        claim = _json(
            self.core.read_namespaced_persistent_volume_claim(
                claim_name, namespace, _preload_content=False
            )
        )
        modes = set((claim.get("spec") or {}).get("accessModes") or [])
        if modes & {"ReadWriteMany", "ReadOnlyMany"}:
            return None
        holder = self.attached.setdefault((namespace, claim_name), node.name)
        if holder != node.name:
            return (
                f"Multi-Attach error for volume {claim_name}: {'/'.join(sorted(modes))} and "
                f"already attached to node {holder}"
            )
        return None

    def _start_pod(self, key: tuple[str, str], deployment: Mapping[str, Any], current: str) -> Pod:
        namespace, name = key
        self._serial += 1
        pod_name = f"{name}-{current[:6]}-{self._serial}"
        template = deployment["spec"]["template"]["spec"]
        labels = dict((deployment["spec"]["template"].get("metadata") or {}).get("labels") or {})
        node = self._schedule(template)
        if node is None:
            pod = Pod(pod_name, current, [], labels=labels, waiting="no node matches")
            log.warning("pod %s/%s: no stand-in node matches its nodeSelector", namespace, pod_name)
            return pod
        claims = tuple(
            (namespace, v["persistentVolumeClaim"]["claimName"])
            for v in template.get("volumes") or []
            if v.get("persistentVolumeClaim")
        )
        for _, claim in claims:
            if problem := self._attach(namespace, claim, node):
                log.warning("pod %s/%s on %s: %s", namespace, pod_name, node.name, problem)
                return Pod(pod_name, current, [], node.name, labels, waiting=problem)
        pod_dir = self.root / "nodes" / node.name / "pods" / namespace / pod_name
        volumes = self._volumes(namespace, template.get("volumes") or [], pod_dir)
        made = [
            [self._container(namespace, pod_name, spec, volumes, pod_dir) for spec in specs]
            for specs in (template.get("initContainers") or [], template["containers"])
        ]
        pod = Pod(pod_name, current, made[1], node.name, labels, made[0], claims)
        pod.observe()
        log.info("started pod %s/%s on %s", namespace, pod_name, node.name)
        return pod

    def _volumes(
        self, namespace: str, volumes: Sequence[Mapping[str, Any]], pod_dir: Path
    ) -> dict[str, Path]:
        local: dict[str, Path] = {}
        for volume in volumes:
            name = volume["name"]
            if claim := volume.get("persistentVolumeClaim"):
                # The claim's data lives once (it moves with the claim between nodes);
                # _attach decides which node may mount it.
                folder = self.root / "volumes" / namespace / claim["claimName"]
            elif source := volume.get("configMap"):
                folder = pod_dir / "configmaps" / name
                folder.mkdir(parents=True, exist_ok=True)
                data = self._config_map(namespace, source["name"])
                for item, text in data.items():
                    (folder / item).write_text(text)
            else:  # emptyDir (and anything else) is a fresh folder per pod
                folder = pod_dir / "volumes" / name
            folder.mkdir(parents=True, exist_ok=True)
            local[name] = folder
        return local

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        response = self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
        return dict(_json(response).get("data") or {})

    def _secret(self, namespace: str, name: str, key: str) -> str:
        response = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        data = _json(response).get("data") or {}
        return base64.b64decode(data[key]).decode()

    def _env_value(self, namespace: str, item: Mapping[str, Any], env: Mapping[str, str]) -> str:
        if "value" in item:
            return expand(str(item["value"]), env)
        source = item.get("valueFrom") or {}
        if ref := source.get("secretKeyRef"):
            return self._secret(namespace, ref["name"], ref["key"])
        if ref := source.get("configMapKeyRef"):
            return self._config_map(namespace, ref["name"])[ref["key"]]
        raise ValueError(f"env {item.get('name')}: the stand-in kubelet cannot resolve {source}")

    def _container(
        self, namespace: str, pod_name: str, spec: Mapping[str, Any], volumes: Mapping[str, Path],
        pod_dir: Path,
    ) -> Container:  # fmt: skip
        mounts = sorted(
            ((m["mountPath"], volumes[m["name"]]) for m in spec.get("volumeMounts") or []),
            key=lambda mount: -len(mount[0]),
        )
        ports = {int(p["containerPort"]): free_port() for p in spec.get("ports") or []}
        by_name = {str(p["name"]): ports[int(p["containerPort"])] for p in spec.get("ports") or []}
        env = {**self.image_env, "HOSTNAME": pod_name}
        for item in spec.get("env") or []:
            env[item["name"]] = rewrite_path(self._env_value(namespace, item, env), mounts)
        argv = [expand(arg, env) for arg in [*spec.get("command", []), *spec.get("args", [])]]
        argv = [rewrite_path(arg, mounts) for arg in rewrite_args(argv, ports)]
        return Container(
            name=f"{pod_name}/{spec['name']}",
            argv=argv,
            env=env,
            ports={**by_name, **{str(k): v for k, v in ports.items()}},
            startup=spec.get("startupProbe"),
            readiness=spec.get("readinessProbe"),
            log=pod_dir / f"{spec['name']}.log",
        )

    # ------------------------------------------------------------------- queries

    def running(self, namespace: str, deployment: str) -> list[Pod]:
        return list(self.pods.get((namespace, deployment), []))

    def url(self, namespace: str, deployment: str, port: str = "http") -> str:
        """A ready pod's address for `port`, as a Service would route to it."""
        for pod in self.running(namespace, deployment):
            if pod.ready:
                return f"http://127.0.0.1:{pod.containers[0].ports[port]}"
        raise LookupError(f"no ready pod of {namespace}/{deployment}")

    def claim_folder(self, namespace: str, claim: str) -> Path:
        """Where a PersistentVolumeClaim's data is (whichever node it is attached to)."""
        return self.root / "volumes" / namespace / claim

    def endpoint(self, namespace: str, selector: Mapping[str, str], port: str) -> int | None:
        """The loopback port of a ready pod that `selector` matches, for a Service's
        targetPort (a port name or number): kube-proxy's job."""
        for (pod_namespace, _), pods in list(self.pods.items()):
            for pod in pods:
                if pod_namespace != namespace or not pod.ready:
                    continue
                if not selector or not selector.items() <= pod.labels.items():
                    continue
                for container in pod.containers:
                    if port in container.ports:
                        return container.ports[port]
        return None

    def service_endpoint(self, host: str, port: int) -> int | None:
        """A Service's DNS name (NAME.NAMESPACE.svc[.cluster.local]) and port, resolved
        to a ready pod's loopback port (None: no such Service or no ready pod)."""
        parts = host.split(".")
        if len(parts) < 3 or parts[2] != "svc":
            return None
        name, namespace = parts[0], parts[1]
        try:
            service = _json(
                self.core.read_namespaced_service(name, namespace, _preload_content=False)
            )
        except client.ApiException:
            return None
        for entry in service["spec"].get("ports") or []:
            if int(entry["port"]) == port:
                target = str(entry.get("targetPort", port))
                return self.endpoint(namespace, service["spec"].get("selector") or {}, target)
        return None


def _proxy_handler(kubelet: StandInKubelet) -> type[BaseHTTPRequestHandler]:
    """The stand-in kube-proxy: an HTTP proxy that forwards a GET or HEAD for a Service
    URL to a ready pod behind it, streaming the answer back."""

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            url = urlsplit(self.path)
            port = kubelet.service_endpoint(url.hostname or "", url.port or 80)
            if port is None:
                self.send_error(502, f"no ready endpoint for {url.hostname}:{url.port}")
                return
            upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            path = url.path + (f"?{url.query}" if url.query else "")
            upstream.request(self.command, path, headers={"Host": url.netloc})
            answer = upstream.getresponse()
            self.send_response(answer.status)
            for header, value in answer.getheaders():
                if header.lower() not in ("connection", "transfer-encoding"):
                    self.send_header(header, value)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                while chunk := answer.read(1 << 16):
                    self.wfile.write(chunk)
            upstream.close()

        do_GET = do_HEAD = _forward

        def log_message(self, format: str, *args: object) -> None:
            log.debug("stand-in proxy: " + format, *args)

    return Handler
