"""The API's verbs on stored objects: create, update, patch, apply, delete (with garbage collection).

Each verb validates fully before it writes, so a rejected request changes nothing; `dry_run` runs every
check and returns the result without storing it.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from typing import Any

from simnode.apiserver import managed
from simnode.apiserver.admission import admit_create
from simnode.apiserver.defaults import apply_defaults, initial_status
from simnode.apiserver.errors import (
    ApiError,
    already_exists,
    bad_request,
    conflict,
    forbidden,
    namespace_not_found,
    not_found,
    stale,
)
from simnode.apiserver.resources import NAMESPACES, RESOURCE_TYPES, SERVICES, ResourceType
from simnode.apiserver.services import Allocator
from simnode.apiserver.store import Key, Obj, Store
from simnode.apiserver.validation import check_name, check_shape, validate

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what generateName draws from (no vowels, no look-alikes)


def _strip_times(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    for e in out.get("metadata", {}).get("managedFields") or []:
        e.pop("time", None)
    out["metadata"].pop("resourceVersion", None)
    return out


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class Api:
    def __init__(self, store: Store, allocator: Allocator) -> None:
        self.store = store
        self.allocator = allocator

    # -- reads --

    @staticmethod
    def key(rt: ResourceType, namespace: str, name: str) -> Key:
        return (rt.key, namespace if rt.namespaced else "", name)

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        obj = self.store.get(self.key(rt, namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return obj

    def _require_namespace(self, rt: ResourceType, namespace: str, *, creating: bool) -> None:
        if not rt.namespaced:
            return
        ns = self.store.peek((NAMESPACES.key, "", namespace))
        if ns is None:
            raise namespace_not_found(namespace)
        if creating and ns["metadata"].get("deletionTimestamp"):
            why = f"unable to create new content in namespace {namespace} because it is being terminated"
            raise forbidden(rt, "", why)

    # -- body checks shared by create/update --

    def _check_body(self, rt: ResourceType, body: Any, namespace: str) -> Obj:
        meta = check_shape(body)
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != rt.api_version:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({rt.api_version})"
            )
        if kind and kind != rt.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        body["apiVersion"], body["kind"] = rt.api_version, rt.kind
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        return dict(body)

    def _prepare(self, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        apply_defaults(rt, obj)
        if rt is SERVICES:
            self.allocator.assign(obj, old)
        validate(rt, obj)
        if rt.generation:
            if old is None:
                obj["metadata"]["generation"] = 1
            else:
                gen = old["metadata"].get("generation", 1)
                obj["metadata"]["generation"] = gen + 1 if _spec_part(obj) != _spec_part(old) else gen

    # -- create --

    def create(self, rt: ResourceType, namespace: str, body: Any, *, manager: str, dry_run: bool) -> Obj:
        obj = self._check_body(rt, body, namespace)
        self._fill_create_meta(rt, obj, namespace)
        admit_create(self.store, rt, obj)
        initial_status(rt, obj)
        self._prepare(rt, obj, None)
        managed.record_update(None, obj, manager, "", rt.api_version)
        return self._insert(rt, obj, dry_run)

    def _fill_create_meta(self, rt: ResourceType, obj: Obj, namespace: str) -> None:
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
        check_name(rt, meta.get("name") or "")
        self._require_namespace(rt, namespace, creating=True)
        if self.store.peek(self.key(rt, namespace, meta["name"])) is not None:
            raise already_exists(rt, meta["name"])
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = managed.now_rfc3339()
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "generation", "managedFields", "selfLink"):
            meta.pop(field, None)

    def _insert(self, rt: ResourceType, obj: Obj, dry_run: bool) -> Obj:
        if dry_run:
            return obj
        return self.store.put(rt.key, obj, None)

    # -- update family --

    def update(
        self, rt: ResourceType, namespace: str, name: str, body: Any, *, manager: str, dry_run: bool,
        subresource: str = "",
    ) -> Obj:
        old = self.get(rt, namespace, name)
        obj = self._check_body(rt, body, namespace)
        meta = obj["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        meta["name"] = name
        if meta.get("resourceVersion") and meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise stale(rt, name)
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, "Precondition failed: UID in precondition does not match the UID of the object")
        new = self._merge_scope(rt, old, obj, subresource)
        self._prepare(rt, new, old)
        if not self._client_set_managed(old, obj):
            managed.record_update(old, new, manager, subresource, rt.api_version)
        return self._replace(rt, old, new, dry_run)

    @staticmethod
    def _client_set_managed(old: Obj, obj: Obj) -> bool:
        """A client that rewrites metadata.managedFields itself (kubectl's apply migration) is obeyed."""
        sent = obj["metadata"].get("managedFields")
        return sent is not None and sent != old["metadata"].get("managedFields")

    @staticmethod
    def _merge_scope(rt: ResourceType, old: Obj, obj: Obj, subresource: str) -> Obj:
        """What a write may change: status only on /status; everything but status on the object.

        For Services as kubernetes pkg/registry/core/service/strategy.go does it: svcStrategy.PrepareForUpdate
        keeps the old status, serviceStatusStrategy.PrepareForUpdate the old spec (the StatusREST of
        pkg/registry/core/service/storage/storage.go serves PUT and PATCH on services/status)."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
            return new
        new = copy.deepcopy(obj)
        om, nm = old["metadata"], new["metadata"]
        for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if field in om:
                nm[field] = om[field]
            else:
                nm.pop(field, None)
        if "managedFields" not in nm and "managedFields" in om:
            nm["managedFields"] = copy.deepcopy(om["managedFields"])
        if rt.has_status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return new

    def _replace(self, rt: ResourceType, old: Obj, new: Obj, dry_run: bool) -> Obj:
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _strip_times(new) == _strip_times(old):
            return old  # a no-op write keeps the resourceVersion and sends no watch event
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rt, self.key(rt, meta.get("namespace", ""), meta["name"]), dry_run, None)
        if dry_run:
            return new
        return self.store.put(rt.key, new, old)

    def apply(
        self, rt: ResourceType, namespace: str, name: str, cfg: Any, *, manager: str, force: bool, dry_run: bool,
        subresource: str = "",
    ) -> tuple[Obj, bool]:
        """Server-side apply; returns the object and whether it was created."""
        if not isinstance(cfg, dict):
            raise bad_request("apply: the body must be a YAML or JSON object")
        if not cfg.get("apiVersion") or not cfg.get("kind"):
            raise bad_request("apply: the configuration must set apiVersion and kind")
        self._check_body(rt, cfg, namespace)
        meta = cfg["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        meta["name"] = name
        live = self.store.get(self.key(rt, namespace, name))
        if live is None:
            if subresource:
                raise not_found(rt, name)
            self._require_namespace(rt, namespace, creating=True)
            check_name(rt, name)
        elif meta.get("resourceVersion") and meta["resourceVersion"] != live["metadata"]["resourceVersion"]:
            raise stale(rt, name)
        merged = managed.apply(live, cfg, manager=manager, force=force, subresource=subresource,
                               api_version=rt.api_version)
        merged["apiVersion"], merged["kind"] = rt.api_version, rt.kind
        if live is None:
            managed_fields = merged["metadata"].get("managedFields")
            self._fill_create_meta(rt, merged, namespace)
            if managed_fields:
                merged["metadata"]["managedFields"] = managed_fields
            admit_create(self.store, rt, merged)
            initial_status(rt, merged)
            self._prepare(rt, merged, None)
            return self._insert(rt, merged, dry_run), True
        if subresource != "status" and rt.has_status:
            merged["status"] = copy.deepcopy(live.get("status"))
            if merged["status"] is None:
                merged.pop("status")
        self._prepare(rt, merged, live)
        return self._replace(rt, live, merged, dry_run), False

    # -- delete and garbage collection --

    def delete(
        self, rt: ResourceType, namespace: str, name: str, options: dict[str, Any], *, dry_run: bool
    ) -> Obj:
        key = self.key(rt, namespace, name)
        old = self.store.get(key)
        if old is None:
            raise not_found(rt, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise conflict(rt, name, "Precondition failed: UID in precondition does not match the UID of the object")
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise stale(rt, name)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = managed.now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            return new if dry_run else self.store.put(rt.key, new, old)
        return self._remove(rt, key, dry_run, options.get("propagationPolicy"))

    def _remove(self, rt: ResourceType, key: Key, dry_run: bool, policy: str | None) -> Obj:
        obj = self.store.get(key)
        assert obj is not None
        if dry_run:
            return obj
        if rt is NAMESPACES:
            for other in RESOURCE_TYPES:
                if other.namespaced:
                    for k in [k for k in self.store.objects if k[0] == other.key and k[1] == key[2]]:
                        if k in self.store.objects:
                            self._remove(other, k, False, policy)
        final = self.store.delete(rt.key, key)
        self._collect(final["metadata"]["uid"], orphan=policy == "Orphan")
        return final

    def _collect(self, owner_uid: str, *, orphan: bool) -> None:
        """Delete (or, orphaning, release) the objects owned by a deleted object; synchronous GC."""
        by_key = {rt.key: rt for rt in RESOURCE_TYPES}
        for key, obj in list(self.store.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key not in self.store.objects or not any(r.get("uid") == owner_uid for r in refs):
                continue
            remaining = [r for r in refs if r.get("uid") != owner_uid]
            rt = by_key[key[0]]
            if orphan or remaining:
                new = copy.deepcopy(obj)
                if remaining:
                    new["metadata"]["ownerReferences"] = remaining
                else:
                    new["metadata"].pop("ownerReferences", None)
                self.store.put(rt.key, new, obj)
            else:
                self._remove(rt, key, False, None)

    # -- pods/binding and scale --

    def bind(self, namespace: str, name: str, binding: Any, *, manager: str, dry_run: bool) -> None:
        from simnode.apiserver.resources import PODS

        if not isinstance(binding, dict) or not isinstance(binding.get("target"), dict):
            raise bad_request("binding: expected a Binding with a target")
        node = binding["target"].get("name")
        if not node:
            raise bad_request("binding: target.name is required")
        old = self.get(PODS, namespace, name)
        if old.get("spec", {}).get("nodeName"):
            raise ApiError(
                409, "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is already assigned to node '
                f'"{old["spec"]["nodeName"]}"',
                details={"name": name, "kind": "pods/binding"},
            )
        new = copy.deepcopy(old)
        new.setdefault("spec", {})["nodeName"] = node
        status = new.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                           "lastTransitionTime": managed.now_rfc3339()})
        new["status"]["conditions"] = conditions
        managed.record_update(old, new, manager, "", PODS.api_version)
        self._replace(PODS, old, new, dry_run)

    def scale(self, rt: ResourceType, obj: Obj) -> Obj:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        m = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in m
            },
            "spec": {"replicas": spec.get("replicas", 0)},
            "status": {"replicas": status.get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))},
        }

    def set_scale(
        self, rt: ResourceType, namespace: str, name: str, scale: Any, *, manager: str, dry_run: bool
    ) -> Obj:
        old = self.get(rt, namespace, name)
        if not isinstance(scale, dict) or not isinstance(scale.get("spec"), dict):
            raise bad_request("scale: expected a Scale object with spec.replicas")
        replicas = scale["spec"].get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise bad_request(f"scale: spec.replicas must be a non-negative integer, got {replicas!r}")
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise stale(rt, name)
        new = copy.deepcopy(old)
        new.setdefault("spec", {})["replicas"] = replicas
        self._prepare(rt, new, old)
        managed.record_update(old, new, manager, "scale", rt.api_version)
        return self.scale(rt, self._replace(rt, old, new, dry_run))
