"""API pods whose container runs a program the simulated node has (WORKLOAD_PROGRAMS, matched on the
container's command[0], as the image's entrypoint is named) run as processes, with what a real kubelet gives a
container: the service-account token volume (a TokenRequest bound to the pod), ConfigMap and hostPath volumes,
env values and fieldRefs, the API server's address, and for each containerPort a port of its own on 127.0.0.1
(there are no pod network namespaces), which the readiness probe targets. A container whose command is
`/bin/sh <script from a ConfigMap volume>` (local-path-provisioner's helper pods) runs that script with the
host's /bin/sh; paths under its volume mounts, in its arguments and env, are mapped onto the node root (there
are no mount namespaces either).

Leaves `<root>/var/lib/kubelet/pods/<uid>/volumes/...` and `.../simnode-ports.json`; processes run in their own
session (they outlive the kubelet and are adopted by the next one, like containers) and log to
`<root>/var/log/pods/<ns>_<name>/<container>.log`. Follows kubernetes/kubernetes pkg/kubelet/kubelet_pods.go
(makeEnvironmentVariables), pkg/volume/projected (the kube-api-access token, ca.crt and namespace files) and
pkg/kubelet/token/token_manager.go (TokenRequest bound to the pod, refreshed after 80% of its lifetime).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from simnode.kubeclient import ApiError, KubeClient
from simnode.kubelet import runtime
from simnode.kubelet.pods import ContainerSim, PodSim
from simnode.kubelet.probes import HttpProber, container_port
from simnode.launch import tool_command
from simnode.paths import ROOT_ENV, NodeRoot

log = logging.getLogger("kubelet.workloads")

# Programs an API pod's container may run as a process (simnode/__main__.py TOOLS has each of them).
WORKLOAD_PROGRAMS = ("local-path-provisioner",)
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_EXPIRATION_S = 3607  # what the kubelet asks for (kube-api-access volumes: 3607 s)
STOP_GRACE_S = 5.0
MOUNTS_ENV = "SIMNODE_MOUNTS"  # JSON {mountPath: host directory}: how the program finds its volumes
PORTS_ENV = "SIMNODE_PORTS"  # JSON {"<containerPort>": host port}: where the program listens


def runs_process(c: ContainerSim) -> bool:
    return bool(c.command) and c.command[0] in WORKLOAD_PROGRAMS


def _script_of(c: ContainerSim, config_map_volumes: set[str]) -> bool:
    """`/bin/sh <file>` where the file lies in one of the container's ConfigMap volumes."""
    if len(c.command) < 2 or c.command[0] not in ("/bin/sh", "sh"):
        return False
    return any(m.get("name") in config_map_volumes and c.command[1].startswith(str(m.get("mountPath", "")).rstrip("/")
                                                                                  + "/")
               for m in c.spec.get("volumeMounts") or [])


def map_path(value: str, mounts: dict[str, str]) -> str:
    """A container path under one of `mounts` as the node path it stands for; other strings unchanged."""
    best = ""
    for mount in mounts:
        m = mount.rstrip("/")
        if m and (value == m or value.startswith(m + "/")) and len(m) > len(best.rstrip("/")):
            best = mount
    if not best:
        return value
    return mounts[best].rstrip("/") + value[len(best.rstrip("/")):]


def _cluster_ca(kubeconfig: Path | None, root: NodeRoot) -> bytes:
    """The CA the kubelet trusts for the API (its kubeconfig's cluster): ca.crt of the token volume."""
    if kubeconfig is None:
        return b""
    try:
        cfg = yaml.safe_load(kubeconfig.read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg.get("contexts") or [] if c.get("name") == ctx_name)
        cluster = next(c["cluster"] for c in cfg.get("clusters") or [] if c.get("name") == ctx.get("cluster"))
        if cluster.get("certificate-authority-data"):
            return base64.b64decode(cluster["certificate-authority-data"])
        ref = Path(str(cluster.get("certificate-authority", "")))
        return (root.path(ref) if ref.is_absolute() else kubeconfig.parent / ref).read_bytes()
    except (OSError, ValueError, StopIteration, KeyError, AttributeError, TypeError) as exc:
        log.warning("cannot read the cluster CA from %s: %s", kubeconfig, exc)
        return b""


class WorkloadRunner:
    """The Runner (pods.py) for API pods: processes for WORKLOAD_PROGRAMS, nothing for other containers."""

    def __init__(self, root: NodeRoot, client: KubeClient, *, kubeconfig: Path | None) -> None:
        self.root = root
        self.client = client
        self.ca_pem = _cluster_ca(kubeconfig, root)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.scripts: set[tuple[str, str]] = set()  # (pod uid, container) running a ConfigMap script
        self.mounts: dict[str, dict[str, str]] = {}  # pod uid -> mountPath -> node directory
        self.env: dict[str, dict[str, str]] = {}  # pod uid -> environment of its process containers
        self.tokens: dict[str, float] = {}  # pod uid -> when its token should be refreshed
        self.errors: dict[str, str] = {}  # pod uid -> why its volumes could not be set up
        self._tasks: set[asyncio.Future[None]] = set()  # stops in flight
        self.prober = HttpProber(self._probe_url)

    def pod_dir(self, uid: str) -> Path:
        return self.root.path(f"/var/lib/kubelet/pods/{uid}")

    # -- volumes and environment, before the containers start --

    async def prepare(self, pod: dict[str, Any], sim: PodSim) -> bool:
        """Volumes and env for the process containers of `pod` (token refreshed when due); False while they
        cannot be set up: the containers then wait in ContainerCreating, as with a real FailedMount."""
        volumes = (pod.get("spec") or {}).get("volumes") or []
        config_maps = {str(v.get("name")) for v in volumes
                       if isinstance(v, dict) and isinstance(v.get("configMap"), dict)}
        for c in sim.containers:
            if _script_of(c, config_maps):
                self.scripts.add((sim.uid, c.name))
        process_containers = [c for c in sim.containers if self.runs(sim, c)]
        if not process_containers:
            return True
        for c in process_containers:
            c.probed = True
        now = time.time()
        if sim.uid in self.env and now < self.tokens.get(sim.uid, 0.0):
            return True
        try:
            mounts = await self._volumes(pod, sim)
        except ApiError as exc:
            # A container whose volumes cannot be set up does not start (the kubelet reports
            # FailedMount); the next pass tries again.
            if self.errors.get(sim.uid) != str(exc):
                log.warning("%s: cannot set up volumes: %s", sim.key, exc)
                self.errors[sim.uid] = str(exc)
            return sim.uid in self.env  # a failed refresh keeps the running process and its old token
        self.errors.pop(sim.uid, None)
        base = {
            # Real pods reach the API through the `kubernetes` Service; the simulated node has no service
            # network, so the address is the one the kubelet itself uses.
            "KUBERNETES_SERVICE_HOST": self.client.server.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]"),
            "KUBERNETES_SERVICE_PORT": self.client.server.rsplit(":", 1)[-1],
            "HOSTNAME": sim.name,
        }
        self.env[sim.uid] = {**base, MOUNTS_ENV: json.dumps(mounts), PORTS_ENV: json.dumps(self._ports(sim))}
        self.mounts[sim.uid] = mounts
        return True

    def runs(self, pod: PodSim, c: ContainerSim) -> bool:
        return runs_process(c) or (pod.uid, c.name) in self.scripts

    async def _volumes(self, pod: dict[str, Any], sim: PodSim) -> dict[str, str]:
        spec = pod.get("spec") or {}
        volumes = {str(v.get("name")): v for v in spec.get("volumes") or [] if isinstance(v, dict)}
        host: dict[str, Path] = {}
        for name, volume in volumes.items():
            if isinstance(volume.get("configMap"), dict):
                host[name] = await self._config_map_volume(sim, name, volume["configMap"])
            elif isinstance(volume.get("hostPath"), dict):
                host[name] = self.root.path(str(volume["hostPath"].get("path", "/")))
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    host[name].mkdir(mode=0o755, parents=True, exist_ok=True)  # hostpath volume plugin
        mounts: dict[str, str] = {}
        for c in sim.containers:
            for m in c.spec.get("volumeMounts") or []:
                if m.get("name") in host:
                    mounts[str(m.get("mountPath"))] = str(host[m["name"]])
        if spec.get("automountServiceAccountToken") is not False:
            mounts[SA_MOUNT] = str(await self._token_volume(pod, sim))
        return mounts

    async def _config_map_volume(self, sim: PodSim, name: str, source: dict[str, Any]) -> Path:
        cm = await self.client.get(f"/api/v1/namespaces/{sim.namespace}/configmaps/{source.get('name')}")
        data = {str(k): str(v) for k, v in (cm.get("data") or {}).items()}
        items = source.get("items")
        files = {str(i["path"]): data[str(i["key"])] for i in items if str(i.get("key")) in data} if items else data
        directory = self.pod_dir(sim.uid) / "volumes/kubernetes.io~configmap" / name
        _write_files(directory, files)
        return directory

    async def _token_volume(self, pod: dict[str, Any], sim: PodSim) -> Path:
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": TOKEN_EXPIRATION_S,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": sim.name, "uid": sim.uid}}}
        answer = await self.client.create(
            f"/api/v1/namespaces/{sim.namespace}/serviceaccounts/{account}/token", body)
        token = str((answer.get("status") or {}).get("token", ""))
        directory = self.pod_dir(sim.uid) / "volumes/kubernetes.io~projected/kube-api-access"
        _write_files(directory, {"token": token, "ca.crt": self.ca_pem.decode(), "namespace": sim.namespace})
        self.tokens[sim.uid] = time.time() + 0.8 * TOKEN_EXPIRATION_S  # token_manager.go: refresh at 80%
        return directory

    def _ports(self, sim: PodSim) -> dict[str, int]:
        """containerPort -> a host port of this pod's own, kept across kubelet restarts (adopted processes)."""
        path = self.pod_dir(sim.uid) / "simnode-ports.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        ports: dict[str, int] = {}
        for c in sim.containers:
            for p in c.spec.get("ports") or []:
                port = str(p.get("containerPort"))
                ports[port] = int(saved[port]) if isinstance(saved.get(port), int) else _free_port()
        runtime.write_json_atomic(path, ports)
        return ports

    # -- Runner --

    def start(self, pod: PodSim, c: ContainerSim) -> None:
        if not self.runs(pod, c):
            return
        c.pid = None
        env = self.env.get(pod.uid, {})  # prepare() succeeded before advance() calls start()
        spec_env = {str(e.get("name")): _env_value(e, pod) for e in c.spec.get("env") or [] if e.get("name")}
        if runs_process(c):
            argv, proc_env = tool_command(c.command[0], c.command[1:], root=self.root)
            proc_env.update(spec_env)
            proc_env.update(env)
        else:
            mounts = self.mounts.get(pod.uid, {})
            argv = ["/bin/sh", *(map_path(a, mounts) for a in c.command[1:])]
            proc_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", ROOT_ENV: str(self.root.root),
                        **{k: map_path(v, mounts) for k, v in spec_env.items()}}
        proc_env[runtime.POD_ENV] = runtime.marker(pod.namespace, pod.name, c.name)
        logfile = runtime.log_path(self.root, pod.namespace, pod.name, c.name)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(logfile, "ab") as out:
                proc = subprocess.Popen(argv, env=proc_env, cwd=str(self.root.root), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.error("cannot start %s/%s: %s", pod.key, c.name, exc)  # noqa: TRY400 (expected condition)
            return
        self.children[proc.pid] = proc
        c.pid = proc.pid
        log.info("started %s container %s (%s) as pid %d", pod.key, c.name, c.command[0], proc.pid)

    def stop(self, pod: PodSim, c: ContainerSim) -> None:
        if c.pid is None:
            return
        pid, mark = c.pid, runtime.marker(pod.namespace, pod.name, c.name)
        if pid in self.children or runtime.is_ours(pid, self.root, mark):
            log.info("stopping %s container %s (pid %d)", pod.key, c.name, pid)
            runtime.signal_group(pid, signal.SIGTERM)
            task = asyncio.get_running_loop().run_in_executor(None, self._reap, pid)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _reap(self, pid: int) -> None:
        runtime.stop_process(pid, grace_s=STOP_GRACE_S, child=self.children.pop(pid, None))

    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None:
        if not self.runs(pod, c):
            return None
        if c.pid is None:
            return 1  # the program could not be started
        child = self.children.get(c.pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            del self.children[c.pid]
            log.warning("%s container %s (pid %d) exited with %d", pod.key, c.name, c.pid, code)
            return 128 - code if code < 0 else code
        if runtime.is_ours(c.pid, self.root, runtime.marker(pod.namespace, pod.name, c.name)):
            return None  # adopted from an earlier kubelet
        return 1

    # -- readiness probes --

    def probe(self, sim: PodSim, now: float) -> None:
        self.prober.start_due(sim, now, key=sim.uid)

    def _probe_url(self, sim: PodSim, c: ContainerSim, get: dict[str, Any]) -> str | None:
        """The probe's port is the container's: find the host port its process was given."""
        port = container_port(c, get.get("port"))
        host_port = json.loads((self.env.get(sim.uid) or {}).get(PORTS_ENV, "{}")).get(str(port))
        return None if host_port is None else f"http://127.0.0.1:{host_port}{get.get('path') or '/'}"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.prober.close()


def _env_value(entry: dict[str, Any], pod: PodSim) -> str:
    """kubelet_pods.go makeEnvironmentVariables: a value, or the fieldRefs a pod can know about itself."""
    if "value" in entry:
        return str(entry["value"])
    field = ((entry.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    return {"metadata.namespace": pod.namespace, "metadata.name": pod.name, "metadata.uid": pod.uid,
            "status.podIP": pod.ip or ""}.get(str(field), "")


def _write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = directory / name
        tmp = directory / f".{name}.tmp"
        tmp.write_text(content)
        tmp.chmod(0o600 if name == "token" else 0o644)
        tmp.replace(target)  # atomic: a program re-reading its token never sees half a file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
