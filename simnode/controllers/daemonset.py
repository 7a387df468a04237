"""DaemonSet controller: one Pod per Ready node the DaemonSet fits (nodeSelector, affinity, taints with
the tolerations the real controller adds), pinned by node affinity and bound by the scheduler; pods of
an old template are replaced one at a time; status counts from pod readiness.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from simnode.controllers.common import Obj, meta, node_ready, pod_ready
from simnode.controllers.informer import Informer
from simnode.controllers.scheduler import fit
from simnode.controllers.workloads import WorkloadControllers, active, status_differs, template_hash
from simnode.kubeclient import ApiError

log = logging.getLogger("controller.daemonset")

REVISION_LABEL = "controller-revision-hash"
# Added to every daemon pod by the real controller, so daemons survive node trouble.
DEFAULT_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]


def target_node(pod: Obj) -> str | None:
    """The node a daemon pod is for: its nodeName, or the matchFields pin set at creation."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    for term in required.get("nodeSelectorTerms") or []:
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") == "In" and f.get("values"):
                return str(f["values"][0])
    return None


def pinned_spec(spec: dict[str, Any], node: str) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    tolerations = list(out.get("tolerations") or [])
    for t in DEFAULT_TOLERATIONS:
        if t not in tolerations:
            tolerations.append(t)
    out["tolerations"] = tolerations
    pin = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    out.setdefault("affinity", {}).setdefault("nodeAffinity", {})[
        "requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [pin]}
    return out


class DaemonSetController:
    def __init__(self, workloads: WorkloadControllers, daemonsets: Informer, nodes: Informer) -> None:
        self.w = workloads
        self.daemonsets = daemonsets
        self.nodes = nodes

    async def sync(self) -> None:
        for ds in self.daemonsets.values():
            if meta(ds).get("deletionTimestamp"):
                continue
            try:
                await self.sync_one(ds)
            except ApiError as exc:
                log.warning("daemonset %s/%s: %s", meta(ds).get("namespace"), meta(ds).get("name"), exc)

    def eligible_nodes(self, ds: Obj) -> list[str]:
        spec = ((ds.get("spec") or {}).get("template") or {}).get("spec") or {}
        names = []
        for node in self.nodes.values():
            name = str(meta(node).get("name"))
            probe = {"spec": pinned_spec(spec, name)}
            if node_ready(node) and fit(probe, [node])[0] is not None:
                names.append(name)
        return sorted(names)

    async def sync_one(self, ds: Obj) -> None:
        m, spec = meta(ds), ds.get("spec") or {}
        template = spec.get("template") or {}
        digest = template_hash(template)
        wanted = self.eligible_nodes(ds)
        pods = [p for p in self.w.owned(self.w.pods, ds) if active(p)]
        by_node: dict[str, list[Obj]] = {}
        for pod in pods:
            by_node.setdefault(target_node(pod) or "", []).append(pod)
        for node, on_node in by_node.items():
            if node not in wanted:  # node gone, or no longer fits: the daemon leaves it
                for pod in on_node:
                    await self.w.delete_pod(pod)
        # Rolling update with maxUnavailable 1: replace one outdated pod only while all others are ready.
        outdated = [p for p in pods if (meta(p).get("labels") or {}).get(REVISION_LABEL) != digest
                    and target_node(p) in wanted]
        replaced: list[Obj] = []
        if outdated and all(pod_ready(p) for p in pods if p is not outdated[0]):
            await self.w.delete_pod(outdated[0])
            replaced.append(outdated[0])
        for node in wanted:
            current = [p for p in by_node.get(node, []) if not any(p is r for r in replaced)]
            if not current:
                extra = {"labels": {REVISION_LABEL: digest, "pod-template-generation": str(m.get("generation", 1))},
                         "spec": pinned_spec(template.get("spec") or {}, node)}
                await self.w.create_pod(ds, kind="DaemonSet", extra=extra)
        await self.status(ds, wanted, digest)

    async def status(self, ds: Obj, wanted: list[str], digest: str) -> None:
        pods = [p for p in self.w.owned(self.w.pods, ds) if active(p) and target_node(p) in wanted]
        scheduled = {target_node(p) for p in pods if (p.get("spec") or {}).get("nodeName")}
        ready = {target_node(p) for p in pods if pod_ready(p)}
        updated = {target_node(p) for p in pods if (meta(p).get("labels") or {}).get(REVISION_LABEL) == digest}
        status = {
            "currentNumberScheduled": len(scheduled),
            "numberMisscheduled": 0,
            "desiredNumberScheduled": len(wanted),
            "numberReady": len(ready),
            "numberAvailable": len(ready),
            "numberUnavailable": len(wanted) - len(ready),
            "updatedNumberScheduled": len(updated),
            "observedGeneration": meta(ds).get("generation", 1),
        }
        if status_differs(status, ds.get("status") or {}):
            m = meta(ds)
            updated_ds = await self.w.client.patch(
                f"/apis/apps/v1/namespaces/{m['namespace']}/daemonsets/{m['name']}/status", {"status": status})
            self.daemonsets.upsert(updated_ds)
