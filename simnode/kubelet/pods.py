"""Simulated pod lifecycle shared by static and API pods: image check -> created -> running -> ready,
crash loops with back-off, and the Kubernetes PodStatus that describes it. Pure state, no I/O: a
Runner (processes for static pods, nothing for API pods) does the side effects.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from simnode.faults import Faults

CRASH_AFTER_S = 0.5  # how long a crash-loop-faulted container runs before it "exits"
BACKOFF_BASE_S = 0.5  # real kubelet: 10 s doubling to 5 min; shortened so tests see restarts quickly
BACKOFF_MAX_S = 10.0
BACKOFF_RESET_S = 30.0  # running this long without a crash resets the back-off
IMAGE_BACKOFF_MAX_S = 10.0
ERR_IMAGE_PULL_SHOWN_S = 1.0  # after a failed check the reason is ErrImagePull, then ImagePullBackOff


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Runner(Protocol):
    def start(self, pod: PodSim, c: ContainerSim) -> None: ...
    def stop(self, pod: PodSim, c: ContainerSim) -> None: ...
    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None: ...


class NullRunner:
    """API pods (coredns, addons) have no process: they run as long as the kubelet says so."""

    def start(self, pod: PodSim, c: ContainerSim) -> None:
        return None

    def stop(self, pod: PodSim, c: ContainerSim) -> None:
        return None

    def exit_code(self, pod: PodSim, c: ContainerSim) -> int | None:
        return None


@dataclass
class ContainerSim:
    name: str
    image: str
    command: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    image_id: str | None = None
    image_failures: int = 0
    image_next_check: float = 0.0
    image_failed_at: float = 0.0
    image_error: str = ""
    image_reason: str = ""  # ErrImageNeverPull stays as it is; other failures alternate with ImagePullBackOff
    created_at: float | None = None
    pid: int | None = None
    restart_count: int = 0
    crash_streak: int = 0
    backoff_until: float | None = None
    last_terminated: dict[str, Any] | None = None
    probe_ok: bool = False
    probe_next: float = 0.0
    probed: bool = False  # set for containers that run a real process: only they can answer probes
    terminated: dict[str, Any] | None = None  # exited for good (restartPolicy Never/OnFailure)
    runtime_id: str | None = None  # the engine's container id, for containers run in the engine (engine.py)

    # Not crash_streak and backoff_until: a kubelet keeps its container back-off in memory
    # (pkg/kubelet/kubelet.go: `klet.backOff = flowcontrol.NewBackOff(backOffPeriod, MaxContainerBackOff)`), so a
    # restarted kubelet restarts an exited container at once, without CrashLoopBackOff.
    PERSISTED = ("image_id", "created_at", "pid", "restart_count", "last_terminated", "terminated", "runtime_id")

    def to_record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PERSISTED}

    def restore(self, record: dict[str, Any]) -> None:
        for key in self.PERSISTED:
            if key in record:
                setattr(self, key, record[key])

    def image_missing(self, now: float, error: str, *, reason: str = "") -> None:
        self.image_reason = reason
        self.image_id = None
        self.image_failures += 1
        self.image_failed_at = now
        self.image_error = error
        self.image_next_check = now + min(2.0 ** (self.image_failures - 1), IMAGE_BACKOFF_MAX_S)

    def image_error_reason(self, now: float) -> str:
        if self.image_reason:
            return self.image_reason
        return "ErrImagePull" if now - self.image_failed_at < ERR_IMAGE_PULL_SHOWN_S else "ImagePullBackOff"


def delay(faults: Faults, name: str) -> float:
    return faults.delay_s(name)


@dataclass
class PodSim:
    namespace: str
    name: str
    uid: str
    containers: list[ContainerSim]
    host_network: bool = False
    ip: str | None = None
    # kubelet kuberuntime computePodActions: Never/OnFailure containers that exited (successfully) stay exited.
    restart_policy: str = "Always"
    first_seen: float = field(default_factory=time.time)
    qos_class: str = "BestEffort"
    transitions: dict[str, tuple[str, float]] = field(default_factory=dict)
    saved_transitions: dict[str, tuple[str, float]] = field(default_factory=dict)
    sandbox_ready: bool = False  # set by simnode/kubelet/sandbox.py once cri-dockerd made the pod's sandbox
    sandbox_error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def times_record(self) -> dict[str, Any]:
        """What keeps startTime and condition transition times stable across a kubelet restart."""
        self.saved_transitions = dict(self.transitions)
        return {"first_seen": self.first_seen, "transitions": {k: list(v) for k, v in self.transitions.items()}}

    @property
    def times_changed(self) -> bool:
        return self.transitions != self.saved_transitions

    def restore_times(self, record: dict[str, Any]) -> None:
        self.first_seen = float(record.get("first_seen") or self.first_seen)
        for cond, value in (record.get("transitions") or {}).items():
            if isinstance(value, list) and len(value) == 2:
                self.transitions[str(cond)] = (str(value[0]), float(value[1]))

    def advance(self, now: float, faults: Faults, runner: Runner) -> bool:
        """Move every container one step; True if something persistent changed."""
        changed = False
        for c in self.containers:
            changed |= self._advance_container(c, now, faults, runner)
        return changed

    def _advance_container(self, c: ContainerSim, now: float, faults: Faults, runner: Runner) -> bool:
        if c.image_id is None or c.terminated is not None:
            return False
        if c.backoff_until is not None:
            if now < c.backoff_until:
                return False
            c.backoff_until = None
        if c.created_at is None:
            c.created_at = now
            c.probe_ok = False
            runner.start(self, c)
            return True
        running_since = c.created_at + delay(faults, "pod_running")
        code = runner.exit_code(self, c)
        faulted = faults.crashloops(self.name) and now >= running_since + CRASH_AFTER_S
        if code is None and not faulted:
            if now - running_since > BACKOFF_RESET_S and c.crash_streak:
                c.crash_streak = 0
                return True
            return False
        if code is None:
            runner.stop(self, c)
        if code is not None and (self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0)):
            c.terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                            "startedAt": rfc3339(min(running_since, now)), "finishedAt": rfc3339(now),
                            "containerID": container_id(self, c)}
            c.created_at = None
            c.pid = None
            return True
        c.last_terminated = {
            "exitCode": 1 if code is None else code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": rfc3339(min(running_since, now)),
            "finishedAt": rfc3339(now),
            "containerID": container_id(self, c),
        }
        c.restart_count += 1
        # pkg/kubelet/kuberuntime/kuberuntime_manager.go doBackOff: a container whose key is not in the back-off
        # (`backOff.IsInBackOffSince(key, ts)` false: its first exit, or the first since the kubelet started) is
        # restarted at once and `backOff.Next(key, ts)` gives the key the initial period; an exit within it
        # waits (CrashLoopBackOff), the period doubling up to the maximum.
        c.backoff_until = (None if c.crash_streak == 0
                           else now + min(BACKOFF_BASE_S * 2.0 ** (c.crash_streak - 1), BACKOFF_MAX_S))
        c.crash_streak += 1
        c.created_at = None
        c.pid = None
        return True

    def stop(self, runner: Runner) -> None:
        for c in self.containers:
            if c.created_at is not None:
                runner.stop(self, c)
                c.created_at = None
                c.pid = None

    def _transition(self, cond: str, status: str, now: float) -> float:
        previous = self.transitions.get(cond)
        if previous is None or previous[0] != status:
            self.transitions[cond] = (status, now)
            return now
        return previous[1]

    def status(self, now: float, faults: Faults, *, host_ip: str) -> dict[str, Any]:
        """The PodStatus the kubelet reports for this pod at `now`."""
        statuses = [container_status(self, c, now, faults) for c in self.containers]
        all_ready = all(s["ready"] for s in statuses)
        started_once = all(s["started"] or s["restartCount"] > 0 or c.terminated for s, c in
                           zip(statuses, self.containers, strict=True))
        ready = "True" if all_ready else "False"
        conds = [
            ("PodReadyToStartContainers", "False" if self.sandbox_error else "True"),
            ("Initialized", "True"),
            ("Ready", ready),
            ("ContainersReady", ready),
            ("PodScheduled", "True"),
        ]
        conditions = []
        for cond, value in conds:
            entry: dict[str, Any] = {"type": cond, "status": value,
                                     "lastTransitionTime": rfc3339(self._transition(cond, value, now)),
                                     "lastProbeTime": None}
            if cond in ("Ready", "ContainersReady") and value == "False":
                waiting = [s["name"] for s in statuses if not s["ready"]]
                entry["reason"] = "ContainersNotReady"
                entry["message"] = f"containers with unready status: [{' '.join(waiting)}]"
            conditions.append(entry)
        ip = host_ip if self.host_network else self.ip
        phase = "Running" if started_once else "Pending"
        ended = [c.terminated for c in self.containers if c.terminated is not None]
        if self.containers and len(ended) == len(self.containers):  # kubelet_pods.go getPhase
            phase = "Succeeded" if all(t.get("exitCode") == 0 for t in ended) else "Failed"
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "startTime": rfc3339(self.first_seen),
            "containerStatuses": statuses,
            "qosClass": self.qos_class,
        }
        if ip:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        return status


def container_id(pod: PodSim, c: ContainerSim) -> str:
    if c.runtime_id:
        return "docker://" + c.runtime_id
    seed = f"{pod.uid}/{c.name}/{c.restart_count}".encode()
    return "docker://" + hashlib.sha256(seed).hexdigest()


def container_status(pod: PodSim, c: ContainerSim, now: float, faults: Faults) -> dict[str, Any]:
    state: dict[str, Any]
    running = False
    ready = False
    if c.terminated is not None:
        state = {"terminated": c.terminated}
    elif c.image_id is None:
        reason = c.image_error_reason(now) if c.image_failures else "ContainerCreating"
        state = {"waiting": {"reason": reason}}
        if c.image_failures:
            state["waiting"]["message"] = c.image_error
            if reason == "ImagePullBackOff" and c.image_error.startswith("Failed to pull image"):
                state["waiting"]["message"] = f'Back-off pulling image "{c.image}"'  # image_manager.go
    elif c.backoff_until is not None:
        wait_s = max(1, round(c.backoff_until - now))
        state = {"waiting": {"reason": "CrashLoopBackOff",
                             "message": f"back-off {wait_s}s restarting failed container={c.name} "
                                        f"pod={pod.name}_{pod.namespace}({pod.uid})"}}
    elif c.created_at is None or now < c.created_at + delay(faults, "pod_running"):
        state = {"waiting": {"reason": "ContainerCreating"}}
    else:
        running_since = c.created_at + delay(faults, "pod_running")
        state = {"running": {"startedAt": rfc3339(running_since)}}
        running = True
        ready = (
            now >= running_since + delay(faults, "pod_ready")
            and (c.probe_ok or not readiness_probe(c))
            and not faults.crashloops(pod.name)
        )
    status: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "imageID": f"docker-pullable://{c.image}@{c.image_id}" if c.image_id else "",
        "ready": ready,
        "started": running,
        "restartCount": c.restart_count,
        "state": state,
        "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
    }
    if running or c.backoff_until is not None or c.terminated is not None:
        status["containerID"] = container_id(pod, c)
    return status


def readiness_probe(c: ContainerSim) -> dict[str, Any] | None:
    """The container's httpGet readiness probe, if it has one and a process that can answer it
    (simulated containers without a process, such as coredns, are ready after the delays)."""
    probe = c.spec.get("readinessProbe")
    if not c.probed or not isinstance(probe, dict) or not isinstance(probe.get("httpGet"), dict):
        return None
    return probe


def qos_class(containers: list[dict[str, Any]]) -> str:
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    def guaranteed(r: dict[str, Any]) -> bool:
        limits = {k: v for k, v in (r.get("limits") or {}).items() if k in ("cpu", "memory")}
        requests = {k: v for k, v in (r.get("requests") or limits).items() if k in ("cpu", "memory")}
        return set(limits) == {"cpu", "memory"} and requests == limits

    return "Guaranteed" if all(guaranteed(r) for r in resources) else "Burstable"


def containers_from_spec(spec: dict[str, Any]) -> list[ContainerSim]:
    sims = []
    for c in spec.get("containers") or []:
        if not isinstance(c, dict) or not c.get("name") or not c.get("image"):
            continue
        command = [str(x) for x in (c.get("command") or [])] + [str(x) for x in (c.get("args") or [])]
        sims.append(ContainerSim(name=str(c["name"]), image=str(c["image"]), command=command, spec=c))
    return sims
