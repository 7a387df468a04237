"""Pod sandboxes as cri-dockerd makes them (RunPodSandbox): the pause image of the *running* cri-dockerd must be
in the engine, and the engine must accept the kubelet's cgroup parent. Until a pod has a sandbox none of its
containers is looked at: the pod stays ContainerCreating and the kubelet logs FailedCreatePodSandBox, as a real
node does. Reads the engine (`/info`, image inspect) and cri-dockerd's unit state from the simulated systemctl;
writes nothing.
"""

from __future__ import annotations

import logging
import time

from simnode.faults import Faults
from simnode.kubelet.docker import DockerRuntime, RuntimeUnavailable
from simnode.kubelet.pods import PodSim
from simnode.paths import NodeRoot
from simnode.systemd import Systemd

log = logging.getLogger("kubelet.sandbox")

CRI_DOCKER_UNIT = "cri-docker.service"
# Mirantis/cri-dockerd v0.3.16 cmd/cri/options/options.go: defaultPodSandboxImageName/Version.
CRI_DOCKERD_DEFAULT_PAUSE = "registry.k8s.io/pause:3.9"
PAUSE_FLAG = "--pod-infra-container-image"
CHECK_PERIOD_S = 1.0  # the engine is asked at most this often; a pod waits at least this long after a fix
_POD = "\0pod\0"  # where the pod name goes in a cached error
_RPC = "rpc error: code = "


def pause_image_of(argv: list[str]) -> str:
    """cri-dockerd's sandbox image from its command line (config/options.go: pod-infra-container-image)."""
    for index, arg in enumerate(argv):
        if arg.startswith(PAUSE_FLAG + "="):
            return arg.split("=", 1)[1]
        if arg == PAUSE_FLAG and index + 1 < len(argv):
            return argv[index + 1]
    return CRI_DOCKERD_DEFAULT_PAUSE


class SandboxGate:
    def __init__(self, root: NodeRoot, docker: DockerRuntime) -> None:
        self.root = root
        self.docker = docker
        self.kubelet_cgroup_driver = "cgroupfs"  # the kubelet's own default (pkg/kubelet/apis/config/v1beta1)
        self._cached: tuple[float, str | None] | None = None

    async def admit(self, sim: PodSim, faults: Faults) -> bool:
        """True once the pod has a sandbox; False (reason in `sim.sandbox_error`, logged once) while it cannot."""
        if sim.sandbox_ready:
            return True
        if any(c.image_id is not None or c.created_at is not None for c in sim.containers):
            sim.sandbox_ready = True  # adopted from an earlier kubelet: its sandbox exists
            return True
        error = await self._error(faults)
        if error is None:
            sim.sandbox_ready, sim.sandbox_error = True, None
            return True
        # kubelet pkg/kubelet/kuberuntime/kuberuntime_manager.go SyncPod: event FailedCreatePodSandBox,
        # "Failed to create pod sandbox: <the runtime's error>"; the pod's containers stay ContainerCreating.
        message = error.replace(_POD, sim.name)
        if sim.sandbox_error != message:
            log.error('FailedCreatePodSandBox pod="%s": Failed to create pod sandbox: %s', sim.key, message)
        sim.sandbox_error = message
        return False

    async def _error(self, faults: Faults) -> str | None:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= CHECK_PERIOD_S:
            self._cached = (now, await self._check(faults))
        return self._cached[1]

    async def _check(self, faults: Faults) -> str | None:
        try:
            error = await self._pause_image_error() or await self._cgroup_error(faults)
        except RuntimeUnavailable as exc:
            error = f'failed to create a sandbox for pod "{_POD}": {exc}'
        return None if error is None or error.startswith(_RPC) else _RPC + "Unknown desc = " + error

    async def _pause_image_error(self) -> str | None:
        systemd = Systemd(self.root)
        record = systemd.state(CRI_DOCKER_UNIT)
        if not record:
            return None  # no cri-dockerd on this machine (a root laid out without simnode.host): nothing to model
        if systemd.active_state(CRI_DOCKER_UNIT) != "active":
            return (_RPC + 'Unavailable desc = connection error: desc = "transport: Error while dialing: '
                    'dial unix /var/run/cri-dockerd.sock: connect: connection refused"')
        # Mirantis/cri-dockerd core/sandbox_run.go RunPodSandbox step 1 and core/sandbox_helpers.go
        # ensureSandboxImageExists: the image of the flags cri-dockerd was started with, pulled if absent.
        image = pause_image_of([str(a) for a in record.get("argv") or []])
        if await self.docker.image_id(image) is not None:
            return None
        # The simulated node is offline: images come from the lifecycle service, never from a pull.
        return (f'failed pulling image "{image}": Error response from daemon: Get "https://{image.split("/")[0]}/v2/": '
                "dial tcp: lookup on the simulated node: no such host (the simulated node never pulls)")

    async def _cgroup_error(self, faults: Faults) -> str | None:
        engine = faults.engine_cgroup_driver or str((await self.docker.info()).get("CgroupDriver") or "cgroupfs")
        # Mirantis/cri-dockerd core/docker_service.go GenerateExpectedCgroupParent: with the engine on systemd
        # only the last part of the kubelet's cgroupfs parent ("/kubepods/burstable/pod<uid>") is passed, and
        # moby daemon/daemon_unix.go verifyPlatformContainerSettings refuses a parent that is not "xxx.slice".
        # The reverse (kubelet systemd, engine cgroupfs) is accepted by both: the slice name is just a path.
        if engine == "systemd" and self.kubelet_cgroup_driver == "cgroupfs":
            return (f'failed to create a sandbox for pod "{_POD}": Error response from daemon: '
                    'cgroup-parent for systemd cgroup should be a valid slice named as "xxx.slice"')
        return None
