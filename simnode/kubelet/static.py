"""Static pods: the manifests in staticPodPath, polled, run as processes (runtime.py) and tracked as
PodSims. Persists pids, manifest hashes and restart counts in pods.json so a restarted kubelet adopts
the running processes instead of starting duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simnode.faults import Faults
from simnode.kubelet import runtime
from simnode.kubelet.docker import DockerRuntime, refresh_images
from simnode.kubelet.pods import ContainerSim, PodSim, containers_from_spec, qos_class
from simnode.kubelet.probes import HttpProber, container_port
from simnode.kubelet.sandbox import SandboxGate
from simnode.paths import NodeRoot

log = logging.getLogger("kubelet.static")

STOP_GRACE_S = 5.0


class ManifestError(Exception):
    pass


def parse_manifest(path: Path, text: str) -> dict[str, Any]:
    try:
        pod = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(pod, dict) or pod.get("kind") != "Pod":
        kind = pod.get("kind") if isinstance(pod, dict) else None
        raise ManifestError(f"{path}: not a Pod manifest (kind {kind!r})")
    meta = pod.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ManifestError(f"{path}: metadata.name is missing")
    if not isinstance(pod.get("spec"), dict) or not containers_from_spec(pod["spec"]):
        raise ManifestError(f"{path}: spec.containers needs at least one container with name and image")
    return pod


def manifest_hash(pod: dict[str, Any]) -> str:
    """Content hash of the parsed manifest (formatting changes do not restart the pod); also its UID."""
    return hashlib.sha256(json.dumps(pod, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class StaticPod:
    file: Path
    manifest: dict[str, Any]
    hash: str
    sim: PodSim


class ProcessRunner:
    """Runs containers whose command is one of our tools as detached processes; others just 'sleep'."""

    def __init__(self, root: NodeRoot) -> None:
        self.root = root
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping: dict[int, float] = {}  # pid -> SIGKILL deadline (loop time)

    @staticmethod
    def runs_process(c: ContainerSim) -> bool:
        return bool(c.command) and c.command[0] in runtime.TOOLS

    def start(self, pod: PodSim, c: ContainerSim) -> None:
        if not self.runs_process(c):
            return
        c.pid = None
        error: OSError | None = None
        try:
            proc = runtime.spawn(self.root, pod.namespace, pod.name, c.name, c.command,
                                 image=str(c.spec.get("image") or ""))
        except OSError as exc:
            error = exc
        if error is not None:
            log.error("cannot start %s/%s: %s", pod.key, c.name, error)
            return
        self.children[proc.pid] = proc
        c.pid = proc.pid
        log.info("started %s container %s as pid %d", pod.key, c.name, proc.pid)

    def stop(self, pod: PodSim, c: ContainerSim) -> None:
        if c.pid is not None:
            self.stop_pid(c.pid, runtime.marker(pod.namespace, pod.name, c.name))

    def stop_pid(self, pid: int, mark: str) -> None:
        # Only signal a pid we started or that still carries our marker (pids get recycled).
        if pid in self.children or runtime.is_ours(pid, self.root, mark):
            log.info("stopping pod process %d (%s)", pid, mark)
            runtime.signal_group(pid, signal.SIGTERM)
            self.stopping[pid] = asyncio.get_running_loop().time() + STOP_GRACE_S

    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None:
        if not self.runs_process(c):
            return None
        if c.pid is None:
            return 1  # the process could not be started
        child = self.children.get(c.pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            del self.children[c.pid]
            log.warning("%s container %s (pid %d) exited with %d", pod.key, c.name, c.pid, code)
            return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as runtimes report
        if runtime.is_ours(c.pid, self.root, runtime.marker(pod.namespace, pod.name, c.name)):
            return None
        log.warning("%s container %s (adopted pid %d) is gone", pod.key, c.name, c.pid)
        return 1  # not our child: the exit status is unknown

    def reap(self) -> None:
        """Escalate stops past their grace period to SIGKILL; collect exited children."""
        now = asyncio.get_running_loop().time()
        for pid, deadline in list(self.stopping.items()):
            child = self.children.get(pid)
            alive = child.poll() is None if child is not None else runtime.pid_running(pid)
            if not alive:
                del self.stopping[pid]
                self.children.pop(pid, None)
            elif now >= deadline:
                log.warning("pod process %d ignored SIGTERM for %.0fs; killing it", pid, STOP_GRACE_S)
                runtime.signal_group(pid, signal.SIGKILL)
                self.stopping[pid] = now + STOP_GRACE_S


class StaticPods:
    def __init__(self, root: NodeRoot, manifest_dir: Path, docker: DockerRuntime) -> None:
        self.root = root
        self.manifest_dir = manifest_dir
        self.docker = docker
        self.runner = ProcessRunner(root)
        self.sandbox = SandboxGate(root, docker)
        self.pods: dict[str, StaticPod] = {}
        self.records = runtime.load_records(root)
        self.host_ip = "127.0.0.1"
        self._parsed: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}
        self.prober = HttpProber(self._probe_url)

    def scan(self) -> tuple[dict[str, tuple[Path, dict[str, Any]]], set[Path]]:
        """Parse the manifest directory: pod key -> (file, manifest); plus files that failed to parse."""
        found: dict[str, tuple[Path, dict[str, Any]]] = {}
        broken: set[Path] = set()
        try:
            files = sorted(p for p in self.manifest_dir.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            files = []
        for path in files:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                cached = self._parsed.get(path)
                if cached is None or cached[0] != stamp:
                    pod = self._parse(path)
                    self._parsed[path] = cached = (stamp, pod)
            except OSError:
                continue
            pod = cached[1]
            if pod is None:
                broken.add(path)
                continue
            key = f"{pod['metadata'].get('namespace') or 'default'}/{pod['metadata']['name']}"
            if key in found:
                log.error("%s: pod %s is already defined by %s; ignoring this file", path, key, found[key][0])
                continue
            found[key] = (path, pod)
        return found, broken

    @staticmethod
    def _parse(path: Path) -> dict[str, Any] | None:
        error: ManifestError
        try:
            return parse_manifest(path, path.read_text())
        except ManifestError as exc:
            error = exc
        log.error("%s", error)  # logged once per file version: the parse result is cached
        return None

    async def tick(self, faults: Faults) -> None:
        found, broken = self.scan()
        changed = self._reconcile(found, broken)
        for sp in self.pods.values():
            if await self.sandbox.admit(sp.sim, faults):
                changed |= await refresh_images(self.docker, sp.sim.containers, time.time())
            now = time.time()
            if sp.sim.advance(now, faults, self.runner):
                # Recorded before the next await: a SIGTERM there ends the tick, and a process started but
                # never recorded would be adopted by no kubelet.
                self._save()
            self.prober.start_due(sp.sim, now, key=sp.sim.key)
        self.runner.reap()
        changed |= any(sp.sim.times_changed for sp in self.pods.values())
        if changed:
            self._save()

    def _reconcile(self, found: dict[str, tuple[Path, dict[str, Any]]], broken: set[Path]) -> bool:
        changed = False
        for key in list(self.pods):
            sp = self.pods[key]
            if key not in found and sp.file not in broken:
                log.info("static pod %s removed (manifest %s gone)", key, sp.file)
                sp.sim.stop(self.runner)
                del self.pods[key]
                changed = True
        # Records of pods this kubelet does not run (left by an earlier kubelet): stop or adopt.
        for key, record in list(self.records.items()):
            if key in self.pods:
                continue
            file = Path(record.get("file", ""))
            if key not in found and file in broken:
                continue  # being rewritten: keep its processes until we can read it
            if key not in found or manifest_hash(found[key][1]) != record.get("manifest_hash"):
                self._stop_record(key, record)
                del self.records[key]
                changed = True
        for key, (file, pod) in found.items():
            digest = manifest_hash(pod)
            current = self.pods.get(key)
            if current is not None and current.hash == digest:
                continue
            if current is not None:
                log.info("static pod %s changed; restarting it", key)
                current.sim.stop(self.runner)
            self.pods[key] = StaticPod(file, pod, digest, self._new_sim(key, pod, digest))
            changed = True
        return changed

    def _stop_record(self, key: str, record: dict[str, Any]) -> None:
        namespace, _, name = key.partition("/")
        for cname, cont in (record.get("containers") or {}).items():
            if isinstance(cont.get("pid"), int):
                self.runner.stop_pid(cont["pid"], runtime.marker(namespace, name, cname))

    def _new_sim(self, key: str, pod: dict[str, Any], digest: str) -> PodSim:
        namespace, _, name = key.partition("/")
        spec = pod["spec"]
        sim = PodSim(
            namespace=namespace,
            name=name,
            uid=digest,
            containers=containers_from_spec(spec),
            host_network=bool(spec.get("hostNetwork")),
            qos_class=qos_class(spec["containers"]),
        )
        for c in sim.containers:
            c.probed = self.runner.runs_process(c)
        record = self.records.get(key)
        if record is None or record.get("manifest_hash") != digest:
            return sim
        # Same manifest as before the kubelet restarted: adopt processes that still run.
        sim.restore_times(record)
        for c in sim.containers:
            saved = (record.get("containers") or {}).get(c.name)
            if not isinstance(saved, dict):
                continue
            c.restore(saved)
            pid = c.pid
            if pid is not None and runtime.is_ours(pid, self.root, runtime.marker(namespace, name, c.name)):
                log.info("adopted running %s container %s (pid %d)", key, c.name, pid)
                continue
            if c.created_at is not None and self.runner.runs_process(c):
                c.restart_count += 1  # it died while nobody watched: restart it, and count that
            c.created_at = None
            c.pid = None
        return sim

    def _save(self) -> None:
        self.records = {
            key: {
                "uid": sp.sim.uid,
                "manifest_hash": sp.hash,
                "file": str(sp.file),
                **sp.sim.times_record(),
                "containers": {c.name: c.to_record() for c in sp.sim.containers},
            }
            for key, sp in self.pods.items()
        }
        runtime.save_records(self.root, self.records)

    def _probe_url(self, sim: PodSim, c: ContainerSim, get: dict[str, Any]) -> str | None:
        port = container_port(c, get.get("port"))
        if port is None:
            return None
        scheme = str(get.get("scheme") or "HTTP").lower()
        host = get.get("host") or (self.host_ip if sim.host_network else sim.ip) or "127.0.0.1"
        return f"{scheme}://{host}:{port}{get.get('path') or '/'}"

    async def close(self) -> None:
        await self.prober.close()
