"""HTTP routing for the API server: authentication, health, discovery, and the resource verbs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from simnode.apiserver import discovery, printing
from simnode.apiserver.api import Api
from simnode.apiserver.authn import Authenticator, token_request
from simnode.apiserver.errors import ApiError, bad_request, method_not_allowed, resource_not_found, unauthorized
from simnode.apiserver.health import Health
from simnode.apiserver.httputil import (
    Target,
    decode,
    json_response,
    negotiate,
    parse_target,
    read_body,
    text_response,
    truthy,
)
from simnode.apiserver.kubeletlink import KubeletCallError, KubeletLink
from simnode.apiserver.patch import json_patch, merge_patch, strategic_merge
from simnode.apiserver.rbac import Authorizer, User, access_review, forbidden, request_attributes
from simnode.apiserver.resources import NODES, ResourceType
from simnode.apiserver.satokens import TokenIssuer
from simnode.apiserver.selectors import parse_selector
from simnode.apiserver.store import Obj, Store
from simnode.apiserver.tls import IDENTITY_KEY, Identity
from simnode.apiserver.watch import WatchRequest, parse_timeout, serve_watch

log = logging.getLogger("simnode.apiserver.http")

_PUBLIC = ("version", "healthz", "livez", "readyz")
_APPLY = "application/apply-patch+yaml"
_PATCHES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    _APPLY: "apply",
}


class Handler:
    def __init__(
        self, api: Api, health: Health, *, server_address: str, anonymous_auth: bool, verbosity: int,
        stopping: asyncio.Event, kubelet: KubeletLink | None = None, tokens: TokenIssuer | None = None,
    ) -> None:
        self.api = api
        self.kubelet = kubelet
        self.store: Store = api.store
        self.health = health
        self.server_address = server_address
        self.anonymous_auth = anonymous_auth
        self.verbosity = verbosity
        self.stopping = stopping
        self.tokens = tokens
        self.authenticator = Authenticator(self.store, tokens)
        self.authorizer = Authorizer(self.store)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await self._dispatch(request)
        except ApiError as exc:
            response = json_response(exc.status(), exc.code)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path_qs)
            response = json_response(ApiError(500, "InternalError", "Internal error occurred").status(), 500)
        if self.verbosity >= 3:
            log.info('"HTTP" verb="%s" URI="%s" latency="%.1fms" userAgent="%s" resp=%d', request.method,
                     request.path_qs, (time.monotonic() - started) * 1000, request.headers.get("User-Agent", ""),
                     response.status)
        return response

    def _authenticate(self, request: web.BaseRequest, parts: list[str]) -> User:
        transport = request.transport
        ident = transport.get_extra_info(IDENTITY_KEY) if transport is not None else None
        if not isinstance(ident, Identity):
            ident = Identity()
        if ident.error:
            log.info("Unable to authenticate the request: %s", ident.error)
            raise unauthorized()
        user = self.authenticator.user(ident, request.headers)
        if not user.name and not (self.anonymous_auth and parts and parts[0] in _PUBLIC):
            raise unauthorized()
        return user

    def _authorize(self, request: web.BaseRequest, user: User) -> None:
        """RBAC for service accounts and impersonated users; system:masters and other certificate users pass
        (what differs from the real Node,RBAC chain is listed in docs/simnode.md, rules 5)."""
        if user.via not in ("token", "impersonation"):
            return
        attrs = request_attributes(request.method, request.path, dict(request.query))
        allowed, reason = self.authorizer.authorize(user, attrs)
        if not allowed:
            log.info("Forbidden: %s %s for %s%s", request.method, request.path, user.name,
                     f" ({reason})" if reason else "")
            raise forbidden(user, attrs, reason)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        user = self._authenticate(request, parts)
        if user.name:
            user = self.authenticator.impersonate(user, request.headers, self.authorizer)
            self._authorize(request, user)
        head = parts[0] if parts else ""
        if head in ("healthz", "livez", "readyz"):
            return self._health(request, head, parts[1:])
        if (request.method not in ("GET", "HEAD") and head in ("version", "openapi")) or (
            request.method != "GET" and head in ("api", "apis") and len(parts) <= (2 if head == "api" else 3)
        ):
            raise method_not_allowed()
        if parts == ["version"]:
            return json_response(discovery.version_info())
        if head == "openapi":
            return self._openapi(parts[1:])
        if head == "api" and len(parts) >= 2:
            if len(parts) == 2:
                return self._maybe(discovery.resource_list("", parts[1]))
            return await self._resource(request, "", parts[1], parts[2:])
        if parts == ["api"]:
            return json_response(discovery.core_versions(self.server_address))
        if parts == ["apis"]:
            return json_response(discovery.group_list())
        if head == "apis" and len(parts) == 2:
            return self._maybe(discovery.group(parts[1]))
        if head == "apis" and len(parts) == 3:
            return self._maybe(discovery.resource_list(parts[1], parts[2]))
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]:
            if request.method != "POST":
                raise method_not_allowed()
            body = decode(await read_body(request), request.content_type)
            return json_response(access_review(self.authorizer, user, body), 201)
        if head == "apis" and len(parts) > 3:
            return await self._resource(request, parts[1], parts[2], parts[3:])
        return text_response("404 page not found\n", 404)

    @staticmethod
    def _maybe(doc: dict[str, Any] | None) -> web.Response:
        if doc is None:
            raise resource_not_found()
        return json_response(doc)

    def _health(self, request: web.BaseRequest, endpoint: str, rest: list[str]) -> web.Response:
        verbose = "verbose" in request.query
        excluded = request.query.getall("exclude", [])
        status, body = self.health.check(endpoint, "/".join(rest), verbose, excluded)
        return text_response(body, status)

    def _openapi(self, rest: list[str]) -> web.Response:
        if rest == ["v3"]:
            return json_response(discovery.openapi_v3_index())
        if rest == ["v2"]:
            return web.Response(body=discovery.openapi_v2_protobuf(), content_type=discovery.OPENAPI_V2_PROTOBUF)
        if rest and rest[0] == "v3":
            doc = discovery.openapi_v3_doc("/".join(rest[1:]))
            if doc is not None:
                return json_response(doc)
        return text_response("404 page not found\n", 404)

    # -- resources --

    def _options(self, request: web.BaseRequest) -> tuple[bool, str]:
        q = request.query
        dry = q.getall("dryRun", [])
        if any(v != "All" for v in dry):
            raise bad_request(f"Invalid dry run value: {dry!r}; the only supported value is All")
        validation = q.get("fieldValidation", "")
        if validation not in ("", "Ignore", "Warn", "Strict"):
            raise bad_request(f'Invalid value "{validation}" for fieldValidation: Ignore, Warn or Strict')
        manager = q.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]
        if len(manager) > 128:
            raise bad_request("fieldManager: Too long: must have at most 128 bytes")
        return bool(dry), manager

    async def _resource(
        self, request: web.BaseRequest, group: str, version: str, parts: list[str]
    ) -> web.StreamResponse:
        target = parse_target(group, version, parts)
        if target is None:
            raise resource_not_found()
        method = request.method
        if method == "GET":
            return await self._get(request, target)
        if target.sub == "log":
            raise method_not_allowed()
        if target.rt.namespaced and target.namespace is None:
            raise method_not_allowed()
        if method == "POST":
            return await self._post(request, target)
        if method == "DELETE":
            return await self._delete(request, target)
        if method in ("PUT", "PATCH") and target.name is not None:
            return await self._write(request, target)
        raise method_not_allowed()

    def _selector_matcher(self, request: web.BaseRequest, t: Target) -> Any:
        sel = parse_selector(request.query.get("labelSelector", ""), request.query.get("fieldSelector", ""),
                             t.rt.plural)

        def matches(obj: Obj) -> bool:
            m = obj["metadata"]
            if t.namespace is not None and t.rt.namespaced and m.get("namespace") != t.namespace:
                return False
            if t.name is not None and m.get("name") != t.name:
                return False
            return sel.matches(obj)

        return matches

    def _render(self, request: web.BaseRequest, rt: ResourceType, objs: list[Obj], *, single: bool) -> web.Response:
        fmt, version = negotiate(request.headers.get("Accept", ""))
        rv = str(self.store.resource_version)
        if fmt == "Table":
            include = request.query.get("includeObject", "Metadata")
            return json_response(printing.table(rt, objs, table_version=version, resource_version=rv,
                                                include_object=include))
        if fmt == "Partial":
            items = [{"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                      "metadata": o["metadata"]} for o in objs]
            if single:
                return json_response(items[0])
            return json_response({"kind": "PartialObjectMetadataList", "apiVersion": f"meta.k8s.io/{version}",
                                  "metadata": {"resourceVersion": rv}, "items": items})
        if single:
            return json_response(objs[0])
        return json_response({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": rv}, "items": objs})

    async def _get(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        if t.legacy_watch or truthy(request.query.get("watch")):
            if t.sub:
                raise method_not_allowed()
            return await self._watch(request, t)
        if t.name is None:
            matches = self._selector_matcher(request, t)
            ns = t.namespace if t.rt.namespaced else None
            objs = json.loads(json.dumps([o for o in self.store.iter_resource(t.rt.key, ns) if matches(o)]))
            return self._render(request, t.rt, objs, single=False)
        obj = self.api.get(t.rt, t.namespace or "", t.name)
        if t.sub == "scale":
            return json_response(self.api.scale(t.rt, obj))
        if t.sub == "log":
            return self._pod_log(request, obj)
        if t.sub not in ("", "status"):
            raise method_not_allowed()
        return self._render(request, t.rt, [obj], single=True)

    def _pod_log(self, request: web.BaseRequest, pod: Obj) -> web.Response:
        """GET pods/{name}/log: the API server asks the pod's kubelet (see kubeletlink.py)."""
        if self.kubelet is None:
            raise ApiError(500, "InternalError", "no kubelet client configured")
        tail = request.query.get("tailLines")
        if tail is not None and not tail.lstrip("-").isdigit():
            raise bad_request(f"tailLines: invalid value {tail!r}")
        node_name = (pod.get("spec") or {}).get("nodeName")
        node = self.store.get((NODES.key, "", node_name)) if node_name else None
        try:
            text = self.kubelet.container_log(pod, node, request.query.get("container"),
                                              int(tail) if tail is not None else None)
        except KubeletCallError as exc:
            raise ApiError(exc.status, exc.reason, str(exc)) from exc
        return web.Response(text=text, content_type="text/plain")

    async def _watch(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        q = request.query
        fmt, version = negotiate(request.headers.get("Accept", ""))
        include = q.get("includeObject", "Metadata")
        rt = t.rt

        def render(obj: Obj, first: bool) -> Obj:
            if fmt == "Table":
                return printing.table(rt, [obj], table_version=version, resource_version=obj["metadata"].get(
                    "resourceVersion", ""), include_object=include, with_columns=first)
            if fmt == "Partial":
                return {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                        "metadata": obj["metadata"]}
            return obj

        wr = WatchRequest(
            rt=rt,
            matches=self._selector_matcher(request, t),
            resource_version=q.get("resourceVersion", ""),
            timeout_s=parse_timeout(q.get("timeoutSeconds")),
            bookmarks=truthy(q.get("allowWatchBookmarks")),
            send_initial=truthy(q.get("sendInitialEvents")),
            render=render,
        )
        return await serve_watch(request, self.store, wr, self.stopping)

    async def _post(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        dry, manager = self._options(request)
        body = decode(await read_body(request), request.content_type)
        ns = t.namespace or ""
        if t.sub == "token" and t.name is not None:
            return json_response(token_request(self.store, self.tokens, ns, t.name, body), 201)
        if t.sub in ("binding", "bindings"):
            name = t.name or (body.get("metadata") or {}).get("name", "") if isinstance(body, dict) else ""
            self.api.bind(ns, name, body, manager=manager, dry_run=dry)
            return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "code": 201}, 201)
        if t.name is not None:
            raise method_not_allowed()
        return json_response(self.api.create(t.rt, ns, body, manager=manager, dry_run=dry), 201)

    async def _write(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        assert t.name is not None
        dry, manager = self._options(request)
        data = await read_body(request)
        ns = t.namespace or ""
        if request.method == "PUT":
            body = decode(data, request.content_type)
            if t.sub == "scale":
                return json_response(self.api.set_scale(t.rt, ns, t.name, body, manager=manager, dry_run=dry))
            return json_response(self.api.update(t.rt, ns, t.name, body, manager=manager, dry_run=dry,
                                                 subresource=t.sub))
        kind = _PATCHES.get(request.content_type)
        if kind is None:
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"{', '.join(_PATCHES)}")
        patch = decode(data, "yaml" if kind == "apply" else "json")
        if kind == "apply":
            if not request.query.get("fieldManager"):
                raise ApiError(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                                               "Required value: is required for apply patch")
            if t.sub == "scale":
                raise method_not_allowed()
            obj, created = self.api.apply(t.rt, ns, t.name, patch, manager=manager,
                                          force=truthy(request.query.get("force")), dry_run=dry, subresource=t.sub)
            return json_response(obj, 201 if created else 200)
        if t.sub == "scale":
            current = self.api.scale(t.rt, self.api.get(t.rt, ns, t.name))
            return json_response(self.api.set_scale(t.rt, ns, t.name, _apply_patch(kind, current, patch),
                                                    manager=manager, dry_run=dry))
        current = self.api.get(t.rt, ns, t.name)
        patched = _apply_patch(kind, current, patch)
        return json_response(self.api.update(t.rt, ns, t.name, patched, manager=manager, dry_run=dry,
                                             subresource=t.sub))

    async def _delete(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        data = await read_body(request)
        options: dict[str, Any] = {}
        if data.strip():
            decoded = decode(data, request.content_type)
            if not isinstance(decoded, dict):
                raise bad_request("DeleteOptions: expected a JSON object")
            options = decoded
        q = request.query
        if q.get("propagationPolicy"):
            options["propagationPolicy"] = q["propagationPolicy"]
        if truthy(q.get("orphanDependents")) or options.get("orphanDependents") is True:
            options["propagationPolicy"] = "Orphan"
        if options.get("propagationPolicy") not in (None, "Orphan", "Background", "Foreground"):
            raise bad_request(f"propagationPolicy: Unsupported value: {options['propagationPolicy']!r}")
        dry, _ = self._options(request)
        dry = dry or options.get("dryRun") == ["All"]
        ns = t.namespace or ""
        if t.sub:
            raise method_not_allowed()
        if t.name is not None:
            return json_response(self.api.delete(t.rt, ns, t.name, options, dry_run=dry))
        matches = self._selector_matcher(request, t)
        victims = [o["metadata"]["name"] for o in self.store.iter_resource(t.rt.key, ns or None) if matches(o)]
        deleted = [self.api.delete(t.rt, ns, name, options, dry_run=dry) for name in victims
                   if self.store.peek(self.api.key(t.rt, ns, name)) is not None]
        return json_response({"kind": f"{t.rt.kind}List", "apiVersion": t.rt.api_version,
                              "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": deleted})


def _apply_patch(kind: str, current: Obj, patch: Any) -> Any:
    if kind == "json":
        return json_patch(current, patch)
    if not isinstance(patch, dict):
        raise bad_request(f"{kind} patch: the body must be a JSON object")
    if kind == "merge":
        return merge_patch(current, patch)
    return strategic_merge(current, patch)
