"""The kube-scheduler's VolumeBinding plugin for pods that use PersistentVolumeClaims: a missing or
terminating claim, or an unbound claim of an Immediate class, makes the pod unschedulable; a bound claim's
volume must fit the node (nodeAffinity); for an unbound claim of a WaitForFirstConsumer class the chosen node
is written to the claim (volume.kubernetes.io/selected-node) and the pod is bound only once the claim is.

Follows kubernetes/kubernetes pkg/scheduler/framework/plugins/volumebinding/volume_binding.go (PreFilter
messages, Filter's ErrReasonNodeConflict, PreBind waiting for the provisioner) and binder.go
(AssumePodVolumes/BindPodVolumes: the selected-node annotation).
"""

from __future__ import annotations

import logging

from simnode.controllers.common import Obj, expression_matches, meta
from simnode.controllers.informer import Informer
from simnode.controllers.volumes import ANN_SELECTED_NODE, claim_class
from simnode.kubeclient import KubeClient

log = logging.getLogger("kube-scheduler.volumebinding")

NODE_CONFLICT = "node(s) had volume node affinity conflict"
UNBOUND_IMMEDIATE = "pod has unbound immediate PersistentVolumeClaims"


class VolumeBinding:
    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.claims = Informer(client, "/api/v1/persistentvolumeclaims")
        self.volumes = Informer(client, "/api/v1/persistentvolumes")
        self.classes = Informer(client, "/apis/storage.k8s.io/v1/storageclasses")

    @property
    def informers(self) -> tuple[Informer, ...]:
        return self.claims, self.volumes, self.classes

    def _claims_of(self, pod: Obj) -> list[tuple[str, Obj | None]]:
        ns = meta(pod).get("namespace")
        names = [str(v["persistentVolumeClaim"].get("claimName")) for v in (pod.get("spec") or {}).get("volumes") or []
                 if isinstance(v, dict) and isinstance(v.get("persistentVolumeClaim"), dict)]
        return [(name, self.claims.get(f"{ns}/{name}")) for name in names]

    def pre_filter(self, pod: Obj) -> str | None:
        """A reason no node can help with, or None."""
        for name, claim in self._claims_of(pod):
            if claim is None:
                return f'persistentvolumeclaim "{name}" not found'
            if meta(claim).get("deletionTimestamp"):
                return f'persistentvolumeclaim "{name}" is being deleted'
            if not (claim.get("spec") or {}).get("volumeName"):
                cls = self.classes.get(claim_class(claim))
                if cls is None or cls.get("volumeBindingMode") != "WaitForFirstConsumer":
                    return UNBOUND_IMMEDIATE
        return None

    def node_problem(self, pod: Obj, node: Obj) -> str | None:
        """Filter: every bound claim's volume must allow the node."""
        labels = meta(node).get("labels") or {}
        fields = {"metadata.name": meta(node).get("name")}
        for _, claim in self._claims_of(pod):
            volume_name = ((claim or {}).get("spec") or {}).get("volumeName")
            volume = self.volumes.get(str(volume_name)) if volume_name else None
            if volume is None:
                continue
            terms = ((((volume.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {})
                     .get("nodeSelectorTerms") or [])
            if terms and not any(
                all(expression_matches(e, labels.get(e.get("key", "")), e.get("key", "") in labels)
                    for e in t.get("matchExpressions") or [])
                and all(expression_matches(e, fields.get(e.get("key", "")), e.get("key", "") in fields)
                        for e in t.get("matchFields") or [])
                for t in terms
            ):
                return NODE_CONFLICT
        return None

    async def pre_bind(self, pod: Obj, node: str) -> bool:
        """True when every claim is bound; otherwise selects `node` for the unbound ones and waits."""
        all_bound = True
        for _, claim in self._claims_of(pod):
            if claim is None or (claim.get("spec") or {}).get("volumeName"):
                continue
            all_bound = False
            if (meta(claim).get("annotations") or {}).get(ANN_SELECTED_NODE) != node:
                path = (f"/api/v1/namespaces/{meta(claim).get('namespace')}/persistentvolumeclaims/"
                        f"{meta(claim).get('name')}")
                updated = await self.client.patch(path, {"metadata": {"annotations": {ANN_SELECTED_NODE: node}}})
                self.claims.upsert(updated)
                log.info("selected node %s for claim %s/%s of pod %s", node, meta(claim).get("namespace"),
                         meta(claim).get("name"), meta(pod).get("name"))
        return all_bound
