"""Who a request is: client certificate, else service-account bearer token, then impersonation headers; and
the TokenRequest subresource (`serviceaccounts/<name>/token`, what `kubectl create token` and the kubelet use).

Follows kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/filters/impersonation.go (the
impersonate verb on users/groups/serviceaccounts, groups of an impersonated service account,
system:authenticated added), pkg/serviceaccount/claims.go (a token whose service account or pod is gone, or
has another uid, no longer authenticates) and pkg/registry/core/serviceaccount/storage/token.go.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from simnode.apiserver.errors import ApiError, bad_request, not_found, unauthorized
from simnode.apiserver.rbac import Attributes, Authorizer, User, forbidden
from simnode.apiserver.resources import PODS, lookup
from simnode.apiserver.satokens import (
    DEFAULT_EXPIRATION_S,
    MAX_EXPIRATION_S,
    MIN_EXPIRATION_S,
    TokenError,
    TokenIssuer,
    TokenSubject,
    sa_groups,
    split_sa_user,
)
from simnode.apiserver.store import Store
from simnode.apiserver.tls import Identity

log = logging.getLogger("simnode.apiserver.authn")

AUTHENTICATED = "system:authenticated"
_SERVICEACCOUNTS = lookup("", "v1", "serviceaccounts")
assert _SERVICEACCOUNTS is not None
SERVICEACCOUNTS = _SERVICEACCOUNTS


class Authenticator:
    def __init__(self, store: Store, tokens: TokenIssuer | None) -> None:
        self.store = store
        self.tokens = tokens

    def user(self, ident: Identity, headers: Any) -> User:
        """The requesting user before impersonation; anonymous is User("")."""
        if ident.authenticated:
            return User(ident.user, (*ident.groups, AUTHENTICATED), via="x509")
        auth = str(headers.get("Authorization", ""))
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            return self._token_user(auth[7:].strip())
        return User("")

    def _token_user(self, token: str) -> User:
        if self.tokens is None:
            log.info("Unable to authenticate the request: no --service-account-key-file to verify tokens with")
            raise unauthorized()
        try:
            subject = self.tokens.verify(token)
            self._check_bound(subject)
        except TokenError as exc:
            log.info("Unable to authenticate the request: %s", exc)
            raise unauthorized() from exc
        return User(subject.user, sa_groups(subject.namespace), via="token")

    def _check_bound(self, s: TokenSubject) -> None:
        sa = self.store.peek((SERVICEACCOUNTS.key, s.namespace, s.name))
        if sa is None or sa["metadata"].get("uid") != s.uid:
            raise TokenError(f'service account {s.namespace}/{s.name} (uid {s.uid}) no longer exists')
        if s.pod_name:
            pod = self.store.peek((PODS.key, s.namespace, s.pod_name))
            if pod is None or pod["metadata"].get("uid") != s.pod_uid:
                raise TokenError(f"pod {s.namespace}/{s.pod_name} the token is bound to no longer exists")

    @staticmethod
    def impersonate(requester: User, headers: Any, authorizer: Authorizer) -> User:
        """The impersonated user if Impersonate-* headers are set (each checked against the requester's rights)."""
        name = headers.get("Impersonate-User")
        groups = list(headers.getall("Impersonate-Group", [])) if hasattr(headers, "getall") else []
        if not name:
            if groups:
                raise bad_request("requested [Impersonate-Group] without impersonating a user")
            return requester
        sa = split_sa_user(name)
        checks = [Attributes(verb="impersonate", path="", resource_request=True, resource="serviceaccounts",
                             namespace=sa[0], name=sa[1]) if sa else
                  Attributes(verb="impersonate", path="", resource_request=True, resource="users", name=name)]
        checks += [Attributes(verb="impersonate", path="", resource_request=True, resource="groups", name=g)
                   for g in groups]
        for a in checks:
            if requester.via == "x509" and "system:masters" not in requester.groups:
                continue  # certificate users are not RBAC-checked here (docs/simnode.md, rules 5)
            allowed, reason = authorizer.authorize(requester, a)
            if not allowed:
                raise forbidden(requester, a, reason)
        if sa and not groups:
            return User(name, sa_groups(sa[0]), via="impersonation")
        return User(name, (*groups, AUTHENTICATED) if AUTHENTICATED not in groups else tuple(groups),
                    via="impersonation")


def token_request(store: Store, tokens: TokenIssuer | None, namespace: str, name: str, body: Any) -> dict[str, Any]:
    """POST serviceaccounts/<name>/token: a TokenRequest with status.token (token.go Create)."""
    if tokens is None or not tokens.can_issue:
        raise ApiError(404, "NotFound", "the server could not find the requested resource", details={})
    if not isinstance(body, dict) or body.get("kind") not in (None, "TokenRequest"):
        raise bad_request("expected a TokenRequest")
    sa = store.peek((SERVICEACCOUNTS.key, namespace, name))
    if sa is None:
        raise not_found(SERVICEACCOUNTS, name)
    spec = body.get("spec") or {}
    expiration = spec.get("expirationSeconds") or DEFAULT_EXPIRATION_S  # kubectl sends null for "unset"
    if not isinstance(expiration, int) or expiration < MIN_EXPIRATION_S:
        raise ApiError(422, "Invalid", f'TokenRequest.authentication.k8s.io "{name}" is invalid: '
                                       "spec.expirationSeconds: Invalid value: "
                                       f"{expiration}: may not specify a duration less than 10 minutes")
    expiration = min(expiration, MAX_EXPIRATION_S)
    pod_name = pod_uid = ""
    ref = spec.get("boundObjectRef")
    if isinstance(ref, dict) and ref.get("kind") == "Pod":
        pod = store.peek((PODS.key, namespace, str(ref.get("name", ""))))
        if pod is None or (ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]):
            raise ApiError(404, "NotFound", f'pods "{ref.get("name")}" not found',
                           details={"name": ref.get("name"), "kind": "pods"})
        pod_name, pod_uid = str(pod["metadata"]["name"]), str(pod["metadata"]["uid"])
    subject = TokenSubject(namespace=namespace, name=name, uid=str(sa["metadata"]["uid"]), pod_name=pod_name,
                           pod_uid=pod_uid)
    audiences = [str(a) for a in spec.get("audiences") or []]
    token, exp = tokens.issue(subject, audiences=audiences, expiration_s=expiration)
    return {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace,
                     "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "spec": {**spec, "audiences": audiences or tokens.audiences, "expirationSeconds": expiration},
        "status": {"token": token, "expirationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))},
    }
