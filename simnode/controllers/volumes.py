"""The persistent-volume controller of kube-controller-manager, for dynamically provisioned volumes: hands
claims to their external provisioner, binds claim and volume once the provisioner has created a volume for
the claim, and releases a volume whose claim is gone (its provisioner then deletes it, reclaimPolicy Delete).

Follows kubernetes/kubernetes pkg/controller/volume/persistentvolume/pv_controller.go: syncUnboundClaim
(WaitForFirstConsumer waits for the scheduler's volume.kubernetes.io/selected-node; provisionClaim sets
volume.kubernetes.io/storage-provisioner and its beta twin for an external provisioner, with the
ExternalProvisioning event), bind (volume claimRef and phase Bound; claim volumeName, the bind-completed and
bound-by-controller annotations, phase Bound with capacity and access modes), syncVolume (a claimRef whose
claim is gone or has another uid: phase Released; reclaim Delete of an externally provisioned volume is left
to its provisioner). Static binding of pre-created volumes to claims is not simulated.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from simnode.controllers.common import Obj, meta, rfc3339
from simnode.controllers.informer import Informer
from simnode.kubeclient import ApiError, KubeClient

log = logging.getLogger("controller.volumes")

ANN_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
ANN_BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
COMPONENT = "persistentvolume-controller"


def claim_class(claim: Obj) -> str:
    """volume/util GetPersistentVolumeClaimClass: the beta annotation wins over spec.storageClassName."""
    beta = (meta(claim).get("annotations") or {}).get("volume.beta.kubernetes.io/storage-class")
    return str(beta if beta is not None else (claim.get("spec") or {}).get("storageClassName") or "")


class VolumeController:
    def __init__(self, client: KubeClient, claims: Informer, volumes: Informer, classes: Informer) -> None:
        self.client = client
        self.claims = claims
        self.volumes = volumes
        self.classes = classes
        self._evented: dict[str, str] = {}  # claim uid -> last reason recorded (the recorder aggregates repeats)

    async def sync(self) -> None:
        for claim in self.claims.values():
            try:
                await self._sync_claim(claim)
            except ApiError as exc:
                log.warning("claim %s/%s: %s", meta(claim).get("namespace"), meta(claim).get("name"), exc)
        for volume in self.volumes.values():
            try:
                await self._sync_volume(volume)
            except ApiError as exc:
                log.warning("volume %s: %s", meta(volume).get("name"), exc)
        live = {str(meta(c).get("uid")) for c in self.claims.values()}
        self._evented = {uid: r for uid, r in self._evented.items() if uid in live}

    # -- claims --

    async def _sync_claim(self, claim: Obj) -> None:
        m, spec = meta(claim), claim.get("spec") or {}
        if m.get("deletionTimestamp"):
            return
        if spec.get("volumeName"):
            volume = self.volumes.get(str(spec["volumeName"]))
            if volume is not None and (claim.get("status") or {}).get("phase") != "Bound":
                await self._bind(volume, claim)
            return
        for volume in self.volumes.values():
            ref = (volume.get("spec") or {}).get("claimRef") or {}
            if ref.get("uid") == m.get("uid"):  # pre-bound by its provisioner (claimRef with our uid)
                await self._bind(volume, claim)
                return
        name = claim_class(claim)
        if not name:
            return  # static binding of an unclassed claim: not simulated
        cls = self.classes.get(name)
        if cls is None:
            await self._event(claim, "Warning", "ProvisioningFailed",
                              f'storageclass.storage.k8s.io "{name}" not found')
            return
        annotations = m.get("annotations") or {}
        if cls.get("volumeBindingMode") == "WaitForFirstConsumer" and not annotations.get(ANN_SELECTED_NODE):
            await self._event(claim, "Normal", "WaitForFirstConsumer",
                              "waiting for first consumer to be created before binding")
            return
        provisioner = str(cls.get("provisioner", ""))
        if annotations.get(ANN_PROVISIONER) != provisioner:
            patch = {"metadata": {"annotations": {ANN_PROVISIONER: provisioner, ANN_BETA_PROVISIONER: provisioner}}}
            updated = await self.client.patch(self._claim_path(claim), patch)
            self.claims.upsert(updated)
        await self._event(claim, "Normal", "ExternalProvisioning",
                          f"Waiting for a volume to be created either by the external provisioner '{provisioner}' "
                          "or manually by the system administrator. If volume creation is delayed, please verify "
                          "that the provisioner is running and correctly registered.")

    @staticmethod
    def _claim_path(claim: Obj) -> str:
        return f"/api/v1/namespaces/{meta(claim).get('namespace')}/persistentvolumeclaims/{meta(claim).get('name')}"

    async def _bind(self, volume: Obj, claim: Obj) -> None:
        """pv_controller.go bind: the volume first, then the claim, then the claim's status."""
        vm, cm = meta(volume), meta(claim)
        if (volume.get("status") or {}).get("phase") != "Bound":
            updated = await self.client.replace(f"/api/v1/persistentvolumes/{vm['name']}/status",
                                                {**volume, "status": {"phase": "Bound"}})
            self.volumes.upsert(updated)
        if (claim.get("spec") or {}).get("volumeName") != vm["name"] or \
                (cm.get("annotations") or {}).get(ANN_BIND_COMPLETED) != "yes":
            patch = {"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes", ANN_BOUND_BY_CONTROLLER: "yes"}},
                     "spec": {"volumeName": vm["name"]}}
            claim = await self.client.patch(self._claim_path(claim), patch)
        spec = volume.get("spec") or {}
        status = {"phase": "Bound", "accessModes": spec.get("accessModes") or [],
                  "capacity": spec.get("capacity") or {}}
        updated_claim = await self.client.replace(f"{self._claim_path(claim)}/status", {**claim, "status": status})
        self.claims.upsert(updated_claim)
        log.info("bound volume %s to claim %s/%s", vm["name"], cm.get("namespace"), cm.get("name"))

    # -- volumes --

    async def _sync_volume(self, volume: Obj) -> None:
        vm, spec = meta(volume), volume.get("spec") or {}
        phase = (volume.get("status") or {}).get("phase")
        ref = spec.get("claimRef") or {}
        if vm.get("deletionTimestamp"):
            return
        if not ref:
            if phase != "Available":
                await self._set_phase(volume, "Available")
            return
        claim = self.claims.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if claim is None:
            # Not in the cache: ask the API before releasing (pv_controller.go syncVolume does the same).
            try:
                claim = await self.client.get(f"/api/v1/namespaces/{ref.get('namespace')}/persistentvolumeclaims/"
                                              f"{ref.get('name')}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
        if claim is None or (ref.get("uid") and meta(claim).get("uid") != ref.get("uid")):
            if phase not in ("Released", "Failed"):
                log.info("volume %s is released: claim %s/%s is gone", vm["name"], ref.get("namespace"),
                         ref.get("name"))
                await self._set_phase(volume, "Released")
            return
        if phase != "Bound" and (claim.get("spec") or {}).get("volumeName") in (None, "", vm["name"]):
            await self._bind(volume, claim)

    async def _set_phase(self, volume: Obj, phase: str) -> None:
        updated = await self.client.replace(f"/api/v1/persistentvolumes/{meta(volume)['name']}/status",
                                            {**volume, "status": {**(volume.get("status") or {}), "phase": phase}})
        self.volumes.upsert(updated)

    async def _event(self, claim: Obj, kind: str, reason: str, message: str) -> None:
        m = meta(claim)
        uid = str(m.get("uid"))
        if self._evented.get(uid) == reason:
            return
        self._evented[uid] = reason
        now = rfc3339()
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{m.get('name')}.{secrets.token_hex(8)}", "namespace": m.get("namespace")},
            "involvedObject": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": m.get("namespace"),
                               "name": m.get("name"), "uid": uid, "resourceVersion": m.get("resourceVersion")},
            "reason": reason, "message": message, "type": kind, "count": 1, "firstTimestamp": now,
            "lastTimestamp": now, "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        }
        try:
            await self.client.create(f"/api/v1/namespaces/{m.get('namespace')}/events", body)
        except ApiError as exc:
            log.warning("event %s for claim %s/%s: %s", reason, m.get("namespace"), m.get("name"), exc)
