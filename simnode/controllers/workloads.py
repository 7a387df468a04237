"""Deployment and ReplicaSet controllers: Deployment -> ReplicaSet `<name>-<pod-template-hash>` ->
Pods `<rs>-<5 chars>`, rolling updates (new RS up, old RS to 0 once the new one is ready), and the
status fields kubectl (rollout status, get) reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from typing import Any

from simnode.controllers.common import Obj, controller_uid, meta, owner_ref, pod_ready, rfc3339
from simnode.controllers.informer import Informer
from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("controller.workloads")

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand SafeEncodeString alphabet


def template_hash(template: dict[str, Any]) -> str:
    """A stable short hash of a pod template, encoded like the real pod-template-hash."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    number = str(int.from_bytes(digest[:4], "big"))
    return "".join(_SAFE[ord(ch) % len(_SAFE)] for ch in number)


def active(pod: Obj) -> bool:
    return not meta(pod).get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in (
        "Succeeded", "Failed")


def _int_or_percent(value: Any, total: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = total * int(value[:-1]) / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value or 0)


def _condition(old: list[dict[str, Any]], kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    now = rfc3339()
    prev = next((c for c in old if c.get("type") == kind), None)
    unchanged = prev is not None and prev.get("status") == status and prev.get("reason") == reason
    return {
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastUpdateTime": prev.get("lastUpdateTime", now) if unchanged and prev else now,
        "lastTransitionTime": prev.get("lastTransitionTime", now)
        if prev is not None and prev.get("status") == status else now,
    }


def status_differs(desired: dict[str, Any], current: dict[str, Any]) -> bool:
    return any(current.get(k) != v for k, v in desired.items())


class WorkloadControllers:
    def __init__(self, client: KubeClient, deployments: Informer, replicasets: Informer, pods: Informer) -> None:
        self.client = client
        self.deployments = deployments
        self.replicasets = replicasets
        self.pods = pods

    def owned(self, informer: Informer, owner: Obj) -> list[Obj]:
        uid, ns = meta(owner).get("uid"), meta(owner).get("namespace")
        return [o for o in informer.values(ns) if controller_uid(o) == uid]

    # --- Deployments ------------------------------------------------------------------------------

    async def sync_deployments(self) -> None:
        for dep in self.deployments.values():
            if meta(dep).get("deletionTimestamp"):
                continue
            try:
                await self.sync_deployment(dep)
            except ApiError as exc:
                log.warning("deployment %s/%s: %s", meta(dep).get("namespace"), meta(dep).get("name"), exc)

    async def sync_deployment(self, dep: Obj) -> None:
        m, spec = meta(dep), dep.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        digest = template_hash(template)
        rss = self.owned(self.replicasets, dep)
        new = next((rs for rs in rss if meta(rs).get("labels", {}).get(HASH_LABEL) == digest), None)
        olds = [rs for rs in rss if rs is not new]
        revisions = [int((meta(rs).get("annotations") or {}).get(REVISION, "0") or 0) for rs in olds]
        revision = str(max(revisions, default=0) + 1)
        if new is None:
            new = await self.create_rs(dep, digest, revision, 0 if spec.get("paused") else desired)
        elif int((meta(new).get("annotations") or {}).get(REVISION, "0") or 0) <= max(revisions, default=0):
            # A template that returns to an older ReplicaSet (rollback) makes it the newest revision.
            new = await self._patch(new, "replicasets", {"metadata": {"annotations": {REVISION: revision}}})
        new_rev = (meta(new).get("annotations") or {}).get(REVISION, revision)
        if not spec.get("paused"):
            await self.rollout(dep, new, olds, desired)
        if (m.get("annotations") or {}).get(REVISION) != new_rev:
            dep = await self._patch(dep, "deployments", {"metadata": {"annotations": {REVISION: new_rev}}})
        await self.deployment_status(dep, new, olds, desired)

    async def rollout(self, dep: Obj, new: Obj, olds: list[Obj], desired: int) -> None:
        strategy = ((dep.get("spec") or {}).get("strategy") or {}).get("type", "RollingUpdate")
        old_pods = sum(int((rs.get("status") or {}).get("replicas") or 0) for rs in olds)
        old_scaled = sum(int((rs.get("spec") or {}).get("replicas") or 0) for rs in olds)
        if strategy == "Recreate":
            # Old pods go first; the new ReplicaSet scales up only when none is left.
            await self.scale_all(olds, 0)
            if old_pods == 0 and old_scaled == 0:
                await self.scale(new, desired)
            return
        await self.scale(new, desired)
        new_ready = int((new.get("status") or {}).get("availableReplicas") or 0)
        if new_ready >= desired or desired == 0:
            await self.scale_all(olds, 0)

    async def scale_all(self, rss: list[Obj], replicas: int) -> None:
        for rs in rss:
            await self.scale(rs, replicas)

    async def scale(self, rs: Obj, replicas: int) -> None:
        if int((rs.get("spec") or {}).get("replicas", 1)) != replicas:
            log.info("scaling replicaset %s/%s to %d", meta(rs)["namespace"], meta(rs)["name"], replicas)
            await self._patch(rs, "replicasets", {"spec": {"replicas": replicas}})

    async def create_rs(self, dep: Obj, digest: str, revision: str, replicas: int) -> Obj:
        m, spec = meta(dep), dep.get("spec") or {}
        template = copy.deepcopy(spec.get("template") or {})
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = digest
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})[HASH_LABEL] = digest
        body: Obj = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{m['name']}-{digest}",
                "namespace": m["namespace"],
                "labels": {**(template["metadata"].get("labels") or {})},
                "annotations": {REVISION: revision, "deployment.kubernetes.io/desired-replicas": str(replicas)},
                "ownerReferences": [owner_ref(dep, "apps/v1", "Deployment")],
            },
            "spec": {"replicas": replicas, "selector": selector, "template": template,
                     "minReadySeconds": spec.get("minReadySeconds", 0)},
        }
        log.info("creating replicaset %s/%s", m["namespace"], body["metadata"]["name"])
        created = await self.client.ensure(f"/apis/apps/v1/namespaces/{m['namespace']}/replicasets", body)
        self.replicasets.upsert(created)
        return created

    async def deployment_status(self, dep: Obj, new: Obj, olds: list[Obj], desired: int) -> None:
        def total(rss: list[Obj], key: str) -> int:
            return sum(int((rs.get("status") or {}).get(key) or 0) for rs in rss)

        everything = [new, *olds]
        available = total(everything, "availableReplicas")
        updated = total([new], "replicas")
        spec = dep.get("spec") or {}
        rolling = ((spec.get("strategy") or {}).get("rollingUpdate") or {})
        max_unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
        old_conditions = (dep.get("status") or {}).get("conditions") or []
        if available >= desired - max_unavailable:
            avail = _condition(old_conditions, "Available", "True", "MinimumReplicasAvailable",
                               "Deployment has minimum availability.")
        else:
            avail = _condition(old_conditions, "Available", "False", "MinimumReplicasUnavailable",
                               "Deployment does not have minimum availability.")
        rs_name = meta(new)["name"]
        complete = updated == desired and total(everything, "replicas") == desired and available >= desired
        if complete:
            prog = _condition(old_conditions, "Progressing", "True", "NewReplicaSetAvailable",
                              f'ReplicaSet "{rs_name}" has successfully progressed.')
        else:
            prog = _condition(old_conditions, "Progressing", "True", "ReplicaSetUpdated",
                              f'ReplicaSet "{rs_name}" is progressing.')
        status = {
            "observedGeneration": meta(dep).get("generation", 1),
            "replicas": total(everything, "replicas"),
            "updatedReplicas": updated,
            "readyReplicas": total(everything, "readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": max(desired - available, 0),
            "conditions": [avail, prog],
        }
        current = dep.get("status") or {}
        comparable = {k: v for k, v in status.items() if k != "conditions"}
        same_conditions = [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
            (c.get("type"), c.get("status"), c.get("reason")) for c in current.get("conditions") or []]
        if status_differs(comparable, current) or not same_conditions:
            await self._patch(dep, "deployments", {"status": status}, subresource="status")

    # --- ReplicaSets ------------------------------------------------------------------------------

    async def sync_replicasets(self) -> None:
        for rs in self.replicasets.values():
            if meta(rs).get("deletionTimestamp"):
                continue
            try:
                await self.sync_replicaset(rs)
            except ApiError as exc:
                log.warning("replicaset %s/%s: %s", meta(rs).get("namespace"), meta(rs).get("name"), exc)

    async def sync_replicaset(self, rs: Obj) -> None:
        m, spec = meta(rs), rs.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        pods = [p for p in self.owned(self.pods, rs) if active(p)]
        if len(pods) < desired:
            for _ in range(desired - len(pods)):
                pods.append(await self.create_pod(rs))
        elif len(pods) > desired:
            # Delete the least useful first: unscheduled, then not ready, then the newest.
            pods.sort(key=lambda p: (bool((p.get("spec") or {}).get("nodeName")), pod_ready(p),
                                     _neg_time(meta(p).get("creationTimestamp", ""))))
            for pod in pods[: len(pods) - desired]:
                await self.delete_pod(pod)
            pods = pods[len(pods) - desired:]
        ready = sum(1 for p in pods if pod_ready(p))
        status = {"replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
                  "availableReplicas": ready, "observedGeneration": m.get("generation", 1)}
        if status_differs(status, rs.get("status") or {}):
            await self._patch(rs, "replicasets", {"status": status}, subresource="status")

    async def create_pod(self, owner: Obj, *, kind: str = "ReplicaSet", extra: Obj | None = None) -> Obj:
        m = meta(owner)
        template = copy.deepcopy((owner.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{m['name']}-",
                "namespace": m["namespace"],
                "labels": dict(tmeta.get("labels") or {}),
                "ownerReferences": [owner_ref(owner, "apps/v1", kind)],
            },
            "spec": template.get("spec") or {},
        }
        if tmeta.get("annotations"):
            body["metadata"]["annotations"] = dict(tmeta["annotations"])
        if extra:
            body["metadata"]["labels"].update(extra.get("labels") or {})
            body["spec"].update(extra.get("spec") or {})
        created = await self.client.create(f"/api/v1/namespaces/{m['namespace']}/pods", body)
        log.info("created pod %s/%s for %s %s", m["namespace"], meta(created).get("name"), kind, m["name"])
        self.pods.upsert(created)
        return created

    async def delete_pod(self, pod: Obj) -> None:
        m = meta(pod)
        log.info("deleting pod %s/%s", m["namespace"], m["name"])
        try:
            await self.client.delete(f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        self.pods.forget(pod)

    async def _patch(self, obj: Obj, resource: str, body: Obj, *, subresource: str = "") -> Obj:
        m = meta(obj)
        path = f"/apis/apps/v1/namespaces/{m['namespace']}/{resource}/{m['name']}"
        updated = await self.client.patch(f"{path}/{subresource}" if subresource else path, body)
        (self.deployments if resource == "deployments" else self.replicasets).upsert(updated)
        return updated


def _neg_time(ts: str) -> list[int]:
    """Sort key that puts newer creation timestamps first."""
    return [-ord(c) for c in ts]
