"""Authorization: request attributes from the URL, RBAC over the stored Roles and bindings, and the 403 the
real server sends when nothing allows a request.

Follows kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go (verbs,
resources, subresources from the path), plugin/pkg/auth/authorizer/rbac/rbac.go (RuleAllows: verbs,
apiGroups, resources incl. `*/sub`, resourceNames, nonResourceURLs; bindings visited cluster-wide then in the
request's namespace; missing roles reported as `RBAC: ...`), pkg/registry/rbac/validation/rule.go
(appliesTo: User, Group, ServiceAccount subjects) and
staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go (forbiddenMessage).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from simnode.apiserver.errors import ApiError
from simnode.apiserver.store import Store

RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    # Where the identity came from: "x509", "token", "impersonation" or "" (anonymous).
    via: str = ""


@dataclass(frozen=True)
class Attributes:
    verb: str
    path: str
    resource_request: bool
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def request_attributes(method: str, path: str, query: dict[str, str]) -> Attributes:
    """requestinfo.go NewRequestInfo: /api/v1/... and /apis/<g>/<v>/... are resource requests, the rest not."""
    parts = [p for p in path.split("/") if p]
    plain_verb = {"GET": "get", "HEAD": "get", "POST": "post", "PUT": "put", "PATCH": "patch",
                  "DELETE": "delete"}.get(method, method.lower())
    if not parts or parts[0] not in ("api", "apis"):
        return Attributes(verb=plain_verb, path=path, resource_request=False)
    if parts[0] == "api":
        if len(parts) < 2:
            return Attributes(verb=plain_verb, path=path, resource_request=False)
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 3:
            return Attributes(verb=plain_verb, path=path, resource_request=False)
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return Attributes(verb=plain_verb, path=path, resource_request=False)  # discovery of one version
    verb = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete"}.get(method, method.lower())
    if rest[0] == "watch":
        verb, rest = "watch", rest[1:]
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        # A step after the namespace name that is not one of its own subresources names a resource in it.
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 else ""
    if resource == "namespaces" and name:
        namespace = name  # requestinfo.go: a namespace's own namespace is its name
    if not name and verb == "get":
        verb = "list"
    if not name and verb == "delete":
        verb = "deletecollection"
    if verb in ("get", "list") and query.get("watch", "").lower() in ("1", "true"):
        verb = "watch"
    return Attributes(verb=verb, path=path, resource_request=True, api_group=group, api_version=version,
                      resource=resource, subresource=subresource, namespace=namespace, name=name)


def _has(values: list[Any], wanted: str) -> bool:
    return "*" in values or wanted in values


def rule_allows(rule: dict[str, Any], a: Attributes) -> bool:
    """rbac.go RuleAllows."""
    verbs = list(rule.get("verbs") or [])
    if not _has(verbs, a.verb):
        return False
    if not a.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == a.path or (url.endswith("*") and a.path.startswith(url[:-1])):
                return True
        return False
    if not _has(list(rule.get("apiGroups") or []), a.api_group):
        return False
    combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    resources = list(rule.get("resources") or [])
    if not any(r == "*" or r == combined or (a.subresource and r == f"*/{a.subresource}") for r in resources):
        return False
    names = list(rule.get("resourceNames") or [])
    return not names or a.name in names


def _applies_to(subject: dict[str, Any], user: User, binding_namespace: str) -> bool:
    """rule.go appliesToUser."""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return bool(user.name == name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(user.name == f"system:serviceaccount:{namespace}:{name}")
    return False


class Authorizer:
    """RBAC over the store, with the bypass the real chain gives system:masters (authorizerfactory)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _objects(self, plural: str, namespace: str | None) -> Iterator[dict[str, Any]]:
        yield from self.store.iter_resource(f"{RBAC_GROUP}/{plural}", namespace)

    def _role_rules(self, ref: dict[str, Any], namespace: str, errors: list[str]) -> list[dict[str, Any]]:
        kind, name = ref.get("kind"), str(ref.get("name", ""))
        if kind == "ClusterRole":
            key = (f"{RBAC_GROUP}/clusterroles", "", name)
            label = f'clusterrole.{RBAC_GROUP} "{name}" not found'
        elif kind == "Role":
            key = (f"{RBAC_GROUP}/roles", namespace, name)
            label = f'role.{RBAC_GROUP} "{name}" not found'
        else:
            return []
        role = self.store.peek(key)
        if role is None:
            errors.append(label)
            return []
        return list(role.get("rules") or [])

    def authorize(self, user: User, a: Attributes) -> tuple[bool, str]:
        """(allowed, reason for the 403 message)."""
        if MASTERS in user.groups:
            return True, ""
        errors: list[str] = []
        bindings = [(crb, "") for crb in self._objects("clusterrolebindings", None)]
        if a.namespace:  # a RoleBinding grants only inside its own namespace
            bindings += [(rb, a.namespace) for rb in self._objects("rolebindings", a.namespace)]
        for binding, ns in bindings:
            if not any(_applies_to(s, user, ns) for s in binding.get("subjects") or []):
                continue
            if any(rule_allows(r, a) for r in self._role_rules(binding.get("roleRef") or {}, ns, errors)):
                return True, ""
        return False, f"RBAC: {', '.join(errors)}" if errors else ""


def forbidden(user: User, a: Attributes, reason: str) -> ApiError:
    """errors.go Forbidden + apierrors.NewForbidden: the message and details kubectl prints."""
    if not a.resource_request:
        msg = f'User "{user.name}" cannot {a.verb} path "{a.path}"'
    else:
        resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        msg = f'User "{user.name}" cannot {a.verb} resource "{resource}" in API group "{a.api_group}"'
        msg += f' in the namespace "{a.namespace}"' if a.namespace else " at the cluster scope"
    if reason:
        msg = f"{msg}: {reason}"
    if not a.resource_request or not a.resource:
        return ApiError(403, "Forbidden", f"forbidden: {msg}", details={})
    qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
    head = f'{qualified} "{a.name}"' if a.name else qualified
    details: dict[str, Any] = {"kind": a.resource}
    if a.name:
        details["name"] = a.name
    if a.api_group:
        details["group"] = a.api_group
    return ApiError(403, "Forbidden", f"{head} is forbidden: {msg}", details=details)


def access_review(authorizer: Authorizer, user: User, body: Any) -> dict[str, Any]:
    """POST selfsubjectaccessreviews (`kubectl auth can-i`): the review with status.allowed for `user`.

    pkg/registry/authorization/selfsubjectaccessreview/rest.go: the requester's own attributes; the same
    decision the request itself would get (certificate users outside system:masters pass, as in _authorize)."""
    if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
        raise ApiError(400, "BadRequest", "expected a SelfSubjectAccessReview with a spec")
    spec = body["spec"]
    res, non = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if isinstance(res, dict) == isinstance(non, dict):
        raise ApiError(422, "Invalid", 'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                                       "spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes "
                                       "and resourceAttributes must be specified")
    if isinstance(res, dict):
        a = Attributes(verb=str(res.get("verb", "")), path="", resource_request=True,
                       api_group=str(res.get("group", "")), api_version=str(res.get("version", "")),
                       resource=str(res.get("resource", "")), subresource=str(res.get("subresource", "")),
                       namespace=str(res.get("namespace", "")), name=str(res.get("name", "")))
    else:
        a = Attributes(verb=str(non.get("verb", "")), path=str(non.get("path", "")), resource_request=False)
    if user.via in ("token", "impersonation"):
        allowed, reason = authorizer.authorize(user, a)
    else:
        allowed, reason = True, ""
    status: dict[str, Any] = {"allowed": allowed}
    if reason:
        status["reason"] = reason
    return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}
