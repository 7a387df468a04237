"""HTTP plumbing for the API server: URL -> resource target, Accept negotiation, bodies and responses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from simnode.apiserver.errors import ApiError, bad_request
from simnode.apiserver.protobody import decode_object
from simnode.apiserver.protowire import ProtoError
from simnode.apiserver.resources import ResourceType, lookup

MAX_BODY_BYTES = 3 * 1024 * 1024
@dataclass
class Target:
    rt: ResourceType
    namespace: str | None  # None: cluster-scoped, or all namespaces
    name: str | None
    sub: str
    legacy_watch: bool


def parse_target(group: str, version: str, parts: list[str]) -> Target | None:
    legacy = bool(parts) and parts[0] == "watch"
    if legacy:
        parts = parts[1:]
    namespace = None
    if len(parts) >= 3 and parts[0] == "namespaces" and parts[2] not in ("status", "finalize"):
        namespace, parts = parts[1], parts[2:]
    if not parts or len(parts) > 3:
        return None
    if group == "" and parts[0] == "bindings" and namespace is not None and len(parts) == 1:
        pods = lookup("", "v1", "pods")
        assert pods is not None
        return Target(pods, namespace, None, "bindings", False)
    rt = lookup(group, version, parts[0])
    if rt is None or (namespace is not None and not rt.namespaced):
        return None
    sub = parts[2] if len(parts) == 3 else ""
    if sub and sub not in rt.subresources:
        return None
    return Target(rt, namespace, parts[1] if len(parts) >= 2 else None, sub, legacy)


def negotiate(accept: str) -> tuple[str, str]:
    """("Table" | "Partial" | "json", meta.k8s.io version) from an Accept header."""
    for clause in accept.split(","):
        media, *raw = (s.strip() for s in clause.split(";"))
        if media not in ("application/json", "*/*", "application/*", ""):
            continue
        params = dict(p.split("=", 1) for p in raw if "=" in p)
        as_kind = params.get("as")
        if as_kind is None:
            return "json", ""
        if params.get("g") == "meta.k8s.io" and params.get("v") in ("v1", "v1beta1"):
            if as_kind == "Table":
                return "Table", params["v"]
            if as_kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
                return "Partial", params["v"]
    return "json", ""


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def text_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"})


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


async def read_body(request: web.BaseRequest) -> bytes:
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY_BYTES}")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(data: bytes, content_type: str) -> Any:
    if content_type == "application/vnd.kubernetes.protobuf":
        try:
            return decode_object(data)
        except (ProtoError, UnicodeDecodeError) as exc:
            raise ApiError(415, "UnsupportedMediaType", f"cannot decode the protobuf body: {exc}") from exc
    if not data.strip():
        raise bad_request("the request body is empty")
    try:
        if "yaml" in content_type:
            return yaml.safe_load(data)
        return json.loads(data)
    except (ValueError, yaml.YAMLError) as exc:
        raise bad_request(f"couldn't decode the request body as {content_type or 'JSON'}: {exc}") from exc
