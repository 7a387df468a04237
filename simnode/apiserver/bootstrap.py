"""Objects the real API server creates at first start and reconciles at every start.

Namespaces default, kube-system, kube-public, kube-node-lease; Service default/kubernetes with the first IP
of the service range; its Endpoints/EndpointSlice pointing at the advertise address and secure port.
"""

from __future__ import annotations

import logging
from typing import Any

from simnode.apiserver.api import Api
from simnode.apiserver.errors import ApiError
from simnode.apiserver.resources import (
    CLUSTERROLEBINDINGS,
    CLUSTERROLES,
    ENDPOINTS,
    ENDPOINTSLICES,
    NAMESPACES,
    SERVICES,
    ResourceType,
)

log = logging.getLogger(__name__)
MANAGER = "kube-apiserver"
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def _ensure(api: Api, rt: ResourceType, namespace: str, obj: dict[str, Any]) -> None:
    """Create obj, or bring the stored one's spec-like fields to obj's values."""
    name = obj["metadata"]["name"]
    existing = api.store.get(api.key(rt, namespace, name))
    if existing is None:
        api.create(rt, namespace, obj, manager=MANAGER, dry_run=False)
        return
    wanted = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
    if any(existing.get(k) != v for k, v in wanted.items()):
        merged = {**existing, **wanted}
        try:
            api.update(rt, namespace, name, merged, manager=MANAGER, dry_run=False)
        except ApiError as exc:
            log.error("reconciling %s %s/%s failed: %s", rt.kind, namespace, name, exc.message)  # noqa: TRY400 (expected condition: no traceback)


def bootstrap(api: Api, *, service_ip: str, advertise_address: str, secure_port: int) -> None:
    for ns in SYSTEM_NAMESPACES:
        if api.store.peek(api.key(NAMESPACES, "", ns)) is None:
            api.create(NAMESPACES, "", {"metadata": {"name": ns}}, manager=MANAGER, dry_run=False)
    labels = {"component": "apiserver", "provider": "kubernetes"}
    port = {"name": "https", "port": 443, "protocol": "TCP", "targetPort": secure_port}
    if api.store.peek(api.key(SERVICES, "default", "kubernetes")) is None:
        svc = {"metadata": {"name": "kubernetes", "labels": labels},
               "spec": {"type": "ClusterIP", "clusterIP": service_ip, "ports": [port], "sessionAffinity": "None"}}
        api.create(SERVICES, "default", svc, manager=MANAGER, dry_run=False)
    _ensure(api, ENDPOINTS, "default", {
        "metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": advertise_address}],
                     "ports": [{"name": "https", "port": secure_port, "protocol": "TCP"}]}],
    })
    _ensure(api, ENDPOINTSLICES, "default", {
        "metadata": {"name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv6" if ":" in advertise_address else "IPv4",
        "endpoints": [{"addresses": [advertise_address], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": secure_port, "protocol": "TCP"}],
    })
    if api.store.peek(api.key(CLUSTERROLES, "", "cluster-admin")) is None:
        role = {"metadata": {"name": "cluster-admin", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                          {"nonResourceURLs": ["*"], "verbs": ["*"]}]}
        api.create(CLUSTERROLES, "", role, manager=MANAGER, dry_run=False)

    _bootstrap_rbac(api)


_BOOTSTRAP_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_INFO_URLS = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
# plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go ClusterRoles() and ClusterRoleBindings(): the
# roles every authenticated client (a service account included) needs for discovery and health.
_BOOTSTRAP_ROLES: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
    "system:discovery": (
        [{"nonResourceURLs": [*_INFO_URLS, "/openapi", "/openapi/*", "/api", "/api/*", "/apis", "/apis/*"],
          "verbs": ["get"]}],
        ["system:authenticated"],
    ),
    "system:public-info-viewer": (
        [{"nonResourceURLs": _INFO_URLS, "verbs": ["get"]}],
        ["system:authenticated", "system:unauthenticated"],
    ),
    "system:basic-user": (
        [{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
          "verbs": ["create"]},
         {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}],
        ["system:authenticated"],
    ),
}


def _bootstrap_rbac(api: Api) -> None:
    for name, (rules, groups) in _BOOTSTRAP_ROLES.items():
        meta = {"name": name, "labels": _BOOTSTRAP_LABELS,
                "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}}
        if api.store.peek(api.key(CLUSTERROLES, "", name)) is None:
            api.create(CLUSTERROLES, "", {"metadata": dict(meta), "rules": rules}, manager=MANAGER, dry_run=False)
        if api.store.peek(api.key(CLUSTERROLEBINDINGS, "", name)) is None:
            binding = {"metadata": dict(meta),
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                       "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}
                                    for g in groups]}
            api.create(CLUSTERROLEBINDINGS, "", binding, manager=MANAGER, dry_run=False)
