"""The ClusterConfiguration kubeadm stores in the `kubeadm-config` ConfigMap (v1beta4, defaults filled),
and reading it back (upgrade). Pure data: no I/O.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from simnode.kubeadm.config import KUBEADM_GROUP, ClusterConfig
from simnode.kubeadm.configfields import build_cluster
from simnode.kubeadm.configload import parse_documents
from simnode.kubeadm.errors import ConfigError
from simnode.kubeadm.values import format_duration

V1BETA4 = f"{KUBEADM_GROUP}/v1beta4"


def _arg_list(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs]


def cluster_configuration_doc(c: ClusterConfig) -> dict[str, Any]:
    """The config as kubeadm uploads it: the user's document converted to v1beta4 with defaults applied."""
    doc = copy.deepcopy(c.raw)
    doc["apiVersion"], doc["kind"] = V1BETA4, "ClusterConfiguration"
    api_server = doc.setdefault("apiServer", {}) or {}
    api_server.pop("timeoutForControlPlane", None)  # v1beta3 only; v1beta4 keeps it in InitConfiguration
    api_server["extraArgs"] = _arg_list(c.apiserver_extra_args)
    if c.apiserver_cert_sans:
        api_server["certSANs"] = list(c.apiserver_cert_sans)
    doc["apiServer"] = api_server
    doc["controllerManager"] = {**(doc.get("controllerManager") or {}),
                                "extraArgs": _arg_list(c.controller_manager_extra_args)}
    doc["scheduler"] = {**(doc.get("scheduler") or {}), "extraArgs": _arg_list(c.scheduler_extra_args)}
    etcd_local = dict((doc.get("etcd") or {}).get("local") or {})
    etcd_local["dataDir"] = c.etcd_data_dir
    etcd_local["extraArgs"] = _arg_list(c.etcd_extra_args)
    doc["etcd"] = {"local": etcd_local}
    doc["networking"] = {"dnsDomain": c.dns_domain, "serviceSubnet": c.service_subnet}
    if c.pod_subnet:
        doc["networking"]["podSubnet"] = c.pod_subnet
    doc.update(
        {
            "kubernetesVersion": c.kubernetes_version,
            "certificatesDir": c.certificates_dir,
            "imageRepository": c.image_repository,
            "clusterName": c.cluster_name,
            "encryptionAlgorithm": c.encryption_algorithm,
            "certificateValidityPeriod": format_duration(c.cert_validity_s),
            "caCertificateValidityPeriod": format_duration(c.ca_validity_s),
            "dns": {**(doc.get("dns") or {}), "disabled": c.dns_disabled},
            "proxy": {"disabled": c.proxy_disabled},
        }
    )
    if c.control_plane_endpoint:
        doc["controlPlaneEndpoint"] = c.control_plane_endpoint
    return doc


def cluster_configuration_yaml(c: ClusterConfig) -> str:
    return yaml.safe_dump(cluster_configuration_doc(c), sort_keys=True)


def read_cluster_configuration(text: str, allowed_versions: tuple[str, ...]) -> ClusterConfig:
    """Parse the ConfigMap's ClusterConfiguration; ConfigError when it is unusable."""
    docs = parse_documents(text, "kubeadm-config ConfigMap")
    if len(docs) != 1 or docs[0].get("kind") != "ClusterConfiguration":
        raise ConfigError(["kubeadm-config ConfigMap: expected one ClusterConfiguration document"])
    doc = docs[0]
    errors: list[str] = []
    version = str(doc.get("apiVersion") or V1BETA4)
    cluster = build_cluster(doc, version, errors, allowed_versions=allowed_versions,
                            default_version=allowed_versions[0])
    if errors:
        raise ConfigError([f"kubeadm-config ConfigMap: {e}" for e in errors])
    return cluster
