"""kubeadm's essential addons, CoreDNS and kube-proxy, as the API objects kubeadm creates for them.

`apply_coredns` / `apply_kube_proxy` create or update every object, so re-running (and upgrade) converges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from simnode.kubeadm.apiclient import RBAC, apply, cluster_role_binding, core, group, namespaced, role, role_binding
from simnode.kubeadm.config import DEFAULT_TOKEN_GROUP, Config
from simnode.kubeclient import KubeClient

Out = Callable[[str], None]
APPS = "apps/v1"
CP_TOLERATION = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}

COREFILE = """.:53 {{
    errors
    health {{
       lameduck 5s
    }}
    ready
    kubernetes {domain} in-addr.arpa ip6.arpa {{
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }}
    prometheus :9153
    forward . /etc/resolv.conf {{
       max_concurrent 1000
    }}
    cache 30 {{
       disable success {domain}
       disable denial {domain}
    }}
    loop
    reload
    loadbalance
}}
"""


def _meta(name: str, namespace: str | None = "kube-system", **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


def coredns_deployment(cfg: Config) -> dict[str, Any]:
    container = {
        "name": "coredns",
        "image": cfg.images["coredns"],
        "imagePullPolicy": "IfNotPresent",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [
            {"containerPort": 53, "name": "dns", "protocol": "UDP"},
            {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
            {"containerPort": 9153, "name": "metrics", "protocol": "TCP"},
        ],
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080, "scheme": "HTTP"},
                          "initialDelaySeconds": 60, "timeoutSeconds": 5, "successThreshold": 1,
                          "failureThreshold": 5},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181, "scheme": "HTTP"}},
        "resources": {"limits": {"memory": "170Mi"}, "requests": {"cpu": "100m", "memory": "70Mi"}},
        "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    return {
        "apiVersion": APPS,
        "kind": "Deployment",
        "metadata": _meta("coredns", **{"k8s-app": "kube-dns"}),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "containers": [container],
                    "dnsPolicy": "Default",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "priorityClassName": "system-cluster-critical",
                    "serviceAccountName": "coredns",
                    "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}, CP_TOLERATION],
                    "volumes": [{"name": "config-volume", "configMap": {
                        "name": "coredns", "items": [{"key": "Corefile", "path": "Corefile"}]}}],
                },
            },
        },
    }


def coredns_service(cfg: Config) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            **_meta("kube-dns", **{"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true",
                                   "kubernetes.io/name": "CoreDNS"}),
            "annotations": {"prometheus.io/port": "9153", "prometheus.io/scrape": "true"},
        },
        "spec": {
            "clusterIP": str(cfg.dns_service_ip),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
            ],
            "selector": {"k8s-app": "kube-dns"},
        },
    }


async def apply_coredns(cfg: Config, client: KubeClient, out: Out) -> None:
    await apply(client, core("kube-system", "serviceaccounts"),
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("coredns")})
    await apply(client, f"{RBAC}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": _meta("system:coredns", None),
        "rules": [
            {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
             "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ],
    })
    service_account = {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}
    await apply(client, f"{RBAC}/clusterrolebindings",
                cluster_role_binding("system:coredns", "system:coredns", [service_account]))
    await apply(client, core("kube-system", "configmaps"), {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("coredns"),
        "data": {"Corefile": COREFILE.format(domain=cfg.cluster.dns_domain)},
    })
    await apply(client, namespaced(APPS, "kube-system", "deployments"), coredns_deployment(cfg))
    await apply(client, core("kube-system", "services"), coredns_service(cfg))
    out("[addons] Applied essential addon: CoreDNS")


def kube_proxy_config(cfg: Config) -> dict[str, str]:
    """The kube-proxy ConfigMap: its KubeProxyConfiguration (the user's, if given) and an in-cluster kubeconfig."""
    proxy = dict(cfg.kube_proxy or {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"})
    proxy.setdefault("clientConnection", {"kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf"})
    if cfg.cluster.pod_subnet:
        proxy.setdefault("clusterCIDR", cfg.cluster.pod_subnet)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default", "cluster": {
            "certificate-authority": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "server": f"https://{cfg.control_plane_endpoint}"}}],
        "contexts": [{"name": "default", "context": {"cluster": "default", "namespace": "default", "user": "default"}}],
        "current-context": "default",
        "users": [{"name": "default", "user": {"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}}],
    }
    return {"config.conf": yaml.safe_dump(proxy, sort_keys=True), "kubeconfig.conf": yaml.safe_dump(kubeconfig)}


def kube_proxy_daemonset(cfg: Config) -> dict[str, Any]:
    container = {
        "name": "kube-proxy",
        "image": cfg.images["kube-proxy"],
        "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf",
                    "--hostname-override=$(NODE_NAME)"],
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "securityContext": {"privileged": True},
        "volumeMounts": [
            {"mountPath": "/var/lib/kube-proxy", "name": "kube-proxy"},
            {"mountPath": "/run/xtables.lock", "name": "xtables-lock"},
            {"mountPath": "/lib/modules", "name": "lib-modules", "readOnly": True},
        ],
    }
    return {
        "apiVersion": APPS,
        "kind": "DaemonSet",
        "metadata": _meta("kube-proxy", **{"k8s-app": "kube-proxy"}),
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {"k8s-app": "kube-proxy"}},
                "spec": {
                    "containers": [container],
                    "hostNetwork": True,
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "priorityClassName": "system-node-critical",
                    "serviceAccountName": "kube-proxy",
                    "tolerations": [{"operator": "Exists"}],
                    "volumes": [
                        {"name": "kube-proxy", "configMap": {"name": "kube-proxy"}},
                        {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
                        {"name": "lib-modules", "hostPath": {"path": "/lib/modules"}},
                    ],
                },
            },
        },
    }


async def apply_kube_proxy(cfg: Config, client: KubeClient, out: Out) -> None:
    await apply(client, core("kube-system", "serviceaccounts"),
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("kube-proxy")})
    await apply(client, f"{RBAC}/clusterrolebindings", cluster_role_binding(
        "kubeadm:node-proxier", "system:node-proxier",
        [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}]))
    await apply(client, core("kube-system", "configmaps"), {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("kube-proxy", **{"app": "kube-proxy"}),
        "data": kube_proxy_config(cfg),
    })
    await apply(client, f"{RBAC}/namespaces/kube-system/roles", role("kube-system", "kube-proxy", [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kube-proxy"], "verbs": ["get"]}]))
    await apply(client, f"{RBAC}/namespaces/kube-system/rolebindings", role_binding(
        "kube-system", "kube-proxy", "kube-proxy", [group(DEFAULT_TOKEN_GROUP)]))
    await apply(client, namespaced(APPS, "kube-system", "daemonsets"), kube_proxy_daemonset(cfg))
    out("[addons] Applied essential addon: kube-proxy")
