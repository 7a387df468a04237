"""The init phases that only talk to the API: upload-config, mark-control-plane, bootstrap-token.

Each creates or updates its objects (re-running converges) with the admin.conf credentials.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from typing import Any

import yaml
from cryptography import x509

from simnode.kubeadm.apiclient import (
    RBAC,
    apply,
    cluster_role_binding,
    core,
    group,
    role,
    role_binding,
    wait_for,
)
from simnode.kubeadm.config import DEFAULT_TOKEN_GROUP, BootstrapToken, Config
from simnode.kubeadm.configdoc import cluster_configuration_yaml
from simnode.kubeadm.kubeconfig import render
from simnode.kubeadm.kubeletfiles import kubelet_config_yaml
from simnode.kubeclient import ApiError, KubeClient

Out = Callable[[str], None]
NODE_GROUPS = [group(DEFAULT_TOKEN_GROUP), group("system:nodes")]
CP_LABELS = ("node-role.kubernetes.io/control-plane", "node.kubernetes.io/exclude-from-external-load-balancers")


def config_map(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}, "data": data}


def _get_cm_rule(name: str) -> list[dict[str, Any]]:
    return [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get"]}]


async def upload_kubeadm_config(cfg: Config, client: KubeClient, out: Out) -> None:
    out('[upload-config] Storing the configuration used in ConfigMap "kubeadm-config" in the "kube-system" Namespace')
    data = {"ClusterConfiguration": cluster_configuration_yaml(cfg.cluster)}
    await apply(client, core("kube-system", "configmaps"), config_map("kube-system", "kubeadm-config", data))
    await apply(client, f"{RBAC}/namespaces/kube-system/roles",
                role("kube-system", "kubeadm:nodes-kubeadm-config", _get_cm_rule("kubeadm-config")))
    await apply(client, f"{RBAC}/namespaces/kube-system/rolebindings",
                role_binding("kube-system", "kubeadm:nodes-kubeadm-config", "kubeadm:nodes-kubeadm-config",
                             NODE_GROUPS))


async def upload_kubelet_config(cfg: Config, client: KubeClient, out: Out) -> None:
    out('[kubelet] Creating a ConfigMap "kubelet-config" in namespace kube-system with the configuration for the '
        "kubelets in the cluster")
    data = {"kubelet": kubelet_config_yaml(cfg)}
    await apply(client, core("kube-system", "configmaps"), config_map("kube-system", "kubelet-config", data))
    await apply(client, f"{RBAC}/namespaces/kube-system/roles",
                role("kube-system", "kubeadm:kubelet-config", _get_cm_rule("kubelet-config")))
    await apply(client, f"{RBAC}/namespaces/kube-system/rolebindings",
                role_binding("kube-system", "kubeadm:kubelet-config", "kubeadm:kubelet-config", NODE_GROUPS))


async def mark_control_plane(cfg: Config, client: KubeClient, out: Out) -> None:
    name = cfg.init.node_name
    path = f"/api/v1/nodes/{name}"
    out(f"[mark-control-plane] Marking the node {name} as control-plane by adding the labels: [{' '.join(CP_LABELS)}]")
    taints = [{"key": t.key, "effect": t.effect, **({"value": t.value} if t.value else {})} for t in cfg.init.taints]
    if taints:
        shown = " ".join(f"{t['key']}:{t['effect']}" for t in taints)
        out(f"[mark-control-plane] Marking the node {name} as control-plane by adding the taints [{shown}]")

    async def node() -> dict[str, Any] | None:
        try:
            return await client.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    existing: dict[str, Any] = await wait_for(f"the Node {name!r} to register", cfg.init.api_call_timeout_s, node)
    current = list((existing.get("spec") or {}).get("taints") or [])
    for taint in taints:
        if not any(c.get("key") == taint["key"] and c.get("effect") == taint["effect"] for c in current):
            current.append(taint)
    patch: dict[str, Any] = {"metadata": {"labels": dict.fromkeys(CP_LABELS, "")}}
    if taints:
        patch["spec"] = {"taints": current}
    await client.patch(path, patch, patch_type="merge")


def _token_secret(token: BootstrapToken, now: dt.datetime) -> dict[str, Any]:
    token_id, secret = token.token.split(".")
    data = {
        "token-id": token_id,
        "token-secret": secret,
        "auth-extra-groups": ",".join(token.groups),
        **{f"usage-bootstrap-{u}": "true" for u in token.usages},
    }
    if token.description:
        data["description"] = token.description
    if token.expires:
        data["expiration"] = str(token.expires)
    elif token.ttl_s > 0:
        data["expiration"] = (now + dt.timedelta(seconds=token.ttl_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"bootstrap-token-{token_id}", "namespace": "kube-system"},
        "type": "bootstrap.kubernetes.io/token",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


async def bootstrap_tokens(cfg: Config, client: KubeClient, ca: x509.Certificate, out: Out) -> None:
    now = dt.datetime.now(dt.UTC)
    for token in cfg.init.bootstrap_tokens:
        out(f"[bootstrap-token] Using token: {token.token.split('.')[0]}.<redacted>")
        await apply(client, core("kube-system", "secrets"), _token_secret(token, now))
    out("[bootstrap-token] Configuring bootstrap tokens, cluster-info ConfigMap, RBAC Roles")
    bootstrappers = [group(DEFAULT_TOKEN_GROUP)]
    await apply(client, f"{RBAC}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kubeadm:get-nodes"},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
    })
    bindings = [
        ("kubeadm:get-nodes", "kubeadm:get-nodes", bootstrappers,
         "[bootstrap-token] Configured RBAC rules to allow Node Bootstrap tokens to get nodes"),
        ("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", bootstrappers,
         "[bootstrap-token] Configured RBAC rules to allow Node Bootstrap tokens to post CSRs in order for nodes "
         "to get long term certificate credentials"),
        ("kubeadm:node-autoapprove-bootstrap", "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
         bootstrappers, "[bootstrap-token] Configured RBAC rules to allow the csrapprover controller automatically "
         "approve CSRs from a Node Bootstrap Token"),
        ("kubeadm:node-autoapprove-certificate-rotation",
         "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient", [group("system:nodes")],
         "[bootstrap-token] Configured RBAC rules to allow certificate rotation for all node client certificates "
         "in the cluster"),
    ]
    for name, role_name, subjects, message in bindings:
        await apply(client, f"{RBAC}/clusterrolebindings", cluster_role_binding(name, role_name, subjects))
        out(message)
    out('[bootstrap-token] Creating the "cluster-info" ConfigMap in the "kube-public" namespace')
    kubeconfig = render("", f"https://{cfg.control_plane_endpoint}", ca, "", {})
    await apply(client, core("kube-public", "configmaps"), config_map("kube-public", "cluster-info",
                                                                      {"kubeconfig": _cluster_only(kubeconfig)}))
    await apply(client, f"{RBAC}/namespaces/kube-public/roles",
                role("kube-public", "kubeadm:bootstrap-signer-clusterinfo", _get_cm_rule("cluster-info")))
    await apply(client, f"{RBAC}/namespaces/kube-public/rolebindings",
                role_binding("kube-public", "kubeadm:bootstrap-signer-clusterinfo",
                             "kubeadm:bootstrap-signer-clusterinfo",
                             [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"}]))


def _cluster_only(kubeconfig: str) -> str:
    """cluster-info carries the cluster (server + CA) only: no users, no contexts."""
    doc = yaml.safe_load(kubeconfig)
    doc["contexts"], doc["users"], doc["current-context"] = None, None, ""
    return yaml.safe_dump(doc, sort_keys=True)

