"""The kubelet's API side once a session exists: mirror pods for static pods, status of pods bound to
this node (simulated containers), deletion of terminating pods. Persists API pod state (IPs, restart
counts) in `<root>/var/lib/kubelet/simnode/state.json`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from simnode.controllers.informer import Informer, Obj, obj_key
from simnode.faults import Faults
from simnode.kubeclient import ApiError, KubeClient
from simnode.kubelet.docker import DockerRuntime, RuntimeUnavailable, refresh_images
from simnode.kubelet.engine import EngineRunner
from simnode.kubelet.node import NodeAgent
from simnode.kubelet.pods import ContainerSim, PodSim, containers_from_spec, qos_class, rfc3339
from simnode.kubelet.runtime import write_json_atomic
from simnode.kubelet.static import StaticPod, StaticPods
from simnode.kubelet.workloads import WorkloadRunner
from simnode.paths import NodeRoot

log = logging.getLogger("kubelet.api")

STATE_REAL_PATH = "/var/lib/kubelet/simnode/state.json"
MIRROR = "kubernetes.io/config.mirror"
RESEND_S = 5.0  # re-send a status the API does not show (e.g. someone overwrote it) at most this often
RETRY_WRITE_S = 1.0
DEFAULT_POD_CIDR = "10.244.0.0/24"


def load_state(root: NodeRoot) -> dict[str, Any]:
    try:
        data = json.loads(root.path(STATE_REAL_PATH).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _meta(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _shown(desired: dict[str, Any], actual: dict[str, Any]) -> bool:
    return all(actual.get(k) == v for k, v in desired.items())


class PodSync:
    def __init__(
        self,
        root: NodeRoot,
        client: KubeClient,
        agent: NodeAgent,
        static: StaticPods,
        docker: DockerRuntime,
        *,
        config_pod_cidr: str | None,
        sandbox_error: Callable[[], str | None] = lambda: None,
        kubeconfig: Path | None = None,
    ) -> None:
        self.root = root
        self.client = client
        self.agent = agent
        self.static = static
        self.docker = docker
        self.config_pod_cidr = config_pod_cidr
        self.sandbox_error = sandbox_error
        node = agent.name
        self.pods = Informer(
            client,
            "/api/v1/pods",
            field_selector=f"spec.nodeName={node}",
            predicate=lambda p: (p.get("spec") or {}).get("nodeName") == node,
        )
        self.state = load_state(root)
        self.api_pods: dict[str, PodSim] = {}
        # Containers of API pods: simulated, except programs the node has (workloads.py) which run as processes.
        self.runner = WorkloadRunner(root, client, kubeconfig=kubeconfig)
        # ... and containers whose image has a program run from it in the Docker Engine (engine.py).
        self.engine = EngineRunner(root, docker)
        self.pod_runner = PodRunner(self.runner, self.engine)
        self._sent: dict[str, tuple[dict[str, Any], float]] = {}  # pod uid -> (status, when)
        self._last_write: dict[str, float] = {}  # throttles creates/deletes that keep failing
        self._dirty = False  # API pod state changed since the last save
        self._errors: dict[str, str] = {}  # pod key -> last API error logged for it

    @property
    def node_ip(self) -> str:
        return self.agent.node_ip

    def _throttled(self, what: str) -> bool:
        now = time.monotonic()
        if now - self._last_write.get(what, 0.0) < RETRY_WRITE_S:
            return True
        self._last_write[what] = now
        return False

    async def sync(self, faults: Faults) -> None:
        """One pass over static pods (mirrors) and API pods bound to this node."""
        if not self.pods.synced.is_set():
            return
        wanted: set[str] = set()
        for sp in list(self.static.pods.values()):
            key = f"{sp.sim.namespace}/{sp.sim.name}-{self.agent.name}"
            wanted.add(key)
            await self._guard(key, self._sync_mirror(key, sp, faults))
        live: set[str] = set()
        for pod in self.pods.values():
            key = obj_key(pod)
            if MIRROR in (_meta(pod).get("annotations") or {}):
                if key not in wanted:
                    await self._guard(key, self._delete(pod, "orphaned mirror pod"))
                continue
            live.add(str(_meta(pod).get("uid")))
            await self._guard(key, self._sync_api_pod(pod, faults))
        changed = False
        for uid in list(self.api_pods):
            if uid not in live:
                del self.api_pods[uid]
                changed = True
        # Forget what was sent to pods that are gone, so the bookkeeping does not grow without bound.
        uids = {str(_meta(p).get("uid")) for p in self.pods.values()}
        self._sent = {uid: sent for uid, sent in self._sent.items() if uid in uids}
        self._errors = {k: e for k, e in self._errors.items() if k in wanted or self.pods.get(k) is not None}
        stale_before = time.monotonic() - 60 * RETRY_WRITE_S
        self._last_write = {k: t for k, t in self._last_write.items() if t > stale_before}
        try:
            await self.engine.refresh(self.api_pods, time.monotonic())
        except RuntimeUnavailable as exc:
            log.debug("engine containers: %s", exc)
        if changed or self._dirty or any(sim.times_changed for sim in self.api_pods.values()):
            self._save()

    async def _guard(self, key: str, work: Awaitable[None]) -> None:
        """Run one pod's sync; API errors are logged once per distinct message (the API being away is
        routine and stays at debug level) and retried on the next pass."""
        try:
            await work
        except ApiError as exc:
            if exc.status == 0:
                log.debug("%s: %s", key, exc)
            elif self._errors.get(key) != str(exc):
                log.warning("%s: %s", key, exc)
                self._errors[key] = str(exc)
        else:
            self._errors.pop(key, None)

    async def _sync_mirror(self, key: str, sp: StaticPod, faults: Faults) -> None:
        cached = self.pods.get(key)
        annotations = (_meta(cached).get("annotations") or {}) if cached else {}
        if cached is not None and (annotations.get(MIRROR) != sp.hash or _meta(cached).get("deletionTimestamp")):
            await self._delete(cached, "stale mirror pod")
            return
        if cached is None:
            if self._throttled(f"create {key}"):
                return
            cached = await self._create_mirror(sp)
        status = sp.sim.status(time.time(), faults, host_ip=self.node_ip)
        await self._post_status(cached, status)

    async def _create_mirror(self, sp: StaticPod) -> Obj:
        body = json.loads(json.dumps(sp.manifest))
        meta = body.setdefault("metadata", {})
        meta["name"] = f"{sp.sim.name}-{self.agent.name}"
        meta["namespace"] = sp.sim.namespace
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            "kubernetes.io/config.hash": sp.hash,
            MIRROR: sp.hash,
            "kubernetes.io/config.seen": rfc3339(sp.sim.first_seen),
            "kubernetes.io/config.source": "file",
        }
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": self.agent.name, "uid": self.agent.uid, "controller": True}
        ]
        for field in ("uid", "resourceVersion", "creationTimestamp"):
            meta.pop(field, None)
        body["spec"]["nodeName"] = self.agent.name
        body.pop("status", None)
        path = f"/api/v1/namespaces/{sp.sim.namespace}/pods"
        try:
            created = await self.client.create(path, body)
            log.info("created mirror pod %s/%s", sp.sim.namespace, meta["name"])
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = await self.client.get(f"{path}/{meta['name']}")
        self.pods.upsert(created)
        return created

    async def _delete(self, pod: Obj, why: str) -> None:
        key = obj_key(pod)
        if self._throttled(f"delete {key}"):
            return
        meta = _meta(pod)
        log.info("deleting %s %s", why, key)
        try:
            await self.client.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", grace_period_s=0)
        except ApiError as exc:
            if exc.status != 404:
                raise
        self.pods.forget(pod)
        self._sent.pop(str(meta.get("uid")), None)

    async def _post_status(self, pod: Obj, status: dict[str, Any]) -> None:
        """Patch the pod's status when ours changed, or (rarely) when the API shows something else."""
        meta = _meta(pod)
        uid = str(meta.get("uid"))  # by uid: a recreated pod of the same name starts afresh
        sent = self._sent.get(uid)
        now = time.monotonic()
        if sent is not None and sent[0] == status and (_shown(status, pod.get("status") or {})
                                                        or now - sent[1] < RESEND_S):
            return
        updated = await self.client.patch(
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status}
        )
        self._sent[uid] = (status, now)
        self.pods.upsert(updated)

    async def _sync_api_pod(self, pod: Obj, faults: Faults) -> None:
        meta = _meta(pod)
        uid = str(meta.get("uid"))
        if meta.get("deletionTimestamp"):
            sim = self.api_pods.pop(uid, None)
            if sim is not None:
                sim.stop(self.pod_runner)
            await self._delete(pod, "terminating pod")
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        sim = self.api_pods.get(uid) or self._new_api_pod(pod)
        if await self.static.sandbox.admit(sim, faults):
            self._dirty |= await refresh_images(self.docker, sim.containers, time.time(), pull_policy=True)
            await self.engine.classify(sim)
        now = time.time()
        if self._network_blocks(sim):
            await self._post_status(pod, sim.status(now, faults, host_ip=self.node_ip))
            return
        if await self.runner.prepare(pod, sim):
            self._dirty |= sim.advance(now, faults, self.pod_runner)
            self.runner.probe(sim, now)
        await self._post_status(pod, sim.status(now, faults, host_ip=self.node_ip))

    def _network_blocks(self, sim: PodSim) -> bool:
        """A pod on the pod network gets no (new) sandbox while the network is not ready; it stays
        ContainerCreating. pkg/kubelet/kubelet.go SyncPod: "network is not ready" unless the pod uses the host
        network; cri-dockerd's SetUpPod then needs the loopback, main and IPAM plugins (cni.py, sandbox_error).
        Containers already started keep running, as they do on a real node."""
        if sim.host_network or any(c.created_at is not None for c in sim.containers):
            return False
        error = self.sandbox_error()
        if error is None:
            return False
        if self._errors.get(sim.key) != error:
            log.warning("%s: network is not ready: %s", sim.key, error)
            self._errors[sim.key] = error
        return True

    def _new_api_pod(self, pod: Obj) -> PodSim:
        meta, spec = _meta(pod), pod.get("spec") or {}
        uid = str(meta.get("uid"))
        sim = PodSim(
            namespace=str(meta.get("namespace")),
            name=str(meta.get("name")),
            uid=uid,
            containers=containers_from_spec(spec),
            host_network=bool(spec.get("hostNetwork")),
            qos_class=qos_class(spec.get("containers") or []),
            restart_policy=str(spec.get("restartPolicy") or "Always"),
        )
        saved = (self.state.get("api_pods") or {}).get(uid) or {}
        sim.restore_times(saved)
        for c in sim.containers:
            c.restore((saved.get("containers") or {}).get(c.name) or {})
        if not sim.host_network:
            sim.ip = saved.get("ip") or self._allocate_ip()
        self.api_pods[uid] = sim
        self._dirty = True
        return sim

    def _allocate_ip(self) -> str | None:
        cidr = self.agent.pod_cidr or self.config_pod_cidr or DEFAULT_POD_CIDR
        used = {s.ip for s in self.api_pods.values()}
        hosts = ipaddress.ip_network(cidr, strict=False).hosts()
        next(hosts, None)  # .1 is the bridge/gateway on a real node
        for ip in hosts:
            if str(ip) not in used:
                return str(ip)
        log.error("pod CIDR %s is exhausted", cidr)
        return None

    def _save(self) -> None:
        self._dirty = False
        self.state["api_pods"] = {
            uid: {
                "namespace": s.namespace,
                "name": s.name,
                "ip": s.ip,
                **s.times_record(),
                "containers": {c.name: c.to_record() for c in s.containers},
            }
            for uid, s in self.api_pods.items()
        }
        self.state["node"] = {"name": self.agent.name, "uid": self.agent.uid}
        write_json_atomic(self.root.path(STATE_REAL_PATH), self.state)


class PodRunner:
    """The Runner (pods.py) for API pods: node programs and scripts as processes (workloads.py), containers
    with a program in their image in the engine (engine.py); the rest (padding stand-ins) simulated."""

    def __init__(self, workloads: WorkloadRunner, engine: EngineRunner) -> None:
        self.workloads = workloads
        self.engine = engine

    def start(self, pod: PodSim, c: ContainerSim) -> None:
        if not self.workloads.runs(pod, c) and self.engine.runs(pod, c):
            self.engine.start(pod, c)
        else:
            self.workloads.start(pod, c)

    def stop(self, pod: PodSim, c: ContainerSim) -> None:
        if not self.workloads.runs(pod, c) and self.engine.runs(pod, c):
            self.engine.stop(pod, c)
        else:
            self.workloads.stop(pod, c)

    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None:
        if not self.workloads.runs(pod, c) and self.engine.runs(pod, c):
            return self.engine.exit_code(pod, c)
        return self.workloads.exit_code(pod, c)
