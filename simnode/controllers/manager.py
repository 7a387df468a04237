"""`kube-controller-manager` stand-in: list+watch caches of the objects its controllers need, and one
reconcile pass over all controllers on every change (debounced) or every RESYNC_S. Writes only to the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

from simnode.controllers.common import (
    FlagError,
    client_from_flags,
    hold_leader_lease,
    parse_flags,
    run_until_signal,
    setup_logging,
)
from simnode.controllers.daemonset import DaemonSetController
from simnode.controllers.informer import Informer
from simnode.controllers.misc import EndpointsController, NodeIpamController, ServiceAccountController
from simnode.controllers.nodelifecycle import NodeTaintController
from simnode.controllers.volumes import VolumeController
from simnode.controllers.workloads import WorkloadControllers
from simnode.kubeclient import KubeClient, KubeconfigError
from simnode.paths import NodeRootError, resolve_root

log = logging.getLogger("kube-controller-manager")

RESYNC_S = 2.0
DEBOUNCE_S = 0.05  # let a burst of watch events settle into one pass


class ControllerManager:
    def __init__(self, client: KubeClient, flags: dict[str, str]) -> None:
        self.client = client
        self.informers = {
            "deployments": Informer(client, "/apis/apps/v1/deployments"),
            "replicasets": Informer(client, "/apis/apps/v1/replicasets"),
            "daemonsets": Informer(client, "/apis/apps/v1/daemonsets"),
            "pods": Informer(client, "/api/v1/pods"),
            "nodes": Informer(client, "/api/v1/nodes"),
            "namespaces": Informer(client, "/api/v1/namespaces"),
            "services": Informer(client, "/api/v1/services"),
            "endpoints": Informer(client, "/api/v1/endpoints"),
            "serviceaccounts": Informer(client, "/api/v1/serviceaccounts", field_selector="metadata.name=default"),
            "persistentvolumeclaims": Informer(client, "/api/v1/persistentvolumeclaims"),
            "persistentvolumes": Informer(client, "/api/v1/persistentvolumes"),
            "storageclasses": Informer(client, "/apis/storage.k8s.io/v1/storageclasses"),
        }
        i = self.informers
        self.workloads = WorkloadControllers(client, i["deployments"], i["replicasets"], i["pods"])
        self.daemonsets = DaemonSetController(self.workloads, i["daemonsets"], i["nodes"])
        self.accounts = ServiceAccountController(client, i["namespaces"], i["serviceaccounts"])
        self.endpoints = EndpointsController(client, i["services"], i["endpoints"], i["pods"])
        self.node_taints = NodeTaintController(client, i["nodes"])
        self.volumes = VolumeController(client, i["persistentvolumeclaims"], i["persistentvolumes"],
                                        i["storageclasses"])
        self.ipam: NodeIpamController | None = None
        if flags.get("allocate-node-cidrs") == "true" and flags.get("cluster-cidr"):
            mask = int(flags.get("node-cidr-mask-size") or flags.get("node-cidr-mask-size-ipv4") or 24)
            self.ipam = NodeIpamController(client, i["nodes"], flags["cluster-cidr"], mask)
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for name, informer in self.informers.items():
                informer.on_event = lambda _kind, _obj: self.changed.set()
                group.create_task(informer.run(), name=f"informer {name}")
            group.create_task(self.loop(), name="controllers")

    async def loop(self) -> None:
        while True:
            if all(i.synced.is_set() for i in self.informers.values()):
                await self.pass_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), RESYNC_S)
            await asyncio.sleep(DEBOUNCE_S)
            self.changed.clear()

    async def pass_once(self) -> None:
        steps = [self.node_taints.sync, self.accounts.sync, self.workloads.sync_deployments,
                 self.workloads.sync_replicasets, self.daemonsets.sync, self.endpoints.sync, self.volumes.sync]
        if self.ipam is not None:
            steps.insert(0, self.ipam.sync)
        for step in steps:
            try:
                await step()
            except Exception:  # one controller's bug must not stop the others
                log.exception("controller step %s failed", step.__qualname__)


def main(argv: list[str]) -> int:
    try:
        flags = parse_flags("kube-controller-manager", argv)
        root = resolve_root()
        client = client_from_flags("kube-controller-manager", flags, root)
    except (FlagError, NodeRootError, KubeconfigError) as exc:
        print(f"kube-controller-manager: {exc}", file=sys.stderr)
        return 1
    setup_logging(flags)

    async def run() -> None:
        async with client:
            manager = ControllerManager(client, flags)
            async with asyncio.TaskGroup() as group:
                if flags.get("leader-elect", "true") == "true":
                    identity = f"{socket.gethostname()}_{id(manager):x}"
                    group.create_task(hold_leader_lease(client, "kube-controller-manager", identity),
                                      name="controller-manager lease")
                group.create_task(manager.run(), name="controller-manager")

    return run_until_signal(run)
