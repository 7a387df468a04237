"""Static pod manifests for etcd and the control plane, as kubeadm writes them to /etc/kubernetes/manifests.

Each manifest is a Pod YAML with real paths (the kubelet re-roots them); written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import yaml

from simnode.kubeadm.config import Config
from simnode.kubeadm.files import write_atomic
from simnode.kubeadm.values import join_host_port
from simnode.paths import NodeRoot

MANIFESTS_DIR = "/etc/kubernetes/manifests"
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ETCD = "etcd"
ADVERTISE_ANNOTATION = "kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint"
ETCD_ANNOTATION = "kubeadm.kubernetes.io/etcd.advertise-client-urls"


def manifest_path(component: str) -> str:
    return f"{MANIFESTS_DIR}/{component}.yaml"


def _args(defaults: dict[str, str], extra: list[tuple[str, str]]) -> list[str]:
    """`--k=v` flags sorted by name like kubeadm; extraArgs override defaults of the same name."""
    merged = dict(defaults)
    for name, value in extra:
        merged[name] = value
    return [f"--{k}={v}" for k, v in sorted(merged.items())]


def _probe(host: str, path: str, port: int, scheme: str, *, failures: int, delay_s: int = 10) -> dict[str, Any]:
    return {
        "failureThreshold": failures,
        "httpGet": {"host": host, "path": path, "port": port, "scheme": scheme},
        "initialDelaySeconds": delay_s,
        "periodSeconds": 10,
        "timeoutSeconds": 15,
    }


def _host_path(name: str, path: str, kind: str, read_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    mount: dict[str, Any] = {"mountPath": path, "name": name}
    if read_only:
        mount["readOnly"] = True
    return mount, {"hostPath": {"path": path, "type": kind}, "name": name}


def _pod(component: str, image: str, command: list[str], probes: dict[str, Any], volumes: list[tuple[str, str, str]],
         annotations: dict[str, str] | None = None, cpu: str = "100m") -> dict[str, Any]:
    mounts = [_host_path(n, p, k, read_only=(n != "etcd-data")) for n, p, k in volumes]
    container: dict[str, Any] = {
        "command": command,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "name": component,
        "resources": {"requests": {"cpu": cpu}},
        "volumeMounts": [m for m, _ in mounts],
        **probes,
    }
    metadata: dict[str, Any] = {
        "creationTimestamp": None,
        "labels": {"component": component, "tier": "control-plane"},
        "name": component,
        "namespace": "kube-system",
    }
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [container],
            "hostNetwork": True,
            "priority": 2000001000,
            "priorityClassName": "system-node-critical",
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [v for _, v in mounts],
        },
        "status": {},
    }


def _pki_volumes(cfg: Config) -> list[tuple[str, str, str]]:
    return [("ca-certs", "/etc/ssl/certs", "DirectoryOrCreate"), ("k8s-certs", cfg.cert_dir, "DirectoryOrCreate")]


def apiserver(cfg: Config) -> dict[str, Any]:
    pki, i, c = cfg.cert_dir.rstrip("/"), cfg.init, cfg.cluster
    defaults = {
        "advertise-address": i.advertise_address,
        "allow-privileged": "true",
        "authorization-mode": "Node,RBAC",
        "bind-address": i.advertise_address,
        "client-ca-file": f"{pki}/ca.crt",
        "enable-admission-plugins": "NodeRestriction",
        "enable-bootstrap-token-auth": "true",
        "etcd-cafile": f"{pki}/etcd/ca.crt",
        "etcd-certfile": f"{pki}/apiserver-etcd-client.crt",
        "etcd-keyfile": f"{pki}/apiserver-etcd-client.key",
        "etcd-servers": "https://127.0.0.1:2379",
        "kubelet-client-certificate": f"{pki}/apiserver-kubelet-client.crt",
        "kubelet-client-key": f"{pki}/apiserver-kubelet-client.key",
        "kubelet-preferred-address-types": "InternalIP,ExternalIP,Hostname",
        "proxy-client-cert-file": f"{pki}/front-proxy-client.crt",
        "proxy-client-key-file": f"{pki}/front-proxy-client.key",
        "requestheader-allowed-names": "front-proxy-client",
        "requestheader-client-ca-file": f"{pki}/front-proxy-ca.crt",
        "requestheader-extra-headers-prefix": "X-Remote-Extra-",
        "requestheader-group-headers": "X-Remote-Group",
        "requestheader-username-headers": "X-Remote-User",
        "secure-port": str(i.bind_port),
        "service-account-issuer": f"https://kubernetes.default.svc.{c.dns_domain}",
        "service-account-key-file": f"{pki}/sa.pub",
        "service-account-signing-key-file": f"{pki}/sa.key",
        "service-cluster-ip-range": c.service_subnet,
        "tls-cert-file": f"{pki}/apiserver.crt",
        "tls-private-key-file": f"{pki}/apiserver.key",
    }
    host, port = i.advertise_address, i.bind_port
    probes = {
        "livenessProbe": _probe(host, "/livez", port, "HTTPS", failures=8),
        "readinessProbe": {**_probe(host, "/readyz", port, "HTTPS", failures=3), "periodSeconds": 1},
        "startupProbe": _probe(host, "/livez", port, "HTTPS", failures=24),
    }
    probes["readinessProbe"].pop("initialDelaySeconds")
    command = ["kube-apiserver", *_args(defaults, c.apiserver_extra_args)]
    return _pod("kube-apiserver", cfg.images["kube-apiserver"], command, probes, _pki_volumes(cfg),
                {ADVERTISE_ANNOTATION: cfg.local_endpoint}, cpu="250m")


def _secure_port(extra: list[tuple[str, str]], default: int) -> int:
    # kubeadm probes the component's secure port; honour an override so several nodes can share a host.
    for name, value in extra:
        if name == "secure-port" and value.isdigit():
            return int(value)
    return default


def controller_manager(cfg: Config) -> dict[str, Any]:
    pki, c = cfg.cert_dir.rstrip("/"), cfg.cluster
    kubeconfig = "/etc/kubernetes/controller-manager.conf"
    defaults = {
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "bind-address": "127.0.0.1",
        "client-ca-file": f"{pki}/ca.crt",
        "cluster-name": c.cluster_name,
        "cluster-signing-cert-file": f"{pki}/ca.crt",
        "cluster-signing-key-file": f"{pki}/ca.key",
        "controllers": "*,bootstrapsigner,tokencleaner",
        "kubeconfig": kubeconfig,
        "leader-elect": "true",
        "requestheader-client-ca-file": f"{pki}/front-proxy-ca.crt",
        "root-ca-file": f"{pki}/ca.crt",
        "service-account-private-key-file": f"{pki}/sa.key",
        "service-cluster-ip-range": c.service_subnet,
        "use-service-account-credentials": "true",
    }
    if c.pod_subnet:
        defaults["allocate-node-cidrs"] = "true"
        defaults["cluster-cidr"] = c.pod_subnet
    port = _secure_port(c.controller_manager_extra_args, 10257)
    probes = {
        "livenessProbe": _probe("127.0.0.1", "/healthz", port, "HTTPS", failures=8),
        "startupProbe": _probe("127.0.0.1", "/healthz", port, "HTTPS", failures=24),
    }
    volumes = [*_pki_volumes(cfg), ("kubeconfig", kubeconfig, "FileOrCreate")]
    return _pod("kube-controller-manager", cfg.images["kube-controller-manager"],
                ["kube-controller-manager", *_args(defaults, c.controller_manager_extra_args)], probes, volumes,
                cpu="200m")


def scheduler(cfg: Config) -> dict[str, Any]:
    kubeconfig = "/etc/kubernetes/scheduler.conf"
    defaults = {
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "bind-address": "127.0.0.1",
        "kubeconfig": kubeconfig,
        "leader-elect": "true",
    }
    port = _secure_port(cfg.cluster.scheduler_extra_args, 10259)
    probes = {
        "livenessProbe": _probe("127.0.0.1", "/healthz", port, "HTTPS", failures=8),
        "startupProbe": _probe("127.0.0.1", "/healthz", port, "HTTPS", failures=24),
    }
    return _pod("kube-scheduler", cfg.images["kube-scheduler"],
                ["kube-scheduler", *_args(defaults, cfg.cluster.scheduler_extra_args)], probes,
                [("kubeconfig", kubeconfig, "FileOrCreate")])


def _metrics_endpoint(extra: list[tuple[str, str]]) -> tuple[str, int]:
    """Where etcd's probes go: kubeadm's 127.0.0.1:2381, or the first --listen-metrics-urls override."""
    for name, value in extra:
        if name == "listen-metrics-urls":
            url = urlsplit(value.split(",")[0].strip())
            if url.hostname and url.port:
                return url.hostname, url.port
    return "127.0.0.1", 2381


def etcd(cfg: Config) -> dict[str, Any]:
    pki, name, c = f"{cfg.cert_dir.rstrip('/')}/etcd", cfg.init.node_name, cfg.cluster
    adv = cfg.init.advertise_address
    client_url, peer_url = f"https://{join_host_port(adv, 2379)}", f"https://{join_host_port(adv, 2380)}"
    defaults = {
        "advertise-client-urls": client_url,
        "cert-file": f"{pki}/server.crt",
        "client-cert-auth": "true",
        "data-dir": c.etcd_data_dir,
        "experimental-initial-corrupt-check": "true",
        "experimental-watch-progress-notify-interval": "5s",
        "initial-advertise-peer-urls": peer_url,
        "initial-cluster": f"{name}={peer_url}",
        "key-file": f"{pki}/server.key",
        "listen-client-urls": f"https://127.0.0.1:2379,{client_url}",
        "listen-metrics-urls": "http://127.0.0.1:2381",
        "listen-peer-urls": peer_url,
        "name": name,
        "peer-cert-file": f"{pki}/peer.crt",
        "peer-client-cert-auth": "true",
        "peer-key-file": f"{pki}/peer.key",
        "peer-trusted-ca-file": f"{pki}/ca.crt",
        "snapshot-count": "10000",
        "trusted-ca-file": f"{pki}/ca.crt",
    }
    host, port = _metrics_endpoint(c.etcd_extra_args)
    probes = {
        "livenessProbe": _probe(host, "/livez", port, "HTTP", failures=8),
        "readinessProbe": {**_probe(host, "/readyz", port, "HTTP", failures=3), "periodSeconds": 1},
        "startupProbe": _probe(host, "/readyz", port, "HTTP", failures=24),
    }
    probes["readinessProbe"].pop("initialDelaySeconds")
    volumes = [("etcd-data", c.etcd_data_dir, "DirectoryOrCreate"), ("etcd-certs", pki, "DirectoryOrCreate")]
    return _pod(ETCD, cfg.images["etcd"], ["etcd", *_args(defaults, c.etcd_extra_args)], probes, volumes,
                {ETCD_ANNOTATION: client_url})


BUILDERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "kube-apiserver": apiserver,
    "kube-controller-manager": controller_manager,
    "kube-scheduler": scheduler,
    ETCD: etcd,
}


def dump(pod: dict[str, Any]) -> str:
    return yaml.safe_dump(pod, sort_keys=True)


def write_manifest(root: NodeRoot, component: str, pod: dict[str, Any]) -> None:
    write_atomic(root.path(manifest_path(component)), dump(pod), mode=0o600)


def is_ours(text: str, component: str) -> bool:
    """A manifest kubeadm wrote for `component` (so re-running init may replace it)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if not isinstance(doc, dict) or doc.get("kind") != "Pod":
        return False
    labels = (doc.get("metadata") or {}).get("labels") or {}
    return bool(labels.get("component") == component and labels.get("tier") == "control-plane")
