"""`kube-scheduler` stand-in: binds pods without spec.nodeName to a Ready node that fits (nodeSelector,
required node affinity, NoSchedule/NoExecute taints vs tolerations, volumes: volumebinding.py) via
pods/binding; a pod that fits nowhere gets PodScheduled=False/Unschedulable with the reason, as the real
scheduler reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import Any

from simnode.controllers.common import (
    FlagError,
    Obj,
    client_from_flags,
    expression_matches,
    hold_leader_lease,
    meta,
    node_ready,
    parse_flags,
    rfc3339,
    run_until_signal,
    setup_logging,
    untolerated_taints,
)
from simnode.controllers.informer import Informer, obj_key
from simnode.controllers.volumebinding import VolumeBinding
from simnode.kubeclient import ApiError, KubeClient, KubeconfigError
from simnode.paths import NodeRootError, resolve_root

log = logging.getLogger("kube-scheduler")

RESYNC_S = 1.0


def affinity_fits(spec: dict[str, Any], node: Obj) -> bool:
    """Required node affinity: any term matches (matchExpressions on labels, matchFields on name)."""
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    labels = meta(node).get("labels") or {}
    fields = {"metadata.name": meta(node).get("name")}
    for term in terms:
        exprs_ok = all(expression_matches(e, labels.get(e.get("key", "")), e.get("key", "") in labels)
                       for e in term.get("matchExpressions") or [])
        fields_ok = all(expression_matches(e, fields.get(e.get("key", "")), e.get("key", "") in fields)
                        for e in term.get("matchFields") or [])
        if exprs_ok and fields_ok:
            return True
    return False


def fit(pod: Obj, nodes: list[Obj], volumes: VolumeBinding | None = None) -> tuple[str | None, str]:
    """(node name, "") for the first fitting node, else (None, the real scheduler's style of message)."""
    spec = pod.get("spec") or {}
    reasons: dict[str, int] = {}
    unresolvable = volumes.pre_filter(pod) if volumes is not None else None
    if unresolvable is not None:
        return None, f"0/{len(nodes)} nodes are available: {unresolvable}. preemption: not eligible due to " \
                     "preemptionPolicy=Never."

    def reject(reason: str) -> None:
        reasons[reason] = reasons.get(reason, 0) + 1

    for node in sorted(nodes, key=lambda n: str(meta(n).get("name"))):
        labels = meta(node).get("labels") or {}
        if not node_ready(node):
            reject("node(s) were not ready or unschedulable")
        elif not affinity_fits(spec, node) or any(
            labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()
        ):
            reject("node(s) didn't match Pod's node affinity/selector")
        elif taints := untolerated_taints(spec, node):
            t = taints[0]
            reject(f"node(s) had untolerated taint {{{t.get('key')}: {t.get('value') or ''}}}")
        elif volumes is not None and (conflict := volumes.node_problem(pod, node)):
            reject(conflict)
        else:
            return str(meta(node)["name"]), ""
    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    message = f"0/{len(nodes)} nodes are available" + (f": {detail}." if detail else ".")
    return None, message + " preemption: not eligible due to preemptionPolicy=Never."


class Scheduler:
    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.pods = Informer(client, "/api/v1/pods", field_selector="spec.nodeName=",
                             predicate=lambda p: not (p.get("spec") or {}).get("nodeName"))
        self.nodes = Informer(client, "/api/v1/nodes")
        self.volumes = VolumeBinding(client)
        self._reported: dict[str, str] = {}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.pods.run(), name="scheduler pod informer")
            group.create_task(self.nodes.run(), name="scheduler node informer")
            for informer in self.volumes.informers:
                group.create_task(informer.run(), name=f"scheduler informer {informer.path}")
            group.create_task(self.loop(), name="scheduler loop")

    async def loop(self) -> None:
        while True:
            if self.pods.synced.is_set() and self.nodes.synced.is_set() and all(
                    i.synced.is_set() for i in self.volumes.informers):
                await self.schedule_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(self.pods.changed, self.nodes.changed), RESYNC_S)
            self.pods.changed.clear()
            self.nodes.changed.clear()

    async def schedule_all(self) -> None:
        nodes = self.nodes.values()
        self._reported = {k: v for k, v in self._reported.items() if self.pods.get(k) is not None}
        for pod in self.pods.values():
            m, spec = meta(pod), pod.get("spec") or {}
            if spec.get("nodeName") or m.get("deletionTimestamp"):
                continue
            if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                continue
            try:
                await self.schedule(pod, nodes)
            except ApiError as exc:
                log.warning("scheduling %s: %s", obj_key(pod), exc)

    async def schedule(self, pod: Obj, nodes: list[Obj]) -> None:
        m = meta(pod)
        key = obj_key(pod)
        node, message = fit(pod, nodes, self.volumes)
        base = f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}"
        if node is None:
            if self._reported.get(key) != message:
                log.info("%s is unschedulable: %s", key, message)
                await self.client.patch(f"{base}/status", {"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastProbeTime": None, "lastTransitionTime": rfc3339(),
                }]}})
                self._reported[key] = message
            return
        if not await self.volumes.pre_bind(pod, node):
            return  # waiting for the claims' volumes to be provisioned on `node`
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": m["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            await self.client.create(f"{base}/binding", binding)
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or bound meanwhile: nothing to do
                raise
        log.info("bound %s to %s", key, node)
        self._reported.pop(key, None)
        self.pods.forget(pod)


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    tasks = [asyncio.create_task(a.wait(), name="wait a"), asyncio.create_task(b.wait(), name="wait b")]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def main(argv: list[str]) -> int:
    try:
        flags = parse_flags("kube-scheduler", argv)
        root = resolve_root()
        client = client_from_flags("kube-scheduler", flags, root)
    except (FlagError, NodeRootError, KubeconfigError) as exc:
        print(f"kube-scheduler: {exc}", file=sys.stderr)
        return 1
    setup_logging(flags)

    async def run() -> None:
        async with client:
            scheduler = Scheduler(client)
            async with asyncio.TaskGroup() as group:
                if flags.get("leader-elect", "true") == "true":
                    identity = f"{socket.gethostname()}_{id(scheduler):x}"
                    group.create_task(hold_leader_lease(client, "kube-scheduler", identity), name="scheduler lease")
                group.create_task(scheduler.run(), name="scheduler")

    return run_until_signal(run)
