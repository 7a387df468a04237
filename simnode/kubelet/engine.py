"""API pods' containers run from their images in the Docker Engine, as cri-dockerd runs them for a real kubelet.

Which containers: those of API pods that workloads.py does not run as a process (node programs, ConfigMap
scripts) and whose image has a program (an Entrypoint or a Cmd). Images without one are the simulated node's
padding stand-ins (coredns, ...) and stay simulated. Everything else, a user's `docker build` included, runs.

How, following kubernetes/kubernetes pkg/kubelet/kuberuntime/kuberuntime_container.go (generateContainerConfig:
`command, args := kubecontainer.ExpandContainerCommandAndArgs(container, envs)`, with `$(VAR)` expanded from the
container's env) and Mirantis/cri-dockerd libdocker/helpers + core/container_create.go (`Entrypoint: command`,
`Cmd: args`, labels `io.kubernetes.*`, name `k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`): `command`
replaces the image's Entrypoint (and then its Cmd is not used: the engine drops an image Cmd when Entrypoint is
given), `args` replaces its Cmd; `env` (values and the pod's own fieldRefs), `workingDir` are passed on.

Network: there is no bridge on the engine. A hostNetwork pod's containers use the host's network (its podIP is
the node IP); any other pod gets a network namespace of its own (`NetworkMode: none`, only loopback; the
pod's further containers join the first one's, as they would join the pause container's). The kube-proxy
stand-in (proxy.py) reaches a containerPort there by opening its socket inside that namespace (setns).

Containers carry `io.simnode.root=<node root>`, so nodes sharing an engine never touch each other's; a container
whose pod is gone is removed on the next pass, and `kubeadm reset` removes them all (remove_all).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from simnode.kubelet.docker import DockerRuntime, RuntimeUnavailable
from simnode.kubelet.pods import ContainerSim, PodSim
from simnode.kubelet.runtime import write_json_atomic
from simnode.paths import NodeRoot

log = logging.getLogger("kubelet.engine")

ROOT_LABEL = "io.simnode.root"
SOCKET_RECORD = "/var/lib/kubelet/simnode/engine.json"  # where kubeadm reset finds the engine
STOP_GRACE_S = 5
SWEEP_PERIOD_S = 2.0
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """kubernetes third_party/forked/golang/expansion: `$(VAR)` from env (unknown stays), `$$` is `$`."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))
    return _VAR.sub(sub, value)


def container_name(pod: PodSim, c: ContainerSim) -> str:
    """cri-dockerd core/naming.go makeContainerName."""
    return f"k8s_{c.name}_{pod.name}_{pod.namespace}_{pod.uid}_{c.restart_count}"


@dataclass
class EngineContainer:
    id: str = ""
    pid: int = 0
    exit_code: int | None = None
    starting: bool = True


class EngineRunner:
    """The Runner (pods.py) for engine-run containers; `refresh` (async, once per sync pass) keeps their
    state, which the synchronous Runner calls read."""

    def __init__(self, root: NodeRoot, docker: DockerRuntime) -> None:
        self.root = root
        self.docker = docker
        self.root_label = str(root.root)
        self.kinds: dict[str, bool] = {}  # image id -> runs in the engine (False: a padding stand-in)
        self.state: dict[tuple[str, str], EngineContainer] = {}  # (pod uid, container) -> what the engine has
        self._tasks: set[asyncio.Task[None]] = set()
        self._removing: set[str] = set()  # container ids being swept
        self._last_sweep = 0.0
        self._recorded = False

    def runs(self, pod: PodSim, c: ContainerSim) -> bool:
        return c.image_id is not None and self.kinds.get(c.image_id, False)

    async def classify(self, sim: PodSim) -> None:
        """Learn, once per image, whether its containers run in the engine."""
        for c in sim.containers:
            if c.image_id is None or c.image_id in self.kinds:
                continue
            status, body = await self.docker.call("GET", f"/images/{quote(c.image_id, safe=':')}/json")
            if status != 200 or not isinstance(body, dict):
                continue
            config = body.get("Config") or {}
            # No Entrypoint and no Cmd: nothing an engine could run ("no command specified"); the node's padding
            # images and the tests' scratch images are such stand-ins, simulated as before.
            self.kinds[c.image_id] = bool(config.get("Entrypoint") or config.get("Cmd"))

    def pid_of(self, uid: str) -> int | None:
        """The pid whose network namespace is the pod's (its first running container), for the kube-proxy."""
        for (pod_uid, _), st in self.state.items():
            if pod_uid == uid and st.pid and st.exit_code is None:
                return st.pid
        return None

    # -- Runner --

    def start(self, pod: PodSim, c: ContainerSim) -> None:
        key = (pod.uid, c.name)
        st = self.state[key] = EngineContainer()
        c.runtime_id = None
        self._spawn(self._start(pod, c, key, st), f"start {pod.key}/{c.name}")

    def stop(self, pod: PodSim, c: ContainerSim) -> None:
        st = self.state.pop((pod.uid, c.name), None)
        if st is not None and st.id:
            self._spawn(self._remove(st.id, grace_s=STOP_GRACE_S), f"stop {pod.key}/{c.name}")

    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None:
        st = self.state.get((pod.uid, c.name))
        if st is None:
            return None  # adopted after a kubelet restart: refresh() finds it (or says it is gone)
        return st.exit_code

    # -- engine work --

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=f"engine {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _config(self, pod: PodSim, c: ContainerSim, network: str) -> dict[str, Any]:
        from simnode.kubelet.workloads import _env_value  # the same env rules as process containers

        env: dict[str, str] = {}
        for e in c.spec.get("env") or []:
            if isinstance(e, dict) and e.get("name"):
                env[str(e["name"])] = expand(_env_value(e, pod), env)
        command = [expand(str(x), env) for x in c.spec.get("command") or []]
        args = [expand(str(x), env) for x in c.spec.get("args") or []]
        ports: dict[str, dict[str, Any]] = {f"{p['containerPort']}/{str(p.get('protocol') or 'TCP').lower()}": {}
                 for p in c.spec.get("ports") or [] if isinstance(p, dict) and p.get("containerPort")}
        labels = {
            "io.kubernetes.pod.name": pod.name,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid,
            "io.kubernetes.container.name": c.name,
            "io.kubernetes.docker.type": "container",
            "annotation.io.kubernetes.container.restartCount": str(c.restart_count),
            ROOT_LABEL: self.root_label,
        }
        config: dict[str, Any] = {
            "Image": c.image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": labels,
            "ExposedPorts": ports,
            "HostConfig": {"NetworkMode": network},
        }
        if command:
            config["Entrypoint"] = command
        if args or command:
            config["Cmd"] = args or None
        if c.spec.get("workingDir"):
            config["WorkingDir"] = str(c.spec["workingDir"])
        if network == "none":
            config["Hostname"] = pod.name[:63]  # the sandbox's hostname is the pod's name
        return config

    def _network(self, pod: PodSim, key: tuple[str, str]) -> str:
        if pod.host_network:
            return "host"
        for (uid, name), st in self.state.items():
            if uid == pod.uid and name != key[1] and st.id and st.exit_code is None:
                return f"container:{st.id}"
        return "none"

    async def _start(self, pod: PodSim, c: ContainerSim, key: tuple[str, str], st: EngineContainer) -> None:
        name = container_name(pod, c)
        try:
            await self._record_socket()
            await self._remove_previous(pod.uid, c.name)
            status, body = await self.docker.call("POST", f"/containers/create?name={quote(name)}",
                                                  body=self._config(pod, c, self._network(pod, key)))
            if status == 409:  # a container of this name from a kubelet that died mid-start
                await self._remove(name, grace_s=0)
                status, body = await self.docker.call("POST", f"/containers/create?name={quote(name)}",
                                                      body=self._config(pod, c, self._network(pod, key)))
            _check(status == 201 and isinstance(body, dict), "create", body)
            st.id = c.runtime_id = str(body["Id"])
            status, body = await self.docker.call("POST", f"/containers/{st.id}/start", timeout_s=30)
            _check(status in (204, 304), "start", body)
            status, body = await self.docker.call("GET", f"/containers/{st.id}/json")
            if status == 200 and isinstance(body, dict):
                st.pid = int((body.get("State") or {}).get("Pid") or 0)
            log.info("started %s container %s from %s in the engine (%s, pid %d)", pod.key, c.name, c.image,
                     st.id[:12], st.pid)
        except RuntimeUnavailable as exc:
            log.warning("%s container %s: %s", pod.key, c.name, exc)
            st.exit_code = 128  # kuberuntime: RunContainerError, then back-off like any failed start
        finally:
            st.starting = False

    async def _sweep(self, cid: str) -> None:
        try:
            await self._remove(cid, grace_s=0)
        finally:
            self._removing.discard(cid)

    async def _remove_previous(self, uid: str, container: str) -> None:
        for item in await self._list():
            labels = item.get("Labels") or {}
            if labels.get("io.kubernetes.pod.uid") == uid and labels.get("io.kubernetes.container.name") == container:
                await self._remove(str(item["Id"]), grace_s=0)

    async def _remove(self, ref: str, *, grace_s: int) -> None:
        try:
            if grace_s:
                await self.docker.call("POST", f"/containers/{quote(ref)}/stop?t={grace_s}", timeout_s=grace_s + 10)
            await self.docker.call("DELETE", f"/containers/{quote(ref)}?force=1&v=1", timeout_s=30)
        except RuntimeUnavailable as exc:
            log.warning("removing container %s: %s", ref, exc)

    async def _list(self) -> list[dict[str, Any]]:
        filters = quote(json.dumps({"label": [f"{ROOT_LABEL}={self.root_label}"]}))
        status, body = await self.docker.call("GET", f"/containers/json?all=1&filters={filters}")
        return [x for x in body if isinstance(x, dict)] if status == 200 and isinstance(body, list) else []

    async def _record_socket(self) -> None:
        if not self._recorded:
            write_json_atomic(self.root.path(SOCKET_RECORD), {"socket": str(self.docker.socket_path)})
            self._recorded = True

    async def refresh(self, pods: dict[str, PodSim], now_mono: float) -> None:
        """One list of this node's containers: exits, adoption after a restart, and removal of containers
        whose pod is gone (at most every SWEEP_PERIOD_S)."""
        if now_mono - self._last_sweep < SWEEP_PERIOD_S and all(
                (st.id and st.exit_code is None) or st.starting for st in self.state.values()):
            return
        self._last_sweep = now_mono
        starting_before = {k for k, st in self.state.items() if st.starting}
        try:
            items = await self._list()
        except RuntimeUnavailable:
            return
        seen: set[tuple[str, str]] = set()
        for item in items:
            labels = item.get("Labels") or {}
            uid, name = labels.get("io.kubernetes.pod.uid", ""), labels.get("io.kubernetes.container.name", "")
            sim = pods.get(uid)
            c = next((x for x in sim.containers if x.name == name), None) if sim is not None else None
            attempt = labels.get("annotation.io.kubernetes.container.restartCount")
            if sim is None or c is None:
                cid = str(item["Id"])
                if cid not in self._removing:
                    log.info("removing container %s of a pod that is gone (%s)", cid[:12], uid)
                    self._removing.add(cid)
                    self._spawn(self._sweep(cid), f"sweep {uid}/{name}")
                continue
            if attempt != str(c.restart_count) or c.created_at is None:
                continue
            key = (uid, name)
            seen.add(key)
            st = self.state.get(key)
            if st is None:  # a container a previous kubelet started: adopt it
                st = self.state[key] = EngineContainer(id=str(item["Id"]), starting=False)
                c.runtime_id = st.id
            if st.starting or st.exit_code is not None:
                continue
            status, body = await self.docker.call("GET", f"/containers/{st.id}/json")
            state = (body.get("State") or {}) if status == 200 and isinstance(body, dict) else {}
            if state.get("Running"):
                st.pid = int(state.get("Pid") or 0)
            else:
                st.exit_code = int(state.get("ExitCode") or 0) if state else 1
                log.warning("%s/%s container %s exited with %s", sim.key, name, st.id[:12], st.exit_code)
        for key, st in list(self.state.items()):
            if key not in seen and key not in starting_before and not st.starting and st.exit_code is None:
                st.exit_code = 1  # removed behind the kubelet's back
        for key in [k for k in self.state if k[0] not in pods]:
            del self.state[key]  # pods gone without a stop (deleted at once): their containers are swept above
        # Adopted pods whose container is not there at all: let the pod see an exit and restart it.
        for uid, sim in pods.items():
            for c in sim.containers:
                if c.created_at is not None and self.runs(sim, c) and (uid, c.name) not in self.state:
                    self.state[(uid, c.name)] = EngineContainer(exit_code=1, starting=False)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _check(ok: bool, what: str, body: Any) -> None:
    if not ok:
        raise RuntimeUnavailable(f"{what}: {_message(body)}")


def _message(body: Any) -> str:
    return str(body.get("message") if isinstance(body, dict) else body).strip()


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("docker", timeout=30)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        self.sock = sock


def remove_all(root: NodeRoot) -> int:
    """kubeadm reset: remove every engine container the node's kubelet started (synchronous)."""
    try:
        record = json.loads(root.path(SOCKET_RECORD).read_text())
        sock = Path(str(record["socket"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    filters = quote(json.dumps({"label": [f"{ROOT_LABEL}={root.root}"]}))
    removed = 0
    try:
        conn = _UnixHTTP(str(sock))
        conn.request("GET", f"/containers/json?all=1&filters={filters}")
        items = json.loads(conn.getresponse().read() or b"[]")
        for item in items if isinstance(items, list) else []:
            conn.request("DELETE", f"/containers/{item['Id']}?force=1&v=1")
            resp = conn.getresponse()
            resp.read()
            removed += resp.status == 204
        conn.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.warning("cannot remove the pod containers in the engine at %s: %s", sock, exc)
    return removed
