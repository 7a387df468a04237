"""The kubeadm PKI: which certificates exist, validating the ones on disk, creating the missing ones.

`plan_pki` reads and checks everything and generates missing keys/certs in memory only; `write_pki`
then writes them under `<root><certificatesDir>` (keys 0600) and prints kubeadm's `[certs]` lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from simnode.kubeadm.config import Config
from simnode.kubeadm.files import write_atomic
from simnode.kubeadm.values import is_ip as _is_ip
from simnode.kubeadm.x509util import (
    CertRequest,
    PrivateKey,
    cert_pem,
    check_is_ca,
    check_key_matches,
    check_public_matches,
    check_sans,
    check_signed_by,
    check_validity,
    issue,
    key_pem,
    load_cert,
    load_key,
    new_key,
    public_pem,
)
from simnode.paths import NodeRoot

CAS = ("ca", "front-proxy-ca", "etcd/ca")


@dataclass(frozen=True)
class CertSpec:
    name: str  # base name in the cert dir: "apiserver", "etcd/server"
    phase: str  # `init phase certs <phase>`: "apiserver", "etcd-server"
    ca: str | None  # signing CA's name, None for a CA
    request: CertRequest


def cert_specs(cfg: Config) -> list[CertSpec]:
    """kubeadm's certificate list, in the order `kubeadm init` creates them."""
    c, i = cfg.cluster, cfg.init
    leaf_s, ca_s = c.cert_validity_s, c.ca_validity_s
    svc = f"kubernetes.default.svc.{c.dns_domain}"
    api_dns = [i.node_name, "kubernetes", "kubernetes.default", "kubernetes.default.svc", svc]
    api_ips = [str(cfg.api_service_ip), i.advertise_address]
    host = cfg.control_plane_host
    if host:
        (api_ips if _is_ip(host) else api_dns).append(host)
    for san in c.apiserver_cert_sans:
        (api_ips if _is_ip(san) else api_dns).append(san)
    etcd_dns = ["localhost", i.node_name]
    etcd_ips = [i.advertise_address, "127.0.0.1", "::1"]

    def etcd_sans(extra: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        dns = etcd_dns + [s for s in extra if not _is_ip(s)]
        return _dedup(dns), _dedup(etcd_ips + [s for s in extra if _is_ip(s)])

    server_dns, server_ips = etcd_sans(c.etcd_server_cert_sans)
    peer_dns, peer_ips = etcd_sans(c.etcd_peer_cert_sans)
    return [
        CertSpec("ca", "ca", None, CertRequest("kubernetes", is_ca=True, validity_s=ca_s)),
        CertSpec("apiserver", "apiserver", "ca", CertRequest(
            "kube-apiserver", server=True, dns_names=_dedup(api_dns), ips=_dedup(api_ips), validity_s=leaf_s)),
        CertSpec("apiserver-kubelet-client", "apiserver-kubelet-client", "ca", CertRequest(
            "kube-apiserver-kubelet-client", orgs=("kubeadm:cluster-admins",), client=True, validity_s=leaf_s)),
        CertSpec("front-proxy-ca", "front-proxy-ca", None, CertRequest("front-proxy-ca", is_ca=True, validity_s=ca_s)),
        CertSpec("front-proxy-client", "front-proxy-client", "front-proxy-ca", CertRequest(
            "front-proxy-client", client=True, validity_s=leaf_s)),
        CertSpec("etcd/ca", "etcd-ca", None, CertRequest("etcd-ca", is_ca=True, validity_s=ca_s)),
        CertSpec("etcd/server", "etcd-server", "etcd/ca", CertRequest(
            i.node_name, server=True, client=True, dns_names=server_dns, ips=server_ips, validity_s=leaf_s)),
        CertSpec("etcd/peer", "etcd-peer", "etcd/ca", CertRequest(
            i.node_name, server=True, client=True, dns_names=peer_dns, ips=peer_ips, validity_s=leaf_s)),
        CertSpec("etcd/healthcheck-client", "etcd-healthcheck-client", "etcd/ca", CertRequest(
            "kube-etcd-healthcheck-client", client=True, validity_s=leaf_s)),
        CertSpec("apiserver-etcd-client", "apiserver-etcd-client", "etcd/ca", CertRequest(
            "kube-apiserver-etcd-client", client=True, validity_s=leaf_s)),
    ]


# `init phase certs <sub>` names in kubeadm's order, and the file base name each writes.
PHASE_TO_NAME: dict[str, str] = {
    "ca": "ca",
    "apiserver": "apiserver",
    "apiserver-kubelet-client": "apiserver-kubelet-client",
    "front-proxy-ca": "front-proxy-ca",
    "front-proxy-client": "front-proxy-client",
    "etcd-ca": "etcd/ca",
    "etcd-server": "etcd/server",
    "etcd-peer": "etcd/peer",
    "etcd-healthcheck-client": "etcd/healthcheck-client",
    "apiserver-etcd-client": "apiserver-etcd-client",
    "sa": "sa",
}


def _dedup(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@dataclass
class KeyPair:
    cert: x509.Certificate
    key: PrivateKey | None  # None: external CA (ca.crt without ca.key)
    generated: bool


@dataclass
class PkiPlan:
    """Everything the certs phase will leave on disk, already validated or generated in memory."""

    cert_dir: str  # real path, e.g. /etc/kubernetes/pki
    pairs: dict[str, KeyPair] = field(default_factory=dict)
    sa_key: PrivateKey | None = None
    sa_generated: bool = False
    messages: dict[str, list[str]] = field(default_factory=dict)  # cert name -> lines to print when written


class _Planner:
    def __init__(self, cfg: Config, root: NodeRoot) -> None:
        self.cfg = cfg
        self.root = root
        self.plan = PkiPlan(cert_dir=cfg.cert_dir)
        self.problems: list[str] = []

    def shown(self, name: str, ext: str) -> str:
        return f"{self.cfg.cert_dir.rstrip('/')}/{name}.{ext}"

    def on_disk(self, name: str, ext: str) -> bool:
        return self.root.path(self.shown(name, ext)).exists()

    def load_pair(self, name: str) -> tuple[x509.Certificate | None, PrivateKey | None, bool]:
        """(cert, key, ok) for files on disk; problems are recorded."""
        cert: x509.Certificate | None = None
        key: PrivateKey | None = None
        ok = True
        if self.on_disk(name, "crt"):
            loaded = load_cert(self.root.path(self.shown(name, "crt")), self.shown(name, "crt"))
            if isinstance(loaded, str):
                self.problems.append(loaded)
                ok = False
            else:
                cert = loaded
        if self.on_disk(name, "key"):
            loaded_key = load_key(self.root.path(self.shown(name, "key")), self.shown(name, "key"))
            if isinstance(loaded_key, str):
                self.problems.append(loaded_key)
                ok = False
            else:
                key = loaded_key
        return cert, key, ok

    def ca(self, spec: CertSpec, create: bool) -> None:
        cert, key, ok = self.load_pair(spec.name)
        crt_shown, key_shown = self.shown(spec.name, "crt"), self.shown(spec.name, "key")
        if not ok:
            return
        if cert is None and key is not None:
            self.problems.append(f"{crt_shown}: file does not exist, but {key_shown} does (remove the key or "
                                 "provide the certificate)")
            return
        if cert is None:
            if not create:
                self.problems.append(f"couldn't load the {spec.name} certificate authority: {crt_shown}: "
                                     "file does not exist")
                return
            new = new_key(self.cfg.cluster.encryption_algorithm)
            self.plan.pairs[spec.name] = KeyPair(issue(spec.request, new), new, generated=True)
            self.plan.messages[spec.name] = [f'[certs] Generating "{spec.name}" certificate and key']
            return
        checks = [check_is_ca(cert, crt_shown), check_validity(cert, crt_shown)]
        if key is not None:
            checks.append(check_key_matches(cert, key, key_shown))
        found = [c for c in checks if c]
        self.problems.extend(found)
        if not found:
            self.plan.pairs[spec.name] = KeyPair(cert, key, generated=False)
            keyless = "" if key is not None else " keyless"
            self.plan.messages[spec.name] = [f"[certs] Using existing {spec.name}{keyless} certificate authority"]

    def leaf(self, spec: CertSpec) -> None:
        assert spec.ca is not None
        ca = self.plan.pairs.get(spec.ca)
        crt_shown, key_shown = self.shown(spec.name, "crt"), self.shown(spec.name, "key")
        cert, key, ok = self.load_pair(spec.name)
        if not ok or ca is None:
            return  # the CA's own problem is already recorded
        if cert is None:
            if ca.key is None:
                self.problems.append(
                    f"[certs] external CA mode: {self.shown(spec.ca, 'key')} is absent, so every certificate it "
                    f"signs must be provided: couldn't load {crt_shown}: file does not exist"
                )
                return
            new = new_key(self.cfg.cluster.encryption_algorithm)
            self.plan.pairs[spec.name] = KeyPair(issue(spec.request, new, ca=(ca.cert, ca.key)), new, True)
            lines = [f'[certs] Generating "{spec.name}" certificate and key']
            if spec.request.server:
                lines.append(f"[certs] {spec.name} serving cert is signed for DNS names "
                             f"[{' '.join(spec.request.dns_names)}] and IPs [{' '.join(spec.request.ips)}]")
            self.plan.messages[spec.name] = lines
            return
        if key is None:
            self.problems.append(f"{key_shown}: file does not exist, but {crt_shown} does")
            return
        checks = [
            check_signed_by(cert, ca.cert, crt_shown, self.shown(spec.ca, "crt")),
            check_validity(cert, crt_shown),
            check_key_matches(cert, key, key_shown),
        ]
        if spec.request.server:
            checks.append(check_sans(cert, spec.request.dns_names, spec.request.ips, crt_shown))
        found = [c for c in checks if c]
        self.problems.extend(found)
        if not found:
            self.plan.pairs[spec.name] = KeyPair(cert, key, generated=False)
            self.plan.messages[spec.name] = [f"[certs] Using existing {spec.name} certificate and key on disk"]

    def service_account(self) -> None:
        key_shown, pub_shown = self.shown("sa", "key"), self.shown("sa", "pub")
        has_key, has_pub = self.on_disk("sa", "key"), self.on_disk("sa", "pub")
        if not has_key and not has_pub:
            ca = self.plan.pairs.get("ca")
            if ca is not None and ca.key is None:
                self.problems.append(f"[certs] external CA mode: {key_shown} must be provided: file does not exist")
                return
            self.plan.sa_key = new_key(self.cfg.cluster.encryption_algorithm)
            self.plan.sa_generated = True
            self.plan.messages["sa"] = ['[certs] Generating "sa" key and public key']
            return
        if not has_key or not has_pub:
            missing, present = (key_shown, pub_shown) if not has_key else (pub_shown, key_shown)
            self.problems.append(f"{missing}: file does not exist, but {present} does")
            return
        key = load_key(self.root.path(key_shown), key_shown)
        if isinstance(key, str):
            self.problems.append(key)
            return
        problem = check_public_matches(self.root.path(pub_shown).read_bytes(), key, pub_shown, key_shown)
        if problem:
            self.problems.append(problem)
            return
        self.plan.sa_key = key
        self.plan.messages["sa"] = ['[certs] Using the existing "sa" key']


def plan_pki(cfg: Config, root: NodeRoot, selected: set[str]) -> tuple[PkiPlan, list[str]]:
    """Validate/generate the certs in `selected` (phase names, "sa" included); CAs they need are loaded.

    Returns the plan and every problem found; the plan is only usable when there are none.
    """
    planner = _Planner(cfg, root)
    specs = cert_specs(cfg)
    needed_cas = {s.ca for s in specs if s.phase in selected and s.ca}
    for spec in specs:
        if spec.ca is None and (spec.phase in selected or spec.name in needed_cas):
            planner.ca(spec, create=spec.phase in selected)
    for spec in specs:
        if spec.ca is not None and spec.phase in selected:
            planner.leaf(spec)
    if "sa" in selected:
        planner.service_account()
    return planner.plan, planner.problems


def write_pki(plan: PkiPlan, root: NodeRoot, names: list[str], out: Callable[[str], None]) -> None:
    """Write the planned certs `names` (cert names or "sa") in order, printing kubeadm's lines."""
    for name in names:
        for line in plan.messages.get(name, []):
            out(line)
        base = f"{plan.cert_dir.rstrip('/')}/{name}"
        if name == "sa":
            if plan.sa_generated and plan.sa_key is not None:
                write_atomic(root.path(base + ".key"), key_pem(plan.sa_key), mode=0o600)
                write_atomic(root.path(base + ".pub"), public_pem(plan.sa_key))
            continue
        pair = plan.pairs.get(name)
        if pair is None or not pair.generated:
            continue
        assert pair.key is not None
        write_atomic(root.path(base + ".key"), key_pem(pair.key), mode=0o600)
        write_atomic(root.path(base + ".crt"), cert_pem(pair.cert))
