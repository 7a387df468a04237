"""The validated kubeadm configuration (Init + Cluster + Kubelet) with kubeadm's defaults applied.

`configload.load_config` builds it from the user's file; phases only read it. Paths stay real
(`/etc/kubernetes/pki`); callers re-root them with `NodeRoot.path`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from simnode.kubeadm.values import IPAddress, IPNetwork, join_host_port, nth_ip, parse_cidrs, split_host_port
from simnode.versions import component_images

DEFAULT_CRI_SOCKET = "unix:///var/run/containerd/containerd.sock"
DEFAULT_SERVICE_SUBNET = "10.96.0.0/12"
DEFAULT_DNS_DOMAIN = "cluster.local"
DEFAULT_CERT_DIR = "/etc/kubernetes/pki"
DEFAULT_IMAGE_REPOSITORY = "registry.k8s.io"
DEFAULT_BIND_PORT = 6443
DEFAULT_HEALTHZ_PORT = 10248
DEFAULT_ETCD_DATA_DIR = "/var/lib/etcd"
DEFAULT_STATIC_POD_PATH = "/etc/kubernetes/manifests"
DEFAULT_CLUSTER_NAME = "kubernetes"
DEFAULT_ENCRYPTION = "RSA-2048"
DEFAULT_CERT_VALIDITY_S = 8760 * 3600.0
DEFAULT_CA_VALIDITY_S = 87600 * 3600.0
DEFAULT_CONTROL_PLANE_TIMEOUT_S = 240.0
DEFAULT_KUBELET_TIMEOUT_S = 240.0
DEFAULT_API_CALL_TIMEOUT_S = 60.0
DEFAULT_TOKEN_GROUP = "system:bootstrappers:kubeadm:default-node-token"
CONTROL_PLANE_TAINT_KEY = "node-role.kubernetes.io/control-plane"
ENCRYPTION_ALGORITHMS = ("ECDSA-P256", "ECDSA-P384", "RSA-2048", "RSA-3072", "RSA-4096")

KUBEADM_GROUP = "kubeadm.k8s.io"
KUBEADM_VERSIONS = ("v1beta3", "v1beta4")
KUBELET_API_VERSION = "kubelet.config.k8s.io/v1beta1"
KUBEPROXY_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"


def kubeadm_images(repo: str, version: str) -> dict[str, str]:
    """Image references as kubeadm names them: CoreDNS keeps its `coredns/` sub-path only in the default
    repository (registry.k8s.io/coredns/coredns), a custom repository gets `<repo>/coredns`."""
    images = component_images(repo, version)
    if repo == DEFAULT_IMAGE_REPOSITORY:
        images["coredns"] = images["coredns"].replace(f"{repo}/coredns:", f"{repo}/coredns/coredns:", 1)
    return images


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str
    value: str = ""


@dataclass(frozen=True)
class BootstrapToken:
    token: str
    description: str = ""
    ttl_s: float = 24 * 3600.0
    expires: str | None = None
    usages: tuple[str, ...] = ("signing", "authentication")
    groups: tuple[str, ...] = (DEFAULT_TOKEN_GROUP,)


@dataclass
class InitConfig:
    api_version: str
    advertise_address: str
    bind_port: int = DEFAULT_BIND_PORT
    node_name: str = ""
    cri_socket: str = DEFAULT_CRI_SOCKET
    taints: list[Taint] = field(default_factory=list)
    kubelet_extra_args: list[tuple[str, str]] = field(default_factory=list)
    ignore_preflight_errors: list[str] = field(default_factory=list)
    bootstrap_tokens: list[BootstrapToken] = field(default_factory=list)
    skip_phases: list[str] = field(default_factory=list)
    control_plane_timeout_s: float = DEFAULT_CONTROL_PLANE_TIMEOUT_S
    kubelet_timeout_s: float = DEFAULT_KUBELET_TIMEOUT_S
    api_call_timeout_s: float = DEFAULT_API_CALL_TIMEOUT_S
    certificate_key: str = ""  # hex AES key for upload-certs


@dataclass
class ClusterConfig:
    api_version: str
    kubernetes_version: str
    control_plane_endpoint: str = ""
    certificates_dir: str = DEFAULT_CERT_DIR
    image_repository: str = DEFAULT_IMAGE_REPOSITORY
    cluster_name: str = DEFAULT_CLUSTER_NAME
    service_subnet: str = DEFAULT_SERVICE_SUBNET
    pod_subnet: str = ""
    dns_domain: str = DEFAULT_DNS_DOMAIN
    apiserver_cert_sans: list[str] = field(default_factory=list)
    apiserver_extra_args: list[tuple[str, str]] = field(default_factory=list)
    controller_manager_extra_args: list[tuple[str, str]] = field(default_factory=list)
    scheduler_extra_args: list[tuple[str, str]] = field(default_factory=list)
    etcd_data_dir: str = DEFAULT_ETCD_DATA_DIR
    etcd_extra_args: list[tuple[str, str]] = field(default_factory=list)
    etcd_server_cert_sans: list[str] = field(default_factory=list)
    etcd_peer_cert_sans: list[str] = field(default_factory=list)
    encryption_algorithm: str = DEFAULT_ENCRYPTION
    cert_validity_s: float = DEFAULT_CERT_VALIDITY_S
    ca_validity_s: float = DEFAULT_CA_VALIDITY_S
    dns_disabled: bool = False
    proxy_disabled: bool = False
    raw: dict[str, Any] = field(default_factory=dict)  # the document as given, for upload-config


@dataclass
class Config:
    init: InitConfig
    cluster: ClusterConfig
    kubelet: dict[str, Any]  # the full KubeletConfiguration document with defaults
    kube_proxy: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    # ---- derived values, computed the way kubeadm does ----
    @property
    def service_net(self) -> IPNetwork:
        return parse_cidrs(self.cluster.service_subnet)[0]

    @property
    def api_service_ip(self) -> IPAddress:
        return nth_ip(self.service_net, 1)

    @property
    def dns_service_ip(self) -> IPAddress:
        return nth_ip(self.service_net, 10)

    @property
    def advertise_ip(self) -> IPAddress:
        return ipaddress.ip_address(self.init.advertise_address)

    @property
    def local_endpoint(self) -> str:
        """`host:port` of this node's API server (kubelet, controller-manager and scheduler use it)."""
        return join_host_port(self.init.advertise_address, self.init.bind_port)

    @property
    def control_plane_endpoint(self) -> str:
        """`host:port` admins reach the API at: controlPlaneEndpoint (port defaults to bindPort) or local."""
        if not self.cluster.control_plane_endpoint:
            return self.local_endpoint
        host, port = split_host_port(self.cluster.control_plane_endpoint)
        return join_host_port(host, port if port is not None else self.init.bind_port)

    @property
    def control_plane_host(self) -> str | None:
        if not self.cluster.control_plane_endpoint:
            return None
        return split_host_port(self.cluster.control_plane_endpoint)[0]

    @property
    def images(self) -> dict[str, str]:
        return kubeadm_images(self.cluster.image_repository, self.cluster.kubernetes_version)

    @property
    def cert_dir(self) -> str:
        return self.cluster.certificates_dir

    @property
    def healthz_port(self) -> int:
        return int(self.kubelet["healthzPort"])

    @property
    def healthz_host(self) -> str:
        host = str(self.kubelet.get("healthzBindAddress") or "127.0.0.1")
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    @property
    def static_pod_path(self) -> str:
        return str(self.kubelet["staticPodPath"])
