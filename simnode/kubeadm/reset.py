"""`kubeadm reset`: stop the static pods and remove what init left on the node (manifests, kubeconfigs,
/var/lib/kubelet, the etcd data dir, the cert dir contents). Prints what it removes like kubeadm.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import yaml

from simnode.kubeadm.errors import KubeadmError, PhaseError
from simnode.kubeadm.initsystem import stop_kubelet_for_reset
from simnode.kubeadm.manifests import ETCD, MANIFESTS_DIR, manifest_path
from simnode.paths import NodeRoot

KUBECONFIGS = ("admin.conf", "super-admin.conf", "kubelet.conf", "bootstrap-kubelet.conf",
               "controller-manager.conf", "scheduler.conf")
KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_ETCD_DIR = "/var/lib/etcd"
DEFAULT_CERT_DIR = "/etc/kubernetes/pki"


def _flag_from_manifest(root: NodeRoot, component: str, flag: str) -> str | None:
    """A `--flag=value` of a static pod manifest kubeadm wrote (reset reads the etcd data dir from it)."""
    try:
        doc = yaml.safe_load(root.path(manifest_path(component)).read_text())
        command = doc["spec"]["containers"][0]["command"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    prefix = f"--{flag}="
    for arg in command:
        if isinstance(arg, str) and arg.startswith(prefix):
            return arg[len(prefix):]
    return None


def _safe_dir(real: str, what: str) -> str:
    """Refuse to empty "/" or a top-level directory of the node: a typo must not wipe the node root."""
    path = PurePosixPath(real)
    if not path.is_absolute() or len(path.parts) < 3:
        raise KubeadmError(f"{what} {real!r}: refusing to delete the contents of a top-level directory; "
                           "pass an absolute path at least two levels deep")
    return real


def clear_dir(directory: Path) -> None:
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def confirm(ask: Callable[[str], str], out: Callable[[str], None]) -> None:
    out("[reset] WARNING: Changes made to this host by 'kubeadm init' or 'kubeadm join' will be reverted.")
    try:
        answer = ask("[reset] Are you sure you want to proceed? [y/N]: ")
    except EOFError:
        answer = ""
    if answer.strip() not in ("y", "Y"):
        raise PhaseError("preflight", "aborted reset operation")


def stop_static_pods(root: NodeRoot, out: Callable[[str], None]) -> None:
    # The kubelet belongs to whoever runs the node (no init system to stop it), so reset stops the pod
    # processes the kubelet started, after their manifests are gone so it does not restart them.
    from simnode.kubelet.engine import remove_all
    from simnode.kubelet.runtime import stop_pod_processes, stop_workload_processes

    stopped = stop_pod_processes(root, grace_s=5.0) + stop_workload_processes(root, grace_s=5.0)
    out(f"[reset] Stopped {stopped} pod container process(es) started by the kubelet")
    # cleanupnode.go removes the kubelet's containers through the CRI (RemoveContainers): here, the engine's.
    removed = remove_all(root)
    if removed:
        out(f"[reset] Removed {removed} pod container(s) from the Docker Engine")


def reset(root: NodeRoot, *, cert_dir: str | None, force: bool, ask: Callable[[str], str],
          out: Callable[[str], None], cri_socket: str | None = None, config: Path | None = None) -> None:
    from simnode.kubeadm.crisocket import reset_cri_socket

    # reset.go: the CRI socket is settled when the command's data is built, before any phase (the prompt
    # included) runs, so a host with several runtimes fails here with nothing touched.
    reset_cri_socket(root, flag=cri_socket, config=config)
    if not force:
        confirm(ask, out)
    cert_dir = cert_dir or _cert_dir_from_manifest(root) or DEFAULT_CERT_DIR
    etcd_dir = _flag_from_manifest(root, ETCD, "data-dir") or DEFAULT_ETCD_DIR
    _safe_dir(cert_dir, "--cert-dir")
    _safe_dir(etcd_dir, "etcd data directory")
    out("[preflight] Running pre-flight checks")
    stop_kubelet_for_reset(root, out)  # cleanupnode.go: before anything is removed
    out(f"[reset] Deleting contents of directory: [{MANIFESTS_DIR}]")
    clear_dir(root.path(MANIFESTS_DIR))
    stop_static_pods(root, out)
    clear_dir(root.path(etcd_dir))
    out(f"[reset] Deleted contents of the etcd data directory: {etcd_dir}")
    out(f"[reset] Deleting contents of directories: [{KUBELET_DIR} {cert_dir}]")
    clear_dir(root.path(KUBELET_DIR))
    clear_dir(root.path(cert_dir))
    files = [f"/etc/kubernetes/{name}" for name in KUBECONFIGS]
    out(f"[reset] Deleting files: [{' '.join(files)}]")
    for real in files:
        root.path(real).unlink(missing_ok=True)
    out("\nThe reset process does not clean CNI configuration. To do so, you must remove /etc/cni/net.d\n\n"
        "The reset process does not reset or clean up iptables rules or IPVS tables.\n\n"
        "The reset process does not clean your kubeconfig files and you must remove them manually.\n"
        "Please, check the contents of the $HOME/.kube/config file.")


def _cert_dir_from_manifest(root: NodeRoot) -> str | None:
    ca_file = _flag_from_manifest(root, "kube-apiserver", "client-ca-file")
    return str(PurePosixPath(ca_file).parent) if ca_file else None
