"""The kubelet's files kubeadm writes: /var/lib/kubelet/config.yaml, kubeadm-flags.env, and (finalize)
kubelet.conf pointed at the rotatable client pem /var/lib/kubelet/pki/kubelet-client-current.pem the kubelet made.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import yaml

from simnode.kubeadm.config import Config
from simnode.kubeadm.files import write_atomic
from simnode.kubeadm.initsystem import try_start_kubelet, try_stop_kubelet
from simnode.kubeadm.kubeconfig import read_kubeconfig
from simnode.paths import NodeRoot

KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
KUBELET_FLAGS = "/var/lib/kubelet/kubeadm-flags.env"
KUBELET_CLIENT_PEM = "/var/lib/kubelet/pki/kubelet-client-current.pem"
KUBELET_CONF = "/etc/kubernetes/kubelet.conf"


def kubelet_config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.kubelet, sort_keys=True)


def kubelet_flags(cfg: Config) -> str:
    """The KUBELET_KUBEADM_ARGS line: runtime endpoint, pause image, node IP/name, kubeletExtraArgs."""
    flags: dict[str, str] = {
        "container-runtime-endpoint": cfg.init.cri_socket,
        "pod-infra-container-image": cfg.images["pause"],
        "node-ip": cfg.init.advertise_address,
    }
    if cfg.init.node_name != socket.gethostname().lower():
        flags["hostname-override"] = cfg.init.node_name
    for name, value in cfg.init.kubelet_extra_args:
        flags[name] = value
    args = " ".join(f"--{k}={v}" for k, v in sorted(flags.items()))
    return f'KUBELET_KUBEADM_ARGS="{args}"\n'


def write_kubelet_start(cfg: Config, root: NodeRoot, out: Callable[[str], None]) -> None:
    # kubernetes/kubernetes cmd/kubeadm/app/cmd/phases/init/kubelet.go runKubeletStart: stop the kubelet service,
    # write its files, then daemon-reload and restart it (a distro kubelet.service is started here).
    try_stop_kubelet(root, out)
    out(f'[kubelet-start] Writing kubelet environment file with flags to file "{KUBELET_FLAGS}"')
    write_atomic(root.path(KUBELET_FLAGS), kubelet_flags(cfg))
    out(f'[kubelet-start] Writing kubelet configuration to file "{KUBELET_CONFIG}"')
    write_atomic(root.path(KUBELET_CONFIG), kubelet_config_yaml(cfg))
    out("[kubelet-start] Starting the kubelet")
    try_start_kubelet(root, out)


def finalize_client_cert(root: NodeRoot, out: Callable[[str], None]) -> None:
    """Point kubelet.conf at the rotatable pem the kubelet's certificate store made, if it made one.

    kubernetes/kubernetes cmd/kubeadm/app/cmd/phases/init/kubeletfinalize.go runKubeletFinalizeCertRotation:
    kubeadm writes no pem; it os.Stat()s kubelet-client-current.pem (the kubelet's store wrote it from
    kubelet.conf's embedded pair at start) and, if it is there, replaces the user's embedded credentials with
    client-certificate/client-key naming it. No pem: rotation is off, kubelet.conf stays as it is.
    """
    if not root.path(KUBELET_CLIENT_PEM).exists():
        return  # "Assuming that kubelet client certificate rotation is disabled" (logged at V(1) only)
    kc = read_kubeconfig(KUBELET_CONF, root)
    if kc.cert_pem is None or kc.key_pem is None:
        raise ValueError(f"{KUBELET_CONF}: the user has no client certificate and key")
    out(f'[kubelet-finalize] Updating "{KUBELET_CONF}" to point to a rotatable kubelet client certificate and key')
    doc = kc.doc
    context = next(c for c in doc["contexts"] if c["name"] == doc["current-context"])
    for user in doc["users"]:
        if user["name"] == context["context"]["user"]:
            user["user"] = {"client-certificate": KUBELET_CLIENT_PEM, "client-key": KUBELET_CLIENT_PEM}
    write_atomic(root.path(KUBELET_CONF), yaml.safe_dump(doc, sort_keys=True), mode=0o600)
