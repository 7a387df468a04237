"""How kubeadm talks to the API: an admin client from admin.conf, and idempotent create-or-update.

Like kubeadm >= 1.29, the first client makes sure the `kubeadm:cluster-admins` group is bound to
cluster-admin, using super-admin.conf when admin.conf is not yet allowed to do so.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from simnode.kubeclient import ApiError, KubeClient, KubeconfigError
from simnode.paths import NodeRoot

ADMIN_CONF = "/etc/kubernetes/admin.conf"
SUPER_ADMIN_CONF = "/etc/kubernetes/super-admin.conf"
RBAC = "/apis/rbac.authorization.k8s.io/v1"


def core(namespace: str, plural: str) -> str:
    return f"/api/v1/namespaces/{namespace}/{plural}"


def namespaced(group_version: str, namespace: str, plural: str) -> str:
    return f"/apis/{group_version}/namespaces/{namespace}/{plural}"


def client_for(root: NodeRoot, kubeconfig: str = ADMIN_CONF, timeout_s: float = 10.0) -> KubeClient:
    try:
        return KubeClient.from_kubeconfig(Path(kubeconfig), root=root, timeout_s=timeout_s)
    except KubeconfigError as exc:
        raise ApiError(0, "KubeconfigError", str(exc)) from exc


async def apply(client: KubeClient, collection: str, body: dict[str, Any]) -> dict[str, Any]:
    """Create `body` in `collection`, or replace the existing object of that name (re-runs converge)."""
    try:
        return await client.create(collection, body)
    except ApiError as exc:
        if exc.status != 409:
            raise
    name = body["metadata"]["name"]
    existing = await client.get(f"{collection}/{name}")
    metadata = {**body["metadata"], "resourceVersion": existing["metadata"].get("resourceVersion", "")}
    return await client.replace(f"{collection}/{name}", {**body, "metadata": metadata})


def cluster_role_binding(name: str, role: str, subjects: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    }


def role_binding(namespace: str, name: str, role: str, subjects: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": subjects,
    }


def role(namespace: str, name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules,
    }


def group(name: str) -> dict[str, str]:
    return {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": name}


async def ensure_admin_binding(root: NodeRoot) -> None:
    """Bind group kubeadm:cluster-admins (admin.conf's O) to cluster-admin, as kubeadm init does."""
    body = cluster_role_binding("kubeadm:cluster-admins", "cluster-admin", [group("kubeadm:cluster-admins")])
    async with client_for(root) as admin:
        try:
            await admin.ensure(f"{RBAC}/clusterrolebindings", body)
        except ApiError as exc:
            if exc.status != 403 or not root.path(SUPER_ADMIN_CONF).exists():
                raise
        else:
            return
    async with client_for(root, SUPER_ADMIN_CONF) as super_admin:
        await super_admin.ensure(f"{RBAC}/clusterrolebindings", body)


async def wait_for(what: str, timeout_s: float, probe: Any, interval_s: float = 0.25) -> Any:
    """Call the async `probe()` until it returns a truthy value; TimeoutError names `what` on deadline."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            result = await probe()
            if result:
                return result
        except ApiError as exc:
            last_error = f" (last error: {exc})"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}{last_error}: context deadline exceeded")
        await asyncio.sleep(interval_s)
