"""Reads a kubeadm config file (multi-document YAML) into a validated `Config`; writes nothing.

Every problem found is collected and reported together as a `ConfigError` with kubeadm-like messages.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from simnode.kubeadm import schema
from simnode.kubeadm.config import (
    DEFAULT_HEALTHZ_PORT,
    DEFAULT_STATIC_POD_PATH,
    KUBEADM_GROUP,
    KUBEADM_VERSIONS,
    KUBELET_API_VERSION,
    KUBEPROXY_API_VERSION,
    Config,
)
from simnode.kubeadm.configfields import build_cluster, build_init, duration, validate_kubelet
from simnode.kubeadm.errors import ConfigError

SCHEME = "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme/scheme.go:31"
_KUBEADM_KINDS = ("InitConfiguration", "ClusterConfiguration")
_IGNORED_KUBEADM_KINDS = ("JoinConfiguration", "ResetConfiguration", "UpgradeConfiguration")
_OLD_VERSIONS = ("v1alpha1", "v1alpha2", "v1alpha3", "v1beta1", "v1beta2")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without timestamp resolution: Go's decoder keeps `expires: 2024-01-01T00:00:00Z` a string."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_documents(text: str, source: str) -> list[dict[str, Any]]:
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: error converting YAML to JSON: yaml: {where}{problem}"]) from exc
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConfigError([f"{source}: document {i + 1}: expected a YAML mapping, got {type(doc).__name__}"])
        out.append(doc)
    return out


def _check_gvk(doc: dict[str, Any]) -> tuple[str, str] | str:
    """(apiVersion, kind), or an error message."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(kind, str) or not kind:
        return f"Object 'Kind' is missing in '{yaml.safe_dump(doc, default_flow_style=True).strip()}'"
    if not isinstance(api_version, str) or not api_version:
        return f"Object 'apiVersion' is missing in '{yaml.safe_dump(doc, default_flow_style=True).strip()}'"
    group, _, version = api_version.rpartition("/")
    if group == KUBEADM_GROUP:
        if version in _OLD_VERSIONS:
            return (
                f'your configuration file uses an old API spec: "{api_version}". Please use an older kubeadm '
                "and 'kubeadm config migrate' to write the new, similar spec using a newer API version."
            )
        if version in KUBEADM_VERSIONS and kind in (*_KUBEADM_KINDS, *_IGNORED_KUBEADM_KINDS):
            return api_version, kind
    elif (api_version, kind) in (
        (KUBELET_API_VERSION, "KubeletConfiguration"),
        (KUBEPROXY_API_VERSION, "KubeProxyConfiguration"),
    ):
        return api_version, kind
    return f'no kind "{kind}" is registered for version "{api_version}" in scheme "{SCHEME}"'


def _gvk_text(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    return f'schema.GroupVersionKind{{Group:"{group}", Version:"{version}", Kind:"{kind}"}}'


def _decode(doc: dict[str, Any], api_version: str, kind: str, errors: list[str], warnings: list[str]) -> None:
    v1beta4 = api_version.endswith("/v1beta4")
    spec = {
        "InitConfiguration": schema.init_configuration(v1beta4),
        "ClusterConfiguration": schema.cluster_configuration(v1beta4),
        "KubeletConfiguration": schema.KUBELET_CONFIGURATION,
    }.get(kind)
    if spec is None:
        return
    decoded = schema.decode(doc, spec)
    gvk = _gvk_text(api_version, kind)
    errors.extend(f"error unmarshaling JSON: while decoding JSON: {e}" for e in decoded.errors)
    warnings.extend(
        f"[config] WARNING: error unmarshaling configuration {gvk}: strict decoding error: unknown field "
        f'"{name}"'
        for name in decoded.unknown
    )


def load_config(
    path: Path | None,
    *,
    allowed_versions: tuple[str, ...],
    default_version: str,
    node_root_hostname: str | None = None,
) -> Config:
    """Read, type-check, default and validate the config; raise ConfigError listing every problem."""
    docs: list[dict[str, Any]] = []
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError([f'unable to read config from "{path}" : {exc.strerror or exc}']) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f'unable to read config from "{path}" : not UTF-8 text ({exc.reason})']) from exc
        docs = parse_documents(text, source)
    errors: list[str] = []
    warnings: list[str] = []
    by_kind: dict[str, tuple[str, dict[str, Any]]] = {}
    for doc in docs:
        gvk = _check_gvk(doc)
        if isinstance(gvk, str):
            errors.append(gvk)
            continue
        api_version, kind = gvk
        if kind in _IGNORED_KUBEADM_KINDS:
            warnings.append(f"[config] WARNING: Ignored configuration document with GroupVersionKind {_gvk_text(*gvk)}")
            continue
        if kind in by_kind:
            errors.append(f"{source}: duplicate {kind} document")
            continue
        by_kind[kind] = (api_version, doc)
        _decode(doc, api_version, kind, errors, warnings)
    if errors:
        raise ConfigError(errors)

    hostname = (node_root_hostname or socket.gethostname()).lower()
    init_version, init_doc = by_kind.get("InitConfiguration", (f"{KUBEADM_GROUP}/v1beta4", {}))
    cluster_version, cluster_doc = by_kind.get("ClusterConfiguration", (init_version, {}))
    init = build_init(init_doc, init_version, hostname, errors)
    cluster = build_cluster(
        cluster_doc, cluster_version, errors, allowed_versions=allowed_versions, default_version=default_version
    )
    if cluster_version.endswith("/v1beta3"):
        init.control_plane_timeout_s = duration(cluster_doc, "apiServer.timeoutForControlPlane", 240.0, errors)
    kubelet = dict(by_kind.get("KubeletConfiguration", (KUBELET_API_VERSION, {}))[1])
    kube_proxy = by_kind.get("KubeProxyConfiguration", (KUBEPROXY_API_VERSION, None))[1]
    if not errors:
        _kubelet_defaults(kubelet, cluster.certificates_dir)
    cfg = Config(init=init, cluster=cluster, kubelet=kubelet, kube_proxy=kube_proxy, warnings=warnings)
    if not errors:
        validate_kubelet(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def _kubelet_defaults(kubelet: dict[str, Any], cert_dir: str) -> None:
    """The defaults kubeadm gives the kubelet config (clusterDNS/clusterDomain are set by validate_kubelet)."""
    kubelet.setdefault("apiVersion", KUBELET_API_VERSION)
    kubelet.setdefault("kind", "KubeletConfiguration")
    kubelet.setdefault("healthzPort", DEFAULT_HEALTHZ_PORT)
    kubelet.setdefault("healthzBindAddress", "127.0.0.1")
    kubelet.setdefault("staticPodPath", DEFAULT_STATIC_POD_PATH)
    kubelet.setdefault("cgroupDriver", "systemd")
    kubelet.setdefault("rotateCertificates", True)
    kubelet.setdefault(
        "authentication",
        {
            "anonymous": {"enabled": False},
            "webhook": {"cacheTTL": "0s", "enabled": True},
            "x509": {"clientCAFile": f"{cert_dir.rstrip('/')}/ca.crt"},
        },
    )
    kubelet.setdefault(
        "authorization",
        {"mode": "Webhook", "webhook": {"cacheAuthorizedTTL": "0s", "cacheUnauthorizedTTL": "0s"}},
    )
