"""Small controllers of kube-controller-manager: ServiceAccount `default` per namespace, Endpoints for
Services with selectors (ready and not-ready pod IPs), and node IPAM (spec.podCIDR from --cluster-cidr).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from simnode.controllers.common import Obj, meta, pod_ready, rfc3339
from simnode.controllers.informer import Informer, obj_key
from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("controller.misc")

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"  # also marks Endpoints this controller owns


class ServiceAccountController:
    def __init__(self, client: KubeClient, namespaces: Informer, accounts: Informer) -> None:
        self.client = client
        self.namespaces = namespaces
        self.accounts = accounts

    async def sync(self) -> None:
        for ns in self.namespaces.values():
            name = meta(ns).get("name")
            if meta(ns).get("deletionTimestamp") or self.accounts.get(f"{name}/default") is not None:
                continue
            body = {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": name}}
            try:
                created = await self.client.ensure(f"/api/v1/namespaces/{name}/serviceaccounts", body)
            except ApiError as exc:
                log.warning("serviceaccount %s/default: %s", name, exc)
                continue
            log.info("created serviceaccount %s/default", name)
            self.accounts.upsert(created)


def _target_port(port: dict[str, Any], pod: Obj) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def endpoint_subsets(service: Obj, pods: list[Obj]) -> list[dict[str, Any]]:
    """Endpoints subsets: one per distinct port set, addresses split by readiness, sorted for stability."""
    selector = (service.get("spec") or {}).get("selector") or {}
    groups: dict[tuple[tuple[str, int, str], ...], dict[str, list[dict[str, Any]]]] = {}
    for pod in pods:
        labels = meta(pod).get("labels") or {}
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or meta(pod).get("deletionTimestamp") or any(labels.get(k) != v for k, v in selector.items()):
            continue
        ports = []
        for sp in (service.get("spec") or {}).get("ports") or []:
            target = _target_port(sp, pod)
            if target is not None:
                ports.append((str(sp.get("name") or ""), target, str(sp.get("protocol") or "TCP")))
        address = {"ip": ip, "targetRef": {"kind": "Pod", "namespace": meta(pod)["namespace"],
                                           "name": meta(pod)["name"], "uid": meta(pod).get("uid")}}
        if (pod.get("spec") or {}).get("nodeName"):
            address["nodeName"] = pod["spec"]["nodeName"]
        group = groups.setdefault(tuple(sorted(ports)), {"addresses": [], "notReadyAddresses": []})
        group["addresses" if pod_ready(pod) else "notReadyAddresses"].append(address)
    subsets = []
    for ports_key, group in sorted(groups.items()):
        subset: dict[str, Any] = {}
        for kind in ("addresses", "notReadyAddresses"):
            if group[kind]:
                subset[kind] = sorted(group[kind], key=lambda a: (a["ip"], a["targetRef"]["name"]))
        subset["ports"] = [{**({"name": n} if n else {}), "port": p, "protocol": proto} for n, p, proto in ports_key]
        subsets.append(subset)
    return subsets


class EndpointsController:
    def __init__(self, client: KubeClient, services: Informer, endpoints: Informer, pods: Informer) -> None:
        self.client = client
        self.services = services
        self.endpoints = endpoints
        self.pods = pods

    async def sync(self) -> None:
        for svc in self.services.values():
            if not (svc.get("spec") or {}).get("selector"):
                continue  # no selector: its Endpoints are managed by someone else (e.g. `kubernetes`)
            try:
                await self.sync_one(svc)
            except ApiError as exc:
                log.warning("endpoints %s: %s", obj_key(svc), exc)
        for ep in self.endpoints.values():
            if TRIGGER in (meta(ep).get("annotations") or {}) and self.services.get(obj_key(ep)) is None:
                try:
                    await self.client.delete(f"/api/v1/namespaces/{meta(ep)['namespace']}/endpoints/{meta(ep)['name']}")
                except ApiError as exc:
                    if exc.status != 404:
                        log.warning("endpoints %s: %s", obj_key(ep), exc)
                self.endpoints.forget(ep)

    async def sync_one(self, svc: Obj) -> None:
        m = meta(svc)
        subsets = endpoint_subsets(svc, self.pods.values(m["namespace"]))
        current = self.endpoints.get(obj_key(svc))
        collection = f"/api/v1/namespaces/{m['namespace']}/endpoints"
        if current is None:
            body = {"apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": m["name"], "namespace": m["namespace"],
                                 "labels": dict(m.get("labels") or {}), "annotations": {TRIGGER: rfc3339()}},
                    "subsets": subsets}
            created = await self.client.ensure(collection, body)
            self.endpoints.upsert(created)
            if (created.get("subsets") or []) == subsets:
                return
            current = created
        if (current.get("subsets") or []) != subsets:
            updated = await self.client.patch(
                f"{collection}/{m['name']}",
                {"metadata": {"annotations": {TRIGGER: rfc3339()}}, "subsets": subsets},
            )
            self.endpoints.upsert(updated)


class NodeIpamController:
    """With --allocate-node-cidrs=true, give each node a /mask slice of --cluster-cidr."""

    def __init__(self, client: KubeClient, nodes: Informer, cluster_cidr: str, mask: int) -> None:
        self.client = client
        self.nodes = nodes
        self.network = ipaddress.ip_network(cluster_cidr.split(",")[0], strict=False)
        self.mask = max(mask, self.network.prefixlen)

    async def sync(self) -> None:
        used = {(n.get("spec") or {}).get("podCIDR") for n in self.nodes.values()}
        for node in self.nodes.values():
            if (node.get("spec") or {}).get("podCIDR"):
                continue
            free = next((str(s) for s in self.network.subnets(new_prefix=self.mask) if str(s) not in used), None)
            if free is None:
                log.error("cluster CIDR %s has no free /%d for node %s", self.network, self.mask, meta(node)["name"])
                return
            try:
                updated = await self.client.patch(f"/api/v1/nodes/{meta(node)['name']}",
                                                  {"spec": {"podCIDR": free, "podCIDRs": [free]}})
            except ApiError as exc:
                log.warning("node %s podCIDR: %s", meta(node)["name"], exc)
                continue
            log.info("allocated podCIDR %s to node %s", free, meta(node)["name"])
            used.add(free)
            self.nodes.upsert(updated)
