"""Configuration drift: the settings a cluster was installed with, compared with the configuration read at start.

The kubeadm step records them (`settings` in `<state_dir>/kubeadm.stamp.json`) each time it makes or updates the
cluster. Keys in `LIVE` are applied to a running cluster as configured; any other changed key only takes effect
with a reset, so the engine holds it at its installed value (the cluster runs on as it was installed) and reports it
as `config_drift` until a reset. Pure apart from reading the stamp; nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from lifecycle import yamlsafe
from lifecycle.config import Config
from lifecycle.paths import HostPaths
from lifecycle.step import ClusterParams

KUBEADM_STAMP = "kubeadm.stamp.json"  # written by states.kubeadm

# key -> how a running cluster gets it. Every other key of SETTINGS needs a reset: it is baked into what kubeadm
# made from it (static pod manifests, etcd's member data, the kubeadm-config and kube-proxy ConfigMaps, the
# Service and pod addresses already handed out), which kubeadm itself only changes by a new init.
LIVE: dict[str, str] = {
    "kubernetes.extra_sans": "the API server certificate re-issued with them (renewal routine)",
    "kubernetes.kubelet_healthz_port": "the kubelet's config.yaml rewritten and the kubelet restarted",
}
# Ports configured as 0 are chosen once at install time: any installed port then matches the configuration.
_ANY_WHEN_ZERO = ("kubernetes.api_port", "kubernetes.kubelet_healthz_port", "kubernetes.etcd_metrics_port")
_CLUSTER_FIELDS = {"kubernetes.api_port": "api_port", "kubernetes.kubelet_healthz_port": "kubelet_healthz_port",
                   "kubernetes.etcd_metrics_port": "etcd_metrics_port"}


@dataclass(frozen=True)
class Change:
    """One key whose configured value differs from the installed cluster's."""

    key: str  # as written in the TOML file: "kubernetes.node_ip"
    installed: Any
    configured: Any

    @property
    def live(self) -> bool:
        return self.key in LIVE

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "installed": self.installed, "configured": self.configured}


def settings_of(config: Config, cluster: ClusterParams) -> dict[str, Any]:
    """The settings a cluster made from `config` and `cluster` runs on, as JSON values (what the stamp records).
    The node IP is the resolved one (the address kubeadm was given)."""
    k8s = config.kubernetes
    return {
        "kubernetes.node_ip": k8s.node_ip,
        "kubernetes.endpoint_name": k8s.endpoint_name,
        "kubernetes.api_port": cluster.api_port,
        "kubernetes.kubelet_healthz_port": cluster.kubelet_healthz_port,
        "kubernetes.etcd_metrics_port": cluster.etcd_metrics_port,
        "kubernetes.service_subnet": k8s.service_subnet,
        "kubernetes.pod_subnet": k8s.pod_subnet,
        "kubernetes.dns_domain": k8s.dns_domain,
        "kubernetes.cluster_name": k8s.cluster_name,
        "kubernetes.image_repository": k8s.image_repository,
        "kubernetes.cri_socket": k8s.cri_socket,
        "kubernetes.extra_sans": list(k8s.extra_sans),
        "pki.key_algorithm": config.pki.key_algorithm,
    }


def compare(installed: Mapping[str, Any], config: Config) -> list[Change]:
    """Every recorded key whose configured value differs, in SETTINGS order. Keys the record lacks (a key added
    after the install) are not compared."""
    k8s = config.kubernetes
    # The cluster parameters only feed the port keys: here, the configured ports (0: any).
    configured = settings_of(config, ClusterParams(
        kubernetes_version=k8s.version, api_port=k8s.api_port, kubelet_healthz_port=k8s.kubelet_healthz_port,
        etcd_metrics_port=k8s.etcd_metrics_port))
    changes: list[Change] = []
    for key, wanted in configured.items():
        if key not in installed:
            continue
        if key in _ANY_WHEN_ZERO and wanted == 0:
            continue
        if installed[key] != wanted:
            changes.append(Change(key, installed[key], wanted))
    return changes


def apply(config: Config, cluster: ClusterParams, changes: list[Change]) -> tuple[Config, ClusterParams]:
    """The configuration and cluster parameters the node runs on: live changes as configured, every other change
    held at its installed value."""
    k8s, pki = config.kubernetes, config.pki
    for change in changes:
        section, _, name = change.key.partition(".")
        value = change.configured if change.live else change.installed
        if change.key in _CLUSTER_FIELDS:
            cluster = replace(cluster, **{_CLUSTER_FIELDS[change.key]: value})
        elif change.live:
            continue  # already in the configuration as configured
        elif section == "kubernetes":
            held: Any = tuple(value) if isinstance(value, list) else value  # lists are tuples in the config
            k8s = replace(k8s, **{name: held})
        else:
            pki = replace(pki, **{name: value})
    return replace(config, kubernetes=k8s, pki=pki), cluster


def pending(changes: list[Change]) -> list[Change]:
    """The changes that wait for a reset."""
    return [change for change in changes if not change.live]


def reset_required_message(changes: list[Change]) -> str:
    """For people: which keys changed, from what to what, and the two ways out."""
    listed = "; ".join(f"{c.key}: installed {json.dumps(c.installed)}, configured {json.dumps(c.configured)}"
                       for c in changes)
    return (f"the configuration changes settings that only a reset applies ({listed}); the cluster keeps running "
            "on its installed settings: put these keys back, or reset (which deletes the cluster's objects) and "
            "install again")


def read_installed(paths: HostPaths) -> dict[str, Any] | None:
    """The settings recorded by the kubeadm step; None before it made a cluster (or when the record has none)."""
    try:
        raw = json.loads((paths.state_dir / KUBEADM_STAMP).read_text())
    except (FileNotFoundError, ValueError):
        return None
    settings = raw.get("settings") if isinstance(raw, dict) else None
    return settings if isinstance(settings, dict) else None


# ---- the kubeadm config: what changed between the one a cluster was made from and the one rendered now --------

# Fields of the rendered kubeadm config that a running cluster takes without kubeadm: certificate settings (the
# certs state issues certificates, through the renewal routine on a running cluster) and the kubelet's own
# configuration (config.yaml rewritten, kubelet restarted). Any other changed field needs `kubeadm init` again.
LIVE_KUBEADM_FIELDS = (
    "ClusterConfiguration.apiServer.certSANs",
    "ClusterConfiguration.certificateValidityPeriod",
    "ClusterConfiguration.caCertificateValidityPeriod",
    "KubeletConfiguration.",
)


def kubeadm_config_changes(applied: str, current: str) -> list[str]:
    """`Kind.field.path` of every field that differs between two kubeadm configs (multi-document YAML).
    Lists are compared whole. ValueError when either is not such a config."""
    old, new = _documents(applied), _documents(current)
    changed: list[str] = []
    for kind in sorted(set(old) | set(new)):
        changed += _diff(old.get(kind), new.get(kind), kind)
    return changed


def needs_kubeadm(fields: list[str]) -> list[str]:
    """The changed fields a running cluster cannot take without a new `kubeadm init`."""
    return [f for f in fields if not any(f == live or (live.endswith(".") and f.startswith(live))
                                         for live in LIVE_KUBEADM_FIELDS)]


def kubelet_document(kubeadm_config: str) -> dict[str, Any]:
    """The KubeletConfiguration document of a kubeadm config ({} when there is none)."""
    return dict(_documents(kubeadm_config).get("KubeletConfiguration", {}))


def merge_kubelet_config(current: dict[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """kubeadm's config.yaml (its KubeletConfiguration with every default filled in) with the fields of ours
    set, nested mappings merged: what kubelet-start would write from the new config, defaults kept."""
    out = dict(current)
    for key, value in wanted.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_kubelet_config(out[key], value)
        else:
            out[key] = value
    return out


def _documents(text: str) -> dict[str, dict[str, Any]]:
    try:
        docs = [d for d in yamlsafe.load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise ValueError("a document without a kind")  # noqa: TRY004 - bad file content, not a bad call
        out[doc["kind"]] = doc
    return out


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            changed += _diff(old.get(key), new.get(key), f"{path}.{key}")
        return changed
    return [] if old == new else [path]
