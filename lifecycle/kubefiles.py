"""The YAML files made next to the PKI: kubeconfigs with embedded credentials, and the kubeadm config.
Pure rendering and parsing (no crypto, no disk): `lifecycle.pki` decides what goes in and checks what comes out.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lifecycle import yamlsafe
from lifecycle.config import Config
from lifecycle.step import ClusterParams, node_ip_of

ENCRYPTION_ALGORITHMS = {"ecdsa-p256": "ECDSA-P256", "rsa-2048": "RSA-2048"}


@dataclass(frozen=True)
class KubeconfigSpec:
    file: str  # "admin.conf"
    server: str
    cluster: str
    user: str
    context: str
    common_name: str
    organization: tuple[str, ...] = ()


@dataclass(frozen=True)
class KubeconfigContent:
    server: str
    cluster: str
    user: str
    context: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def render_kubeconfig(spec: KubeconfigSpec, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> bytes:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": spec.cluster,
                "cluster": {"certificate-authority-data": _b64(ca_pem), "server": spec.server},
            }
        ],
        "contexts": [{"name": spec.context, "context": {"cluster": spec.cluster, "user": spec.user}}],
        "current-context": spec.context,
        "preferences": {},
        "users": [
            {
                "name": spec.user,
                "user": {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)},
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()


def parse_kubeconfig(data: bytes, *, read_file: Callable[[str], bytes]) -> KubeconfigContent:
    """The current context's cluster and user; file references (as kubelet-finalize writes) go to `read_file`.

    Raises ValueError naming what is missing or malformed.
    """
    try:
        doc = yamlsafe.load(data)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a kubeconfig (not a mapping)")  # noqa: TRY004 - bad file content, not a bad call
    context_name = doc.get("current-context")
    context = _named(doc, "contexts", context_name, "context")
    cluster = _named(doc, "clusters", context.get("cluster"), "cluster")
    user = _named(doc, "users", context.get("user"), "user")
    return KubeconfigContent(
        server=str(cluster.get("server", "")),
        cluster=str(context.get("cluster")),
        user=str(context.get("user")),
        context=str(context_name),
        ca_pem=_data_or_file(cluster, "certificate-authority", read_file),
        cert_pem=_data_or_file(user, "client-certificate", read_file),
        key_pem=_data_or_file(user, "client-key", read_file),
    )


def _named(doc: dict[str, Any], section: str, name: object, inner: str) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(inner), dict):
            return dict(item[inner])
    raise ValueError(f"no {inner} named {name!r} in {section}")


def _data_or_file(section: dict[str, Any], key: str, read_file: Callable[[str], bytes]) -> bytes:
    if f"{key}-data" in section:
        try:
            return base64.b64decode(str(section[f"{key}-data"]), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{key}-data is not base64") from exc
    if key in section:
        try:
            return read_file(str(section[key]))
        except OSError as exc:
            raise ValueError(f"{key} {section[key]!r} cannot be read: {exc.strerror}") from exc
    raise ValueError(f"no {key}-data")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def render_kubeadm_config(config: Config, cluster: ClusterParams, *, certificates_dir: Path,
                          cgroup_driver: str) -> bytes:
    """InitConfiguration, ClusterConfiguration (kubeadm.k8s.io/v1beta4) and KubeletConfiguration, in that order.

    `cgroup_driver` is the container engine's (`docker info`): the kubelet's must be the same, or every pod
    sandbox fails (cri-dockerd hands the kubelet's cgroup parent to the engine as it is).
    """
    k8s = config.kubernetes
    node_ip = node_ip_of(config, cluster)
    init = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        "localAPIEndpoint": {"advertiseAddress": node_ip, "bindPort": cluster.api_port},
        "nodeRegistration": {
            "name": config.node_name,
            "criSocket": k8s.cri_socket,
            "taints": [],  # a single node must run ordinary workloads
            "kubeletExtraArgs": [{"name": "node-ip", "value": node_ip}],
        },
    }
    cluster_doc = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": cluster.kubernetes_version,
        "clusterName": k8s.cluster_name,
        "controlPlaneEndpoint": host_port(k8s.endpoint_name, cluster.api_port),
        "certificatesDir": str(certificates_dir),
        "imageRepository": k8s.image_repository,
        "encryptionAlgorithm": ENCRYPTION_ALGORITHMS[config.pki.key_algorithm],
        # So that `kubeadm certs renew` issues what the certs state would.
        "certificateValidityPeriod": go_duration(config.pki.cert_validity_days * 86400),
        "caCertificateValidityPeriod": go_duration(config.pki.ca_validity_days * 86400),
        "networking": {
            "serviceSubnet": k8s.service_subnet,
            "podSubnet": k8s.pod_subnet,
            "dnsDomain": k8s.dns_domain,
        },
        "apiServer": {"certSANs": list(k8s.extra_sans)},
    }
    if cluster.etcd_metrics_port != 2381:  # kubeadm's default; another port lets nodes share a host
        cluster_doc["etcd"] = {"local": {"extraArgs": [
            {"name": "listen-metrics-urls", "value": f"http://127.0.0.1:{cluster.etcd_metrics_port}"},
        ]}}
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "healthzPort": cluster.kubelet_healthz_port,
        "healthzBindAddress": "127.0.0.1",
        "cgroupDriver": cgroup_driver,
        "clusterDomain": k8s.dns_domain,
    }
    text = yaml.safe_dump_all([init, cluster_doc, kubelet], sort_keys=False, explicit_start=True)
    return text.encode()


def go_duration(seconds: float) -> str:
    """Whole seconds as a Go duration with hours, as kubeadm prints it: 365 days -> "8760h0m0s"."""
    hours, rest = divmod(max(1, round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 host needs brackets
