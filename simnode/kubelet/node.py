"""The Node object and its heartbeat: registration, status (Ready, addresses, capacity, nodeInfo) and
the Lease in kube-node-lease. Writes only to the API.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from simnode.kubeclient import ApiError, KubeClient
from simnode.kubelet.pods import rfc3339
from simnode.launch import build_version

log = logging.getLogger("kubelet.node")

LEASE_DURATION_S = 40
KUBELET_PORT = 10250
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def node_name_from_cert(cert_pem: bytes | None) -> str | None:
    """`<name>` from a client certificate whose CN is `system:node:<name>`."""
    if not cert_pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = str(attr.value)
        if value.startswith("system:node:") and len(value) > len("system:node:"):
            return value.removeprefix("system:node:")
    return None


def default_node_ip() -> str:
    """The address of the interface holding the default route (no packet is sent), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects a route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _capacity() -> dict[str, str]:
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    st = os.statvfs("/")
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_kib}Ki",
        "ephemeral-storage": f"{st.f_blocks * st.f_frsize // 1024}Ki",
        "hugepages-2Mi": "0",
        "pods": "110",
    }


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


class NodeAgent:
    def __init__(
        self, client: KubeClient, name: str, node_ip: str, runtime_version: str,
        network_error: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.client = client
        self.name = name
        self.node_ip = node_ip
        self.runtime_version = runtime_version
        self.network_error = network_error  # the runtime's NetworkReady, as the kubelet words it (cni.py)
        self.node: dict[str, Any] = {}
        self.ready_since = time.time()
        self._ready: tuple[str, float] = ("", self.ready_since)  # Ready status and when it last changed

    @property
    def path(self) -> str:
        return f"/api/v1/nodes/{self.name}"

    @property
    def uid(self) -> str:
        return str((self.node.get("metadata") or {}).get("uid", ""))

    @property
    def pod_cidr(self) -> str | None:
        cidr = (self.node.get("spec") or {}).get("podCIDR")
        return str(cidr) if cidr else None

    def labels(self) -> dict[str, str]:
        arch = ARCH.get(platform.machine(), platform.machine())
        return {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": arch,
        }

    def status(self, now: float) -> dict[str, Any]:
        def cond(kind: str, status: str, reason: str, message: str, since: float) -> dict[str, str]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": rfc3339(now), "lastTransitionTime": rfc3339(since)}

        # pkg/kubelet/nodestatus/setters.go ReadyCondition: runtime and network errors make Ready False with
        # reason KubeletNotReady and the errors as the message; the transition time moves only on a change.
        network_error = self.network_error()
        ready = "False" if network_error else "True"
        if self._ready[0] != ready:
            self._ready = (ready, now)
        if network_error:
            ready_cond = cond("Ready", "False", "KubeletNotReady", network_error, self._ready[1])
        else:
            ready_cond = cond("Ready", "True", "KubeletReady", "kubelet is posting ready status", self._ready[1])
        capacity = _capacity()
        return {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available", self.ready_since),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure",
                     self.ready_since),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available",
                     self.ready_since),
                ready_cond,
            ],
            "addresses": [{"type": "InternalIP", "address": self.node_ip}, {"type": "Hostname", "address": self.name}],
            "capacity": capacity,
            "allocatable": capacity,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id", "0" * 32),
                "systemUUID": _read("/sys/class/dmi/id/product_uuid", "00000000-0000-0000-0000-000000000000"),
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": _os_image(),
                "containerRuntimeVersion": self.runtime_version,
                "kubeletVersion": build_version(),
                "kubeProxyVersion": build_version(),
                "operatingSystem": "linux",
                "architecture": self.labels()["kubernetes.io/arch"],
            },
        }

    async def register(self) -> None:
        """Create the Node (or take over an existing one of that name) and post its status."""
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": self.labels(),
                "annotations": {"volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            },
            "spec": {},
        }
        try:
            self.node = await self.client.create("/api/v1/nodes", body)
            log.info("registered node %s", self.name)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.node = await self.client.patch(self.path, {"metadata": {"labels": self.labels()}})
            log.info("node %s already registered; updated it", self.name)
        await self.post_status()

    async def post_status(self) -> None:
        self.node = await self.client.patch(f"{self.path}/status", {"status": self.status(time.time())})

    async def heartbeat(self) -> None:
        """Status and lease renewal; re-registers a node that was deleted."""
        try:
            await self.post_status()
        except ApiError as exc:
            if exc.status != 404:
                raise
            log.warning("node %s was deleted; registering it again", self.name)
            await self.register()
        await self.renew_lease()

    async def renew_lease(self) -> None:
        now = time.time()
        micro = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        collection = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        try:
            await self.client.patch(f"{collection}/{self.name}", {"spec": {"renewTime": micro}})
        except ApiError as exc:
            if exc.status != 404:
                raise
        else:
            return
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
        await self.client.create(collection, {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease", "ownerReferences": [owner]},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_DURATION_S,
                     "renewTime": micro},
        })
