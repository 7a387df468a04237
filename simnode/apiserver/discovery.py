"""Documents clients read before talking to resources: /version, legacy discovery, and a minimal OpenAPI v3.

The OpenAPI v3 documents only describe each resource's PATCH operation with its `fieldValidation`
parameter: that is what kubectl checks to leave validation to the server (`--validate` default).
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
from typing import Any

from simnode.apiserver.protowire import field_bytes, field_str
from simnode.apiserver.resources import ALL_VERBS, ResourceType, group_versions, types_in
from simnode.launch import component_version


def version_info() -> dict[str, Any]:
    git_version = component_version()
    major, minor = git_version.lstrip("v").split(".")[:2]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {
        "major": major,
        "minor": minor,
        "emulationMajor": major,
        "emulationMinor": minor,
        "gitVersion": git_version,
        "gitCommit": hashlib.sha1(git_version.encode()).hexdigest(),
        "gitTreeState": "clean",
        "buildDate": "2024-12-10T11:36:15Z",
        "goVersion": "go1.22.9",
        "compiler": "gc",
        "platform": f"linux/{arch}",
    }


def _hash(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()[:8]).decode()


def _resource_entries(rt: ResourceType) -> list[dict[str, Any]]:
    main: dict[str, Any] = {
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": list(ALL_VERBS),
        "storageVersionHash": _hash(rt.key),
    }
    if rt.short_names:
        main["shortNames"] = list(rt.short_names)
    if rt.categories:
        main["categories"] = list(rt.categories)
    entries = [main]
    for sub in rt.subresources:
        entry: dict[str, Any] = {"name": f"{rt.plural}/{sub}", "singularName": "", "namespaced": rt.namespaced}
        if sub == "status":
            entry.update(kind=rt.kind, verbs=["get", "patch", "update"])
        elif sub == "scale":
            entry.update(group="autoscaling", version="v1", kind="Scale", verbs=["get", "patch", "update"])
        elif sub == "binding":
            entry.update(kind="Binding", verbs=["create"])
        elif sub == "token":
            entry.update(group="authentication.k8s.io", version="v1", kind="TokenRequest", verbs=["create"])
        elif sub == "log":
            entry.update(kind="Pod", verbs=["get"])
        entries.append(entry)
    return entries


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    types = types_in(group, version)
    if not types:
        return None
    resources = [e for rt in types for e in _resource_entries(rt)]
    if group == "":
        resources.append({"name": "bindings", "singularName": "binding", "namespaced": True, "kind": "Binding",
                          "verbs": ["create"]})
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def core_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": vs, "preferredVersion": vs[0]}


def group_list() -> dict[str, Any]:
    groups = [_group(g, vs) for g, vs in group_versions().items() if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def group(name: str) -> dict[str, Any] | None:
    versions = group_versions().get(name)
    if not name or versions is None:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_index() -> dict[str, Any]:
    paths = {}
    for g, versions in group_versions().items():
        for v in versions:
            p = _gv_path(g, v)
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={_hash(json.dumps(openapi_v3_doc(p)))}"}
    return {"paths": paths}


def _patch_operation(rt: ResourceType) -> dict[str, Any]:
    params = [
        {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
        for name in ("dryRun", "fieldManager", "fieldValidation", "force")
    ]
    return {
        "operationId": f"patch{rt.kind}",
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
    }


def openapi_v3_doc(gv_path: str) -> dict[str, Any] | None:
    parts = gv_path.split("/")
    if parts[0] == "api" and len(parts) == 2:
        group, version = "", parts[1]
    elif parts[0] == "apis" and len(parts) == 3:
        group, version = parts[1], parts[2]
    else:
        return None
    types = types_in(group, version)
    if not types:
        return None
    paths = {}
    for rt in types:
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        paths[f"/{gv_path}{scope}/{rt.plural}/{{name}}"] = {"patch": _patch_operation(rt)}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": component_version()},
        "paths": paths,
        "components": {"schemas": {}},
    }


OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def openapi_v2_protobuf() -> bytes:
    """A gnostic `openapi_v2.Document` with one PATCH operation per kind and no schemas.

    kubectl <= 1.28 reads it to learn that the server validates fields (`fieldValidation` on PATCH); with no
    definitions it computes client-side apply patches from its compiled-in types.
    """
    query = field_str(2, "query") + field_str(6, "string")
    params = b"".join(
        field_bytes(8, field_bytes(1, field_bytes(2, field_bytes(3, query + field_str(4, name)))))
        for name in ("dryRun", "fieldManager", "fieldValidation", "force")
    )
    paths = b""
    for g, versions in group_versions().items():
        for v in versions:
            for rt in types_in(g, v):
                gvk_yaml = f"group: {json.dumps(rt.group)}\nkind: {rt.kind}\nversion: {rt.version}\n"
                extension = field_bytes(13, field_str(1, "x-kubernetes-group-version-kind") + field_bytes(
                    2, field_str(2, gvk_yaml)))
                operation = field_str(5, f"patch{rt.kind}") + params + extension
                scope = "/namespaces/{namespace}" if rt.namespaced else ""
                path = f"/{_gv_path(g, v)}{scope}/{rt.plural}/{{name}}"
                paths += field_bytes(2, field_str(1, path) + field_bytes(2, field_bytes(8, operation)))
    info = field_str(1, "Kubernetes") + field_str(2, component_version())
    return field_str(1, "2.0") + field_bytes(2, info) + field_bytes(8, paths)
