"""Node lifecycle controller, NoSchedule tainting only: a node whose Ready condition is False carries
`node.kubernetes.io/not-ready:NoSchedule`, Unknown (or none yet) carries `node.kubernetes.io/unreachable:NoSchedule`,
True carries neither. Writes only node specs.
"""

from __future__ import annotations

import logging
from typing import Any

from simnode.controllers.common import Obj, meta
from simnode.controllers.informer import Informer
from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("controller.nodelifecycle")

NOT_READY = "node.kubernetes.io/not-ready"
UNREACHABLE = "node.kubernetes.io/unreachable"
# kubernetes/kubernetes pkg/controller/nodelifecycle/node_lifecycle_controller.go, nodeConditionToTaintKeyStatusMap
# and doNoScheduleTaintingPass: Ready False -> not-ready, Unknown -> unreachable, both with effect NoSchedule.
# (The NoExecute taints and evictions of that controller are not simulated: a single node has nowhere to go.)
_READY_TAINT = {"False": NOT_READY, "Unknown": UNREACHABLE}


def wanted_taints(node: Obj) -> list[dict[str, Any]]:
    """The node's taints with the Ready-derived NoSchedule taint set to match its Ready condition."""
    ready = next((c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    # A node that has posted no Ready condition yet counts as Unknown, as in the controller's tryUpdateNodeHealth.
    status = str(ready.get("status")) if ready else "Unknown"
    keep = [t for t in (node.get("spec") or {}).get("taints") or []
            if not (t.get("key") in (NOT_READY, UNREACHABLE) and t.get("effect") == "NoSchedule")]
    key = _READY_TAINT.get(status)
    if key is None:
        return keep
    # The admission plugin TaintNodesByCondition puts the same taint on every new node
    # (kubernetes/kubernetes plugin/pkg/admission/nodetaint/admission.go); this pass keeps it until Ready is True.
    return [*keep, {"key": key, "effect": "NoSchedule"}]


class NodeTaintController:
    def __init__(self, client: KubeClient, nodes: Informer) -> None:
        self.client = client
        self.nodes = nodes

    async def sync(self) -> None:
        for node in self.nodes.values():
            current = (node.get("spec") or {}).get("taints") or []
            wanted = wanted_taints(node)
            if _keys(current) == _keys(wanted):
                continue
            name = meta(node)["name"]
            try:
                updated = await self.client.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": wanted or None}})
            except ApiError as exc:
                log.warning("node %s taints: %s", name, exc)
                continue
            log.info("node %s taints now %s", name, sorted(_keys(wanted)) or "none")
            self.nodes.upsert(updated)


def _keys(taints: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(str(t.get("key")), str(t.get("effect"))) for t in taints}
