"""Which CRI endpoint a kubeadm command uses when it is given none: the detection kubeadm runs on the host.

kubeadm cmd/kubeadm/app/util/runtime/runtime.go (DetectCRISocket, detectCRISocketImpl, defaultKnownCRISockets)
and constants_unix.go: the known endpoints are looked at in this order; none found gives the default
(containerd), one gives that one, several is an error that names them all. Paths are looked up under the node root.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from simnode.kubeadm.errors import KubeadmError
from simnode.paths import NodeRoot

# kubeadm cmd/kubeadm/app/constants/constants_unix.go: CRISocketContainerd, CRISocketCRIO, CRISocketDocker.
KNOWN_CRI_SOCKETS = (
    "unix:///var/run/containerd/containerd.sock",
    "unix:///var/run/crio/crio.sock",
    "unix:///var/run/cri-dockerd.sock",
)
DEFAULT_CRI_SOCKET = KNOWN_CRI_SOCKETS[0]  # constants.DefaultCRISocket
# runtime.go: ErrMultipleCRIEndpoints wrapped with the endpoints found.
MULTIPLE_ENDPOINTS = ("found multiple CRI endpoints on the host. Please define which one do you wish to use by "
                      "setting the 'criSocket' field in the kubeadm configuration file: {found}")


def is_socket(root: NodeRoot, endpoint: str) -> bool:
    """The endpoint's path under the node root is a unix socket.

    Upstream's isExistingSocket (runtime_unix.go) dials the socket; the sockets `simnode.host` lays out have
    nobody listening, so the simulation checks the file type instead. That is stricter than kubeadm only for a
    stale socket file whose runtime is stopped (kubeadm would skip it; we count it).
    """
    try:
        return stat.S_ISSOCK(root.path(endpoint.removeprefix("unix://")).stat().st_mode)
    except OSError:
        return False


def detect_cri_socket(root: NodeRoot) -> str:
    """kubeadm's DetectCRISocket on the node: the one known endpoint present, the default if none, else fail."""
    found = [endpoint for endpoint in KNOWN_CRI_SOCKETS if is_socket(root, endpoint)]
    if len(found) > 1:
        raise KubeadmError(MULTIPLE_ENDPOINTS.format(found=", ".join(found)))
    return found[0] if found else DEFAULT_CRI_SOCKET


def reset_config_cri_socket(path: Path | None) -> str | None:
    """`criSocket` of a ResetConfiguration (kubeadm.k8s.io/v1beta4) in the --config file, if it has one.

    kubeadm cmd/kubeadm/app/util/config/resetconfiguration.go: reset reads only a ResetConfiguration (v1beta4 is
    the first API version that has the kind); other documents in the file are ignored.
    """
    if path is None:
        return None
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except OSError as exc:
        raise KubeadmError(f'unable to read config from "{path}" : {exc.strerror or exc}') from exc
    except yaml.YAMLError as exc:
        raise KubeadmError(f'unable to decode config from "{path}": {exc}') from exc
    for doc in docs:
        if _is_reset_configuration(doc):
            value = doc.get("criSocket")
            if value is not None and not isinstance(value, str):
                raise KubeadmError(f'ResetConfiguration.criSocket: expected a string, got {value!r}')
            return value or None
    return None


def _is_reset_configuration(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "ResetConfiguration" and \
        doc.get("apiVersion") == "kubeadm.k8s.io/v1beta4"


def reset_cri_socket(root: NodeRoot, *, flag: str | None, config: Path | None) -> str:
    """The endpoint `kubeadm reset` uses (cmd/kubeadm/app/cmd/reset.go, newResetData and resetDetectCRISocket):
    --cri-socket, else the ResetConfiguration's criSocket, else (cluster answer aside, see docs/simnode.md) the
    socket detected on the host, which fails where several runtimes answer."""
    if flag:
        return flag
    return reset_config_cri_socket(config) or detect_cri_socket(root)
