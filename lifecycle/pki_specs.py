"""What the kubeadm PKI must hold for one configuration: every certificate's subject, usages and SANs, and the
kubeconfigs' names and servers. Pure data, no crypto and no disk.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TypeVar

from lifecycle.config import Config
from lifecycle.kubefiles import KubeconfigSpec, host_port

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CA_NAMES = ("ca", "front-proxy-ca", "etcd/ca")
CERT_NAMES = ("ca", "apiserver", "apiserver-kubelet-client", "front-proxy-ca", "front-proxy-client", "etcd/ca",
              "etcd/server", "etcd/peer", "etcd/healthcheck-client", "apiserver-etcd-client")  # as cert_specs
ADMINS_GROUP = "kubeadm:cluster-admins"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")  # fullmatch: `$` passes a newline


@dataclass(frozen=True)
class PkiParams:
    """The expectations a PKI is checked against (issue #4 builds these for host-provided bundles too)."""

    node_name: str
    node_ip: str
    endpoint_name: str
    api_port: int
    service_subnet: str = "10.96.0.0/12"
    dns_domain: str = "cluster.local"
    extra_sans: tuple[str, ...] = ()
    key_algorithm: str = "ecdsa-p256"
    cert_validity_days: float = 365  # fractions allowed (short lifetimes for tests)
    ca_validity_days: float = 3650
    cluster_name: str = "kubernetes"
    user_name: str = "kubernetes-admin"
    context_name: str = "kubernetes-admin@kubernetes"

    @classmethod
    def from_config(cls, config: Config, *, api_port: int, node_ip: str | None = None) -> PkiParams:
        """`node_ip`: the install's resolved address (lifecycle.step.node_ip_of); default: the configured one."""
        k8s = config.kubernetes
        return cls(
            node_name=config.node_name, node_ip=node_ip or k8s.node_ip, endpoint_name=k8s.endpoint_name,
            api_port=api_port,
            service_subnet=k8s.service_subnet, dns_domain=k8s.dns_domain, extra_sans=k8s.extra_sans,
            key_algorithm=config.pki.key_algorithm, cert_validity_days=config.pki.cert_validity_days,
            ca_validity_days=config.pki.ca_validity_days, cluster_name=k8s.cluster_name, user_name=k8s.user_name,
            context_name=k8s.context_name,
        )


@dataclass(frozen=True)
class CertSpec:
    name: str  # path under the PKI dir without extension: "etcd/server"
    common_name: str
    organization: tuple[str, ...] = ()
    ca: str | None = None  # the signing CA's name; None for a CA
    server: bool = False
    client: bool = False
    dns_names: tuple[str, ...] = ()
    ips: tuple[IPAddress, ...] = ()


def split_sans(items: tuple[str, ...] | list[str], *, key: str) -> tuple[list[str], list[IPAddress]]:
    """DNS names and IPs; anything else is an error naming `key` (kubeadm would only warn and drop it)."""
    dns: list[str] = []
    ips: list[IPAddress] = []
    for item in items:
        try:
            ips.append(ipaddress.ip_address(item))
            continue
        except ValueError:
            pass
        if len(item) > 253 or not _DNS_RE.fullmatch(item):
            raise ValueError(f"{key}: {item!r} is neither an IP address nor a DNS name")
        dns.append(item)
    return dns, ips


def _unique(items: list[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


def cert_specs(p: PkiParams) -> list[CertSpec]:
    """Every certificate kubeadm makes, CAs before what they sign. Raises ValueError on bad SANs."""
    node_ip = ipaddress.ip_address(p.node_ip)
    service_ip: IPAddress = ipaddress.ip_network(p.service_subnet).network_address + 1  # kubernetes.default
    endpoint_dns, endpoint_ips = split_sans([p.endpoint_name], key="kubernetes.endpoint_name")
    extra_dns, extra_ips = split_sans(p.extra_sans, key="kubernetes.extra_sans")
    split_sans([p.node_name], key="node.name")
    apiserver_dns = [p.node_name, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                     f"kubernetes.default.svc.{p.dns_domain}", *endpoint_dns, *extra_dns]
    apiserver_ips: list[IPAddress] = [service_ip, node_ip, *endpoint_ips, *extra_ips]
    etcd_dns = (p.node_name, "localhost")
    etcd_ips = _unique([node_ip, ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")])
    return [
        CertSpec("ca", "kubernetes"),
        CertSpec("apiserver", "kube-apiserver", ca="ca", server=True,
                 dns_names=_unique(apiserver_dns), ips=_unique(apiserver_ips)),
        CertSpec("apiserver-kubelet-client", "kube-apiserver-kubelet-client", (ADMINS_GROUP,), ca="ca", client=True),
        CertSpec("front-proxy-ca", "front-proxy-ca"),
        CertSpec("front-proxy-client", "front-proxy-client", ca="front-proxy-ca", client=True),
        CertSpec("etcd/ca", "etcd-ca"),
        CertSpec("etcd/server", p.node_name, ca="etcd/ca", server=True, client=True, dns_names=etcd_dns, ips=etcd_ips),
        CertSpec("etcd/peer", p.node_name, ca="etcd/ca", server=True, client=True, dns_names=etcd_dns, ips=etcd_ips),
        CertSpec("etcd/healthcheck-client", "kube-etcd-healthcheck-client", ca="etcd/ca", client=True),
        CertSpec("apiserver-etcd-client", "kube-apiserver-etcd-client", ca="etcd/ca", client=True),
    ]


def kubeconfig_specs(p: PkiParams) -> list[KubeconfigSpec]:
    """As kubeadm >= 1.30: admin, super-admin and kubelet via the endpoint; the control plane via the node IP."""
    endpoint = f"https://{host_port(p.endpoint_name, p.api_port)}"
    local = f"https://{host_port(p.node_ip, p.api_port)}"
    cluster = p.cluster_name

    def spec(file: str, server: str, user: str, org: tuple[str, ...] = ()) -> KubeconfigSpec:
        return KubeconfigSpec(file=file, server=server, cluster=cluster, user=user, context=f"{user}@{cluster}",
                              common_name=user, organization=org)

    admin = KubeconfigSpec(file="admin.conf", server=endpoint, cluster=cluster, user=p.user_name,
                           context=p.context_name, common_name="kubernetes-admin", organization=(ADMINS_GROUP,))
    return [
        admin,
        spec("super-admin.conf", endpoint, "kubernetes-super-admin", ("system:masters",)),
        spec("kubelet.conf", endpoint, f"system:node:{p.node_name}", ("system:nodes",)),
        spec("controller-manager.conf", local, "system:kube-controller-manager"),
        spec("scheduler.conf", local, "system:kube-scheduler"),
    ]
