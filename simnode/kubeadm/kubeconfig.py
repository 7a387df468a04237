"""kubeadm's kubeconfig files in /etc/kubernetes: build them from the CA, or validate the ones on disk.

`plan_kubeconfigs` checks existing files and renders missing ones in memory; `write_kubeconfigs` writes
them (mode 0600). Existing files are never overwritten, like kubeadm.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from cryptography import x509

from simnode.kubeadm.config import Config
from simnode.kubeadm.files import write_atomic
from simnode.kubeadm.x509util import (
    CertRequest,
    PrivateKey,
    cert_pem,
    check_key_matches,
    check_signed_by,
    check_validity,
    issue,
    key_pem,
    new_key,
    parse_key,
)
from simnode.paths import NodeRoot

KUBECONFIG_DIR = "/etc/kubernetes"


@dataclass(frozen=True)
class KubeconfigSpec:
    phase: str  # `init phase kubeconfig <phase>`
    file: str  # "admin.conf"
    user: str  # CN and kubeconfig user name
    orgs: tuple[str, ...]
    server: str  # https://host:port

    @property
    def path(self) -> str:
        return f"{KUBECONFIG_DIR}/{self.file}"


def kubeconfig_specs(cfg: Config) -> list[KubeconfigSpec]:
    """As kubeadm >= 1.30 (ControlPlaneKubeletLocalMode off): admin, super-admin and kubelet reach the API via
    controlPlaneEndpoint; controller-manager and scheduler via this node's advertise address."""
    public = f"https://{cfg.control_plane_endpoint}"
    local = f"https://{cfg.local_endpoint}"
    node = f"system:node:{cfg.init.node_name}"
    return [
        KubeconfigSpec("admin", "admin.conf", "kubernetes-admin", ("kubeadm:cluster-admins",), public),
        KubeconfigSpec("super-admin", "super-admin.conf", "kubernetes-super-admin", ("system:masters",), public),
        KubeconfigSpec("kubelet", "kubelet.conf", node, ("system:nodes",), public),
        KubeconfigSpec("controller-manager", "controller-manager.conf", "system:kube-controller-manager", (), local),
        KubeconfigSpec("scheduler", "scheduler.conf", "system:kube-scheduler", (), local),
    ]


def render(cluster_name: str, server: str, ca: x509.Certificate, user: str, user_entry: dict[str, str]) -> str:
    """A kubeconfig as kubeadm writes it (one cluster, one context, one user)."""
    context = f"{user}@{cluster_name}"
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "clusters": [{
            "cluster": {"certificate-authority-data": base64.b64encode(cert_pem(ca)).decode(), "server": server},
            "name": cluster_name,
        }],
        "contexts": [{"context": {"cluster": cluster_name, "user": user}, "name": context}],
        "current-context": context,
        "kind": "Config",
        "preferences": {},
        "users": [{"name": user, "user": user_entry}],
    }
    return yaml.safe_dump(doc, sort_keys=True)


def embedded_user(cert: x509.Certificate, key: PrivateKey) -> dict[str, str]:
    return {
        "client-certificate-data": base64.b64encode(cert_pem(cert)).decode(),
        "client-key-data": base64.b64encode(key_pem(key)).decode(),
    }


@dataclass
class Kubeconfig:
    """The parts of a kubeconfig kubeadm looks at (current context only)."""

    server: str
    ca_pem: bytes | None
    cert_pem: bytes | None
    key_pem: bytes | None
    doc: dict[str, Any] = field(default_factory=dict)


def _named(items: Any, name: Any, what: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(what), dict):
            return dict(item[what])
    raise ValueError(f"no {what} named {name!r}")


def _material(entry: dict[str, Any], key: str, root: NodeRoot) -> bytes | None:
    data = entry.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{key}-data is not valid base64") from exc
    ref = entry.get(key)
    if not ref:
        return None
    try:
        return root.path(str(ref)).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {key} {ref}: {exc.strerror}") from exc


def read_kubeconfig(path: str, root: NodeRoot) -> Kubeconfig:
    """Parse a kubeconfig (real path, re-rooted); ValueError names what is wrong."""
    try:
        doc = yaml.safe_load(root.path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("not a kubeconfig")  # noqa: TRY004  (callers treat every unusable file alike)
    context = _named(doc.get("contexts"), doc.get("current-context"), "context")
    cluster = _named(doc.get("clusters"), context.get("cluster"), "cluster")
    user = _named(doc.get("users"), context.get("user"), "user")
    return Kubeconfig(
        server=str(cluster.get("server") or ""),
        ca_pem=_material(cluster, "certificate-authority", root),
        cert_pem=_material(user, "client-certificate", root),
        key_pem=_material(user, "client-key", root),
        doc=doc,
    )


def validate_existing(spec: KubeconfigSpec, root: NodeRoot, ca: x509.Certificate) -> list[str]:
    """Problems with an existing kubeconfig, in kubeadm's words where kubeadm has them."""
    shown = spec.path
    try:
        kc = read_kubeconfig(shown, root)
    except (OSError, ValueError) as exc:
        return [f'{shown}: not a usable kubeconfig: {exc}']
    problems: list[str] = []
    try:
        kc_ca = x509.load_pem_x509_certificate(kc.ca_pem or b"")
    except ValueError:
        kc_ca = None
    if kc_ca is None or kc_ca != ca:
        problems.append(f'a kubeconfig file "{shown}" exists already but has got the wrong CA cert')
    if kc.server != spec.server:
        problems.append(f'a kubeconfig file "{shown}" exists already but has got the wrong API Server URL '
                        f'(it has "{kc.server}", expected "{spec.server}")')
    if kc.cert_pem is None or kc.key_pem is None:
        return [*problems, f"{shown}: the user has no client certificate and key"]
    try:
        cert = x509.load_pem_x509_certificate(kc.cert_pem)
    except ValueError:
        return [*problems, f"{shown}: client certificate is not a readable PEM certificate"]
    key = parse_key(kc.key_pem, f"{shown}: client key")
    checks = [
        check_signed_by(cert, ca, f"{shown}: client certificate", "the cluster CA"),
        check_validity(cert, f"{shown}: client certificate"),
        key if isinstance(key, str) else check_key_matches(cert, key, f"{shown}: client key"),
    ]
    return problems + [c for c in checks if c]


@dataclass
class KubeconfigPlan:
    contents: dict[str, str] = field(default_factory=dict)  # file -> new text; absent: reuse existing
    messages: dict[str, str] = field(default_factory=dict)


def plan_kubeconfigs(
    cfg: Config,
    root: NodeRoot,
    ca: tuple[x509.Certificate, PrivateKey | None],
    selected: set[str],
) -> tuple[KubeconfigPlan, list[str]]:
    plan, problems = KubeconfigPlan(), []
    ca_cert, ca_key = ca
    for spec in kubeconfig_specs(cfg):
        if spec.phase not in selected:
            continue
        if root.path(spec.path).exists():
            found = validate_existing(spec, root, ca_cert)
            problems.extend(found)
            plan.messages[spec.file] = f'[kubeconfig] Using existing kubeconfig file: "{spec.path}"'
            continue
        if ca_key is None:
            problems.append(f'[kubeconfig] external CA mode: the CA key is absent, so "{spec.path}" must be '
                            "provided: file does not exist")
            continue
        key = new_key(cfg.cluster.encryption_algorithm)
        req = CertRequest(spec.user, orgs=spec.orgs, client=True, validity_s=cfg.cluster.cert_validity_s)
        cert = issue(req, key, ca=(ca_cert, ca_key))
        plan.contents[spec.file] = render(cfg.cluster.cluster_name, spec.server, ca_cert, spec.user,
                                          embedded_user(cert, key))
        plan.messages[spec.file] = f'[kubeconfig] Writing "{spec.file}" kubeconfig file'
    return plan, problems


def write_kubeconfigs(plan: KubeconfigPlan, root: NodeRoot, files: list[str], out: Callable[[str], None]) -> None:
    for file in files:
        if file in plan.messages:
            out(plan.messages[file])
        if file in plan.contents:
            write_atomic(root.path(f"{KUBECONFIG_DIR}/{file}"), plan.contents[file], mode=0o600)
