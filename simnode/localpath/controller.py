"""The provisioning loop of local-path-provisioner: for claims of its StorageClasses, a directory on the node
and a hostPath PersistentVolume bound to the claim by claimRef; for Released volumes with reclaimPolicy Delete,
the directory and the PersistentVolume are removed.

Follows sigs.k8s.io/sig-storage-lib-external-provisioner/v11 controller.go (shouldProvision: the
volume.kubernetes.io/storage-provisioner annotation set by the PV controller, and with WaitForFirstConsumer the
volume.kubernetes.io/selected-node annotation set by the scheduler; provisionClaimOperation: PV name
`pvc-<claim uid>`, claimRef, provisioned-by annotation, the Provisioning/ProvisioningFailed/ProvisioningSucceeded
events; shouldDelete/deleteVolumeOperation), volume_store.go (a PV that cannot be saved: the event, then the
volume is deleted again) and rancher/local-path-provisioner provisioner.go (Provision/Delete: the
`<pv>_<ns>_<claim>` folder under the node's path, the hostPath source, the node affinity, the setup and teardown
scripts of the ConfigMap, run by a helper pod: helperpod.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from typing import Any

from simnode.controllers.informer import Informer, Obj
from simnode.kubeclient import ApiError, KubeClient
from simnode.localpath.config import DEFAULT_NODE, Config
from simnode.localpath.helperpod import HelperError, HelperPods

log = logging.getLogger("local-path-provisioner")

ANN_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_NODE_NAME = "local.path.provisioner/selected-node"
NODE_AFFINITY_KEY = "kubernetes.io/hostname"
RESYNC_S = 2.0
SAVE_ATTEMPTS = 3  # volume_store.go backoffStore: 5 attempts 10 s apart; shortened for tests
SAVE_RETRY_S = 0.5
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # per-claim requeue delays after a failure


class ProvisionError(Exception):
    pass


def _meta(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


class Provisioner:
    def __init__(self, client: KubeClient, *, name: str, config: Config, helper: HelperPods,
                 identity: str) -> None:
        self.client = client
        self.name = name
        self.config = config
        self.helper = helper
        self.identity = identity  # event source component
        self.claims = Informer(client, "/api/v1/persistentvolumeclaims")
        self.volumes = Informer(client, "/api/v1/persistentvolumes")
        self.classes = Informer(client, "/apis/storage.k8s.io/v1/storageclasses")
        self.changed = asyncio.Event()
        self._retry_at: dict[str, tuple[float, int]] = {}  # object uid -> (not before, failures so far)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for informer, label in ((self.claims, "claims"), (self.volumes, "volumes"), (self.classes, "classes")):
                informer.on_event = lambda _kind, _obj: self.changed.set()
                group.create_task(informer.run(), name=f"informer {label}")
            group.create_task(self._loop(), name="provisioner loop")

    async def _loop(self) -> None:
        while True:
            if all(i.synced.is_set() for i in (self.claims, self.volumes, self.classes)):
                await self.pass_once()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), RESYNC_S)

    async def pass_once(self) -> None:
        for claim in self.claims.values():
            if self._should_provision(claim) and self._due(claim):
                await self._provision(claim)
        for volume in self.volumes.values():
            if self._should_delete(volume) and self._due(volume):
                await self._delete(volume)

    # -- bookkeeping of retries --

    def _due(self, obj: Obj) -> bool:
        entry = self._retry_at.get(str(_meta(obj).get("uid")))
        return entry is None or time.monotonic() >= entry[0]

    def _failed(self, obj: Obj) -> None:
        uid = str(_meta(obj).get("uid"))
        failures = self._retry_at.get(uid, (0.0, 0))[1]
        delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
        self._retry_at[uid] = (time.monotonic() + delay, failures + 1)

    # -- provisioning --

    def _class_of(self, claim: Obj) -> Obj | None:
        name = (claim.get("spec") or {}).get("storageClassName") or \
            (_meta(claim).get("annotations") or {}).get("volume.beta.kubernetes.io/storage-class", "")
        return self.classes.get(str(name)) if name else None

    def _should_provision(self, claim: Obj) -> bool:
        """controller.go shouldProvision."""
        spec, annotations = claim.get("spec") or {}, _meta(claim).get("annotations") or {}
        if spec.get("volumeName") or _meta(claim).get("deletionTimestamp"):
            return False
        provisioner = annotations.get(ANN_PROVISIONER) or annotations.get(ANN_BETA_PROVISIONER)
        if provisioner != self.name:
            return False
        if self.volumes.get(self._pv_name(claim)) is not None:
            return False  # already provisioned (the PV controller binds it)
        cls = self._class_of(claim)
        if cls is not None and cls.get("volumeBindingMode") == "WaitForFirstConsumer":
            return bool(annotations.get(ANN_SELECTED_NODE))
        return True

    @staticmethod
    def _pv_name(claim: Obj) -> str:
        return f"pvc-{_meta(claim).get('uid')}"

    async def _provision(self, claim: Obj) -> None:
        meta = _meta(claim)
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        cls = self._class_of(claim)
        if cls is None:
            log.error("claim %s: its StorageClass is not found; retrying", key)
            self._failed(claim)
            return
        await self._event(claim, "Normal", "Provisioning",
                          f'External provisioner is provisioning volume for claim "{key}"')
        try:
            volume, path = await self._provision_volume(claim, cls)
        except (ProvisionError, ApiError) as exc:
            message = f'failed to provision volume with StorageClass "{_meta(cls).get("name")}": {_why(exc)}'
            log.error("claim %s: %s", key, message)  # noqa: TRY400 (expected condition: no traceback)
            await self._event(claim, "Warning", "ProvisioningFailed", message)
            self._failed(claim)
            return
        error: ApiError | None = None
        for attempt in range(SAVE_ATTEMPTS):
            try:
                created = await self.client.create("/api/v1/persistentvolumes", volume)
            except ApiError as exc:
                if exc.status == 409:
                    return  # saved by an earlier attempt whose answer was lost
                error = exc
                log.error("claim %s: saving PersistentVolume %s failed (attempt %d): %s", key,  # noqa: TRY400 (expected condition: no traceback)
                          volume["metadata"]["name"], attempt + 1, exc.message)
                await asyncio.sleep(SAVE_RETRY_S)
                continue
            self.volumes.upsert(created)
            self._retry_at.pop(str(meta.get("uid")), None)
            log.info("claim %s: volume %s provisioned at %s", key, volume["metadata"]["name"], path)
            await self._event(claim, "Normal", "ProvisioningSucceeded",
                              f"Successfully provisioned volume {volume['metadata']['name']}")
            return
        assert error is not None
        await self._event(claim, "Warning", "ProvisioningFailed",
                          f"Error creating provisioned PV object for claim {key}: {_why(error)}. Deleting the volume.")
        try:  # volume_store.go: the volume is deleted again
            await self._helper("delete", volume=volume["metadata"]["name"], path=path,
                               node=volume["metadata"]["annotations"][ANN_NODE_NAME])
        except ProvisionError as exc:
            await self._event(claim, "Warning", "ProvisioningCleanupFailed",
                              f"Error cleaning provisioned volume for claim {key}: {exc}. Please delete manually.")
        self._failed(claim)

    async def _provision_volume(self, claim: Obj, cls: Obj) -> tuple[dict[str, Any], str]:
        """provisioner.go provisionFor: the directory (setup script) and the PersistentVolume to save."""
        spec, meta = claim.get("spec") or {}, _meta(claim)
        class_name = str(_meta(cls).get("name"))
        cfg = self.config.for_class(class_name)
        shared = bool(cfg.shared_path)
        if not shared:
            if spec.get("selector") is not None:
                raise ProvisionError("claim.Spec.Selector is not supported")
            if any(m not in ("ReadWriteOnce", "ReadWriteOncePod") for m in spec.get("accessModes") or []):
                raise ProvisionError("NodePath only supports ReadWriteOnce and ReadWriteOncePod (1.22+) access modes")
        node_name = (meta.get("annotations") or {}).get(ANN_SELECTED_NODE, "")
        node: Obj | None = None
        if node_name:
            node = await self.client.get(f"/api/v1/nodes/{node_name}")
        elif not shared:
            raise ProvisionError("configuration error, no node was specified")
        base = cfg.shared_path if shared else self._path_on_node(cfg.node_paths, node_name,
                                                                 (cls.get("parameters") or {}).get("nodePath", ""))
        pv_name = self._pv_name(claim)
        path = f"{base.rstrip('/')}/{pv_name}_{meta.get('namespace')}_{meta.get('name')}"
        size = str(((spec.get("resources") or {}).get("requests") or {}).get("storage", "0"))
        log.info("Creating volume %s at %s:%s", pv_name, node_name, path)
        await self._helper("create", volume=pv_name, path=path, node=node_name, size=size)
        affinity_value = ((_meta(node).get("labels") or {}).get(NODE_AFFINITY_KEY) if node else None) or node_name
        volume: dict[str, Any] = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name,
                         "annotations": {ANN_NODE_NAME: node_name, ANN_PROVISIONED_BY: self.name}},
            "spec": {
                "persistentVolumeReclaimPolicy": cls.get("reclaimPolicy") or "Delete",
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "capacity": {"storage": size},
                "hostPath": {"path": path, "type": "DirectoryOrCreate"},
                "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                             "namespace": meta.get("namespace"), "name": meta.get("name"),
                             "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                "storageClassName": class_name,
            },
        }
        if not shared:
            volume["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": NODE_AFFINITY_KEY, "operator": "In", "values": [affinity_value]}]}]}}
        return volume, path

    @staticmethod
    def _path_on_node(node_paths: dict[str, tuple[str, ...]], node: str, requested: str) -> str:
        """provisioner.go getPathOnNode."""
        paths = node_paths.get(node)
        if paths is None:
            paths = node_paths.get(DEFAULT_NODE)
            if paths is None:
                raise ProvisionError(f"config doesn't contain node {node}, and no {DEFAULT_NODE} available")
        if not paths:
            raise ProvisionError(f"no local path available on node {node}")
        if requested:
            if requested not in paths:
                raise ProvisionError(f"config doesn't contain path {requested} on node {node}")
            return requested
        return random.choice(paths)

    async def _helper(self, action: str, *, volume: str, path: str, node: str, size: str = "0") -> None:
        """provisioner.go createHelperPod: the ConfigMap's script run on `node` by a helper pod."""
        try:
            await self.helper.run(action, volume=volume, path=path, node=node, size=size)
        except HelperError as exc:
            raise ProvisionError(str(exc)) from exc

    # -- deletion --

    def _should_delete(self, volume: Obj) -> bool:
        """controller.go shouldDelete: ours, Released, reclaimPolicy Delete."""
        meta, spec = _meta(volume), volume.get("spec") or {}
        return ((meta.get("annotations") or {}).get(ANN_PROVISIONED_BY) == self.name
                and (volume.get("status") or {}).get("phase") == "Released"
                and spec.get("persistentVolumeReclaimPolicy") == "Delete"
                and not meta.get("deletionTimestamp"))

    async def _delete(self, volume: Obj) -> None:
        name = str(_meta(volume).get("name"))
        path = str(((volume.get("spec") or {}).get("hostPath") or {}).get("path", ""))
        node = str((_meta(volume).get("annotations") or {}).get(ANN_NODE_NAME, ""))
        try:
            _check_host_path(name, path)
            if not await self._node_exists(node):
                log.info("Node %s does not exist, skipping cleanup of volume %s", node, name)
            else:
                log.info("Deleting volume %s at %s:%s", name, node, path)
                size = str(((volume.get("spec") or {}).get("capacity") or {}).get("storage", "0"))
                await self._helper("delete", volume=name, path=path, node=node, size=size)
            await self.client.delete(f"/api/v1/persistentvolumes/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return
            log.error("volume %s: deleting failed: %s", name, exc.message)  # noqa: TRY400 (expected condition: no traceback)
            await self._event(volume, "Warning", "VolumeFailedDelete", _why(exc), kind="PersistentVolume")
            self._failed(volume)
        except ProvisionError as exc:
            log.error("volume %s: deleting failed: %s", name, exc)  # noqa: TRY400 (expected condition: no traceback)
            await self._event(volume, "Warning", "VolumeFailedDelete", str(exc), kind="PersistentVolume")
            self._failed(volume)
        else:
            self.volumes.forget(volume)
            log.info("volume %s deleted", name)

    async def _node_exists(self, node: str) -> bool:
        """provisioner.go deleteFor: a volume on a node that is gone is not cleaned up."""
        if not node:
            return True
        try:
            await self.client.get(f"/api/v1/nodes/{node}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- events --

    async def _event(self, obj: Obj, event_type: str, reason: str, message: str, *,
                     kind: str = "PersistentVolumeClaim") -> None:
        """record.EventRecorder: an Event in the object's namespace ("default" for cluster objects)."""
        meta = _meta(obj)
        namespace = meta.get("namespace") or "default"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": kind,
                               "namespace": meta.get("namespace"), "name": meta.get("name"), "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message, "type": event_type, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": self.identity}, "reportingComponent": self.identity,
        }
        try:
            await self.client.create(f"/api/v1/namespaces/{namespace}/events", event)
        except ApiError as exc:
            # record/event.go: events that cannot be written are logged and dropped.
            log.error("Server rejected event (will not retry!): %s", exc.message)  # noqa: TRY400 (expected condition: no traceback)


def _check_host_path(name: str, path: str) -> None:
    if not path.startswith("/"):
        raise ProvisionError(f"volume {name} has no hostPath")


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, ApiError) else str(exc)

