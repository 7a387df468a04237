"""Mutating admission the storage addon depends on: a claim without a class gets the default StorageClass.

Follows kubernetes/kubernetes plugin/pkg/admission/storage/storageclass/setdefault/admission.go (only on
create; a claim that names a class, even "", or has the beta annotation is left alone) and
pkg/volume/util/storageclass.go GetDefaultClass (annotation is-default-class "true", or its beta form; with
several defaults the newest wins).
"""

from __future__ import annotations

from simnode.apiserver.resources import ResourceType
from simnode.apiserver.store import Obj, Store

DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
BETA_DEFAULT_CLASS = "storageclass.beta.kubernetes.io/is-default-class"
BETA_CLASS = "volume.beta.kubernetes.io/storage-class"


def admit_create(store: Store, rt: ResourceType, obj: Obj) -> None:
    if rt.kind != "PersistentVolumeClaim" or not isinstance(obj.get("spec"), dict):
        return
    if "storageClassName" in obj["spec"] and obj["spec"]["storageClassName"] is not None:
        return
    if BETA_CLASS in (obj["metadata"].get("annotations") or {}):
        return
    defaults = [sc for sc in store.iter_resource("storage.k8s.io/storageclasses", None)
                if "true" in ((sc["metadata"].get("annotations") or {}).get(DEFAULT_CLASS),
                              (sc["metadata"].get("annotations") or {}).get(BETA_DEFAULT_CLASS))]
    if not defaults:
        return
    newest = max(defaults, key=lambda sc: (sc["metadata"].get("creationTimestamp", ""), sc["metadata"]["name"]))
    obj["spec"]["storageClassName"] = newest["metadata"]["name"]
